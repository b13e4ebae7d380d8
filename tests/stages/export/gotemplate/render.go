// Renders an Ollama Modelfile TEMPLATE with Go's text/template (the engine Ollama uses) on conversations.
// stdin: {"template": "...", "conversations": [[{"role": "...", "content": "..."}, ...], ...]}
// stdout: a JSON list of the rendered prompts. Data shape as in Ollama's template.Values: .Messages with .Role and
// .Content, plus .System / .Prompt / .Response (empty here: the templates written by llmops use .Messages).
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Values struct {
	Messages []Message
	System   string
	Prompt   string
	Response string
}

func main() {
	var in struct {
		Template      string      `json:"template"`
		Conversations [][]Message `json:"conversations"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("modelfile").Parse(in.Template))
	out := []string{}
	for _, msgs := range in.Conversations {
		var b strings.Builder
		if err := tmpl.Execute(&b, Values{Messages: msgs}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

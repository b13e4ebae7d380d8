"""An Ollama ``Modelfile`` beside the GGUF: FROM, a TEMPLATE translated from the model's chat template, stops.

Why by family instead of a Jinja→Go compiler: chat templates are Jinja programs, Ollama's are Go templates, and
a literal translation of arbitrary Jinja is not possible. Almost every chat model uses one of a few formats, so the
Jinja template is *rendered* on probe conversations (with and without a system message, with history) and compared
with each known family's rendering; the family whose rendering is identical on every probe gives the Go template.
A model-specific default system prompt (SmolLM2 adds one when the conversation has none) is detected the same way
and written into the template. No match → no TEMPLATE line and a warning (Ollama then guesses from the GGUF).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

_S, _U, _A, _U2 = "SYS-7f3a", "USR-19c2", "ASST-4b8e", "USR2-d05c"
PROBES: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": _U}],
    [{"role": "system", "content": _S}, {"role": "user", "content": _U}],
    [{"role": "user", "content": _U}, {"role": "assistant", "content": _A}, {"role": "user", "content": _U2}],
    [{"role": "system", "content": _S}, {"role": "user", "content": _U}, {"role": "assistant", "content": _A},
     {"role": "user", "content": _U2}],
)


@dataclasses.dataclass
class Family:
    name: str
    render: Callable[[list[dict[str, str]], str | None], str]  # (messages, default system) -> prompt text
    go_template: Callable[[str | None], str]
    stops: tuple[str, ...]
    system_role: bool = True


def _turn_family(name: str, turn: str, end: str) -> Family:
    """A family whose every turn is ``turn`` (with ``{role}``) + content + ``end``, ending in an open assistant turn,
    and whose template inserts ``default_system`` as a first system turn when there is none (chatml, llama3). The
    Python rendering and the Go template are made from the same two strings."""

    def head(role: str) -> str:
        return turn.replace("{role}", role)

    def render(msgs: list[dict[str, str]], default_system: str | None) -> str:
        out = ""
        if default_system is not None and msgs[0]["role"] != "system":
            out += head("system") + default_system + end
        for m in msgs:
            out += head(m["role"]) + m["content"] + end
        return out + head("assistant")

    def go_template(default_system: str | None) -> str:
        default = ""
        if default_system is not None:
            default = '{{- if and (eq $i 0) (ne $m.Role "system") }}' + head("system") + default_system + end + \
                "{{ end }}"
        return ("{{- range $i, $m := .Messages }}" + default + head("{{ $m.Role }}") + "{{ $m.Content }}" + end +
                "{{ end }}" + head("assistant"))

    return Family(name, render, go_template, (end.strip(),))


def _zephyr(msgs: list[dict[str, str]], default_system: str | None) -> str:
    out = ""
    for m in msgs:
        out += f"<|{m['role']}|>\n{m['content']}</s>\n"
    return out + "<|assistant|>\n"


def _zephyr_go(default_system: str | None) -> str:
    return "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}</s>\n{{ end }}<|assistant|>\n"


def _gemma(msgs: list[dict[str, str]], default_system: str | None) -> str:
    out = ""
    for m in msgs:
        role = "model" if m["role"] == "assistant" else m["role"]
        out += f"<start_of_turn>{role}\n{m['content']}<end_of_turn>\n"
    return out + "<start_of_turn>model\n"


def _gemma_go(default_system: str | None) -> str:
    return ('{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}{{ .Role }}{{ end }}\n'
            "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n")


FAMILIES = (
    _turn_family("chatml", "<|im_start|>{role}\n", "<|im_end|>\n"),
    _turn_family("llama3", "<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>"),
    Family("zephyr", _zephyr, _zephyr_go, ("</s>",)),
    Family("gemma", _gemma, _gemma_go, ("<end_of_turn>",), system_role=False),
)


def render_jinja(template: str, messages: list[dict[str, str]], *, bos: str = "", eos: str = "") -> str:
    """Render a chat template the way transformers and llama-cpp-python do (sandboxed Jinja, ``raise_exception``)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str) -> None:
        raise ValueError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, bos_token=bos, eos_token=eos,
                                            add_generation_prompt=True)


def detect_family(template: str, *, bos: str = "", eos: str = "") -> tuple[Family | None, str | None]:
    """(family, default system prompt) whose rendering equals the Jinja template's on every probe, or (None, None)."""
    rendered = []
    for msgs in PROBES:
        try:
            text = render_jinja(template, msgs, bos=bos, eos=eos)
        except Exception:  # noqa: BLE001 - e.g. a template that refuses system messages
            text = None
        if text is not None and bos and "bos_token" in template and text.startswith(bos):
            text = text[len(bos):]  # llama.cpp adds BOS itself when the GGUF says so
        rendered.append(text)
    for fam in FAMILIES:
        default = _default_system(fam, rendered[0])
        ok = True
        for msgs, text in zip(PROBES, rendered):
            if not fam.system_role and msgs[0]["role"] == "system":
                continue
            if text is None or fam.render(msgs, default) != text:
                ok = False
                break
        if ok:
            return fam, default
    return None, None


def _default_system(fam: Family, rendered_user_only: str | None) -> str | None:
    """The system prompt a template adds when the conversation has none (the text between the family's system
    prefix and suffix at the start of a user-only rendering)."""
    if rendered_user_only is None or not fam.system_role:
        return None
    marker = fam.render([{"role": "system", "content": "\x00"}], None)
    head, _, tail = marker.partition("\x00")
    tail = tail[: len(tail) - len(fam.render([], None))] if fam.render([], None) and tail.endswith(fam.render([], None)) else tail
    if rendered_user_only.startswith(head):
        end = rendered_user_only.find(tail, len(head))
        if end > 0:
            return rendered_user_only[len(head):end]
    return None


@dataclasses.dataclass
class ModelfileResult:
    text: str
    family: str | None
    default_system: str | None
    stops: list[str]
    warnings: list[str]


def build_modelfile(gguf_name: str, *, chat_template: str | None, bos: str = "", eos: str = "",
                    generation_config: dict[str, Any] | None = None, context_length: int | None = None,
                    extra_stops: list[str] | None = None) -> ModelfileResult:
    """The Modelfile text for ``ollama create NAME -f Modelfile`` run in the folder that holds ``gguf_name``."""
    warnings: list[str] = []
    fam, default = detect_family(chat_template, bos=bos, eos=eos) if chat_template else (None, None)
    lines = ["# Written by llmops-jupyter: `ollama create <name> -f Modelfile` in this folder.", f"FROM ./{gguf_name}"]
    stops: list[str] = []
    if fam is not None:
        lines.append(f'TEMPLATE """{fam.go_template(default)}"""')
        stops.extend(fam.stops)
    elif chat_template:
        warnings.append("the chat template matches no known family (chatml, llama3, zephyr, gemma): no TEMPLATE "
                        "written; Ollama will guess it from the GGUF's tokenizer.chat_template")
    else:
        warnings.append("the model has no chat template: no TEMPLATE written (raw prompts only)")
    for s in [eos, *(extra_stops or [])]:
        if s and s not in stops:
            stops.append(s)
    for s in stops:
        lines.append(f"PARAMETER stop {json.dumps(s)}")
    gen = generation_config or {}
    if gen.get("do_sample"):
        for key, name in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k")):
            if gen.get(key) is not None:
                lines.append(f"PARAMETER {name} {gen[key]}")
    else:
        lines.append("PARAMETER temperature 0")  # the model was evaluated greedily
    if gen.get("repetition_penalty") not in (None, 1.0):
        lines.append(f"PARAMETER repeat_penalty {gen['repetition_penalty']}")
    if context_length:
        lines.append(f"PARAMETER num_ctx {min(int(context_length), 8192)}")
    return ModelfileResult("\n".join(lines) + "\n", fam.name if fam else None, default, stops, warnings)


def parse_modelfile(text: str) -> dict[str, Any]:
    """FROM, TEMPLATE and PARAMETERs of a Modelfile (for tests and the report; not a full Ollama parser)."""
    out: dict[str, Any] = {"parameters": []}
    rest = text
    while rest:
        line, _, rest = rest.partition("\n")
        if line.startswith("#") or not line.strip():
            continue
        word, _, arg = line.partition(" ")
        if arg.startswith('"""'):
            body = arg[3:]
            while '"""' not in body:
                nxt, _, rest = rest.partition("\n")
                body += "\n" + nxt
            arg = body[: body.index('"""')]
        if word == "PARAMETER":
            name, _, value = arg.partition(" ")
            out["parameters"].append((name, json.loads(value) if value.startswith('"') else value))
        else:
            out[word] = arg
    return out


def write_modelfile(folder: Path, result: ModelfileResult) -> Path:
    path = folder / "Modelfile"
    path.write_text(result.text)
    return path

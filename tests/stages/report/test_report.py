"""`%llmops report`: one offline HTML page comparing eval runs (base vs fine-tuned vs quantized), with lineage."""

from __future__ import annotations

import pytest

from llmops_jupyter.core.errors import ConfigError


def test_report_compares_labelled_eval_runs(shell, registry, tiny_dataset, tiny_model, tmp_path):
    common = f"--data {tiny_dataset.hash} --limit 3 --metrics exact_match,rougeL,ppl --max-new-tokens 4"
    base = shell.run_line_magic("llmops", f"eval --model tiny-llama {common}")
    other = shell.run_line_magic("llmops", f"eval --model {tiny_model} {common}")
    out = tmp_path / "r.html"
    rep = shell.run_line_magic("llmops", f"report --evals base={base.run_id} candidate={other.run_id} "
                                         f"--title 'Tiny report' --out {out}")
    assert rep.status == "finished"
    page = out.read_text()
    assert "<h1>Tiny report</h1>" in page and "Held-out metrics" in page
    assert "Δ candidate − base" in page and "Held-out examples" in page and "exact_match" in page and "rougeL" in page
    assert "Plotly.newPlot" in page and "<script src=\"https://cdn" not in page and len(page) > 1_000_000  # inlined
    art = registry.get_artifact(f"{rep.run_id}:report")
    assert (art.path / "report.html").read_text() == page
    upstream = {n["hash"] for n in registry.lineage(art, "up")["nodes"]}
    assert {registry.get_artifact(f"{r.run_id}:eval-results").hash for r in (base, other)} <= upstream
    metrics = registry.metrics(rep.run_id)
    assert metrics["base/ppl"] == pytest.approx(base.metrics["ppl"])
    assert metrics["candidate/ppl"] == pytest.approx(other.metrics["ppl"])
    assert "Tiny report: held-out metrics" in str(rep.outputs["table"])


def test_report_rejects_bad_eval_items():
    from llmops_jupyter.stages.report.stage import ReportConfig

    with pytest.raises(ConfigError, match="evals"):
        ReportConfig(evals=[])
    with pytest.raises(ConfigError, match="LABEL=RUN"):
        ReportConfig(evals=["=eval-1"])
    assert ReportConfig(evals=["a=eval-1", "eval-2"]).parsed_evals() == [("a", "eval-1"), (None, "eval-2")]

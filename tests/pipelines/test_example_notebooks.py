"""The example notebooks execute end to end through papermill on the tiny model (parameter overrides only).

Notebook 02 (QLoRA → merge → GPTQ → serve → monitor → report) is exercised on the real small model by
``make demo``; the others run here so they never rot. Assertions read the executed notebooks' saved outputs:
what a person opening them would see.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

pytest.importorskip("papermill")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "example-notebooks"
TINY = {"model": "tiny-llama", "eval_limit": 8, "max_new_tokens": 8}


def outputs(nb) -> tuple[str, list[dict]]:
    """All text/HTML of the saved outputs, and the plotly figures (JSON) among them."""
    texts, figures = [], []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                texts.append(out["text"])
            data = out.get("data", {})
            texts += [str(data.get(k, "")) for k in ("text/plain", "text/html")]
            if "application/vnd.plotly.v1+json" in data:
                figures.append(data["application/vnd.plotly.v1+json"])
    return "\n".join(texts), figures


def titles(figures: list[dict]) -> list[str]:
    out = []
    for f in figures:
        t = (f.get("layout") or {}).get("title")
        out.append(t.get("text", "") if isinstance(t, dict) else str(t or ""))
    return out


def run_notebook(name: str, params: dict, tmp_path: Path):
    """Execute as a recorded pipeline run (papermill, a real kernel that inherits PYTHONPATH and LLMOPS_HOME)."""
    from llmops_jupyter.pipelines import run_pipeline

    out = tmp_path / name
    res = run_pipeline(str(NOTEBOOKS / name), params, output=str(out), cwd=str(tmp_path), cache=False)
    status = res["status"] if isinstance(res, dict) else str(res.status)
    assert status == "finished", res
    return nbformat.read(out, as_version=4)


def test_every_example_notebook_is_parameterised_and_explained():
    from llmops_jupyter.pipelines.params import notebook_parameters, parameters_cell_index

    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["01_quickstart.ipynb", "02_qlora_merge_gptq_serve.ipynb", "03_sweep_and_compare.ipynb",
                     "04_human_evaluation.ipynb"]
    for name in names:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert parameters_cell_index(nb) >= 0, name
        params = notebook_parameters(nb, name)
        assert params["model"].default == "smollm2-135m", name  # real model by default; CI overrides it
        assert sum(c.cell_type == "markdown" for c in nb.cells) >= 4, f"{name}: explain each stage"
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name}: saved with outputs"


def test_quickstart_runs_on_the_tiny_model(home, tmp_path, tiny_model):
    nb = run_notebook("01_quickstart.ipynb", {**TINY, "max_steps": 10, "batch_size": 4, "seq_len": 96}, tmp_path)
    text, figures = outputs(nb)
    assert "Data report" in text and "Eval summary (8 examples)" in text
    assert any("Evaluation summary" in t for t in titles(figures)), titles(figures)  # eval figure saved
    assert "fine-tuned − base" in text  # the comparison table
    assert "finetune" in text and "lineage" in text.lower()


def test_sweep_notebook_compares_variants(home, tmp_path, tiny_model):
    params = {**TINY, "template": str(ROOT / "templates" / "finetune.ipynb"), "lr_grid": [1e-4, 1e-3],
              "rank_grid": [8], "max_steps": 4, "parallel": 1}
    nb = run_notebook("03_sweep_and_compare.ipynb", params, tmp_path)
    text, figures = outputs(nb)
    assert "Sweep sweep-" in text and "2 variants" in text and "best eval_loss" in text
    assert "best variant" in text and "Eval summary (8 examples)" in text
    assert len(figures) >= 2  # parallel coordinates + metric vs parameter, and the eval summary


def test_human_evaluation_notebook_stores_ratings(home, tmp_path, tiny_model):
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.stages.eval import store as evalstore

    nb = run_notebook("04_human_evaluation.ipynb", {**TINY, "max_steps": 5, "auto_rate": True}, tmp_path)
    text, _ = outputs(nb)
    assert "CompareView" in text or "Example 1 /" in text
    rows = evalstore.ratings(Registry(home))
    assert len({r["example_id"] for r in rows}) == 8 and len(rows) == 16  # 8 examples × 2 versions
    assert all(r["preferred_model_ref"] for r in rows)
    assert all(r["thumbs"] == 1 for r in rows if r["model_ref"] == r["preferred_model_ref"])
    assert 1 <= len(evalstore.preference_pairs(Registry(home))) <= 8  # identical outputs make no pair
    assert "thumbs" in text


QLORA_TINY = {**TINY, "max_steps": 10, "seq_len": 96, "group_size": 32, "calibration_samples": 16, "requests": 2}


def test_lifecycle_notebook_runs_on_the_tiny_model(home, tmp_path, tiny_model):
    """02 end to end (QLoRA → merge → GPTQ → serve → openai → monitor → report); the tiny model learns nothing in
    10 steps, so the gates are relaxed here (``make demo`` runs the real gates on SmolLM2)."""
    params = {**QLORA_TINY, "finetune_gate": "exact_match>=-1", "gptq_gate": "exact_match>=-1"}
    nb = run_notebook("02_qlora_merge_gptq_serve.ipynb", params, tmp_path)
    text, figures = outputs(nb)
    assert "Regression gate (paired bootstrap)" in text and "FAIL" not in text
    assert "Merged model" in text or "merge" in text.lower()
    assert text.count("   model: ") == 2  # answers through the openai client
    report = tmp_path / "demo_report.html"
    page = report.read_text()
    assert "Held-out metrics" in page and "Quality gates" in page and "Quantization (quantize-" in page
    for label in ("base", "fine-tuned", "gptq"):
        assert f"<th>{label}</th>" in page
    assert any("Evaluation summary" in t for t in titles(figures))


def test_lifecycle_notebook_fails_when_fine_tuning_does_not_beat_the_base(home, tmp_path, tiny_model):
    from llmops_jupyter.pipelines import run_pipeline

    params = {**QLORA_TINY, "finetune_gate": "exact_match>=0.5"}
    res = run_pipeline(str(NOTEBOOKS / "02_qlora_merge_gptq_serve.ipynb"), params, output=str(tmp_path / "o.ipynb"),
                       cwd=str(tmp_path), cache=False)
    assert res["status"] == "failed" and "GateError" in res["error"] and "exact_match>=0.5" in res["error"]
    assert not (tmp_path / "demo_report.html").exists()  # nothing downstream of the failed gate ran

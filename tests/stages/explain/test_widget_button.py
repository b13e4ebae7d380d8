"""The "explain" button of the eval rating/compare widget (``%llmops rate``): it explains the example on screen —
the first version's answer to the prompt it was given, contrasted with the second version — as a recorded run."""

from __future__ import annotations

import json

import pytest

from llmops_jupyter.core.runner import Runner


@pytest.fixture()
def two_version_eval(registry, tiny_model, tiny_dataset, model_cache):
    from llmops_jupyter.models.tiny import build_tiny_model

    other = build_tiny_model(model_cache / "tiny-llama-seed3", seed=3)
    return Runner(registry).run("eval", model=[str(tiny_model), str(other)], data=tiny_dataset.hash, limit=2,
                                metrics=["exact_match"], max_new_tokens=4)


def test_the_explain_button_explains_the_example_on_screen(registry, two_version_eval):
    from llmops_jupyter.stages.eval.rate import CompareView

    view = CompareView(registry, [two_version_eval.run_id])
    view.next_button.click()
    row = view._tables[0][view.example_id]
    view.explain_button.click()
    res = view.last_explanation
    assert res is not None and res.status == "finished", view.status.value
    rec = res.outputs["explanation"]
    assert rec["prompt_text"] == row["prompt"]  # the rendered prompt the version was given, not re-templated
    assert rec["target"] == row["output"] or (not row["output"].strip() and rec["generated"])
    assert [m["ref"] for m in rec["models"]] == [v["model_ref"] for v in view.versions]
    assert rec["contrast"] is not None and len(rec["contrast"]) == len(rec["answer_ids"])
    assert f"run {res.run_id}" in view.status.value
    assert registry.get_run(res.run_id)["stage"] == "explain"


@pytest.mark.slow
def test_the_explain_button_in_a_real_kernel_keeps_its_pictures(tmp_path, tiny_model):
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in (
        "%load_ext llmops_jupyter",
        "from llmops_jupyter.testing import tiny_records\nrecs = tiny_records(8)\n"
        f"d = get_ipython().run_line_magic('llmops', 'data $recs --tokenizer {tiny_model} --eval-fraction 0.5')",
        f"e = get_ipython().run_line_magic('llmops', 'eval --model {tiny_model} --data data@latest --limit 1 "
        "--metrics exact_match --max-new-tokens 4')",
        "view = get_ipython().run_line_magic('llmops', 'rate eval@latest')\nview",
        "r = view.explain()\nprint(r.status, r.run_id)")]
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(nb, str(tmp_path / "saved.ipynb"))
    saved = nbformat.read(str(tmp_path / "saved.ipynb"), as_version=4)
    assert "finished" in "".join(o.get("text", "") for o in saved.cells[4]["outputs"])
    state = saved.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    captured = [m["state"].get("outputs", []) for m in state.values() if m["model_name"] == "OutputModel"]
    text = json.dumps(captured)
    assert "<span title=" in text and "application/vnd.plotly.v1+json" in text  # token view + lens under the button

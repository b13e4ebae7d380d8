"""The "explain" button of the eval rating/compare widget (``%llmops rate``): it explains the example on screen —
the first version's answer to the prompt it was given, contrasted with the second version — as a recorded run."""

from __future__ import annotations

import json

import pytest

from llmops_jupyter.core.runner import Runner
from llmops_jupyter.testing import sliced_kernel_manager


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


def _saved_notebook(tmp_path, tiny_model, cells):
    """``cells`` run through a real kernel after ``%load_ext`` and a tiny dataset (cells 0 and 1), saved with its
    widget state and read back."""
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in (
        "%load_ext llmops_jupyter",
        "from llmops_jupyter.testing import tiny_records\nrecs = tiny_records(8)\n"
        f"d = get_ipython().run_line_magic('llmops', 'data $recs --tokenizer {tiny_model} --eval-fraction 0.5')",
        *cells)]
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}},
                            kernel_manager_class=sliced_kernel_manager()).execute()
    nbformat.write(nb, str(tmp_path / "saved.ipynb"))
    return nbformat.read(str(tmp_path / "saved.ipynb"), as_version=4)


@pytest.mark.slow
def test_the_explain_button_in_a_real_kernel_keeps_its_pictures(tmp_path, tiny_model):
    saved = _saved_notebook(tmp_path, tiny_model, (
        f"e = get_ipython().run_line_magic('llmops', 'eval --model {tiny_model} --data data@latest --limit 1 "
        "--metrics exact_match --max-new-tokens 4')",
        "view = get_ipython().run_line_magic('llmops', 'rate eval@latest')\nview",
        "r = view.explain()\nprint(r.status, r.run_id)"))
    assert "finished" in "".join(o.get("text", "") for o in saved.cells[4]["outputs"])
    state = saved.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    captured = [m["state"].get("outputs", []) for m in state.values() if m["model_name"] == "OutputModel"]
    text = json.dumps(captured)
    assert "<span title=" in text and "application/vnd.plotly.v1+json" in text  # token view + lens under the button


def test_every_eval_example_has_an_explain_button_that_contrasts_the_two_versions(registry, two_version_eval):
    """The eval cell's examples (``outputs['examples']``): one button per example on the page; a click explains
    that example — the first version's answer contrasted with the second (``--model A --model B``)."""
    from llmops_jupyter.stages.eval import store as evalstore

    view = two_version_eval.outputs["examples"]
    assert len(view) == 2 and [v["model_ref"] for v in view.versions] == \
        [v["model_ref"] for v in evalstore.versions(registry, two_version_eval.run_id)]
    rows = view.widget.children[1].children  # built on first display
    assert len(rows) == 2 and set(view.buttons) == {0, 1}
    second = view.buttons[1]
    assert second.button in rows[1].children[1].children and second.out is rows[1].children[2]
    second.button.click()
    res = second.last
    assert res is not None and res.status == "finished", second.status.value
    row = evalstore.load_examples(registry, two_version_eval.run_id)[1]
    rec = res.outputs["explanation"]
    assert rec["prompt_text"] == row["prompt"]
    assert rec["target"] == row["output"] or (not row["output"].strip() and rec["generated"])
    assert [m["ref"] for m in rec["models"]] == [v["model_ref"] for v in view.versions]
    assert rec["contrast"] is not None and len(rec["contrast"]) == len(rec["answer_ids"])
    assert "example 2" in second.status.value and f"run {res.run_id}" in second.status.value
    assert view.buttons[0].last is None and view.buttons[0].status.value == ""  # only the clicked example ran
    assert registry.get_run(res.run_id)["stage"] == "explain"


def test_eval_examples_page_and_a_baseline_run_is_the_contrast(registry, tiny_model, tiny_dataset, model_cache):
    """Five examples a page; with ``--baseline RUN`` the candidate's answer is read by the baseline's version."""
    from llmops_jupyter.models.tiny import build_tiny_model

    runner = Runner(registry)
    opts = {"data": tiny_dataset.hash, "limit": 6, "metrics": ["exact_match"], "max_new_tokens": 2}
    base = runner.run("eval", model=[str(tiny_model)], **opts)
    other = build_tiny_model(model_cache / "tiny-llama-seed4", seed=4)
    cand = runner.run("eval", model=[str(other)], baseline=base.run_id, **opts)
    view = cand.outputs["examples"]
    assert [(v["run_id"], v["model_ref"]) for v in view.versions] == [(cand.run_id, str(other)),
                                                                        (base.run_id, str(tiny_model))]
    view.widget  # noqa: B018
    assert sorted(view.buttons) == [0, 1, 2, 3, 4] and view.prev_button.disabled
    view.next_button.click()
    assert sorted(view.buttons) == [5] and view.next_button.disabled
    res = view.explain(2)  # an example of another page: shown first, then explained under its button
    assert view.page == 0 and view.buttons[2].last is res and res.status == "finished"
    assert [m["ref"] for m in res.outputs["explanation"]["models"]] == [str(other), str(tiny_model)]


def test_terminals_skip_the_examples_widget(registry, two_version_eval, capsys):
    from llmops_jupyter.core.display import print_text

    print_text(two_version_eval.outputs["examples"])
    assert capsys.readouterr().out == ""
    assert "2 examples, 2 version(s)" in repr(two_version_eval.outputs["examples"])
    # a notebook saved without widget state (papermill) shows that line, not the repr of every nested widget
    bundle = two_version_eval.outputs["examples"]._repr_mimebundle_()
    assert bundle["text/plain"] == repr(two_version_eval.outputs["examples"])
    assert "application/vnd.jupyter.widget-view+json" in bundle


@pytest.mark.slow
def test_an_eval_cells_explain_button_in_a_real_kernel_keeps_its_pictures(tmp_path, tiny_model):
    """The eval magic's cell shows its examples widget; a click on an example's button puts the explain pictures
    into that example's Output widget, and the notebook saved with its widget state still has them."""
    saved = _saved_notebook(tmp_path, tiny_model, (
        f"e = get_ipython().run_line_magic('llmops', 'eval --model {tiny_model} --model {tiny_model} "
        "--data data@latest --limit 2 --metrics exact_match --max-new-tokens 4')",
        "b = e.outputs['examples'].buttons[1]\nb.button.click()\nprint(b.last.status, b.last.run_id, b.out.model_id)",
        f"e1 = get_ipython().run_line_magic('llmops', 'eval --model {tiny_model} --data data@latest --limit 2 "
        "--metrics exact_match --max-new-tokens 4')\n"
        "dv = get_ipython().run_line_magic('llmops', f'diff {e.run_id} {e1.run_id}')\ndv",
        "c = dv.examples.buttons[0]\nc.button.click()\nprint(c.last.status, c.last.run_id, c.out.model_id)"))
    shown = [o for o in saved.cells[2]["outputs"] if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert shown, saved.cells[2]["outputs"]  # the examples widget is in the eval cell's output
    status, run_id, out_id = "".join(o.get("text", "") for o in saved.cells[3]["outputs"]).split()
    assert status == "finished" and run_id.startswith("explain")
    state = saved.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    pictures = json.dumps(state[out_id]["state"]["outputs"])  # the clicked example's own Output widget
    assert "<span title=" in pictures and "application/vnd.plotly.v1+json" in pictures
    # the diff of two eval runs (the compare view) shows their shared examples, and its button's pictures stay too
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in saved.cells[4]["outputs"])
    status, diff_run, diff_out = "".join(o.get("text", "") for o in saved.cells[5]["outputs"]).split()
    assert status == "finished" and diff_run != run_id
    assert "<span title=" in json.dumps(state[diff_out]["state"]["outputs"])
    others = [m["state"].get("outputs") for k, m in state.items()
              if m["model_name"] == "OutputModel" and k not in (out_id, diff_out)]
    # the examples not clicked keep an empty output area: one of each explained view, both of e1's own cell
    assert len(others) == 4 and not any(others)


def test_explain_gets_the_models_eval_was_given(shell, registry, two_version_eval, tiny_model, tiny_dataset):
    """Not eval's version refs: a model given twice is ``A#2``, prompt versions of one model are ``qa@1``/``qa@2``."""
    from llmops_jupyter.stages.eval import store as evalstore
    from llmops_jupyter.stages.eval.explain_button import explain_models

    twice = Runner(registry).run("eval", model=[str(tiny_model), str(tiny_model)], data=tiny_dataset.hash, limit=1,
                                 metrics=["exact_match"], max_new_tokens=2)
    versions = evalstore.versions(registry, twice.run_id)
    assert [v["model_ref"] for v in versions] == [str(tiny_model), f"{str(tiny_model)}#2"]
    assert explain_models(registry, versions) == [str(tiny_model), str(tiny_model)]
    shell.run_cell_magic("llmops", "prompt qa", "system: You are terse.\nuser: {question}")
    shell.run_cell_magic("llmops", "prompt qa", "system: Answer in one word.\nuser: Q: {question}")
    prompts = shell.run_line_magic("llmops", f"eval --model {tiny_model} --data {tiny_dataset.hash} --prompt qa@1 "
                                             "--prompt qa@2 --limit 1 --max-new-tokens 2 --metrics exact_match")
    versions = evalstore.versions(registry, prompts.run_id)
    assert [v["model_ref"] for v in versions] == ["qa@1", "qa@2"]
    assert explain_models(registry, versions) == [str(tiny_model)]  # one model on two prompts: no contrast
    view = prompts.outputs["examples"]
    res = view.explain(0)
    assert res is not None and res.status == "finished", view.buttons[0].status.value
    rec = res.outputs["explanation"]
    assert rec["prompt_text"] == evalstore.load_examples(registry, prompts.run_id)[0]["prompt"]
    assert "You are terse." in rec["prompt_text"] and rec["contrast"] is None
def test_diff_of_two_eval_runs_explains_a_shared_example_as_the_contrast_of_their_versions(
        registry, tiny_model, tiny_dataset, model_cache):
    from llmops_jupyter.models.tiny import build_tiny_model
    from llmops_jupyter.stages.eval import store as evalstore
    from llmops_jupyter.views.diff import diff_runs

    runner = Runner(registry)
    other = build_tiny_model(model_cache / "tiny-llama-seed5", seed=5)
    opts = {"data": tiny_dataset.hash, "metrics": ["exact_match"], "max_new_tokens": 2}
    a = runner.run("eval", model=[str(tiny_model)], limit=3, **opts)
    b = runner.run("eval", model=[str(other)], limit=2, **opts)
    diff = diff_runs(registry, a.run_id, b.run_id)
    view = diff.examples
    assert view is diff.examples  # built once per diff (displaying it and clicking in it use the same widgets)
    assert [(v["run_id"], v["model_ref"]) for v in view.versions] == [(a.run_id, str(tiny_model)),
                                                                        (b.run_id, str(other))]
    assert len(view) == 2  # the examples both runs have
    res = view.explain(1)
    rec = res.outputs["explanation"]
    assert [m["ref"] for m in rec["models"]] == [str(tiny_model), str(other)]
    assert rec["prompt_text"] == evalstore.load_examples(registry, a.run_id)[1]["prompt"]
    assert diff_runs(registry, a.run_id, res.run_id).examples is None  # not two eval runs: no examples view

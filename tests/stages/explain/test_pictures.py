"""The explain pictures survive where users keep them: a notebook saved after a real kernel ran the magic (static
HTML token view + plotly JSON, no widget state needed) and the lifecycle HTML report."""

from __future__ import annotations

import pytest

from llmops_jupyter.core.runner import Runner
from llmops_jupyter.testing import sliced_kernel_manager


def test_report_shows_an_explain_run(registry, tiny_model, tiny_dataset, tmp_path):
    runner = Runner(registry)
    ev = runner.run("eval", model=[str(tiny_model)], data=tiny_dataset.hash, limit=2, metrics=["exact_match"],
                    max_new_tokens=4)
    ex = runner.run("explain", model=[str(tiny_model), str(tiny_model)], prompt="two plus two", target="four")
    out = tmp_path / "report.html"
    runner.run("report", evals=[ev.run_id], runs=[ex.run_id], out=str(out), inline_plotlyjs=False, examples=0)
    page = out.read_text()
    assert f"Explanation ({ex.run_id})" in page
    assert "per-token logprob difference" in page and "<span title=" in page  # the token views, as static HTML
    assert f"logit lens ({ex.run_id})" in page and "Logit lens" in page  # the plotly figure (title in its JSON)
    assert f"contrast ({ex.run_id})" in page


@pytest.mark.slow
def test_pictures_survive_in_the_saved_notebook(tmp_path, tiny_model):
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in (
        "%load_ext llmops_jupyter",
        f"r = get_ipython().run_line_magic('llmops', \"explain --model {tiny_model} --model {tiny_model} "
        "--prompt 'two plus two' --target four\")")]
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}},
                            kernel_manager_class=sliced_kernel_manager()).execute()
    nbformat.write(nb, str(tmp_path / "saved.ipynb"))
    saved = nbformat.read(str(tmp_path / "saved.ipynb"), as_version=4)
    outs = [o for o in saved.cells[1]["outputs"] if o.get("output_type") == "display_data"]
    html = [o["data"]["text/html"] for o in outs if "text/html" in o.get("data", {})]
    assert any("<span title=" in h and "per-token logprob difference" in h for h in html)  # static, no JS needed
    figs = [o["data"]["application/vnd.plotly.v1+json"] for o in outs
            if "application/vnd.plotly.v1+json" in o.get("data", {})]
    titles = [f["layout"]["title"]["text"] for f in figs]
    assert any(t.startswith("Logit lens") for t in titles) and any("logprob difference" in t for t in titles)
    lens = next(f for f in figs if f["layout"]["title"]["text"].startswith("Logit lens"))
    assert lens["data"][0]["type"] == "heatmap" and len(lens["data"][0]["y"]) == 3  # emb + 2 layers

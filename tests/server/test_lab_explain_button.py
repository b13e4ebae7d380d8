"""The explain button of an eval cell's examples in JupyterLab in a real Chromium: the cell shows the examples
widget, a click on an example's "explain" runs the explain stage in the kernel and its pictures (the token view,
the logit lens) render under that button.

Needs Debian's ``chromium`` and Python Playwright (as test_lab_browser.py). Screenshots: ``test-artifacts/lab/``.
"""

from __future__ import annotations

import pytest
from lab_cells import SHOTS, chromium, open_notebook, run_first_cell

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def write_notebook(path, tiny_model, home) -> None:
    """One cell: data and an eval of two versions in a registry of its own (``home``): the session's server registry
    is the other tests' fixture (its lineage graphs would gain this test's runs)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(
        f"import os\nos.environ['LLMOPS_HOME'] = {str(home)!r}\n"
        "%load_ext llmops_jupyter\n"
        "from llmops_jupyter.testing import tiny_records\nrecs = tiny_records(8)\n"
        f"%llmops data $recs --tokenizer {tiny_model} --eval-fraction 0.5\n"
        f"%llmops eval --model {tiny_model} --model {tiny_model} --data data@latest --limit 2 --metrics exact_match "
        "--max-new-tokens 4")]
    nbformat.write(nb, str(path))


def test_eval_example_explain_button_in_lab(lab_server, tiny_model, tmp_path):
    from llmops_jupyter.registry import Registry

    home = tmp_path / ".llmops"
    write_notebook(lab_server.root / "explain-button.ipynb", tiny_model, home)
    with chromium() as (sync_api, browser):
        expect = sync_api.expect
        page = open_notebook(browser, lab_server, "explain-button.ipynb")
        examples = page.locator(".jp-NotebookPanel:visible .llmops-eval-examples .llmops-eval-example")
        run_first_cell(sync_api, page, "explain-button.ipynb", examples, wait_ms=120_000, shot="30-eval-waiting")
        expect(examples).to_have_count(2, timeout=60_000)
        second = examples.nth(1)
        expect(second).to_contain_text("#2")
        page.screenshot(path=str(SHOTS / "30-eval-examples.png"))
        expect(second.locator(".llmops-explain-output span[title]")).to_have_count(0)  # nothing before the click
        second.locator("button.llmops-explain-button").click()
        # the kernel runs the explain stage; its token view (static HTML: one span per answer token, the value in
        # its title) and its logit-lens heatmap (plotly) render in this example's output area
        tokens = second.locator(".llmops-explain-output span[title]")
        tokens.first.wait_for(timeout=180_000)
        expect(second).to_contain_text("explained example 2 (run explain-", timeout=60_000)
        expect(second.locator(".llmops-explain-output")).to_contain_text("per-token logprob difference")
        second.locator(".llmops-explain-output .js-plotly-plot").first.wait_for(timeout=60_000)
        first = examples.nth(0)
        expect(first.locator(".llmops-explain-output span[title]")).to_have_count(0)  # only the clicked example
        second.locator(".llmops-explain-output").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "31-eval-example-explained.png"))
    assert [r["stage"] for r in Registry(home).list_runs()] == ["explain", "eval", "data"]  # all in its own registry

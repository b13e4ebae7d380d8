"""``%llmops plan --form`` in JupyterLab in a real Chromium: the form renders, a bad value shows the magic's
message beside its field, Run shows the equivalent line and the command's output.

Needs Debian's ``chromium`` and Python Playwright (as test_lab_browser.py). Screenshots: ``test-artifacts/lab/``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lab_cells import SHOTS, chromium, open_notebook, run_first_cell

pytestmark = [pytest.mark.browser, pytest.mark.slow]

EQUIVALENT = "Equivalent cell: %llmops plan --model Llama-3.1-8B --rank 8"


def write_notebook(path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("%load_ext llmops_jupyter\n%llmops plan --form")]
    nbformat.write(nb, str(path))


def test_plan_form_in_lab(lab_server):
    write_notebook(lab_server.root / "forms.ipynb")
    with chromium() as (sync_api, browser):
        page = open_notebook(browser, lab_server, "forms.ipynb")
        form = page.locator(".llmops-form")
        run_first_cell(sync_api, page, "forms.ipynb", form, shot="20-form-waiting")
        model = page.locator(".llmops-field-model input")
        model.fill("Llama-3.1-8B")
        rank = page.locator(".llmops-field-rank input")
        rank.fill("0")
        error = page.locator(".llmops-field-rank .llmops-form-error")
        page.wait_for_function("el => el.textContent.includes('--rank must be >= 1')", arg=error.element_handle(),
                               timeout=30_000)
        assert "plan: --rank must be >= 1 and <= 4096 (got 0)" in error.inner_text()
        page.screenshot(path=str(SHOTS / "20-form-invalid.png"))
        rank.fill("8")
        page.wait_for_function("el => el.textContent.trim() === ''", arg=error.element_handle(), timeout=30_000)
        page.locator("button.llmops-form-run").click()
        out = page.locator(".llmops-form .jp-OutputArea-output")
        # the line, then the plan itself: two outputs that arrive one after the other, so wait for both (the
        # count right after the first appeared was 1 on a loaded machine)
        sync_api.expect(out.filter(has_text=EQUIVALENT)).to_have_count(1, timeout=60_000)
        sync_api.expect(out.filter(has_text="Llama-3.1-8B: 8.03B params")).to_have_count(1, timeout=60_000)
        texts = out.all_inner_texts()
        line = next(i for i, t in enumerate(texts) if EQUIVALENT in t)
        assert line < next(i for i, t in enumerate(texts) if "8.03B params" in t), texts
        # the Lab extension put the exact line into a new cell below the form's cell
        page.wait_for_function(
            "() => [...document.querySelectorAll('.jp-NotebookPanel .jp-Cell .jp-InputArea-editor')]"
            ".some(e => e.textContent.includes('%llmops plan --model Llama-3.1-8B --rank 8'))", timeout=30_000)
        editors = page.locator(".jp-NotebookPanel .jp-Cell .jp-InputArea-editor").all_inner_texts()
        assert [e.strip() for e in editors].count("%llmops plan --model Llama-3.1-8B --rank 8") == 1, editors
        page.screenshot(path=str(SHOTS / "21-form-run.png"))

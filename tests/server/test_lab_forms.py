"""``%llmops plan --form`` in JupyterLab in a real Chromium: the form renders, a bad value shows the magic's
message beside its field, Run shows the equivalent line and the command's output.

Needs Debian's ``chromium`` and Python Playwright (as test_lab_browser.py). Screenshots: ``test-artifacts/lab/``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "lab"
EQUIVALENT = "Equivalent cell: %llmops plan --model Llama-3.1-8B --rank 8"
# The Lab app is exposed as window.jupyterapp (the server runs with --LabApp.expose_app_in_browser).
KERNEL_IDLE = """path => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const ctx = w && w.sessionContext;
  return !!(ctx && w.context && w.context.path === path && w.context.isReady && ctx.isReady
            && ctx.session && ctx.session.kernel && ctx.session.kernel.status === 'idle'
            && w.content && w.content.activeCell && w.content.activeCell.editor);
}"""
EDITOR_FOCUSED = """() => {
  const el = document.activeElement;
  return !!(el && el.closest('.jp-NotebookPanel .jp-Cell .jp-InputArea-editor'));
}"""


def write_notebook(path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("%load_ext llmops_jupyter\n%llmops plan --form")]
    nbformat.write(nb, str(path))


def test_plan_form_in_lab(lab_server):
    exe = shutil.which("chromium")
    if exe is None:
        message = "Debian chromium is not installed (apt-get install -y chromium; `make test` does it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    sync_api = pytest.importorskip("playwright.sync_api")
    SHOTS.mkdir(parents=True, exist_ok=True)
    write_notebook(lab_server.root / "forms.ipynb")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 950})
            page.goto(f"{lab_server.url}/lab/tree/forms.ipynb?token={lab_server.token}")
            # a cell of the *visible* notebook: Lab restores the notebooks an earlier page left open (hidden tabs),
            # and the first cell in the DOM may be one of theirs (it never becomes visible)
            page.locator(".jp-NotebookPanel .jp-Cell:visible").first.wait_for(timeout=180_000)
            form = page.locator(".llmops-form")
            for attempt in range(3):
                # Shift+Enter only once the notebook's kernel is idle and its first cell's editor has the focus:
                # a keypress before that is lost (the reason to retry is a lost keypress, never a fixed pause)
                page.wait_for_function(KERNEL_IDLE, arg="forms.ipynb", timeout=180_000)
                if form.is_visible():  # the previous attempt's run only took longer than its wait
                    break
                # the visible notebook: Lab may restore another one (an earlier test's) in a background tab
                page.locator(".jp-NotebookPanel .jp-Cell .jp-InputArea-editor:visible").first.click()
                page.wait_for_function(EDITOR_FOCUSED, timeout=30_000)
                page.keyboard.press("Shift+Enter")
                try:
                    form.wait_for(timeout=60_000)
                    break
                except sync_api.TimeoutError:
                    page.screenshot(path=str(SHOTS / f"20-form-waiting-{attempt}.png"))
            form.wait_for(timeout=30_000)
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
        finally:
            browser.close()

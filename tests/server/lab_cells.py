"""Driving a notebook in JupyterLab from Playwright: launch Debian's chromium, open a notebook and run its first
cell once the kernel is really ready (shared by the browser tests that execute cells)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "lab"
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


@contextlib.contextmanager
def chromium() -> Iterator[tuple[Any, Any]]:
    """``(sync_api, browser)``: Debian's chromium under Playwright (a missing browser fails under CI, else skips)."""
    exe = shutil.which("chromium")
    if exe is None:
        message = "Debian chromium is not installed (apt-get install -y chromium; `make test` does it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    sync_api = pytest.importorskip("playwright.sync_api")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield sync_api, browser
        finally:
            browser.close()


def open_notebook(browser: Any, lab_server: Any, name: str) -> Any:
    page = browser.new_page(viewport={"width": 1500, "height": 950})
    page.goto(f"{lab_server.url}/lab/tree/{name}?token={lab_server.token}")
    # a cell of the *visible* notebook: Lab restores the notebooks an earlier page left open (hidden tabs),
    # and the first cell in the DOM may be one of theirs (it never becomes visible)
    page.locator(".jp-NotebookPanel .jp-Cell:visible").first.wait_for(timeout=180_000)
    return page


def run_first_cell(sync_api: Any, page: Any, name: str, shown: Any, *, wait_ms: int = 60_000,
                   shot: str = "cell-waiting") -> None:
    """Shift+Enter in the notebook's first cell until ``shown`` (a locator of what the cell displays) is visible."""
    for attempt in range(3):
        # Shift+Enter only once the notebook's kernel is idle and its first cell's editor has the focus:
        # a keypress before that is lost (the reason to retry is a lost keypress, never a fixed pause)
        page.wait_for_function(KERNEL_IDLE, arg=name, timeout=180_000)
        if shown.first.is_visible():  # the previous attempt's run only took longer than its wait
            return
        # the visible notebook: Lab may restore another one (an earlier test's) in a background tab
        page.locator(".jp-NotebookPanel .jp-Cell .jp-InputArea-editor:visible").first.click()
        page.wait_for_function(EDITOR_FOCUSED, timeout=30_000)
        page.keyboard.press("Shift+Enter")
        try:
            shown.first.wait_for(timeout=wait_ms)
            return
        except sync_api.TimeoutError:
            page.screenshot(path=str(SHOTS / f"{shot}-{attempt}.png"))
    shown.first.wait_for(timeout=30_000)

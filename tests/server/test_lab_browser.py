"""The Lab extension in a real Chromium: sidebar runs, a run's lineage graph, "Run as pipeline" on a template.

Needs Debian's ``chromium`` (``apt-get install -y chromium``; Playwright's own browser download does not work
here) and Python Playwright. Screenshots go to ``test-artifacts/lab/``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "lab"


def expect(locator):
    """Playwright's auto-retrying assertion (imported late: Playwright is optional, the page fixture skips)."""
    from playwright.sync_api import expect as _expect

    return _expect(locator)


@pytest.fixture(scope="module")
def page(lab_server):
    exe = shutil.which("chromium")
    if exe is None:  # CI first: under CI a missing browser fails, it never skips
        message = "Debian chromium is not installed (apt-get install -y chromium; `make test` does it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    sync_api = pytest.importorskip("playwright.sync_api")  # an import skip fails under CI (tests/conftest.py)
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1500, "height": 950})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{lab_server.url}/lab/tree/template.ipynb?token={lab_server.token}")
        # a cell of the *visible* notebook: Lab restores the notebooks an earlier page left open (hidden tabs),
        # and the first cell in the DOM may be one of theirs (it never becomes visible)
        page.locator(".jp-NotebookPanel .jp-Cell:visible").first.wait_for(timeout=180_000)
        yield page
        page.screenshot(path=str(SHOTS / "99-final.png"))
        browser.close()
        assert not [e for e in errors if "llmops" in e.lower()], errors


def open_sidebar(page) -> None:
    tab = page.locator('.jp-SideBar .lm-TabBar-tab[data-id="llmops-sidebar"]')
    tab.wait_for(timeout=60_000)
    if "lm-mod-current" not in (tab.get_attribute("class") or ""):
        tab.click()
    page.wait_for_selector("#llmops-sidebar .llmops-run-row", timeout=30_000)


def test_sidebar_lists_runs_and_resources(page, lab_server):
    open_sidebar(page)
    rows = page.locator("#llmops-sidebar .llmops-run-row")
    ids = set(rows.evaluate_all("rs => rs.map(r => r.dataset.runId)"))
    assert {lab_server.ids[k] for k in ("data", "finetune", "merge", "quantize", "serve", "eval")} <= ids
    page.wait_for_selector("#llmops-sidebar .llmops-resources .llmops-bar", timeout=30_000)
    resources = page.locator("#llmops-sidebar .llmops-resources").inner_text()
    assert "RAM" in resources or "GPU" in resources
    expect(page.locator(f'#llmops-sidebar .llmops-running[data-run-id="{lab_server.ids["running"]}"]')) \
        .to_have_count(1, timeout=30_000)
    row = page.locator(f'.llmops-run-row[data-run-id="{lab_server.ids["eval"]}"]')
    expect(row).to_contain_text("failed", timeout=30_000)
    page.fill("#llmops-sidebar .llmops-filter", "quantize")
    expect(rows).to_have_count(1, timeout=30_000)
    expect(rows).to_have_attribute("data-stage", "quantize")
    page.fill("#llmops-sidebar .llmops-filter", "")
    expect(rows).not_to_have_count(1, timeout=30_000)
    # the user filter: every recorded user offered; choosing one lists only the runs that user recorded
    from llmops_jupyter.core.env import who

    me = who()  # who recorded the populated runs
    users = page.locator("#llmops-sidebar .llmops-user-filter option").all_inner_texts()
    assert users[0] == "all users" and me in users, users
    page.select_option("#llmops-sidebar .llmops-user-filter", me)
    expect(page.locator("#llmops-sidebar .llmops-user-filter")).to_have_value(me)
    expect(rows.first).to_be_visible(timeout=30_000)
    titles = rows.evaluate_all("rs => rs.map(r => r.title)")
    assert titles and all(f" by {me}" in t for t in titles), titles
    page.select_option("#llmops-sidebar .llmops-user-filter", "")
    expect(page.locator("#llmops-sidebar .llmops-user-filter")).to_have_value("")
    page.screenshot(path=str(SHOTS / "01-sidebar-runs.png"))


def test_run_detail_shows_lineage_graph(page, lab_server):
    open_sidebar(page)
    page.click(f'.llmops-run-row[data-run-id="{lab_server.ids["finetune"]}"]')
    page.wait_for_selector(f'.llmops-detail-id:text("{lab_server.ids["finetune"]}")', timeout=30_000)
    nodes = page.locator(".llmops-lineage svg .llmops-node")
    expect(nodes).to_have_count(12, timeout=30_000)  # the detail and its graph render together; wait for all
    kinds = nodes.evaluate_all("ns => ns.map(n => n.dataset.kind)")
    # the chain, the eval of the adapter and one model card per adapter / merged / quantized / deployment version
    assert sorted(kinds) == sorted(["raw-data", "dataset", "base-model", "adapter", "merged", "quantized",
                                    "deployment", "eval-results"] + ["model-card"] * 4)
    page.wait_for_function("() => document.querySelectorAll('.llmops-lineage svg .llmops-edge').length >= 6",
                           timeout=30_000)
    # Layered top to bottom: raw data above dataset above adapter above merged above quantized above deployment.
    ys = {k: page.locator(f'.llmops-node[data-kind="{k}"]').bounding_box()["y"]
          for k in ("raw-data", "dataset", "adapter", "merged", "quantized", "deployment")}
    assert ys["raw-data"] < ys["dataset"] < ys["adapter"] < ys["merged"] < ys["quantized"] < ys["deployment"]
    assert page.locator(".llmops-node-own").get_attribute("data-kind") == "adapter"
    params = page.locator(".llmops-params").inner_text()
    assert "rank" in params and "8" in params
    assert "eval_loss" in page.locator(".llmops-metric-table").inner_text()
    page.locator(".llmops-lineage").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "02-run-lineage.png"))
    # Clicking a node selects the run that produced it.
    page.click('.llmops-node[data-kind="quantized"]')
    page.wait_for_selector(f'.llmops-detail-id:text("{lab_server.ids["quantize"]}")', timeout=30_000)
    page.click(f'.llmops-run-row[data-run-id="{lab_server.ids["finetune"]}"]')
    page.wait_for_selector(f'.llmops-detail-id:text("{lab_server.ids["finetune"]}")', timeout=30_000)
    # "Open notebook" opens the notebook recorded on the run.
    page.click(".llmops-open-notebook")
    page.wait_for_selector('.lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current:has-text("template.ipynb")',
                           timeout=30_000)


def test_run_as_pipeline_from_notebook_toolbar(page, lab_server):
    open_sidebar(page)
    before = set(page.locator(".llmops-run-row").evaluate_all("rs => rs.map(r => r.dataset.runId)"))
    page.locator(".jp-NotebookPanel:visible .llmops-run-pipeline-button").first.click()
    dialog = page.locator(".jp-Dialog")
    dialog.wait_for(timeout=30_000)
    expect(dialog.locator("input, textarea")).to_have_count(5, timeout=30_000)
    types = dict(dialog.locator("input, textarea").evaluate_all("es => es.map(e => [e.name, e.dataset.type])"))
    assert types == {"lr": "float", "steps": "int", "use_lora": "bool", "run_name": "str", "layers": "list"}
    dialog.locator('input[name="steps"]').fill("4")
    dialog.locator('input[name="run_name"]').fill("from-lab")
    page.screenshot(path=str(SHOTS / "03-run-as-pipeline-dialog.png"))
    dialog.locator(".jp-mod-accept").click()
    page.wait_for_selector(".llmops-job-finished", timeout=180_000)
    # both new runs (the pipeline and the stage run its notebook made) listed, not only the first to appear
    stages = page.wait_for_function(
        """before => {
          const s = [...document.querySelectorAll('.llmops-run-row')]
            .filter(r => !before.includes(r.dataset.runId)).map(r => r.dataset.stage);
          return s.includes('pipeline') && s.includes('toy-train') && s;
        }""", arg=sorted(before), timeout=60_000).json_value()
    assert {"pipeline", "toy-train"} <= set(stages)
    page.evaluate("document.querySelector('#llmops-sidebar').scrollTop = 0")
    page.screenshot(path=str(SHOTS / "04-pipeline-finished.png"))
    # The job links its run: selecting it shows the output notebook artifact.
    page.click(".llmops-job-finished .llmops-job-run")
    page.wait_for_selector('.llmops-artifacts:has-text("notebook")', timeout=30_000)
    page.click(".llmops-job-finished .llmops-job-output")
    page.wait_for_selector('.lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current:has-text("template-")',
                           timeout=30_000)
    page.screenshot(path=str(SHOTS / "05-output-notebook.png"))


def test_sidebar_shows_the_model_selection_table(page, lab_server):
    """The sidebar's Model selection section shows the same rows as GET /llmops/selection (= `%llmops select`)."""
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.views.select import selection_rows

    open_sidebar(page)
    page.wait_for_selector("#llmops-sidebar .llmops-selection-table tr td", timeout=30_000)
    shown = page.locator("#llmops-sidebar .llmops-selection-table tr").evaluate_all(
        "rs => rs.slice(1).map(r => [...r.children].map(c => c.textContent))")
    reg = Registry(lab_server.home)
    expected = selection_rows(reg, [r["id"] for r in reg.list_runs(stage="eval", limit=5)], "f1")
    assert [row[0] for row in shown] == [r["label"] for r in expected]
    assert all(row[2] == "unknown" for row in shown)  # no price known for these local versions: never $0

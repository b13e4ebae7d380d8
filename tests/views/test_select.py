"""The selection view over real eval runs of endpoints (FakeOpenAI, priced and unpriced): one table, the Pareto
front, the chart in the notebook and in the saved .ipynb, and the same section in the HTML report."""

from __future__ import annotations

import json

import pytest

from llmops_jupyter.core.runner import Runner
from llmops_jupyter.testing import FakeOpenAI, sliced_kernel_manager
from llmops_jupyter.views.select import mark_pareto

pytest.importorskip("httpx")


def _row(label, q, c, lat):
    return {"label": label, "quality": q, "cost_usd": c, "latency_s": lat}


def test_pareto_front_closed_form():
    rows = [_row("cheap", 0.5, 1.0, 1.0), _row("best", 0.9, 5.0, 2.0), _row("worse", 0.4, 2.0, 3.0),
            _row("fast", 0.5, 1.0, 0.5), _row("unpriced", 0.99, None, 0.1)]
    mark_pareto(rows)
    assert [r["label"] for r in rows if r["pareto"]] == ["best", "fast"]  # cheap is dominated by fast (same q, c)
    assert rows[2]["why"] == "dominated" and rows[4]["why"] == "cost unknown" and not rows[4]["pareto"]
    low = [_row("a", 3.0, 1.0, 1.0), _row("b", 2.0, 1.0, 1.0)]
    mark_pareto(low, higher_is_better=False)  # ppl: lower is better
    assert [r["pareto"] for r in low] == [False, True]


@pytest.fixture()
def eval_runs(registry, tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": f"is {i} even", "answer": f"the answer is is {i}"}) + "\n"
                                 for i in range(4)))
    with FakeOpenAI("cheap") as a, FakeOpenAI("pricey") as b:
        prices = tmp_path / "prices.json"
        prices.write_text(json.dumps({"source": "sheet", "date": "2026-12-01", "prices": [
            {"model": "cheap", "input_per_mtok": 0.1, "output_per_mtok": 0.4},
            {"model": "pricey", "input_per_mtok": 5.0, "output_per_mtok": 15.0}]}))
        res = Runner(registry).run("eval", model=[f"openai:{a.url}#cheap", f"openai:{b.url}#pricey",
                                                  f"openai:{b.url}#unpriced"],
                                   data=str(questions), metrics=["f1", "latency"], prices=str(prices))
    return res


def test_select_table_front_and_figure(shell, eval_runs):
    sel = shell.run_line_magic("llmops", f"select {eval_runs.run_id} --quality f1")
    by = {r["label"].split("@")[0]: r for r in sel.rows}
    assert set(by) == {"cheap", "pricey", "unpriced"}
    assert by["cheap"]["quality"] == by["pricey"]["quality"]  # same answers: price decides
    assert by["cheap"]["cost_usd"] < by["pricey"]["cost_usd"] and by["cheap"]["pareto"]  # strictly cheapest
    # pricey stays on the front only by being faster (same quality, more cost)
    assert by["pricey"]["pareto"] == (by["pricey"]["latency_s"] < by["cheap"]["latency_s"])
    assert by["unpriced"]["cost_usd"] is None and by["unpriced"]["why"] == "cost unknown"
    text = str(sel)
    assert "unknown" in text and "★ front" in text
    fig = sel.figure.to_plotly_json()
    names = [t.get("name") for t in fig["data"]]
    assert "Pareto front" in names and len(fig["data"][0]["x"]) + (len(fig["data"][1]["x"]) if len(names) > 1 and
                                                                    names[1] == "dominated" else 0) == 2
    assert "cost unknown, not plotted" in fig["layout"]["title"]["text"]


def test_report_has_the_selection_section(registry, eval_runs, tmp_path):
    rep = Runner(registry).run("report", evals=[eval_runs.run_id], out=str(tmp_path / "r.html"),
                               inline_plotlyjs=False, examples=0)
    page = (tmp_path / "r.html").read_text()
    assert "Model selection (quality vs cost vs latency)" in page and "Pareto front" in page
    assert rep.status == "finished"


@pytest.mark.slow
def test_selection_chart_renders_in_a_notebook_and_the_saved_ipynb(tmp_path):
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in (
        "%load_ext llmops_jupyter",
        "import json\nfrom llmops_jupyter.testing import FakeOpenAI\nfake = FakeOpenAI()\n"
        "open('q.jsonl', 'w').write(json.dumps({'question': 'two plus two', 'answer': 'four'}) + '\\n')",
        "r = get_ipython().run_line_magic('llmops', f'eval --model openai:{fake.url}#fake-mini --data q.jsonl '\n"
        "                                '--metrics f1,latency')",
        "%llmops select eval@latest",
        "fake.close()")]
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
                            kernel_manager_class=sliced_kernel_manager()).execute()
    nbformat.write(nb, str(tmp_path / "saved.ipynb"))
    saved = nbformat.read(str(tmp_path / "saved.ipynb"), as_version=4)
    outs = saved.cells[3]["outputs"]
    mimes = [m for o in outs for m in o.get("data", {})]
    assert "application/vnd.plotly.v1+json" in mimes  # the figure itself is saved, not a widget reference
    assert "Model selection (1 versions)" in json.dumps(outs)


def test_judge_calls_are_priced_and_counted_in_the_selection(registry, shell, tmp_path):
    """An endpoint judge is priced like a candidate: its calls' usage x its price is the version's judge cost, and
    the selection's cost per example includes it; an unpriced judge makes that cost unknown, never $0."""
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question": f"is {i} even", "answer": f"the answer is is {i}"}) + "\n"
                                 for i in range(3)))
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"source": "sheet", "date": "2026-12-01", "prices": [
        {"model": "cheap", "input_per_mtok": 0.1, "output_per_mtok": 0.4},
        {"model": "grader", "input_per_mtok": 3.0, "output_per_mtok": 7.0}]}))
    with FakeOpenAI("cheap") as cand, FakeOpenAI("grader") as judge:
        priced = Runner(registry).run("eval", model=[f"openai:{cand.url}#cheap"], data=str(questions),
                                      metrics=["f1"], prices=str(prices), judge=judge.url, judge_model="grader")
        paid = sum(u["prompt_tokens"] * 3.0 + u["completion_tokens"] * 7.0 for u in judge.usage) / 1e6  # 3 calls
        unpriced = Runner(registry).run("eval", model=[f"openai:{cand.url}#cheap"], data=str(questions),
                                        metrics=["f1"], prices=str(prices), judge=judge.url, judge_model="other",
                                        cache=False)
    assert len(judge.usage) == 6 and paid > 0
    s = priced.summary["prices"]["prices"]
    assert any(p["model"] == "grader" and p["input_per_mtok"] == 3.0 for p in s)  # the judge's price in lineage
    from llmops_jupyter.stages.eval import store as evalstore

    summary = next(iter(evalstore.summaries(registry, priced.run_id).values()))
    assert summary["judge_cost_usd"] == pytest.approx(paid, abs=1e-12)  # the 3 calls of the priced run
    sel = shell.run_line_magic("llmops", f"select {priced.run_id} {unpriced.run_id} --quality f1")
    by_run = {r["run"]: r for r in sel.rows}
    assert by_run[priced.run_id]["cost_usd"] == pytest.approx(summary["cost_usd"] + paid, abs=1e-12)
    assert by_run[unpriced.run_id]["cost_usd"] is None

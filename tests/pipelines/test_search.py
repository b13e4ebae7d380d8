"""Optuna search: the space syntax, and a real search on the tiny model (6 trials, pruning, resume).

The trials are pipeline runs of a small fine-tune notebook (papermill, real kernels). Pruning is made deterministic
by the space: a learning rate of 1e-6 barely moves the eval loss while 5e-3 drops it fast, so once a good trial
completed, the median pruner stops every bad one at its first evaluation.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from llmops_jupyter.core.errors import ConfigError

pytest.importorskip("optuna")
pytest.importorskip("papermill")

NOTEBOOK_PARAMS = """model = "tiny-llama"
data = "data@latest"
lr = 2e-4
rank = 8
dropout = 0.05
max_steps = 6
eval_every = 2"""

FINETUNE = ("%llmops finetune --model $model --data $data --lr $lr --rank $rank --dropout $dropout "
            "--max-steps $max_steps --eval-every $eval_every --batch-size 4 --log-every 1 --checkpoint-every 0")


def search_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(NOTEBOOK_PARAMS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# Fine-tune trial"), params,
                nbformat.v4.new_code_cell("%load_ext llmops_jupyter"), nbformat.v4.new_code_cell(FINETUNE)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_space_syntax():
    from llmops_jupyter.pipelines.search import distributions, parse_space

    # argparse or a front end may split items on their commas: they are joined back
    space = parse_space(["lr=loguniform(1e-5", "1e-3)", "rank=int(4,64)", "dropout=float(0,0.2)",
                         "method=choice(lora,qlora)"])
    assert space == {"lr": {"kind": "loguniform", "low": 1e-5, "high": 1e-3},
                     "rank": {"kind": "int", "low": 4, "high": 64},
                     "dropout": {"kind": "float", "low": 0.0, "high": 0.2},
                     "method": {"kind": "choice", "values": ["lora", "qlora"]}}
    d = distributions(space)
    assert d["lr"].log and d["rank"].low == 4 and d["method"].choices == ("lora", "qlora")
    for bad, needle in (("lr=loguniform(0,1)", "not positive"), ("rank=int(4.5,8)", "whole numbers"),
                        ("lr=normal(0,1)", "unknown distribution"), ("lr", "not understood"),
                        ("rank=int(8,4)", "empty")):
        with pytest.raises(ConfigError, match=needle):
            parse_space([bad])


def test_search_flags_need_search_optuna(shell, home):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="--search optuna"):
        shell.run_line_magic("llmops", "sweep nb.ipynb --grid lr=1e-4 --trials 3")


@pytest.mark.parametrize("startup", [3, 5])
def test_hyperband_prunes_nothing_before_startup_trials_complete(startup):
    """--startup-trials holds for --pruner hyperband too (Optuna's HyperbandPruner has no such count and pruned
    the 4th trial after 3 completed, with --startup-trials 5)."""
    import optuna

    from llmops_jupyter.pipelines.search import make_pruner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(pruner=make_pruner({"name": "hyperband", "startup_trials": startup}),
                                sampler=optuna.samplers.RandomSampler(seed=0))
    assert isinstance(study.pruner, optuna.pruners.HyperbandPruner)  # TPE samples per bracket
    pruned = []
    for n in range(startup + 6):
        trial = study.ask()
        value = 1.0 if n == 0 else 10.0 + n  # every later trial is worse than the first at every step
        for step in range(1, 10):
            trial.report(value, step)
            if trial.should_prune():
                complete = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
                pruned.append((n, complete))
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, value)
    assert all(complete >= startup for _n, complete in pruned), pruned
    assert pruned, "hyperband never pruned after the startup trials"  # it still prunes afterwards


def test_listener_is_a_no_op_outside_a_trial(monkeypatch):
    import sys

    from llmops_jupyter.core.runner import DEFAULT_LISTENERS, Event, EventType
    from llmops_jupyter.pipelines.search import ENV_STORAGE, trial_listener

    assert "llmops_jupyter.pipelines.search:trial_listener" in DEFAULT_LISTENERS
    monkeypatch.delenv(ENV_STORAGE, raising=False)
    optuna_loaded = "optuna" in sys.modules
    trial_listener(Event(EventType.METRIC, "finetune-x", "finetune", {"values": {"eval_loss": 1.0}, "step": 2}))
    assert ("optuna" in sys.modules) == optuna_loaded


@pytest.mark.slow
def test_optuna_search_prunes_records_best_and_resumes(home, tmp_path, tiny_model, tiny_dataset, capsys):
    import optuna

    from llmops_jupyter.frontends.cli import main as cli
    from llmops_jupyter.registry import Registry

    nb = search_notebook(tmp_path / "trial.ipynb")
    argv = ["sweep", str(nb), "--search", "optuna", "--trials", "6", "--metric", "eval_loss",
            "--direction", "minimize", "--space", "lr=choice(1e-6,5e-3)", "rank=int(2,16)", "dropout=float(0,0.2)",
            "--pruner", "median", "--startup-trials", "1", "--seed", "3", "--parallel", "2",
            "-p", "model", str(tiny_model), "-p", "data", tiny_dataset.hash]
    assert cli(argv) in (0, None)
    out = capsys.readouterr().out
    reg = Registry(home)
    (sweep,) = reg.list_runs(stage="sweep")
    assert sweep["status"] == "finished", sweep["error"]
    trials = sweep["summary"]["trials"]
    assert len(trials) == 6
    statuses = [t["status"] for t in trials]
    assert "pruned" in statuses and "finished" in statuses and "failed" not in statuses, trials
    # a pruned trial: its fine-tune stopped early (status pruned, fewer steps), its pipeline run is pruned too
    pruned = next(t for t in trials if t["status"] == "pruned")
    assert reg.get_run(pruned["run_id"])["status"] == "pruned"
    (ft,) = reg.child_runs(pruned["run_id"], "finetune")
    assert ft["status"] == "pruned" and ft["summary"]["steps"] < 6 and "Optuna" in ft["error"]
    # Optuna was told: pruned trials are PRUNED; the best trial is on the sweep run's summary and metrics
    study = optuna.load_study(study_name=sweep["params"]["study"],
                              storage=optuna.storages.JournalStorage(
                                  optuna.storages.journal.JournalFileBackend(sweep["params"]["storage"])))
    assert Path(sweep["params"]["storage"]).is_relative_to(home / "search")
    states = {t.user_attrs["run_id"]: t.state.name for t in study.trials}
    assert states[pruned["run_id"]] == "PRUNED"
    best = sweep["summary"]["best"]
    assert best["run_id"] == study.best_trial.user_attrs["run_id"] and best["value"] == study.best_value
    assert reg.metrics(sweep["id"])["best_eval_loss"] == pytest.approx(best["value"])
    assert best["params"]["lr"] == 5e-3
    assert "trial" in out and best["run_id"] in out
    # compare adds Optuna's own figures
    from llmops_jupyter.pipelines.aggregate import compare_sweep

    comp = compare_sweep(reg, sweep["id"])
    titles = [f.layout.title.text for f in comp.figures]
    assert {"Optuna: optimisation history", "Optuna: parallel coordinates"} <= set(titles), titles
    assert comp.best()["run_id"] == best["run_id"]

    # resume: the study grows to 8 trials; the 6 finished ones are not run again
    before = {r["id"] for r in reg.list_runs(stage="pipeline", limit=None)}
    assert cli(["sweep", str(nb), "--search", "optuna", "--resume", sweep["id"], "--trials", "8",
                "--parallel", "2"]) in (0, None)
    resumed = reg.list_runs(stage="sweep")[0]
    assert resumed["id"] != sweep["id"] and resumed["params"]["study"] == sweep["params"]["study"]
    new = resumed["summary"]["trials"]
    assert [t["index"] for t in new] == [6, 7]
    after = {r["id"] for r in reg.list_runs(stage="pipeline", limit=None)}
    assert len(after - before) == 2 and before <= after
    study = optuna.load_study(study_name=sweep["params"]["study"], storage=study._storage)
    assert len(study.trials) == 8
    assert len(compare_sweep(reg, resumed["id"]).rows) == 8


@pytest.mark.slow
def test_example_notebook_05_runs_on_the_tiny_model(home, tmp_path, tiny_model):
    """example-notebooks/05 through papermill on the tiny model: a search with a pruned trial, compare, diff."""
    from llmops_jupyter.pipelines import run_pipeline
    from llmops_jupyter.pipelines.params import notebook_parameters

    root = Path(__file__).resolve().parents[2]
    src = root / "example-notebooks" / "05_search_and_diff.ipynb"
    nb = nbformat.read(src, as_version=4)
    assert notebook_parameters(nb, src.name)["model"].default == "smollm2-135m"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    out = tmp_path / "05.ipynb"
    res = run_pipeline(str(src), {"model": "tiny-llama", "trials": 4, "max_steps": 6, "eval_every": 2,
                                  "parallel": 2}, output=str(out), cwd=str(tmp_path), cache=False)
    assert res["status"] == "finished", res
    done = nbformat.read(out, as_version=4)
    texts, titles = [], []
    for cell in done.cells:
        for o in cell.get("outputs", []):
            texts.append(o.get("text", ""))
            data = o.get("data", {})
            texts += [str(data.get(k, "")) for k in ("text/plain", "text/html")]
            fig = data.get("application/vnd.plotly.v1+json")
            if fig:
                t = (fig.get("layout") or {}).get("title")
                titles.append(t.get("text", "") if isinstance(t, dict) else str(t or ""))
    text = "\n".join(texts)
    assert "best trial" in text and "4 trials" in text and "diff finetune-" in text
    assert "Optuna: optimisation history" in titles and any(t.startswith("Training curves") for t in titles)
    form_out = done.cells[-1].outputs  # the closing form cell: a widget view (with its text fallback)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in form_out), form_out

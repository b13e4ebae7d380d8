"""Pipelines: typed parameters, papermill runs recorded in the registry, secrets, caching, sweeps, rerun, export.

Notebooks run through a real kernel (papermill/nbclient). The notebooks register a tiny ``toy`` stage themselves
(the same source is registered in this process, so parameters are typed against its config like a real stage's).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest

from llmops_jupyter.core.errors import ConfigError, StageError
from llmops_jupyter.frontends.cli import main as cli
from llmops_jupyter.registry import Registry

pytest.importorskip("papermill")

TOY_SRC = '''
import dataclasses
from pathlib import Path
from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.stage import Stage, register_stage

@dataclasses.dataclass
class ToyConfig(StageConfig):
    lr: float = option(1e-4, "learning rate", min=0, min_exclusive=True)
    rank: int = option(8, "rank", min=1, max=256, aliases=["lora_r"])
    mode: str = option("fast", "mode", choices=["fast", "slow"])
    api_key: str | None = option(None, "key", secret=True)

@register_stage
class ToyStage(Stage):
    """A deterministic stand-in for a training stage: a loss from lr and rank, an artifact."""
    name = "toy"
    config_cls = ToyConfig

    def run(self, ctx):
        c = ctx.config
        loss = round(1.0 / (1.0 + c.rank * c.lr * 1000.0), 6)
        ctx.log_metrics({"loss": loss})
        out = ctx.staging_dir()
        (out / "model.txt").write_text(f"{c.lr} {c.rank}")
        ctx.save_artifact(out, "adapter", name="toy")
        return {"loss": loss}
'''
_toy = types.ModuleType("toy_stage")
sys.modules["toy_stage"] = _toy
exec(compile(TOY_SRC, "toy_stage", "exec"), _toy.__dict__)

SECRET = "s3cr3t-value-9f8e7d"


def expected_loss(lr: float, r: int) -> float:
    return round(1.0 / (1.0 + r * lr * 1000.0), 6)


def make_notebook(path: Path, body: list[str], params: str = 'lr = 1e-4\nrank = 8\nmode = "fast"\napi_key = None'
                  ) -> Path:
    nb = nbformat.v4.new_notebook()
    setup = nbformat.v4.new_code_cell("%load_ext llmops_jupyter\n" + TOY_SRC)
    p = nbformat.v4.new_code_cell(params)
    p.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# Toy pipeline"), p, setup] + [nbformat.v4.new_code_cell(s) for s in body]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


TRAIN = [
    "from llmops_jupyter.core.runner import Runner\n"
    "res = Runner().run('toy', lr=lr, rank=rank, mode=mode, api_key=api_key)\nres.metrics",
    "import os\nfrom llmops_jupyter.pipelines import record_metrics\n"
    "record_metrics(key_len=len(api_key or ''), gpu=float(os.environ.get('CUDA_VISIBLE_DEVICES', '-1')))",
]


@pytest.fixture()
def toy_nb(home, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPS_TEST_KEY", SECRET)
    return make_notebook(tmp_path / "toy.ipynb", TRAIN)


def all_bytes(root: Path) -> list[tuple[Path, bytes]]:
    """Every file below ``root``, read out of process (a live registry database must not be opened here)."""
    from llmops_jupyter.testing import read_bytes_elsewhere

    return [(Path(p), data) for p, data in read_bytes_elsewhere(sorted(root.rglob("*"))).items()]


def pipeline_runs(reg: Registry) -> list[dict]:
    return reg.list_runs(stage="pipeline", limit=None)


# -- parameters: typed and validated before any kernel starts -------------------------------------------------------
def test_parameters_typed_against_notebook_and_stage_config(toy_nb):
    from llmops_jupyter.pipelines.params import read_notebook, resolve_parameters

    nb = read_notebook(toy_nb)
    ok = resolve_parameters(nb, {"lr": "2e-4", "rank": "16", "mode": "slow", "api_key": "env:LLMOPS_TEST_KEY"})
    assert ok.values["lr"] == 2e-4 and ok.values["rank"] == 16 and ok.record["api_key"] == "env:LLMOPS_TEST_KEY"
    cases = {
        "rank": ("abc", "whole number"),       # notebook type
        "lr": ("-1", "toy --lr"),                # stage config range (lr > 0)
        "mode": ("medium", "must be one of"),   # stage config choices
        "ranks": ("8", "did you mean 'rank'"),  # unknown name
        "api_key": ("literal", "environment reference"),  # secret by value
    }
    for name, (value, needle) in cases.items():
        with pytest.raises(ConfigError) as err:
            resolve_parameters(nb, {name: value})
        assert f"'{name}'" in str(err.value) and needle in str(err.value), str(err.value)
    lists = make_notebook(toy_nb.with_name("l.ipynb"), [], params="layers = [1, 2]\nopts = {'a': 1}\nflag = False")
    nb2 = read_notebook(lists)
    v = resolve_parameters(nb2, {"layers": "3,4", "opts": "{b: 2}", "flag": "yes"}).values
    assert v == {"layers": [3, 4], "opts": {"b": 2}, "flag": True}
    for name, value in (("layers", "[1, 'x']"), ("opts", "[1]"), ("flag", "maybe")):
        with pytest.raises(ConfigError, match=f"'{name}"):
            resolve_parameters(nb2, {name: value})


def test_bad_parameter_rejected_before_any_kernel(toy_nb, home, capsys):
    for argv in (["-p", "rank", "abc"], ["-p", "rank", "0"], ["-p", "learning_rate", "1"]):
        assert cli(["run", str(toy_nb), *argv]) == 2
        err = capsys.readouterr().err
        assert f"'{argv[1]}'" in err and "ConfigError" in err
    reg = Registry(home)
    assert pipeline_runs(reg) == [] and reg.list_runs(limit=None) == []  # papermill never started a kernel
    assert not list(toy_nb.parent.glob("*.out.ipynb"))


# -- a recorded pipeline run ------------------------------------------------------------------------------------
def test_run_records_pipeline_children_cache_secret_and_rerun(toy_nb, home, tmp_path, capsys):
    argv = ["run", str(toy_nb), "-p", "lr", "2e-4", "--param", "rank", "16", "-p", "api_key", "env:LLMOPS_TEST_KEY"]
    assert cli(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    reg = Registry(home)
    (run,) = pipeline_runs(reg)
    assert run["status"] == "finished" and "Pipeline" in printed and run["id"] in printed
    assert run["params"]["parameters"] == {"lr": 2e-4, "rank": 16, "api_key": "env:LLMOPS_TEST_KEY"}
    assert run["notebook"] == str(toy_nb) and run["env"]["packages"].get("papermill")
    src = [a for a in reg.run_artifacts(run["id"], "input") if a.kind == "notebook"]
    out = [a for a in reg.run_artifacts(run["id"], "output") if a.kind == "notebook"]
    assert len(src) == 1 and len(out) == 1 and run["summary"]["notebook_artifact"] == src[0].hash
    cells = run["summary"]["cells"]
    assert any(c["injected"] for c in cells) and all(c["duration_s"] is not None for c in cells)
    (child,) = run["summary"]["children"]
    toy = reg.get_run(child["id"])
    assert toy["stage"] == "toy" and toy["parent_id"] == run["id"] and toy["notebook"] == str(toy_nb)
    assert toy["params"]["api_key"] == "***"
    metrics = reg.metrics(run["id"])
    assert metrics["loss"] == pytest.approx(expected_loss(2e-4, 16)) and metrics["key_len"] == len(SECRET)
    executed = nbformat.read(next(out[0].path.glob("*.ipynb")), as_version=4)
    assert "rank = 16" in "".join(c.source for c in executed.cells)

    # same inputs → cached (no kernel, no new stage run); --no-cache executes again
    assert cli(argv) == 0
    runs = pipeline_runs(reg)
    assert runs[0]["status"] == "cached" and runs[0]["summary"]["cached_from"] == run["id"]
    assert len(reg.list_runs(stage="toy", limit=None)) == 1
    assert cli([*argv, "--no-cache"]) == 0
    assert pipeline_runs(reg)[0]["status"] == "finished" and len(reg.list_runs(stage="toy", limit=None)) == 2

    # reproducibility: the recorded notebook and parameters give the same metrics
    capsys.readouterr()
    assert cli(["rerun", run["id"]]) == 0
    text = capsys.readouterr().out
    assert "reproduced: all metrics match" in text
    rerun = pipeline_runs(reg)[0]
    assert rerun["summary"]["rerun_of"] == run["id"] and rerun["summary"]["metrics_match"] is True

    # the secret value is nowhere: output notebooks, artifacts, registry db (+WAL), notebooks next to the source
    reg.close()
    for path, data in all_bytes(tmp_path):
        assert SECRET.encode() not in data, path
    con = sqlite3.connect(home / "registry.db")
    dump = "\n".join(con.iterdump())
    con.close()
    assert SECRET not in dump


def test_failing_cell_and_dead_kernel_are_reported(home, tmp_path):
    from llmops_jupyter.pipelines import run_pipeline

    bad = make_notebook(tmp_path / "bad.ipynb", ["x = 1", "raise ValueError('boom in cell')"])
    with pytest.raises(StageError) as err:
        run_pipeline(bad, {"rank": 4})
    msg = str(err.value)
    assert "cell 4" in msg and "raise ValueError" in msg and "boom in cell" in msg, msg
    reg = Registry(home)
    failed = pipeline_runs(reg)[0]
    assert failed["status"] == "failed" and "boom in cell" in failed["error"]
    assert [a.kind for a in reg.run_artifacts(failed["id"], "output")] == ["notebook"]  # the failed notebook is kept

    dead = make_notebook(tmp_path / "dead.ipynb", ["import os\nos._exit(1)", "print('never')"])
    with pytest.raises(StageError) as err:
        run_pipeline(dead, {})
    assert "kernel" in str(err.value) and "died" in str(err.value) and "cell 3" in str(err.value), str(err.value)
    assert pipeline_runs(reg)[0]["status"] == "failed"


def test_run_out_writes_the_executed_notebook_for_finished_failed_and_cached_runs(toy_nb, home, tmp_path, capsys):
    out = tmp_path / "results" / "toy.out.ipynb"
    assert cli(["run", str(toy_nb), "--out", str(out)]) == 0, capsys.readouterr().err
    executed = nbformat.read(out, as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    out.unlink()
    assert cli(["run", str(toy_nb), "--out", str(out)]) == 0  # cached: the earlier run's notebook
    assert "cached" in capsys.readouterr().out and out.exists()
    bad = make_notebook(tmp_path / "bad.ipynb", ["x = 1", "raise ValueError('boom in cell')"])
    failed = tmp_path / "results" / "bad.out.ipynb"
    assert cli(["run", str(bad), "--out", str(failed)]) != 0
    text = failed.read_text()
    assert "boom in cell" in text and "ValueError" in text  # where it stopped, with the traceback
    assert not [p for p in failed.parent.iterdir() if p.name.startswith(".")]  # no temp files left behind


# -- sweeps -----------------------------------------------------------------------------------------------------
def test_sweep_on_dask_localcluster_compare_and_cache(toy_nb, home, shell, monkeypatch, capsys):
    distributed = pytest.importorskip("distributed")
    import llmops_jupyter.pipelines.sweep as sweep_mod

    monkeypatch.setattr(sweep_mod, "detect_gpus", lambda: ["0", "1"])  # the CUDA boundary: pin per variant
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as lc:
        argv = ["sweep", str(toy_nb), "--grid", "lr=1e-4,2e-4", "rank=8,16", "--parallel", "2",
                "--cluster", lc.scheduler_address, "-p", "mode", "slow"]
        assert cli(argv) == 0, capsys.readouterr().err
        reg = Registry(home)
        (sw,) = reg.list_runs(stage="sweep")
        assert sw["status"] == "finished" and sw["summary"]["backend"] == "dask"
        runs = [r for r in pipeline_runs(reg) if r["parent_id"] == sw["id"]]
        assert len(runs) == 4 and all(r["status"] == "finished" for r in runs)
        assert {r["params"]["parameters"]["mode"] for r in runs} == {"slow"}
        seen = set()
        for r in runs:
            p = r["params"]["parameters"]
            m = reg.metrics(r["id"])
            assert m["loss"] == pytest.approx(expected_loss(p["lr"], p["rank"]))
            assert m["gpu"] in (0.0, 1.0)
            seen.add((p["lr"], p["rank"]))
        assert seen == {(1e-4, 8), (1e-4, 16), (2e-4, 8), (2e-4, 16)}

        cmp = shell.run_line_magic("llmops", f"compare {sw['id']} --metric loss")
        assert [r[cmp.table.columns.index("lr")] for r in cmp.table.rows] == ["0.0001", "0.0001", "0.0002", "0.0002"]
        for row in cmp.rows:
            assert row["metrics"]["loss"] == pytest.approx(expected_loss(row["params"]["lr"], row["params"]["rank"]))
        assert cmp.best()["params"] == {"lr": 2e-4, "rank": 16}  # lowest loss
        kinds = [f.data[0].type for f in cmp.figures]
        assert kinds == ["parcoords", "scatter"]
        report = reg.get_artifact(f"{sw['id']}:report").file("sweep-report.html")
        assert "plotly" in report.read_text() and sw["id"] in report.read_text()

        # re-running with one more rank: the 4 unchanged variants come from the cache, only 2 execute
        argv[4] = "rank=8,16,32"
        assert cli(argv) == 0, capsys.readouterr().err
        sw2 = reg.list_runs(stage="sweep")[0]
        statuses = sorted(r["status"] for r in pipeline_runs(reg) if r["parent_id"] == sw2["id"])
        assert statuses == ["cached"] * 4 + ["finished"] * 2


def test_sweep_local_process_pool(toy_nb, home):
    from llmops_jupyter.pipelines import run_sweep

    res = run_sweep(toy_nb, ["rank=2", "4"], {"lr": 1e-3}, parallel=2, gpus=[])
    reg = Registry(home)
    assert res.summary["backend"] == "processes"
    runs = [r for r in pipeline_runs(reg) if r["parent_id"] == res.run_id]
    assert sorted(reg.metrics(r["id"])["loss"] for r in runs) == [expected_loss(1e-3, 4), expected_loss(1e-3, 2)]
    with pytest.raises(ConfigError, match="'rank'"):  # every variant validated before the first kernel
        run_sweep(toy_nb, ["rank=2,oops"], gpus=[])


# -- export -----------------------------------------------------------------------------------------------------
def test_export_lifts_magic_arguments_into_parameters(home, tmp_path, shell):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Work"), nbformat.v4.new_code_cell("%load_ext llmops_jupyter\n" + TOY_SRC),
                nbformat.v4.new_code_cell("%llmops toy --lr 0.002 --lora-r 4 --mode slow")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "work.ipynb"
    nbformat.write(nb, src)
    table = shell.run_line_magic("llmops", f"pipeline export {src} --out {tmp_path / 'pipe.ipynb'}")
    assert [r[0] for r in table.rows] == ["lr", "rank", "mode"]
    out = nbformat.read(tmp_path / "pipe.ipynb", as_version=4)
    params = [c for c in out.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and "lr = 0.002" in params[0].source and "rank = 4" in params[0].source
    assert "%llmops toy --lr $lr --rank $rank --mode $mode" in out.cells[-1].source
    assert Registry(home).list_artifacts("notebook")
    shell.run_line_magic("llmops", f"pipeline run {tmp_path / 'pipe.ipynb'} -p rank 32")
    reg = Registry(home)
    (run,) = pipeline_runs(reg)
    assert reg.metrics(run["id"])["loss"] == pytest.approx(expected_loss(0.002, 32))


def test_load_ext_stays_light():
    code = ("import sys; from llmops_jupyter.core.stage import discover; d = discover(); "
            "assert {'run', 'sweep', 'pipeline', 'rerun', 'compare'} <= set(d), d; "
            "bad = [m for m in ('papermill', 'plotly', 'distributed', 'nbformat', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


def test_help_lists_param_flags(capsys):
    assert cli(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert "-p NAME VALUE, --param NAME VALUE" in out and "--no-cache" in out


def test_lab_server_contract(toy_nb, home, tmp_path):
    """The Lab server delegates to ``pipelines.run_pipeline(nb, params, output=, cwd=, registry_home=)`` → dict."""
    from llmops_jupyter.pipelines import run_pipeline

    out = tmp_path / "outputs" / "toy.out.ipynb"
    res = run_pipeline(str(toy_nb), {"rank": 2}, output=str(out), cwd=str(tmp_path), registry_home=str(home))
    assert res["status"] == "finished" and res["error"] is None and len(res["stage_runs"]) == 1
    assert out.exists() and Registry(home).get_run(res["run_id"])["stage"] == "pipeline"
    bad = make_notebook(tmp_path / "bad.ipynb", ["1/0"])
    res = run_pipeline(str(bad), {}, output=str(tmp_path / "bad.out.ipynb"), registry_home=str(home))
    assert res["status"] == "failed" and "ZeroDivisionError" in res["error"] and res["run_id"]


def test_sweep_variant_failing_outside_llmops_keeps_its_index_and_run(toy_nb, home):
    """A variant whose pipeline fails with another library's error (here jupyter_client: no such kernel) is
    reported as that variant, with its pipeline run and the error's type, not as variant -1 without a run."""
    from llmops_jupyter.core.errors import StageError
    from llmops_jupyter.pipelines import run_sweep

    with pytest.raises(StageError, match="2 of 2 sweep variants failed"):
        run_sweep(toy_nb, ["rank=2", "4"], {"lr": 1e-3}, parallel=1, gpus=[], kernel="llmops-no-such-kernel")
    reg = Registry(home)
    sweep = reg.list_runs(stage="sweep", limit=1)[0]
    variants = sweep["summary"]["variants"]
    assert [v["index"] for v in variants] == [0, 1], variants
    runs = {r["params"].get("variant"): r["id"] for r in pipeline_runs(reg) if r["parent_id"] == sweep["id"]}
    for v in variants:
        assert v["status"] == "failed" and "NoSuchKernel" in v["error"], v
        assert v["run_id"] == runs[v["index"]], (v, runs)


def test_grid_and_search_share_one_gpu_hand_out():
    """One scheduling loop (sweep.hand_out) for grids and searches: at most `parallel` jobs, each on a GPU no other
    running job holds, the slot back when the job ends, the next job started only when a slot is free."""
    import concurrent.futures as cf
    import inspect

    from llmops_jupyter.pipelines import sweep

    class Threads:  # the backend's submit / wait_any / result interface over threads
        def __init__(self):
            self.pool = cf.ThreadPoolExecutor(max_workers=4)

        def submit(self, fn, *a):
            return self.pool.submit(fn, *a)

        def wait_any(self, futures):
            return list(cf.wait(futures, return_when=cf.FIRST_COMPLETED)[0])

        def result(self, fut):
            return fut.result()

    held, seen, todo = set(), [], list(range(7))

    def start(gpu):
        if not todo:
            return None
        assert gpu is not None and gpu not in held, (gpu, held)
        assert len(held) < 2
        held.add(gpu)
        i = todo.pop(0)
        return Threads.pool.submit(lambda: {"index": i, "gpu": gpu}), i

    backend = Threads()
    Threads.pool = backend.pool
    for tag, gpu, res in sweep.hand_out(backend, ["0", "1"], 2, start):
        assert res == {"index": tag, "gpu": gpu}
        held.discard(gpu)
        seen.append(tag)
    assert sorted(seen) == list(range(7)) and not held
    source = inspect.getsource(sweep.SweepStage)
    assert source.count("hand_out(") == 2 and "free.pop(" not in source  # no copy of the loop left

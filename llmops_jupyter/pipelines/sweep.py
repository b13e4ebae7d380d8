"""Sweeps: a grid of parameter variants of one notebook (or an Optuna search over a space of them, see
:mod:`llmops_jupyter.pipelines.search`), each a pipeline run under one ``sweep`` run.

Every variant is validated before the first kernel starts. Variants run on a local process pool by default, or on
a Dask distributed cluster when given its address (``tcp://host:8786``, or a ``Client``/cluster object from Python).
When GPUs exist, each running variant gets one of them (``CUDA_VISIBLE_DEVICES``) and no two running variants share
one: the driver hands a GPU slot to a variant when it starts and takes it back when it ends. Cached variants (same
notebook, parameters and input files) come back at once, so re-running a sweep only runs what changed.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import math
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.errors import ConfigError, LlmopsError, StageError
from llmops_jupyter.core.runner import RunContext, Runner, RunResult
from llmops_jupyter.core.stage import Stage
from llmops_jupyter.registry import Registry, RunStatus


def parse_grid(items: list[str] | dict[str, Any] | None) -> dict[str, list[Any]]:
    """``["lr=1e-4", "2e-4", "rank=8,16"]`` (argparse splits on commas) or a mapping → ``{name: [values]}``."""
    if not items:
        return {}
    if isinstance(items, dict):
        return {str(k): (list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in items.items()}
    grid: dict[str, list[Any]] = {}
    current = None
    for item in items:
        for part in ([item] if not isinstance(item, str) else [p for p in item.split(",") if p.strip()]):
            if isinstance(part, str) and "=" in part:
                current, _, value = part.partition("=")
                current = current.strip().replace("-", "_")
                if current in grid:
                    raise ConfigError(f"--grid names '{current}' twice.", field="grid",
                                      fix="give each parameter once: --grid lr=1e-4,2e-4 rank=8,16")
                grid[current] = [value.strip()] if value.strip() else []
            elif current is None:
                raise ConfigError(f"--grid value {part!r} has no parameter name.", field="grid",
                                  fix="write --grid name=v1,v2 other=v3,v4")
            else:
                grid[current].append(part.strip() if isinstance(part, str) else part)
    empty = [k for k, v in grid.items() if not v]
    if empty:
        raise ConfigError(f"--grid '{empty[0]}' has no values.", field="grid", fix=f"write --grid {empty[0]}=v1,v2")
    return grid


def expand(grid: dict[str, list[Any]], fixed: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    names = list(grid)
    return [{**(fixed or {}), **dict(zip(names, combo, strict=True))} for combo in itertools.product(*(grid[n] for n in names))]


def detect_gpus() -> list[str]:
    """GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else what ``nvidia-smi -L`` lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def run_variant(home: str, notebook: str, params: dict[str, Any], *, parent_id: str, sweep: str, index: int,
                cache: bool, gpu: str | None, kernel: str | None, cwd: str | None,
                timeout: int | None, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """One variant (runs in a pool process or a Dask worker); never raises, reports errors in the result.

    ``extra_env`` goes to the variant's kernel (an Optuna trial's storage/study/trial ids). A notebook whose stage
    run was pruned (stopped early by a search) makes the pipeline run ``pruned`` too."""
    from llmops_jupyter.pipelines.execute import run_pipeline

    env = {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}
    env.update(extra_env or {})
    registry = Registry.open(home)
    try:
        res = run_pipeline(notebook, params, registry=registry, cache=cache, parent_id=parent_id, sweep=sweep,
                           variant=index, env=env, kernel=kernel, cwd=cwd, timeout=timeout,
                           name=f"{Path(notebook).stem}[{index}]")
        status = str(res.status)
        pruned = [c for c in registry.child_runs(res.run_id) if c["status"] == RunStatus.PRUNED.value]
        if pruned and status == RunStatus.FINISHED.value:
            status = RunStatus.PRUNED.value
            registry.update_run(res.run_id, status=RunStatus.PRUNED, error=pruned[0]["error"])
        return {"index": index, "run_id": res.run_id, "status": status, "metrics": res.metrics,
                "error": None, "gpu": gpu}
    except Exception as exc:  # noqa: BLE001 - any failure is this variant's result, with its index and run id
        error = str(exc) if isinstance(exc, LlmopsError) else f"{type(exc).__name__}: {exc}"
        return {"index": index, "run_id": variant_run_id(registry, parent_id, index), "status": "failed",
                "metrics": {}, "error": error, "gpu": gpu}


def variant_run_id(registry: Registry, parent_id: str, index: int) -> str | None:
    """The newest pipeline run of variant ``index`` under the sweep ``parent_id`` (None if it never started)."""
    found = [r["id"] for r in registry.child_runs(parent_id, "pipeline", newest_first=True)
             if r["params"].get("variant") == index]
    return found[0] if found else None


def hand_out(backend: Any, gpus: list[str], parallel: int,
             start: Callable[[str | None], tuple[Any, Any] | None]) -> Iterator[tuple[Any, str | None, dict]]:
    """The scheduling loop of grids and searches: at most ``parallel`` jobs at once, each holding one GPU slot of
    ``gpus`` while it runs (no two running jobs share one), the slot handed back when it ends.

    ``start(gpu)`` submits the next job on ``gpu`` (None: no GPU) and returns ``(future, tag)``, or None when there
    is nothing left to start; it is called only when a slot is free, so a search asks for its next trial after
    hearing the last results. Yields ``(tag, gpu, result)`` as jobs end."""
    free = list(gpus)
    pending: dict[Any, tuple[str | None, Any]] = {}
    more = True
    while True:
        while more and len(pending) < parallel:
            gpu = free.pop(0) if free else None
            started = start(gpu)
            if started is None:
                more = False
                if gpu is not None:
                    free.insert(0, gpu)
                break
            fut, tag = started
            pending[fut] = (gpu, tag)
        if not pending:
            return
        for fut in backend.wait_any(list(pending)):
            gpu, tag = pending.pop(fut)
            if gpu is not None:
                free.append(gpu)
            yield tag, gpu, backend.result(fut)


@dataclasses.dataclass
class SweepRunConfig(StageConfig):
    """What a sweep run records."""

    notebook: str = option(help="the notebook swept")
    grid: dict[str, Any] = option({}, "parameter → list of values")
    parameters: dict[str, Any] = option({}, "parameters fixed for every variant")
    parallel: int = option(1, "variants running at once", min=1)
    cluster: str | None = option(None, "Dask scheduler address, or None for the local process pool")
    cache: bool = option(True, "reuse unchanged variants")
    search: str = option("grid", "grid: every combination; optuna: TPE sampling over `space` with pruning",
                         choices=["grid", "optuna"])
    space: dict[str, Any] = option({}, "optuna: parameter → distribution")
    trials: int | None = option(None, "optuna: trials the study holds when the sweep ends", min=1)
    metric: str | None = option(None, "optuna: the metric optimised (a pipeline run metric; reported while "
                                      "training for pruning)")
    direction: str = option("minimize", "optuna: minimize or maximize the metric",
                            choices=["minimize", "maximize"])
    pruner: str = option("median", "optuna: the pruner", choices=["none", "median", "hyperband"])
    startup_trials: int = option(5, "optuna: trials before pruning and TPE modelling start", min=1)
    seed: int | None = option(None, "optuna: sampler seed")
    study: str | None = option(None, "optuna: the study name (the first sweep run's id)")
    storage: str | None = option(None, "optuna: the study's journal file")
    resume: str | None = option(None, "optuna: the sweep run this one resumes")


SweepRunConfig.command = "sweep"


class SweepStage(Stage):
    name = "sweep"
    config_cls = SweepRunConfig

    def __init__(self, variants: list[dict[str, Any]], *, cluster: Any = None, gpus: list[str] | None = None,
                 kernel: str | None = None, cwd: str | None = None, timeout: int | None = None):
        self.variants = variants
        self.cluster = cluster
        self.gpus = gpus if gpus is not None else detect_gpus()
        self.kernel = kernel
        self.cwd = cwd
        self.timeout = timeout

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from llmops_jupyter.pipelines.aggregate import compare_sweep, write_report

        cfg: SweepRunConfig = ctx.config
        if cfg.search == "optuna":
            return self._search(ctx)
        total = len(self.variants)
        parallel = max(1, min(cfg.parallel, total, len(self.gpus) or cfg.parallel))
        common = dict(parent_id=ctx.run_id, sweep=ctx.run_id, cache=cfg.cache, kernel=self.kernel, cwd=self.cwd,
                      timeout=self.timeout)
        home = str(ctx.registry.home)
        where = f"Dask cluster {cfg.cluster}" if self.cluster is not None else f"{parallel} local process(es)"
        ctx.log(f"sweep of {total} variants on {where}" + (f", GPUs {','.join(self.gpus)}" if self.gpus else ""))
        ctx.progress(0, total, desc="variants")
        results: list[dict[str, Any]] = []
        queue = list(enumerate(self.variants))
        with _Backend(self.cluster, parallel) as backend:
            def start(gpu: str | None) -> tuple[Any, int] | None:
                if not queue:
                    return None
                i, params = queue.pop(0)
                return backend.submit(run_variant, home, cfg.notebook, params, index=i, gpu=gpu, **common), i

            for i, gpu, res in hand_out(backend, self.gpus, parallel, start):
                if res.get("index") != i:  # the worker died before reporting: still this variant's result
                    res.update(index=i, gpu=gpu, run_id=variant_run_id(ctx.registry, ctx.run_id, i))
                results.append(res)
                ctx.progress(len(results), total, desc="variants")
        results.sort(key=lambda r: r["index"])
        failed = [r for r in results if r["status"] == "failed"]
        ctx.set_summary(variants=[{k: r[k] for k in ("index", "run_id", "status", "gpu", "error")} for r in results],
                        backend="dask" if self.cluster is not None else "processes", parallel=parallel)
        ctx.log_metrics({"variants": total, "failed": len(failed),
                         "cached": sum(r["status"] == "cached" for r in results)})
        comparison = compare_sweep(ctx.registry, ctx.run_id, runs=[r["run_id"] for r in results if r["run_id"]],
                                   grid=list(cfg.grid), variants=self.variants)
        out = ctx.staging_dir("report")
        write_report(comparison, out / "sweep-report.html")
        ctx.save_artifact(out, "report", name=f"sweep {Path(cfg.notebook).stem}", meta={"file": "sweep-report.html"})
        if failed:
            lines = "; ".join(f"variant {r['index']} ({r['run_id']}): {r['error']}" for r in failed[:3])
            raise StageError(f"{len(failed)} of {total} sweep variants failed: {lines}",
                             fix=f"see `%llmops compare {ctx.run_id}` and `%llmops show <run>` of the failed ones")
        return {"comparison": comparison}


    def _search(self, ctx: RunContext) -> dict[str, Any]:
        """Ask Optuna for trials, run each as a pipeline variant (up to ``parallel`` at once), tell it the result."""
        from optuna.trial import TrialState

        from llmops_jupyter.pipelines import search
        from llmops_jupyter.pipelines.aggregate import compare_sweep, write_report

        cfg: SweepRunConfig = ctx.config
        pruner = {"name": cfg.pruner, "startup_trials": cfg.startup_trials}
        # On resume the sampler's seed moves on by the trials already there, so it does not replay the first draws.
        existing = _study_size(cfg.storage, cfg.study)
        seed = None if cfg.seed is None else cfg.seed + existing
        study = search.create_study(cfg.storage, cfg.study, direction=cfg.direction, pruner=pruner, seed=seed,
                                    startup_trials=cfg.startup_trials)
        # A resumed study may hold trials whose process died with the old sweep: they never finish; mark them failed.
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        done_states = (TrialState.COMPLETE, TrialState.PRUNED)
        before = len(study.get_trials(deepcopy=False, states=done_states))
        todo = max(0, (cfg.trials or 0) - before)
        dists = search.distributions(cfg.space)
        parallel = max(1, min(cfg.parallel, todo or 1, len(self.gpus) or cfg.parallel))
        home = str(ctx.registry.home)
        where = f"Dask cluster {cfg.cluster}" if self.cluster is not None else f"{parallel} local process(es)"
        ctx.log(f"optuna search: {todo} new trial(s) ({before} already in study {cfg.study}) on {where}")
        ctx.progress(0, todo, desc="trials")
        results: list[dict[str, Any]] = []
        fixed = dict(cfg.parameters)
        asked = 0
        with _Backend(self.cluster, parallel) as backend:
            def start(gpu: str | None) -> tuple[Any, Any] | None:
                nonlocal asked
                if asked >= todo:
                    return None
                trial = study.ask(dists)
                asked += 1
                env = search.trial_env(cfg.storage, cfg.study, trial._trial_id, cfg.metric, pruner)
                fut = backend.submit(run_variant, home, cfg.notebook, {**fixed, **trial.params},
                                     parent_id=ctx.run_id, sweep=ctx.run_id, index=trial.number,
                                     cache=cfg.cache, gpu=gpu, kernel=self.kernel, cwd=self.cwd,
                                     timeout=self.timeout, extra_env=env)
                return fut, trial

            for trial, gpu, res in hand_out(backend, self.gpus, parallel, start):
                if res.get("index") != trial.number:  # the worker died before reporting
                    res.update(gpu=gpu, run_id=variant_run_id(ctx.registry, ctx.run_id, trial.number))
                res["index"] = trial.number
                res["params"] = dict(trial.params)
                value = res["metrics"].get(cfg.metric)
                if res["run_id"]:
                    trial.set_user_attr("run_id", res["run_id"])
                if res["status"] == RunStatus.PRUNED.value:
                    study.tell(trial, state=TrialState.PRUNED)
                elif res["status"] == "failed" or value is None or math.isnan(value):
                    if res["status"] != "failed":
                        res["error"] = f"the notebook recorded no metric '{cfg.metric}'"
                        res["status"] = "failed"
                    study.tell(trial, state=TrialState.FAIL)
                else:
                    study.tell(trial, float(value))
                res["value"] = value
                results.append(res)
                ctx.progress(len(results), todo, desc="trials")
                ctx.log(f"trial {trial.number} {res['status']}"
                        + (f": {cfg.metric}={value:.4g}" if value is not None else "")
                        + f" ({_params_text(trial.params)})")
        results.sort(key=lambda r: r["index"])
        best = search.best_trial(study)
        counts = {s: sum(r["status"] == s for r in results) for s in ("finished", "cached", "pruned", "failed")}
        ctx.set_summary(trials=[{k: r.get(k) for k in ("index", "run_id", "status", "params", "value", "gpu", "error")}
                                for r in results],
                        best=best, study=cfg.study, storage=cfg.storage, study_trials=len(study.trials),
                        backend="dask" if self.cluster is not None else "processes", parallel=parallel)
        metrics = {"trials": len(results), "pruned": counts["pruned"], "failed": counts["failed"],
                   "cached": counts["cached"]}
        if best is not None and best["value"] is not None:
            metrics[f"best_{cfg.metric}"] = best["value"]
        ctx.log_metrics(metrics)
        if best is not None:
            ctx.log(f"best trial {best['trial']} ({best['run_id']}): {cfg.metric}={best['value']:.4g} {best['params']}")
        comparison = compare_sweep(ctx.registry, ctx.run_id, study=study)
        out = ctx.staging_dir("report")
        write_report(comparison, out / "sweep-report.html")
        ctx.save_artifact(out, "report", name=f"search {Path(cfg.notebook).stem}", meta={"file": "sweep-report.html"})
        if results and counts["failed"] == len(results):
            lines = "; ".join(f"trial {r['index']} ({r['run_id']}): {r['error']}" for r in results[:3])
            raise StageError(f"all {len(results)} trials failed: {lines}",
                             fix=f"see `%llmops show <run>` of the failed ones (`%llmops compare {ctx.run_id}`)")
        return {"comparison": comparison, "best": best}


def _study_size(storage: str, study: str) -> int:
    from llmops_jupyter.pipelines import search

    names = [st.study_name for st in search.open_storage(storage).get_all_studies()]
    return len(search.load_study(storage, study).trials) if study in names else 0


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


class _Backend:
    """The same submit/wait interface over a local process pool and a Dask client."""

    def __init__(self, cluster: Any, parallel: int):
        self.cluster = cluster
        self.parallel = parallel
        self.client = None
        self.pool = None
        self._own_client = False

    def __enter__(self) -> _Backend:
        if self.cluster is None:
            import multiprocessing

            # spawn: a fresh interpreter per worker (no inherited SQLite handles or threads from a kernel).
            self.pool = cf.ProcessPoolExecutor(max_workers=self.parallel,
                                               mp_context=multiprocessing.get_context("spawn"))
            return self
        from llmops_jupyter.core.errors import require

        distributed = require("distributed", "batch", package="dask[distributed]", feature="--cluster")
        if isinstance(self.cluster, distributed.Client):
            self.client = self.cluster
        else:
            address = getattr(self.cluster, "scheduler_address", None) or str(self.cluster)
            try:
                self.client = distributed.Client(address, set_as_default=False, timeout="20s")
            except (OSError, TimeoutError) as exc:
                raise StageError(f"Cannot reach the Dask scheduler at {address} ({exc}).",
                                 fix="check the address (tcp://host:8786) and that the scheduler is running") from None
            self._own_client = True
        return self

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.pool is not None:
            return self.pool.submit(fn, *args, **kwargs)
        return self.client.submit(fn, *args, pure=False, **kwargs)

    def wait_any(self, futures: list[Any]) -> list[Any]:
        if self.pool is not None:
            done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
            return list(done)
        import time

        # Polling the futures' own client (distributed.wait / as_completed want a global default client).
        while True:
            done = [f for f in futures if f.done()]
            if done:
                return done
            time.sleep(0.2)

    def result(self, fut: Any) -> dict[str, Any]:
        try:
            return fut.result()
        except Exception as exc:  # noqa: BLE001 - a worker died: report the variant, keep the sweep going
            return {"index": -1, "run_id": None, "status": "failed", "metrics": {},
                    "error": f"{type(exc).__name__}: {exc}", "gpu": None}

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self.client is not None and self._own_client:
            self.client.close()


def _workers(gpus: list[str] | None, parallel: int | None, cluster: Any, jobs: int) -> tuple[list[str], int, str | None]:
    """(GPUs, parallel kernels, recorded cluster address) of a sweep or search: one kernel per GPU, else half the
    cores (at most ``jobs``), unless ``parallel`` says otherwise."""
    gpus = detect_gpus() if gpus is None else gpus
    if parallel is None:
        parallel = len(gpus) or max(1, min(jobs, (os.cpu_count() or 2) // 2))
    address = None if cluster is None else (cluster if isinstance(cluster, str)
                                            else getattr(cluster, "scheduler_address", type(cluster).__name__))
    return gpus, parallel, address


def run_sweep(
    notebook: str | os.PathLike,
    grid: dict[str, list[Any]] | list[str],
    parameters: dict[str, Any] | None = None,
    *,
    registry: Registry | None = None,
    parallel: int | None = None,
    cluster: Any = None,
    cache: bool = True,
    name: str | None = None,
    kernel: str | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: int | None = None,
    gpus: list[str] | None = None,
) -> RunResult:
    """Validate every variant, then run them (see the module docstring). Returns the ``sweep`` run."""
    from llmops_jupyter.pipelines.execute import prepare

    registry = registry or Registry.open()
    grid = parse_grid(grid)
    if not grid:
        raise ConfigError("A sweep needs --grid.", field="grid", fix="write --grid lr=1e-4,2e-4 rank=8,16")
    variants = expand(grid, parameters)
    source, _nb, params, _env = prepare(notebook, parameters, registry=registry)
    typed = []
    for v in variants:  # every variant checked before the first kernel starts
        typed.append(prepare(source, v, registry=registry)[2].record)
    typed_grid = {k: [prepare(source, {k: x}, registry=registry)[2].record[k] for x in vals]
                  for k, vals in grid.items()}
    gpus, parallel, address = _workers(gpus, parallel, cluster, len(variants))
    config = SweepRunConfig(notebook=str(source), grid=typed_grid, parameters=params.record, parallel=parallel,
                            cluster=address, cache=cache)
    stage = SweepStage(typed, cluster=cluster, gpus=gpus, kernel=kernel,
                       cwd=str(Path(cwd).resolve()) if cwd else None, timeout=timeout)
    return Runner(registry).run(stage, config, name=name)


def run_search(
    notebook: str | os.PathLike | None,
    space: dict[str, Any] | list[str] | None = None,
    parameters: dict[str, Any] | None = None,
    *,
    trials: int | None = None,
    metric: str | None = None,
    direction: str | None = None,
    pruner: str | None = None,
    startup_trials: int | None = None,
    seed: int | None = None,
    resume: str | None = None,
    registry: Registry | None = None,
    parallel: int | None = None,
    cluster: Any = None,
    cache: bool = True,
    name: str | None = None,
    kernel: str | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: int | None = None,
    gpus: list[str] | None = None,
) -> RunResult:
    """An Optuna search over ``space`` (see :mod:`llmops_jupyter.pipelines.search`); returns the ``sweep`` run.

    ``resume`` names an earlier optuna sweep run: its study (storage, space, metric, direction, notebook and fixed
    parameters unless given again) continues until it holds ``trials`` finished trials; trials already complete or
    pruned are not repeated."""
    from llmops_jupyter.pipelines import search
    from llmops_jupyter.pipelines.execute import prepare

    registry = registry or Registry.open()
    prev: dict[str, Any] = {}
    if resume:
        old = registry.get_run(resume)
        if old["stage"] != "sweep" or old["params"].get("search") != "optuna":
            raise ConfigError(f"--resume {resume}: run {old['id']} is not an optuna sweep.", field="resume",
                              value=resume, fix="pass a sweep run made with --search optuna (`%llmops runs --stage sweep`)")
        prev = old["params"]
        resume = old["id"]
    space = search.parse_space(space) or prev.get("space") or {}
    if not space:
        raise ConfigError("--search optuna needs --space.", field="space",
                          fix="write --space 'lr=loguniform(1e-5,1e-3)' 'rank=int(4,64)'")
    metric = metric or prev.get("metric")
    if not metric:
        raise ConfigError("--search optuna needs --metric (the value to optimise).", field="metric",
                          fix="e.g. --metric eval_loss --direction minimize")
    trials = trials or prev.get("trials")
    if not trials:
        raise ConfigError("--search optuna needs --trials.", field="trials", fix="e.g. --trials 20")
    notebook = notebook or prev.get("notebook")
    if not notebook:
        raise ConfigError("a search needs a notebook.", field="notebook", fix="llmops sweep NB --search optuna ...")
    fixed = {**(prev.get("parameters") or {}), **(parameters or {})}
    overlap = sorted(set(fixed) & set(space))
    for k in overlap:
        fixed.pop(k)
    source, _nb, params, _env = prepare(notebook, fixed, registry=registry)
    for k, d in space.items():  # every parameter typed against the notebook before the first kernel starts
        probes = d["values"] if d["kind"] == "choice" else [d["low"], d["high"]]
        for v in probes:
            prepare(source, {**fixed, k: v}, registry=registry)
    gpus, parallel, address = _workers(gpus, parallel, cluster, trials)
    run_id = f"sweep-{os.urandom(4).hex()}"
    study = prev.get("study") or run_id
    storage = prev.get("storage") or str(search.storage_path(registry.home, study))
    config = SweepRunConfig(
        notebook=str(source), grid={}, parameters=params.record, parallel=parallel, cluster=address, cache=cache,
        search="optuna", space=space, trials=trials, metric=metric,
        direction=direction or prev.get("direction") or "minimize", pruner=pruner or prev.get("pruner") or "median",
        startup_trials=startup_trials or prev.get("startup_trials") or 5,
        seed=seed if seed is not None else prev.get("seed"), study=study, storage=storage, resume=resume)
    stage = SweepStage([], cluster=cluster, gpus=gpus, kernel=kernel, cwd=str(Path(cwd).resolve()) if cwd else None,
                       timeout=timeout)
    return Runner(registry).run(stage, config, name=name, run_id=run_id)

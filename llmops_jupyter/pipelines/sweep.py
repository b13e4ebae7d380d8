"""Sweeps: a grid of parameter variants of one notebook, each a pipeline run under one ``sweep`` run.

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
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.errors import ConfigError, LlmopsError, StageError
from llmops_jupyter.core.runner import RunContext, Runner, RunResult
from llmops_jupyter.core.stage import Stage
from llmops_jupyter.registry import Registry


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
                timeout: int | None) -> dict[str, Any]:
    """One variant (runs in a pool process or a Dask worker); never raises, reports errors in the result."""
    from llmops_jupyter.pipelines.execute import run_pipeline

    env = {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}
    registry = Registry.open(home)
    try:
        res = run_pipeline(notebook, params, registry=registry, cache=cache, parent_id=parent_id, sweep=sweep,
                           variant=index, env=env, kernel=kernel, cwd=cwd, timeout=timeout,
                           name=f"{Path(notebook).stem}[{index}]")
        return {"index": index, "run_id": res.run_id, "status": str(res.status), "metrics": res.metrics,
                "error": None, "gpu": gpu}
    except LlmopsError as exc:
        failed = [r["id"] for r in registry.child_runs(parent_id, "pipeline", newest_first=True)
                  if r["params"].get("variant") == index]
        return {"index": index, "run_id": failed[0] if failed else None, "status": "failed", "metrics": {},
                "error": str(exc), "gpu": gpu}


@dataclasses.dataclass
class SweepRunConfig(StageConfig):
    """What a sweep run records."""

    notebook: str = option(help="the notebook swept")
    grid: dict[str, Any] = option({}, "parameter → list of values")
    parameters: dict[str, Any] = option({}, "parameters fixed for every variant")
    parallel: int = option(1, "variants running at once", min=1)
    cluster: str | None = option(None, "Dask scheduler address, or None for the local process pool")
    cache: bool = option(True, "reuse unchanged variants")


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
        total = len(self.variants)
        parallel = max(1, min(cfg.parallel, total, len(self.gpus) or cfg.parallel))
        common = dict(parent_id=ctx.run_id, sweep=ctx.run_id, cache=cfg.cache, kernel=self.kernel, cwd=self.cwd,
                      timeout=self.timeout)
        home = str(ctx.registry.home)
        where = f"Dask cluster {cfg.cluster}" if self.cluster is not None else f"{parallel} local process(es)"
        ctx.log(f"sweep of {total} variants on {where}" + (f", GPUs {','.join(self.gpus)}" if self.gpus else ""))
        ctx.progress(0, total, desc="variants")
        results: list[dict[str, Any]] = []
        with _Backend(self.cluster, parallel) as backend:
            free = list(self.gpus)
            pending: dict[Any, str | None] = {}
            queue = list(enumerate(self.variants))
            while queue or pending:
                while queue and len(pending) < parallel:
                    i, params = queue.pop(0)
                    gpu = free.pop(0) if free else None
                    fut = backend.submit(run_variant, home, cfg.notebook, params, index=i, gpu=gpu, **common)
                    pending[fut] = gpu
                done = backend.wait_any(list(pending))
                for fut in done:
                    gpu = pending.pop(fut)
                    if gpu is not None:
                        free.append(gpu)
                    results.append(backend.result(fut))
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
    gpus = detect_gpus() if gpus is None else gpus
    if parallel is None:
        parallel = len(gpus) or max(1, min(len(variants), (os.cpu_count() or 2) // 2))
    address = None if cluster is None else (cluster if isinstance(cluster, str)
                                            else getattr(cluster, "scheduler_address", type(cluster).__name__))
    config = SweepRunConfig(notebook=str(source), grid=typed_grid, parameters=params.record, parallel=parallel,
                            cluster=address, cache=cache)
    stage = SweepStage(typed, cluster=cluster, gpus=gpus, kernel=kernel,
                       cwd=str(Path(cwd).resolve()) if cwd else None, timeout=timeout)
    return Runner(registry).run(stage, config, name=name)

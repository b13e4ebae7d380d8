"""Pipeline commands: ``pipeline export|run``, ``run``, ``sweep``, ``rerun``, ``compare`` (papermill glue).

Views, not stages: the runs they create (``pipeline`` per notebook execution, ``sweep`` per grid) are recorded by
:mod:`llmops_jupyter.pipelines`, which this module imports only inside the commands (papermill, dask and plotly
stay unloaded until a pipeline actually runs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.display import Bundle, Table, fmt_duration
from llmops_jupyter.core.errors import ConfigError, StageError
from llmops_jupyter.core.stage import CommandEnv, command


def _opt(default: Any, help: str, *, flag: str | None = None, aliases: tuple[str, ...] = (), **argparse: Any) -> Any:
    """:func:`option` plus argparse overrides (repeatable ``-p NAME VALUE``, short flags with long aliases)."""
    f = option(default, help, flag=flag)
    meta = {**f.metadata, "argparse": {**argparse, "aliases": aliases}}
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata=meta)
    return dataclasses.field(default=f.default, metadata=meta)


def _param_field() -> Any:
    return _opt([], "a notebook parameter: -p NAME VALUE (repeat it); VALUE is typed against the notebook's "
                    "parameters cell and the stage config; secrets as env:VAR", flag="-p", aliases=("--param",),
                action="append", nargs=2, metavar=("NAME", "VALUE"))


def _file_field() -> Any:
    return _opt(None, "YAML file of parameters (name: value); -p values win", flag="-f", aliases=("--file",))


def _params(cfg: Any) -> dict[str, Any]:
    from llmops_jupyter.pipelines.execute import gather_params
    from llmops_jupyter.pipelines.params import pairs_to_dict

    return gather_params(pairs_to_dict(cfg.param), cfg.file)


def _run_report(result: Any) -> Bundle:
    cells = result.summary.get("cells", [])
    timing = Table(["cell", "first line", "status", "seconds"],
                   [["injected" if c.get("injected") else c.get("index"), c.get("first_line"), c.get("status"),
                     c.get("duration_s")] for c in cells], title="Cells")
    children = Table(["run", "stage", "status"], [[c["id"], c["stage"], c["status"]]
                                                  for c in result.summary.get("children", [])],
                     title="Stage runs made by the notebook")
    note = f" (cached: same notebook, parameters and inputs as {result.summary['cached_from']})" \
        if result.summary.get("cached_from") else ""
    head = Table(["field", "value"], [["pipeline run", result.run_id], ["status", f"{result.status}{note}"],
                                      ["duration", fmt_duration(result.duration_s)],
                                      ["output notebook", str(result.artifact.path) if result.artifact else ""]],
                 title=f"Pipeline {result.summary.get('notebook', '')}")
    metrics = Table(["metric", "value"], sorted(result.metrics.items()), title="Metrics")
    return Bundle(head, metrics, timing, children)


def _progress_printer(env: CommandEnv) -> Any:
    """The command line and a notebook cell get a line per stage start/end and progress step while the kernel
    works (the pipeline's stages run in another process, so no live bar can reach here)."""
    if env.front_end not in ("cli", "magic"):
        return None

    def out(line: str) -> None:
        print(line, flush=True)

    return out


def _execute(cfg: Any, env: CommandEnv) -> Bundle:
    from llmops_jupyter.pipelines import copy_output_notebook, track_started
    from llmops_jupyter.pipelines.execute import run_pipeline

    listeners: list = []
    started = track_started(listeners)
    try:
        result = run_pipeline(cfg.notebook, _params(cfg), registry=env.registry, cache=cfg.cache, name=cfg.name,
                              kernel=cfg.kernel, timeout=cfg.timeout, listeners=listeners,
                              progress=_progress_printer(env))
    except StageError:
        if cfg.out and started:
            copy_output_notebook(env.registry, env.registry.get_run(started[0])["summary"], cfg.out)
        raise
    if cfg.out:
        copy_output_notebook(env.registry, result.summary, cfg.out)
    return _run_report(result)


@dataclasses.dataclass
class RunConfig(StageConfig):
    notebook: str = option(help="the notebook to execute (needs a cell tagged 'parameters' to take -p values)",
                           positional=True)
    param: list[str] = _param_field()
    file: str | None = _file_field()
    cache: bool = option(True, "reuse the earlier run when notebook, parameters and input files are unchanged "
                               "(--no-cache to execute anyway)")
    name: str | None = option(None, "name of the pipeline run in the registry")
    kernel: str | None = option(None, "kernel spec (default: 'llmops-jupyter' if installed, else the notebook's)")
    timeout: int | None = option(None, "seconds a single cell may run before the run fails", min=1)
    out: str | None = option(None, "also write the executed notebook here (it is always kept in the registry; "
                                   "written for a failed run too, to see where it stopped)")


@command("run", RunConfig, extras=("batch",))
def run(cfg: RunConfig, env: CommandEnv) -> Bundle:
    """Execute a notebook with papermill as a recorded pipeline run (parameters validated before the kernel starts)."""
    return _execute(cfg, env)


@dataclasses.dataclass
class PipelineConfig(StageConfig):
    action: str = option(help="export: make this notebook a pipeline notebook; run: execute one",
                         positional=True, choices=["export", "run"])
    notebook: str | None = option(None, "the notebook (export: default the current notebook)", positional=True)
    out: str | None = option(None, "export: where to write the pipeline notebook (default <name>.pipeline.ipynb); "
                                   "run: also write the executed notebook here")
    param: list[str] = _param_field()
    file: str | None = _file_field()
    cache: bool = option(True, "run: reuse an unchanged earlier run (--no-cache to execute anyway)")
    name: str | None = option(None, "run: name of the pipeline run")
    kernel: str | None = option(None, "run: kernel spec (default: 'llmops-jupyter' if installed)")
    timeout: int | None = option(None, "run: seconds a single cell may run", min=1)


@command("pipeline", PipelineConfig, extras=("batch",))
def pipeline(cfg: PipelineConfig, env: CommandEnv) -> Bundle | Table:
    """Pipeline notebooks: `export` lifts magic arguments into a parameters cell; `run` executes with papermill."""
    if cfg.action == "run":
        if not cfg.notebook:
            raise ConfigError("pipeline run needs a notebook.", field="notebook",
                              fix="%llmops pipeline run my.ipynb -p name value")
        return _execute(cfg, env)
    from llmops_jupyter.core.env import current_notebook
    from llmops_jupyter.pipelines.export import export_notebook

    source = cfg.notebook or current_notebook()
    if not source:
        raise ConfigError("pipeline export cannot tell which notebook this is.", field="notebook",
                          fix="pass its path: %llmops pipeline export my.ipynb")
    path, lifted, art = export_notebook(source, cfg.out, registry=env.registry)
    rows = [[lf.name, repr(lf.value), f"{lf.stage} {lf.flag}", lf.cell] for lf in lifted]
    note = f"notebook artifact {art.short} (hash of the exported notebook)" if art else ""
    return Table(["parameter", "value", "from", "cell"], rows, title=f"Pipeline notebook written to {path}", note=note)


@dataclasses.dataclass
class SweepConfig(StageConfig):
    notebook: str = option(help="the pipeline notebook to sweep", positional=True)
    grid: list[str] = option([], "values per parameter: --grid lr=1e-4,2e-4 rank=8,16 (all combinations)")
    param: list[str] = _param_field()
    file: str | None = _opt(None, "YAML file: fixed parameters, or `parameters:` and `grid:` mappings",
                            flag="-f", aliases=("--file",))
    parallel: int | None = option(None, "variants at once (default: one per GPU, else half the CPU cores)", min=1)
    cluster: str | None = option(None, "Dask scheduler address (tcp://host:8786); default: local process pool")
    cache: bool = option(True, "skip variants whose notebook, parameters and inputs are unchanged (--no-cache)")
    name: str | None = option(None, "name of the sweep run")
    kernel: str | None = option(None, "kernel spec for every variant")
    timeout: int | None = option(None, "seconds a single cell may run", min=1)
    search: str = option("grid", "grid: every combination of --grid; optuna: TPE sampling over --space with pruning "
                                 "(needs --trials and --metric)", choices=["grid", "optuna"])
    space: list[str] = option([], "optuna: distributions per parameter: --space 'lr=loguniform(1e-5,1e-3)' "
                                  "'rank=int(4,64)' 'dropout=float(0,0.2)' 'method=choice(lora,qlora)'")
    trials: int | None = option(None, "optuna: trials the study holds when the sweep ends (with --resume: the new "
                                      "total)", min=1)
    metric: str | None = option(None, "optuna: the metric to optimise (e.g. eval_loss); its intermediate values "
                                      "while training drive pruning")
    direction: str | None = option(None, "optuna: minimize or maximize --metric (default: minimize)",
                                   choices=["minimize", "maximize"])
    pruner: str | None = option(None, "optuna: stop unpromising trials early (default: median)",
                                choices=["none", "median", "hyperband"])
    startup_trials: int | None = option(None, "optuna: trials before pruning and TPE modelling start (default 5)",
                                        min=1)
    seed: int | None = option(None, "optuna: sampler seed (same seed and results → same proposals)", min=0)
    resume: str | None = option(None, "optuna: continue the study of this sweep run (finished trials are kept, "
                                      "not repeated)")

    def validate(self) -> None:
        if self.search == "grid":
            given = [f for f in ("space", "trials", "metric", "direction", "pruner", "startup_trials", "seed",
                                 "resume") if getattr(self, f) not in (None, [])]
            if given:
                flag = "--" + given[0].replace("_", "-")
                raise ConfigError(f"sweep: {flag} belongs to an Optuna search.", field=given[0],
                                  fix=f"add --search optuna (or drop {flag} for a grid sweep)")


@command("sweep", SweepConfig, extras=("batch",))
def sweep(cfg: SweepConfig, env: CommandEnv) -> Any:
    """Run a notebook over a grid of parameters, or an Optuna search with pruning (process pool or Dask cluster),
    then compare the variants."""
    from llmops_jupyter.pipelines.execute import gather_params
    from llmops_jupyter.pipelines.params import load_params_file, pairs_to_dict
    from llmops_jupyter.pipelines.sweep import parse_grid, run_search, run_sweep

    grid = parse_grid(cfg.grid)
    fixed: dict[str, Any] = {}
    if cfg.file:
        data = load_params_file(cfg.file)
        if "grid" in data or "parameters" in data:
            grid = {**parse_grid(data.get("grid") or {}), **grid}
            fixed.update(data.get("parameters") or {})
        else:
            fixed.update(data)
    fixed.update(gather_params(pairs_to_dict(cfg.param)))
    if cfg.search == "optuna":
        result = run_search(cfg.notebook, cfg.space, fixed, trials=cfg.trials, metric=cfg.metric,
                            direction=cfg.direction, pruner=cfg.pruner, startup_trials=cfg.startup_trials,
                            seed=cfg.seed, resume=cfg.resume, registry=env.registry, parallel=cfg.parallel,
                            cluster=cfg.cluster, cache=cfg.cache, name=cfg.name, kernel=cfg.kernel,
                            timeout=cfg.timeout)
    else:
        result = run_sweep(cfg.notebook, grid, fixed, registry=env.registry, parallel=cfg.parallel,
                           cluster=cfg.cluster, cache=cfg.cache, name=cfg.name, kernel=cfg.kernel,
                           timeout=cfg.timeout)
    comparison = result.outputs["comparison"]
    if result.artifact is not None:
        comparison.report = result.artifact.file("sweep-report.html")
    return comparison


@dataclasses.dataclass
class CompareConfig(StageConfig):
    sweep: str = option("sweep@latest", "sweep run id (or prefix / 'sweep@latest')", positional=True)
    metric: str | None = option(None, "metric for colour, best variant and metric-vs-parameter plots")
    out: str | None = option(None, "also write the HTML report (table + figures) to this file")


@command("compare", CompareConfig)
def compare(cfg: CompareConfig, env: CommandEnv) -> Any:
    """Compare a sweep's variants: one table plus parallel-coordinates and metric-vs-parameter figures (for an Optuna
    search also its optimisation history, parameter importances and parallel coordinates)."""
    from llmops_jupyter.pipelines.aggregate import compare_sweep, write_report

    comparison = compare_sweep(env.registry, cfg.sweep, metric=cfg.metric)
    if cfg.metric and cfg.metric not in comparison.metrics:
        raise ConfigError(f"compare: the sweep has no metric '{cfg.metric}'.", field="metric", value=cfg.metric,
                          fix=f"choose one of: {', '.join(comparison.metrics) or '(none recorded)'}")
    if cfg.out:
        write_report(comparison, cfg.out)
    else:
        try:
            comparison.report = env.registry.get_artifact(f"{comparison.sweep_id}:report").file("sweep-report.html")
        except Exception:  # noqa: BLE001 - a sweep that failed before its report
            pass
    return comparison


@dataclasses.dataclass
class RerunConfig(StageConfig):
    run: str = option(help="the pipeline run to reproduce (id, prefix or 'pipeline@latest')", positional=True)
    rtol: float = option(1e-6, "relative tolerance for metrics to count as reproduced", min=0)
    atol: float = option(1e-9, "absolute tolerance for metrics to count as reproduced", min=0)


@command("rerun", RerunConfig, extras=("batch",))
def rerun(cfg: RerunConfig, env: CommandEnv) -> Table:
    """Re-execute a pipeline run with its recorded notebook and parameters; report whether metrics match."""
    from llmops_jupyter.pipelines.execute import rerun_pipeline

    new, rows, ok = rerun_pipeline(cfg.run, registry=env.registry, rtol=cfg.rtol, atol=cfg.atol)
    verdict = "reproduced: all metrics match" if ok else "NOT reproduced: some metrics differ"
    table = Table(["metric", "original", "rerun", "diff", "match"],
                  [[r["metric"], r["original"], r["rerun"], r["diff"], "yes" if r["match"] else "NO"] for r in rows],
                  title=f"Rerun {new.run_id} of {cfg.run}",
                  note=f"{verdict} (rtol={cfg.rtol:g}, atol={cfg.atol:g})")
    table.matches = ok  # type: ignore[attr-defined]
    table.run_id = new.run_id  # type: ignore[attr-defined]
    return table

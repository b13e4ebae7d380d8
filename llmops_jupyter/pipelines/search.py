"""Optuna search over a pipeline notebook: TPE sampling, pruning on intermediate metrics, resumable storage.

Each trial is an ordinary pipeline run under the ``sweep`` run (same process pool / Dask backend as a grid). The
study lives in one Optuna journal file inside the registry folder (``<home>/search/<study>.journal``), shared by the
driver and every trial's kernel, so a sweep can be resumed (``--resume SWEEP``) without repeating finished trials.

Pruning crosses the process boundary through the environment: the sweep starts each trial's kernel with
``LLMOPS_OPTUNA_STORAGE``, ``LLMOPS_OPTUNA_STUDY``, ``LLMOPS_OPTUNA_TRIAL`` (and the metric and pruner). In that
kernel every Runner has :func:`trial_listener` among its default listeners; it reports the metric's intermediate
values (eval loss every ``--eval-every`` steps) to the trial and, when the pruner says so, asks the run to stop
(:func:`llmops_jupyter.core.runner.request_stop`): the fine-tune ends at the next step and is recorded ``pruned``.
Outside such a kernel the listener does nothing and imports nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from llmops_jupyter.core.errors import ConfigError

ENV_STORAGE = "LLMOPS_OPTUNA_STORAGE"
ENV_STUDY = "LLMOPS_OPTUNA_STUDY"
ENV_TRIAL = "LLMOPS_OPTUNA_TRIAL"
ENV_METRIC = "LLMOPS_OPTUNA_METRIC"
ENV_PRUNER = "LLMOPS_OPTUNA_PRUNER"

KINDS = ("float", "uniform", "loguniform", "int", "logint", "choice")
_SPEC = re.compile(r"([A-Za-z_][\w-]*)\s*=\s*([a-z]+)\s*\(([^()]*)\)")


# -- the search space ----------------------------------------------------------------------------------------------
def parse_space(items: list[str] | dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``['lr=loguniform(1e-5,1e-3)', 'rank=int(4,64)', 'dropout=float(0,0.2)', 'method=choice(lora,qlora)']`` →
    ``{name: {"kind", "low", "high"} | {"kind": "choice", "values"}}`` (a mapping of such dicts passes through).

    Front ends may have split an item on its commas; the items are joined back before parsing."""
    if not items:
        return {}
    if isinstance(items, dict):
        return {str(k): dict(v) for k, v in items.items()}
    text = ",".join(str(i) for i in items)
    space: dict[str, dict[str, Any]] = {}
    pos = 0
    for m in _SPEC.finditer(text):
        gap = text[pos:m.start()].strip(" ,")
        if gap:
            raise _bad(gap)
        pos = m.end()
        name, kind, args = m.group(1).replace("-", "_"), m.group(2), [a.strip() for a in m.group(3).split(",")]
        if name in space:
            raise ConfigError(f"--space names '{name}' twice.", field="space", fix="give each parameter once")
        if kind not in KINDS:
            raise ConfigError(f"--space '{name}': unknown distribution '{kind}'.", field="space", value=kind,
                              fix=f"use one of: {', '.join(KINDS)}")
        if kind == "choice":
            if not any(args):
                raise _bad(m.group(0))
            space[name] = {"kind": "choice", "values": [_scalar(a) for a in args if a]}
            continue
        if len(args) != 2:
            raise _bad(m.group(0))
        try:
            low, high = float(args[0]), float(args[1])
        except ValueError:
            raise _bad(m.group(0)) from None
        if not low < high or (kind in ("loguniform", "logint") and low <= 0):
            raise ConfigError(f"--space '{name}': the range ({args[0]}, {args[1]}) is empty"
                              + (" or not positive (log scale)" if kind.startswith("log") else "") + ".",
                              field="space", fix="write low < high, e.g. lr=loguniform(1e-5,1e-3)")
        if kind in ("int", "logint"):
            if low != int(low) or high != int(high):
                raise ConfigError(f"--space '{name}': int() takes whole numbers, got {m.group(0)}.", field="space",
                                  fix="e.g. rank=int(4,64)")
            low, high = int(low), int(high)
        space[name] = {"kind": {"uniform": "float"}.get(kind, kind), "low": low, "high": high}
    rest = text[pos:].strip(" ,")
    if rest:
        raise _bad(rest)
    return space


def _bad(text: str) -> ConfigError:
    return ConfigError(f"--space item '{text}' is not understood.", field="space", value=text,
                       fix="write NAME=loguniform(LOW,HIGH) | float(LOW,HIGH) | int(LOW,HIGH) | choice(A,B,...)")


def _scalar(text: str) -> Any:
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            continue
    return {"true": True, "false": False}.get(text.lower(), text)


def distributions(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Optuna distributions for :func:`parse_space`'s result (optuna imported here)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for name, d in space.items():
        kind = d["kind"]
        if kind == "choice":
            out[name] = CategoricalDistribution(d["values"])
        elif kind in ("int", "logint"):
            out[name] = IntDistribution(int(d["low"]), int(d["high"]), log=kind == "logint")
        else:
            out[name] = FloatDistribution(float(d["low"]), float(d["high"]), log=kind == "loguniform")
    return out


# -- storage, pruner, study ----------------------------------------------------------------------------------------
def storage_path(home: str | os.PathLike, study: str) -> Path:
    """Where a study's journal lives: inside the registry folder, next to the runs it describes."""
    path = Path(home) / "search" / f"{study}.journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def open_storage(path: str | os.PathLike) -> Any:
    """Optuna's journal storage on a file: safe for several processes (the driver, local workers, kernels)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def make_pruner(spec: dict[str, Any] | None) -> Any:
    """``{"name": "none"|"median"|"hyperband", "startup_trials": N, "warmup_steps": W}`` → an Optuna pruner."""
    import optuna

    spec = spec or {"name": "median"}
    name = spec.get("name", "median")
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        return _startup_hyperband(int(spec.get("startup_trials", 5)),
                                  min_resource=max(1, int(spec.get("min_resource") or 1)))
    return optuna.pruners.MedianPruner(n_startup_trials=int(spec.get("startup_trials", 5)),
                                       n_warmup_steps=int(spec.get("warmup_steps", 0)))


def _startup_hyperband(startup_trials: int, **kwargs: Any) -> Any:
    """Optuna's HyperbandPruner has no startup count: it prunes against whatever trials its bracket holds, from the
    second trial on. This one prunes nothing until ``startup_trials`` trials are complete (what ``--startup-trials``
    means for the median pruner too), then defers to Hyperband; a subclass, so TPE still sees a Hyperband pruner
    and samples per bracket."""
    import optuna
    from optuna.trial import TrialState

    class StartupHyperbandPruner(optuna.pruners.HyperbandPruner):
        def __init__(self, n_startup_trials: int, **kw: Any):
            super().__init__(**kw)
            self.n_startup_trials = n_startup_trials

        def prune(self, study: Any, trial: Any) -> bool:
            complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if len(complete) < self.n_startup_trials:
                return False
            return super().prune(study, trial)

    return StartupHyperbandPruner(startup_trials, **kwargs)


def load_study(storage: str | os.PathLike, name: str, pruner: dict[str, Any] | None = None) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=name, storage=open_storage(storage), pruner=make_pruner(pruner))


def create_study(storage: str | os.PathLike, name: str, *, direction: str, pruner: dict[str, Any] | None,
                 seed: int | None, startup_trials: int) -> Any:
    """Create (or load, on resume) the study with a seeded TPE sampler."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, startup_trials))
    return optuna.create_study(study_name=name, storage=open_storage(storage), direction=direction,
                               sampler=sampler, pruner=make_pruner(pruner), load_if_exists=True)


def trial_env(storage: str | os.PathLike, study: str, trial_id: int, metric: str,
              pruner: dict[str, Any] | None) -> dict[str, str]:
    """The environment a trial's kernel gets (what :func:`trial_listener` reads)."""
    return {ENV_STORAGE: str(storage), ENV_STUDY: study, ENV_TRIAL: str(trial_id), ENV_METRIC: metric,
            ENV_PRUNER: json.dumps(pruner or {"name": "median"})}


# -- the listener in every trial's kernel --------------------------------------------------------------------------
_TRIALS: dict[tuple[str, str, int], Any] = {}


def trial_listener(event: Any) -> None:
    """Default listener: in a search trial's kernel, report intermediate values of the searched metric to the
    trial and stop the run when the pruner says so; elsewhere a no-op (no import, no I/O)."""
    storage = os.environ.get(ENV_STORAGE)
    if not storage or str(getattr(event, "type", "")) != "metric":
        return
    study, trial_id = os.environ.get(ENV_STUDY), os.environ.get(ENV_TRIAL)
    metric = os.environ.get(ENV_METRIC) or "eval_loss"
    values, step = event.data.get("values") or {}, event.data.get("step")
    if not study or not trial_id or metric not in values or step is None:
        return
    value = float(values[metric])
    if math.isnan(value):
        return
    key = (storage, study, int(trial_id))
    trial = _TRIALS.get(key)
    if trial is None:
        import optuna

        trial = optuna.trial.Trial(load_study(storage, study, json.loads(os.environ.get(ENV_PRUNER) or "{}")),
                                   int(trial_id))
        _TRIALS[key] = trial
    import warnings

    with warnings.catch_warnings():  # the final evaluation may repeat the last eval step: Optuna ignores it
        warnings.simplefilter("ignore")
        trial.report(value, int(step))
    if trial.should_prune():
        from llmops_jupyter.core.runner import request_stop

        request_stop(event.run_id, f"pruned by the Optuna search (trial {trial.number}): {metric} {value:.4g} at "
                                   f"step {int(step)} is worse than the pruner allows")


# -- what a finished study says ------------------------------------------------------------------------------------
def best_trial(study: Any) -> dict[str, Any] | None:
    """The best complete trial as a plain dict (number, value, params, run_id), or None."""
    try:
        t = study.best_trial
    except ValueError:
        return None
    return {"trial": t.number, "value": t.value, "params": dict(t.params), "run_id": t.user_attrs.get("run_id")}


def trial_runs(study: Any) -> list[dict[str, Any]]:
    """One dict per trial that ran a pipeline: number, state, value, params, run_id."""
    out = []
    for t in study.get_trials(deepcopy=False):
        out.append({"trial": t.number, "state": t.state.name.lower(), "value": t.value, "params": dict(t.params),
                    "run_id": t.user_attrs.get("run_id")})
    return out


def study_figures(study: Any) -> list[Any]:
    """Optuna's own plotly figures: optimisation history, parameter importances, parallel coordinates (each left out
    when the study cannot support it yet, e.g. importances with fewer than two complete trials)."""
    import warnings

    from optuna import visualization as vis

    figs = []
    for name, fn in (("optimisation history", vis.plot_optimization_history),
                     ("parameter importances", vis.plot_param_importances),
                     ("parallel coordinates", vis.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fig = fn(study)
        except Exception:  # noqa: BLE001 - too few complete trials for this plot
            continue
        fig.update_layout(title=f"Optuna: {name}")
        figs.append(fig)
    return figs

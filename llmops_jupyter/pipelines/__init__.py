"""Papermill glue: a notebook becomes a parameterised, recorded, reproducible pipeline run.

* :mod:`.params` — parameters typed against the notebook's ``parameters`` cell and the stage configs;
* :mod:`.execute` — :func:`run_pipeline`: papermill on the project's kernel, recorded as a ``pipeline`` run;
* :mod:`.sweep` — grids of variants on a local process pool or a Dask cluster, one GPU per variant;
* :mod:`.aggregate` — one table and plotly figures across variants, and an HTML report;
* :mod:`.export` — turn a working notebook into a pipeline notebook (lift magic arguments into parameters).

This module itself imports only the standard library (papermill, nbformat, dask and plotly load on use).
Inside a pipeline notebook, :func:`record_metrics` logs values straight onto the pipeline run.
"""

from __future__ import annotations

import os
from typing import Any


def current_pipeline_run() -> str | None:
    """The pipeline run executing this kernel (``$LLMOPS_PIPELINE_RUN``), or None outside a pipeline."""
    return os.environ.get("LLMOPS_PIPELINE_RUN") or None


def record_metrics(step: int | None = None, **values: float) -> dict[str, float]:
    """Log metrics on the pipeline run driving this kernel (a no-op returning the values outside a pipeline).

    Sweeps compare variants on these (plus the final metrics of every stage run the notebook made).
    """
    run_id = current_pipeline_run()
    clean = {k: float(v) for k, v in values.items() if v is not None}
    if run_id and clean:
        from llmops_jupyter.registry import Registry

        Registry.open().log_metrics(run_id, clean, step)
    return clean


def run_pipeline(notebook: Any, parameters: dict[str, Any] | None = None, *, output: Any = None,
                 registry_home: Any = None, **kwargs: Any) -> Any:
    """See :func:`llmops_jupyter.pipelines.execute.run_pipeline` (returns the ``RunResult``).

    With ``output=`` (the Lab server's contract, ``llmops_jupyter.server.pipeline``) the executed notebook is also
    copied there and a dict ``{"run_id", "output", "status", "error", "stage_runs"}`` is returned; a failed run is
    reported in it instead of raised. ``registry_home`` selects the registry.
    """
    from llmops_jupyter.pipelines.execute import run_pipeline as _run

    if registry_home is not None:
        from llmops_jupyter.registry import Registry

        kwargs["registry"] = Registry.open(registry_home)
    if output is None:
        return _run(notebook, parameters, **kwargs)
    from pathlib import Path

    from llmops_jupyter.core.errors import StageError

    started = track_started(kwargs.setdefault("listeners", []))
    try:
        res = _run(notebook, parameters, **kwargs)
        run_id, status, error, summary = res.run_id, str(res.status), None, res.summary
    except StageError as exc:
        run_id, status, error = (started[0] if started else None), "failed", str(exc)
        summary = {}
        if run_id:
            from llmops_jupyter.registry import Registry

            summary = (kwargs.get("registry") or Registry.open()).get_run(run_id)["summary"]
    from llmops_jupyter.registry import Registry

    out = Path(output)
    copy_output_notebook(kwargs.get("registry") or Registry.open(), summary, out)
    return {"run_id": run_id, "output": str(out), "status": status, "error": error,
            "stage_runs": [c["id"] for c in summary.get("children", [])]}


def track_started(listeners: list) -> list[str]:
    """Add a listener to ``listeners`` that collects the ids of pipeline runs as they start: how a caller finds the
    run (and its stored notebook) when ``run_pipeline`` raises."""
    started: list[str] = []
    listeners.append(
        lambda ev: started.append(ev.run_id) if str(ev.type) == "started" and ev.stage == "pipeline" else None)
    return started


def copy_output_notebook(registry: Any, summary: dict[str, Any], out: Any) -> bool:
    """Copy a pipeline run's executed notebook (its ``output_notebook`` artifact, kept for failed runs too) to
    ``out``, atomically. False when the run stored none (it failed before the kernel started)."""
    import shutil
    from pathlib import Path

    from llmops_jupyter.core.files import atomic_path

    if not summary.get("output_notebook"):
        return False
    files = sorted(registry.get_artifact(summary["output_notebook"]).path.glob("*.ipynb"))
    if not files:
        return False
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        shutil.copyfile(files[0], tmp)
    return True


def run_sweep(*args: Any, **kwargs: Any):
    """See :func:`llmops_jupyter.pipelines.sweep.run_sweep`."""
    from llmops_jupyter.pipelines.sweep import run_sweep as _run

    return _run(*args, **kwargs)

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
        from ..registry import Registry

        Registry.open().log_metrics(run_id, clean, step)
    return clean


def run_pipeline(*args: Any, **kwargs: Any):
    """See :func:`llmops_jupyter.pipelines.execute.run_pipeline`."""
    from .execute import run_pipeline as _run

    return _run(*args, **kwargs)


def run_sweep(*args: Any, **kwargs: Any):
    """See :func:`llmops_jupyter.pipelines.sweep.run_sweep`."""
    from .sweep import run_sweep as _run

    return _run(*args, **kwargs)

"""Resource health during long stages: GPU memory, utilisation and temperature sampled into the run's metrics.

:class:`GpuSampler` samples every ``interval`` seconds in a daemon thread: through NVML (``nvidia-ml-py``'s
``pynvml``) when a GPU is visible (``gpu_mem_mb``, ``gpu_util``, ``gpu_temp_c`` per device; ``gpu1_…`` for the
second one), otherwise the process's resident memory (``cpu_rss_mb``), so CPU-only runs and CI exercise the same
path. Samples go to the registry as ordinary metrics (step = sample index) and, when a
:class:`~llmops_jupyter.core.runner.RunContext` is given, as METRIC events that live dashboards already plot.

Two ways in:

* automatic: :func:`listener`, in every Runner's default set, starts a sampler on STARTED of a long
  stage and stops it on FINISHED/FAILED/INTERRUPTED: ``finetune``, ``eval``, ``quantize``, ``merge`` when a GPU is
  visible, and any stage class with ``resource_sampling = True`` always. ``LLMOPS_RESOURCE_SAMPLING=on`` samples
  the long stages on CPU too, ``off`` disables it; ``LLMOPS_SAMPLE_S`` sets the interval (default 10 s);
* explicit, for a stage or its dashboard: ``with sample_resources(ctx, interval=5): ...`` or :func:`sample_once`.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.runner import END_EVENTS, Event, EventType

if TYPE_CHECKING:
    from llmops_jupyter.core.runner import RunContext
    from llmops_jupyter.registry import Registry

LONG_STAGES = {"finetune", "eval", "evaluate", "quantize", "merge"}
DEFAULT_INTERVAL_S = 10.0

_nvml_state: dict[str, Any] = {}
_nvml_lock = threading.Lock()


def _nvml() -> Any | None:
    """The initialised ``pynvml`` module, or None (not installed, no driver, no GPU). Cached per process."""
    with _nvml_lock:
        if "mod" not in _nvml_state:
            mod = None
            try:
                import pynvml

                pynvml.nvmlInit()
                if pynvml.nvmlDeviceGetCount() > 0:
                    mod = pynvml
            except Exception:  # noqa: BLE001 - ImportError or NVMLError (no driver): fall back to CPU sampling
                mod = None
            _nvml_state["mod"] = mod
        return _nvml_state["mod"]


def _rss_mb() -> float | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:  # noqa: BLE001 - psutil missing: read /proc
        pass
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024
    except Exception:  # noqa: BLE001
        return None


def sample_once(devices: list[int] | None = None) -> dict[str, float]:
    """One sample: per-GPU memory (MB), utilisation (%) and temperature (°C) via NVML, else ``cpu_rss_mb``.

    Cheap (NVML calls, no torch import), so a dashboard may call it on every refresh.
    """
    nvml = _nvml()
    out: dict[str, float] = {}
    if nvml is not None:
        try:
            count = nvml.nvmlDeviceGetCount()
            for i in devices if devices is not None else range(count):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                prefix = "gpu" if i == 0 else f"gpu{i}"
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                out[f"{prefix}_mem_mb"] = mem.used / 2**20
                try:
                    out[f"{prefix}_util"] = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                except Exception:  # noqa: BLE001 - not supported on some (MIG) devices
                    pass
                try:
                    out[f"{prefix}_temp_c"] = float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
                except Exception:  # noqa: BLE001
                    pass
        except Exception:  # noqa: BLE001 - a flaky driver must never break a run
            pass
    rss = _rss_mb()
    if rss is not None and not out:
        out["cpu_rss_mb"] = rss
    return out


class GpuSampler:
    """Background sampler writing :func:`sample_once` into a run's metrics every ``interval`` seconds.

    Takes one sample when started and one when stopped, so even a short run has a before/after pair.
    """

    def __init__(
        self,
        registry: Registry | None = None,
        run_id: str | None = None,
        *,
        ctx: RunContext | None = None,
        interval: float = DEFAULT_INTERVAL_S,
        devices: list[int] | None = None,
    ):
        if ctx is None and (registry is None or run_id is None):
            raise ValueError("GpuSampler needs a RunContext or a registry and a run id")
        self.ctx = ctx
        self.registry = registry if registry is not None else ctx.registry  # type: ignore[union-attr]
        self.run_id = run_id if run_id is not None else ctx.run_id  # type: ignore[union-attr]
        self.interval = max(0.05, float(interval))
        self.devices = devices
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def backend(self) -> str:
        return "nvml" if _nvml() is not None else "cpu"

    def sample(self) -> dict[str, float]:
        values = sample_once(self.devices)
        if values:
            if self.ctx is not None:
                self.ctx.log_metrics(values, step=self.samples)
            else:
                self.registry.log_metrics(self.run_id, values, step=self.samples)
            self.samples += 1
        return values

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - sampling is advisory
                print(f"llmops: resource sampling stopped: {exc}", file=sys.stderr)
                return
            self._stop.wait(self.interval)

    def start(self) -> GpuSampler:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"llmops-sampler-{self.run_id}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=max(5.0, self.interval))
        self._thread = None
        try:
            self.sample()
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> GpuSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def sample_resources(ctx: RunContext, interval: float | None = None) -> GpuSampler:
    """For stages and the fine-tune dashboard: ``with sample_resources(ctx): train()``."""
    return GpuSampler(ctx=ctx, interval=interval if interval is not None else configured_interval())


def configured_interval() -> float:
    try:
        return float(os.environ.get("LLMOPS_SAMPLE_S", DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S


def mode() -> str:
    """``auto`` (default), ``on`` or ``off`` from ``LLMOPS_RESOURCE_SAMPLING``."""
    value = os.environ.get("LLMOPS_RESOURCE_SAMPLING", "auto").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("1", "on", "true", "yes", "always"):
        return "on"
    return "auto"


def _opted_in(stage: str) -> bool:
    try:
        from llmops_jupyter.core.stage import get_command

        return bool(getattr(get_command(stage).stage_cls, "resource_sampling", False))
    except Exception:  # noqa: BLE001 - unknown stage: not opted in
        return False


def should_sample(stage: str) -> bool:
    """Whether the automatic listener samples a run of ``stage``.

    ``auto``: stages that set ``resource_sampling = True`` always; the built-in long stages only when NVML sees a
    GPU (CPU-only runs then keep exactly the metrics their stage logs). ``on``: every long stage, CPU RSS included.
    """
    m = mode()
    if m == "off":
        return False
    if _opted_in(stage):
        return True
    if stage not in LONG_STAGES:
        return False
    return m == "on" or _nvml() is not None


_ACTIVE: dict[str, GpuSampler] = {}


def listener(event: Event) -> None:
    """Default Runner listener: sample during long stages without any change to the stages."""
    if event.type is EventType.STARTED:
        if event.run_id in _ACTIVE or not should_sample(event.stage):
            return
        registry = event.registry
        if registry is None:
            return
        _ACTIVE[event.run_id] = GpuSampler(registry, event.run_id, interval=configured_interval()).start()
    elif event.type in END_EVENTS:
        sampler = _ACTIVE.pop(event.run_id, None)
        if sampler is not None:
            sampler.stop()



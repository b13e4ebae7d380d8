"""Prices and cost formulas, in one place: what a call to a hosted model costs, and what your own models cost.

Read by ``eval`` (cost per candidate and of the judge, ``--budget-usd``), by ``plan --cost`` (fine-tuning GPU-hours,
a deployment's $ per 1M tokens and the break-even volume against a hosted price) and by the selection view.

Prices come from, in order:

1. a **user price file** (``--prices FILE``, JSON): ``{"source": "...", "date": "YYYY-MM-DD", "prices": [{"model":
   "...", "endpoint": "optional URL prefix", "input_per_mtok": 0.15, "output_per_mtok": 0.6}]}``;
2. the **genai-prices** snapshot bundled in that package (offline: this module never asks it to update), used only
   for an endpoint whose base URL is that provider's own API (``api.openai.com``...). A self-hosted server that
   happens to serve a model called ``gpt-4o-mini`` is *not* priced as OpenAI;
3. otherwise the price is **unknown**: shown as "unknown" with a warning, never as 0 or a guess.

Every price used in a run is written to the run's lineage as a ``price-table`` artifact (source, date, per model).
Standard library only at import.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from llmops_jupyter.core.errors import DataError

MTOK = 1_000_000

#: genai-prices carries no date of its own: the month each known version was published on the package index
#: (other versions show their version number and "date not recorded").
GENAI_PRICES_RELEASED = {"0.2.3": "2026-11"}


@dataclasses.dataclass(frozen=True)
class Price:
    """USD per million input / output tokens of one model at one endpoint, and where that number came from."""

    model: str
    endpoint: str | None
    input_per_mtok: float | None
    output_per_mtok: float | None
    source: str
    date: str | None
    note: str = ""

    @property
    def known(self) -> bool:
        return self.input_per_mtok is not None and self.output_per_mtok is not None

    def cost(self, prompt_tokens: int | float | None, completion_tokens: int | float | None) -> float | None:
        """``prompt × input + completion × output`` (per token); ``None`` when the price or the usage is unknown."""
        if not self.known or prompt_tokens is None or completion_tokens is None:
            return None
        return (prompt_tokens * self.input_per_mtok + completion_tokens * self.output_per_mtok) / MTOK

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def unknown(model: str, endpoint: str | None, why: str) -> Price:
    return Price(model, endpoint, None, None, "unknown", None, why)


def fmt_usd(value: float | None) -> str:
    """``$0.000123`` for a known cost, ``unknown`` otherwise (never ``$0`` for a missing price)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "unknown"
    return f"${value:.6f}" if value < 0.01 else f"${value:,.4f}"


def _num(value: Any, where: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or math.isnan(value):
        raise DataError(f"{path}: {where} must be a number >= 0 (USD per million tokens), got {value!r}.",
                        path=str(path), fix="write prices as numbers, e.g. \"input_per_mtok\": 0.15")
    return float(value)


def load_price_file(path: str | Path) -> list[Price]:
    """Prices from a user file (format in the module docstring); a bad file is one line naming the entry."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"Price file '{p}' does not exist.", path=str(p),
                        fix="pass --prices with a JSON file of {source, date, prices: [...]}")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{p}: not valid JSON ({exc}).", path=str(p), fix="fix the JSON syntax") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("prices"), list):
        raise DataError(f"{p}: expected an object with a 'prices' list.", path=str(p),
                        fix='write {"source": "...", "date": "YYYY-MM-DD", "prices": [{"model": ...}]}')
    for key in ("source", "date"):
        if not str(doc.get(key) or "").strip():
            raise DataError(f"{p}: '{key}' is missing: a price needs to say where and when it was taken.",
                            path=str(p), fix=f'add "{key}": "..." at the top level')
    out = []
    for i, e in enumerate(doc["prices"]):
        if not isinstance(e, dict) or not str(e.get("model") or "").strip():
            raise DataError(f"{p}: prices[{i}] has no 'model'.", path=str(p), fix="give every entry a model name")
        out.append(Price(str(e["model"]), (str(e["endpoint"]).rstrip("/") if e.get("endpoint") else None),
                         _num(e.get("input_per_mtok"), f"prices[{i}].input_per_mtok", p),
                         _num(e.get("output_per_mtok"), f"prices[{i}].output_per_mtok", p),
                         f"user file {p.name}: {doc['source']}", str(doc["date"]), str(e.get("note") or "")))
    return out


def genai_prices_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("genai-prices")
    except importlib.metadata.PackageNotFoundError:
        return None


def _genai_lookup(base_url: str, model: str) -> Price | None:
    """The bundled genai-prices snapshot for a provider's own API URL; ``None`` when it has no such entry."""
    version = genai_prices_version()
    if version is None:
        return None
    from datetime import datetime, timezone

    from genai_prices import data_snapshot  # bundled data only; update_prices (the fetcher) is never started

    try:
        provider, info = data_snapshot.get_snapshot().find_provider_model(model, None, None, base_url)
    except LookupError:
        return None
    prices = info.get_prices(datetime.now(timezone.utc))
    note = []

    def per_mtok(value: Any) -> float | None:
        if value is None:
            return None
        if hasattr(value, "base"):  # TieredPrices: the price below the first threshold
            note.append("tiered price: base tier used")
            value = value.base
        return float(value)

    inp, out = per_mtok(getattr(prices, "input_mtok", None)), per_mtok(getattr(prices, "output_mtok", None))
    if inp is None or out is None:
        return None
    return Price(model, base_url.rstrip("/"), inp, out, f"genai-prices {version} ({provider.id}/{info.id})",
                 GENAI_PRICES_RELEASED.get(version, f"date not recorded (genai-prices {version})"), "; ".join(note))


def is_hosted(base_url: str) -> bool:
    """A URL on the public internet (not loopback or a private address): the only kind a provider table prices."""
    import ipaddress

    host = (urlsplit(base_url).hostname or "").lower()
    if host in ("localhost", "") or host.endswith((".local", ".internal", ".lan")):
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "." in host
    return not (ip.is_loopback or ip.is_private or ip.is_link_local)


class PriceTable:
    """Looks prices up (user file first, then genai-prices for hosted provider URLs) and remembers every one used,
    so the run can record exactly the prices its costs were computed with."""

    def __init__(self, user_file: str | Path | None = None):
        self.user_file = str(user_file) if user_file else None
        self.user = load_price_file(user_file) if user_file else []
        self.used: dict[tuple[str | None, str], Price] = {}

    def lookup(self, model: str, endpoint: str | None = None) -> Price:
        key = (endpoint.rstrip("/") if endpoint else None, model)
        if key in self.used:
            return self.used[key]
        price = self._find(model, key[0])
        self.used[key] = price
        return price

    def _find(self, model: str, endpoint: str | None) -> Price:
        matches = [p for p in self.user if p.model == model and (p.endpoint is None or (endpoint or "").startswith(
            p.endpoint))]
        if matches:  # the most specific endpoint prefix wins
            return max(matches, key=lambda p: len(p.endpoint or ""))
        if endpoint and is_hosted(endpoint):
            found = _genai_lookup(endpoint, model)
            if found is not None:
                return found
            if genai_prices_version() is None:
                return unknown(model, endpoint, "genai-prices is not installed (pip install "
                                                "'llmops-jupyter[eval]') and no --prices file entry")
            return unknown(model, endpoint, f"not in genai-prices {genai_prices_version()} for this URL, and no "
                                            "--prices file entry")
        where = "a self-hosted endpoint" if endpoint else "a local model"
        return unknown(model, endpoint, f"{where} has no list price: add it to a --prices file")

    def snapshot(self) -> dict[str, Any]:
        """What the run records in lineage: every price used, with its source and date."""
        return {"user_file": self.user_file, "genai_prices": genai_prices_version(),
                "prices": [p.to_dict() for p in self.used.values()]}

    def warnings(self) -> list[str]:
        return [f"price of {p.model}" + (f" at {p.endpoint}" if p.endpoint else "") + f" is unknown ({p.note}); "
                "its cost shows as 'unknown', not $0" for p in self.used.values() if not p.known]


# -- cost of your own models: fine-tuning --------------------------------------------------------------------------
#: assumed model FLOPs utilisation when the registry has no measured one for the hardware (labelled "assumed MFU")
DEFAULT_MFU = 0.35


def training_flops(params: float, tokens: float, method: str, gradient_checkpointing: bool = False) -> float:
    """FLOPs ≈ 4·N·D for LoRA/QLoRA (frozen base: forward + activation gradients), 6·N·D for full fine-tuning (plus
    the weight gradients), +2·N·D when gradient checkpointing recomputes the forward pass."""
    k = 6.0 if method == "full" else 4.0
    return (k + (2.0 if gradient_checkpointing else 0.0)) * params * tokens


def gpu_family(gpu: str | None) -> str | None:
    """The fine-tune's peak table entry a GPU name falls under ("NVIDIA A100-SXM4-80GB" → "A100"), ``None`` when
    the table has none. The table is ordered most specific first, so "A10" never swallows an A100."""
    if not gpu:
        return None
    from llmops_jupyter.stages.finetune.kernels import PEAK_TFLOPS  # a table only: no torch import

    for frag, _ in PEAK_TFLOPS:
        if frag.lower() in gpu.lower():
            return frag
    return None


def peak_tflops_for(gpu: str | None) -> float | None:
    """Dense bf16 peak of a GPU by name fragment (the fine-tune's own MFU table), ``None`` when unknown."""
    from llmops_jupyter.stages.finetune.kernels import PEAK_TFLOPS

    family = gpu_family(gpu)
    return dict(PEAK_TFLOPS)[family] if family else None


def achieved_mfu(flops_per_token: float, tokens_per_step: float, seconds_per_step: float,
                 peak_tflops: float | None) -> float | None:
    """Measured model FLOPs utilisation (0-1): the FLOPs rule's FLOPs per step over the measured step time, divided
    by the device's peak; ``None`` when the peak is unknown (CPU, a GPU not in the table), never a made-up peak."""
    if not peak_tflops or not seconds_per_step or seconds_per_step <= 0:
        return None
    return flops_per_token * tokens_per_step / seconds_per_step / (peak_tflops * 1e12)


@dataclasses.dataclass
class TrainingCost:
    flops: float
    peak_tflops: float
    mfu: float
    mfu_label: str  # "assumed MFU" | "measured (N runs on GPU)"
    usd_per_hour: float | None
    gpus: int = 1

    @property
    def gpu_hours(self) -> float:
        """FLOPs ÷ (peak × MFU), in GPU-hours."""
        return self.flops / (self.peak_tflops * 1e12 * self.mfu) / 3600

    @property
    def wall_hours(self) -> float:
        return self.gpu_hours / self.gpus

    @property
    def usd(self) -> float | None:
        return None if self.usd_per_hour is None else self.gpu_hours * self.usd_per_hour


def measured_mfu(registry: Any, gpu: str) -> tuple[float, int] | None:
    """Mean MFU of the registry's finished fine-tunes on this GPU: a run counts when the GPU its environment
    recorded falls under the same peak-table entry (or, for a GPU not in the table, has the same name)."""
    want = gpu_family(gpu) or gpu.strip().lower()
    vals = []
    for run in registry.list_runs(stage="finetune", limit=200):
        if run.get("status") != "finished":
            continue
        gpus = (run.get("env") or {}).get("gpus") or []
        mfu = registry.metrics(run["id"]).get("mfu_pct")
        if mfu and any((gpu_family(str(g)) or str(g).strip().lower()) == want for g in gpus):
            vals.append(mfu / 100)
    return (sum(vals) / len(vals), len(vals)) if vals else None


@dataclasses.dataclass
class Calibration:
    """A running or finished fine-tune's runtime, estimated from the step timings of its first steps, in parts:

    * ``setup_s``: start of the run to the start of the training loop (model load, tokenising, the batching
      probe), measured;
    * the loop: ``first_step_s`` (measured: allocation and lazy initialisation make it slower) + the other
      ``total_steps - 1`` steps × the **median** step time of the calibration steps, + the evaluations and
      checkpoint saves the schedule holds × their measured mean time (unknown until one has happened);
    * ``finish_s``: the final evaluation and saving the adapter, measured once the run has ended.

    The same is done for CPU seconds (``*_cpu_*``): on a shared machine other processes stretch wall time, not the
    CPU time of the run's own steps."""

    run_id: str
    steps_seen: int  # timed steps (after the first) the step time is the median of
    seconds_per_step: float
    cpu_seconds_per_step: float
    spread: tuple[float, float]  # lowest and highest per-window median step time among those calibrated on
    total_steps: int
    done_steps: int
    first_step_s: float
    first_step_cpu_s: float
    tokens_per_step: float | None = None
    evals: int = 0  # evaluations the schedule holds (--eval-every)
    eval_s: float | None = None
    eval_cpu_s: float | None = None
    saves: int = 0  # checkpoint saves the schedule holds (--checkpoint-every)
    save_s: float | None = None
    save_cpu_s: float | None = None
    setup_s: float | None = None
    finish_s: float | None = None
    measured_loop_s: float | None = None  # the trainer's own train_runtime
    measured_loop_cpu_s: float | None = None
    measured_runtime_s: float | None = None  # the whole run, start to end
    flops_per_token: float | None = None
    peak_tflops: float | None = None

    @property
    def steps_s(self) -> float:
        return max(self.total_steps - 1, 0) * self.seconds_per_step

    @property
    def pauses_s(self) -> float:
        """Evaluations and saves in the loop (those not measured yet count 0: see :attr:`unmeasured`)."""
        return self.evals * (self.eval_s or 0.0) + self.saves * (self.save_s or 0.0)

    @property
    def unmeasured(self) -> list[str]:
        return ([f"{self.evals} evaluation(s)"] if self.evals and self.eval_s is None else []) + \
               ([f"{self.saves} checkpoint save(s)"] if self.saves and self.save_s is None else [])

    @property
    def loop_s(self) -> float:
        """The training loop: first step + the others at the median step time + evaluations and saves."""
        return self.first_step_s + self.steps_s + self.pauses_s

    @property
    def loop_cpu_s(self) -> float:
        return (self.first_step_cpu_s + max(self.total_steps - 1, 0) * self.cpu_seconds_per_step
                + self.evals * (self.eval_cpu_s or 0.0) + self.saves * (self.save_cpu_s or 0.0))

    @property
    def estimated_runtime_s(self) -> float:
        """The whole run: measured set-up + the calibrated loop + the measured finish (0 while it is running)."""
        return (self.setup_s or 0.0) + self.loop_s + (self.finish_s or 0.0)

    @property
    def remaining_s(self) -> float:
        left = max(self.total_steps - self.done_steps, 0)
        done_share = self.done_steps / self.total_steps if self.total_steps else 1.0
        return left * self.seconds_per_step + self.pauses_s * (1 - done_share)

    @property
    def mfu(self) -> float | None:
        """Measured MFU of the calibrated steps (:func:`achieved_mfu`); ``None`` without a known peak."""
        if self.flops_per_token is None or self.tokens_per_step is None:
            return None
        return achieved_mfu(self.flops_per_token, self.tokens_per_step, self.seconds_per_step, self.peak_tflops)


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def calibrate(registry: Any, run: str, first_steps: int = 20) -> Calibration:
    """Calibrate a fine-tune's runtime on the step timings its first logging steps recorded (``step_s`` etc.,
    see ``stages/finetune/train.StepTimer``), taking logged windows until ``first_steps`` timed steps are covered;
    the step time is their median (each window's median weighted by its step count)."""
    from llmops_jupyter.core.errors import StageError

    run_id = registry.resolve_run(run)
    info = registry.get_run(run_id)
    if info["stage"] != "finetune":
        raise StageError(f"--run {run} is a {info['stage']} run, not a fine-tune.",
                         fix="pass a fine-tuning run (`%llmops runs --stage finetune`)")
    hist: dict[str, list[dict[str, Any]]] = {}
    for r in registry.metric_history(run_id):
        hist.setdefault(r["key"], []).append(r)
    windows = list(zip(hist.get("step_s", []), hist.get("step_cpu_s", []), hist.get("steps_timed", []),
                       hist.get("step_tokens", [])))
    used, n = [], 0
    for w in windows:
        if n >= first_steps:
            break
        used.append(w)
        n += int(w[2]["value"])
    if not hist.get("first_step_s") or n < 2:
        raise StageError(f"Run {run_id} has timed {n} step(s) after its first: too few to calibrate on.",
                         fix="wait for a few more logged steps (log with --log-every 1 for short runs); runs "
                             "trained before step timing was recorded cannot be calibrated")
    wall = _median([w[0]["value"] for w in used for _ in range(int(w[2]["value"]))])
    cpu = _median([w[1]["value"] for w in used for _ in range(int(w[2]["value"]))])
    tokens = sum(w[3]["value"] * w[2]["value"] for w in used) / n
    params, summary, metrics = info.get("params") or {}, info.get("summary") or {}, registry.metrics(run_id)
    loss_steps = [r["step"] for r in hist.get("loss", []) if r["step"] is not None]
    done = int(summary.get("steps") or (loss_steps[-1] if loss_steps else 0))
    total = int(params.get("max_steps") or summary.get("steps") or 0) or done

    def mean(key: str) -> float | None:
        vals = [r["value"] for r in hist.get(key, [])]
        return sum(vals) / len(vals) if vals else None

    def scheduled(every: Any) -> int:  # the trainer also evaluates / saves at the last step
        every = int(every or 0)
        return -(-total // every) if every > 0 else 0

    first = hist["first_step_s"][0]
    loop_start = first["ts"] - first["value"]
    setup = loop_start - info["started_at"] if info.get("started_at") else None
    end = hist.get("train_cpu_s")
    finish = (info["finished_at"] - end[-1]["ts"] if end and info.get("finished_at") and info.get("status")
              == "finished" else None)
    measured = (info["finished_at"] - info["started_at"] if info.get("status") == "finished"
                and info.get("finished_at") and info.get("started_at") else None)
    window_medians = [w[0]["value"] for w in used]
    return Calibration(
        run_id, n, wall, cpu, (min(window_medians), max(window_medians)), total, done, first["value"],
        hist["first_step_cpu_s"][0]["value"], tokens,
        evals=scheduled(params.get("eval_every")) if summary.get("eval_examples", 1) else 0,  # 0: no eval split
        eval_s=mean("eval_s"), eval_cpu_s=mean("eval_cpu_s"),
        saves=scheduled(params.get("checkpoint_every")), save_s=mean("save_s"), save_cpu_s=mean("save_cpu_s"),
        setup_s=setup, finish_s=finish, measured_loop_s=metrics.get("train_runtime_s"),
        measured_loop_cpu_s=metrics.get("train_cpu_s"), measured_runtime_s=measured,
        flops_per_token=summary.get("flops_per_token"), peak_tflops=summary.get("peak_tflops"))


# -- cost of your own models: a deployment -------------------------------------------------------------------------
@dataclasses.dataclass
class ServingCost:
    """A deployment's cost per token at a given $/h and utilisation, from its request log's measured throughput."""

    deployment: str
    requests: int
    tokens_in: int
    tokens_out: int
    busy_s: float
    usd_per_hour: float
    utilisation: float
    hosted: Price | None = None

    @property
    def tokens_per_s(self) -> float:
        """Tokens (prompt + completion) processed per second of serving (the union of request intervals)."""
        return (self.tokens_in + self.tokens_out) / self.busy_s if self.busy_s > 0 else math.nan

    @property
    def usd_per_mtok(self) -> float:
        """$ per 1M tokens (prompt + completion) = $/h ÷ (tokens/s × 3600 × utilisation) × 1e6."""
        return self.usd_per_hour / (self.tokens_per_s * 3600 * self.utilisation) * MTOK

    @property
    def usd_per_request(self) -> float:
        return self.usd_per_hour / (self.requests / self.busy_s * 3600 * self.utilisation)

    @property
    def hosted_usd_per_request(self) -> float | None:
        """The same traffic mix at the hosted price (its input and output prices applied to the logged tokens)."""
        if self.hosted is None or not self.hosted.known or not self.requests:
            return None
        return self.hosted.cost(self.tokens_in, self.tokens_out) / self.requests

    @property
    def break_even_requests_per_hour(self) -> float | None:
        """Traffic above which the deployment (a fixed $/h) is cheaper than paying the hosted price per request."""
        h = self.hosted_usd_per_request
        return None if not h else self.usd_per_hour / h

    @property
    def capacity_requests_per_hour(self) -> float:
        return self.requests / self.busy_s * 3600 if self.busy_s > 0 else math.nan


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals (overlapping requests count once)."""
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def serving_cost(registry: Any, deployment: str, usd_per_hour: float, utilisation: float = 1.0,
                 hosted: Price | None = None) -> ServingCost:
    from llmops_jupyter.core.errors import StageError

    rows = [r for r in registry.requests(deployment) if r["status"] == 200 and r["tokens_out"] is not None]
    if not rows:
        raise StageError(f"Deployment {deployment} has no successful requests logged: nothing to measure.",
                         fix="send it some traffic (or an eval with --model deployment:ID) first")
    busy = busy_seconds([(r["ts"] - (r["latency_s"] or 0.0), r["ts"]) for r in rows])
    return ServingCost(deployment, len(rows), sum(int(r["tokens_in"] or 0) for r in rows),
                       sum(int(r["tokens_out"] or 0) for r in rows), busy, usd_per_hour, utilisation, hosted)

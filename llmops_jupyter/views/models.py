"""``%llmops models`` (what is available locally) and ``%llmops plan`` (will this fine-tune fit?)."""

from __future__ import annotations

import dataclasses
import html
import os
from pathlib import Path
from typing import Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.display import Table
from llmops_jupyter.core.stage import CommandEnv, command


@dataclasses.dataclass
class ModelsConfig(StageConfig):
    path: list[str] = option([], "extra folders to scan for checkpoints (besides the model cache, the HF cache and "
                                 "the registry)")
    kind: str | None = option(None, "only this kind", choices=["base-model", "adapter", "merged", "pruned", "distilled", "quantized",
                                                              "provider"])


def _hf_cache_dirs() -> list[Path]:
    root = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" /
                                                                        "huggingface")) / "hub")
    out = []
    for repo in sorted(root.glob("models--*")):
        snaps = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
        if snaps:
            out.append(snaps[-1])
    return out


def _scan(folder: Path) -> list[Path]:
    if (folder / "config.json").exists() or (folder / "adapter_config.json").exists():
        return [folder]
    return sorted(p.parent for p in folder.glob("*/config.json")) + sorted(
        p.parent for p in folder.glob("*/adapter_config.json"))


@command("models", ModelsConfig)
def models(cfg: ModelsConfig, env: CommandEnv) -> Table:
    """List models available offline: providers, the local model cache, the HF cache and registry artifacts."""
    from llmops_jupyter.models.refs import PROVIDERS, describe_checkpoint, model_cache_dir

    rows: list[list[Any]] = []
    seen: set[str] = set()

    def add(name: str, kind: str, source: str, path: Path | None) -> None:
        key = str(path.resolve()) if path else name
        if key in seen:
            return
        seen.add(key)
        info: dict[str, Any] = {}
        if path is not None and path.exists():
            info = describe_checkpoint(path)
        params = info.get("params")
        rows.append([name, kind, source, f"{params / 1e6:.1f}M" if params else "", info.get("dtype") or "",
                     info.get("quantization") or "", f"{info['bytes'] / 1e6:.1f} MB" if info.get("bytes") else "",
                     str(path) if path else "(built on first use)"])

    for art in env.registry.list_artifacts():
        if art.kind in ("base-model", "adapter", "merged", "pruned", "distilled", "quantized"):
            add(art.name or art.short, art.kind, f"registry {art.short}", art.path)
    cache = model_cache_dir()
    for p in _scan(cache):
        add(p.name, "base-model", "model cache", p)
    for name in sorted(PROVIDERS):
        if not (cache / name).exists():
            add(name, "provider", "provider (offline)", None)
    for p in _hf_cache_dirs():
        add(p.parent.parent.name.replace("models--", "").replace("--", "/"), "base-model", "HF cache", p)
    for folder in cfg.path:
        for p in _scan(Path(folder).expanduser()):
            add(p.name, "adapter" if (p / "adapter_config.json").exists() else "base-model", "path", p)
    if cfg.kind:
        rows = [r for r in rows if r[1] == cfg.kind]
    return Table(["name", "kind", "source", "params", "dtype", "quant", "size", "path"], rows,
                 title="Models available offline",
                 note="Use any name, path or registry hash with --model. `%llmops plan --model NAME` checks memory.")


@dataclasses.dataclass
class PlanConfig(StageConfig):
    model: str | None = option(None, "model: a catalog name (e.g. Llama-3.1-8B), local checkpoint, registry ref or "
                                     "provider (not needed for --cost --deployment)")
    method: str = option("lora", "fine-tuning method", choices=["lora", "qlora", "full"])
    seq_len: int = option(1024, "tokens per sequence", min=1, max=1_048_576)
    batch: int = option(4, "sequences per device step (micro-batch)", min=1, max=4096)
    rank: int = option(16, "LoRA rank", min=1, max=4096)
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass")
    dtype: str = option("bf16", "compute dtype of the (non-quantized) weights", choices=["bf16", "fp16", "fp32"])
    optimizer: str = option("adamw", "optimizer state size", choices=["adamw", "adamw8bit", "sgd"])
    gpu_memory: float | None = option(None, "plan for a GPU with this many GB instead of the detected device",
                                      min=0.1, min_exclusive=False)
    cost: bool = option(False, "also estimate cost: fine-tuning FLOPs (4ND LoRA/QLoRA, 6ND full, +2ND with gradient "
                               "checkpointing), GPU-hours = FLOPs / (peak x MFU) and USD at --usd-per-hour; with "
                               "--run a fine-tune's runtime calibrated on the median of its first steps; with "
                               "--deployment $ per 1M tokens")
    tokens: int | None = option(None, "training tokens D for --cost (examples x tokens per example x epochs)", min=1)
    usd_per_hour: float | None = option(None, "USD per GPU-hour (or per hour of the deployment's machine) for --cost",
                                        min=0.0)
    gpu: str | None = option(None, "GPU to cost the fine-tune on (H100, A100, L4, ...; default: the detected one)")
    gpus: int = option(1, "GPUs training together (wall-clock = GPU-hours / gpus)", min=1, max=100000)
    peak_tflops: float | None = option(None, "dense bf16 peak TFLOP/s of that GPU (default: from the GPU's name)",
                                       min=0.0, min_exclusive=True)
    mfu: float | None = option(None, "model FLOPs utilisation to assume (0-1) when the registry has no measured one "
                                     "on that GPU; default 0.35", min=0.0, max=1.0, min_exclusive=True)
    run: str | None = option(None, "a running or finished fine-tune: estimate its runtime from its first steps")
    calibrate_steps: int = option(20, "timed steps after the first that --run calibrates on (the median step "
                                          "time)", min=2, max=100000)
    deployment: str | None = option(None, "a deployment (id): $ per 1M tokens from its request log's throughput")
    utilisation: float = option(1.0, "share of the hour the deployment is busy (0-1], for --deployment",
                                min=0.0, max=1.0, min_exclusive=True)
    hosted: str | None = option(None, "hosted model to compare the deployment with, openai:BASE_URL#MODEL (priced "
                                      "from --prices or genai-prices): break-even volume")
    prices: str | None = option(None, "price file (JSON) for --hosted; see `%llmops eval --help`")

    def validate(self) -> None:
        if not self.model and not (self.cost and (self.deployment or self.run)):
            raise self.invalid("model", "is required", fix="pass --model NAME (or --cost --deployment ID / --run ID)")
        if (self.deployment or self.run or self.tokens) and not self.cost:
            raise self.invalid("cost", "is needed for --tokens / --run / --deployment", fix="add --cost")
        if self.deployment and self.usd_per_hour is None:
            raise self.invalid("usd_per_hour", "is required with --deployment",
                               fix="pass the machine's price, e.g. --usd-per-hour 2.5")
        if self.hosted and not self.hosted.startswith("openai:"):
            raise self.invalid("hosted", "must be openai:BASE_URL#MODEL",
                               fix="e.g. --hosted openai:https://api.openai.com/v1#gpt-4o-mini")


def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


class Plan:
    def __init__(self, arch, est, device, tips):
        self.arch, self.est, self.device, self.tips = arch, est, device, tips

    @property
    def fits(self) -> bool:
        from llmops_jupyter.models.planning import GB

        return self.est.total <= self.device.total_gb * GB * 0.9

    def rows(self) -> list[tuple[str, str]]:
        from llmops_jupyter.models.planning import GB

        rows = [(k, f"{v / GB:.2f} GB") for k, v in self.est.parts.items()]
        rows.append(("total", f"{self.est.total / GB:.2f} GB"))
        return rows

    def verdict(self) -> str:
        from llmops_jupyter.models.planning import GB

        d = self.device
        word = "FITS" if self.fits else "DOES NOT FIT"
        return (f"{word}: {self.est.total / GB:.1f} GB needed vs {d.total_gb:.1f} GB on {d.name} ({d.kind}); "
                f"{self.arch.name}: {_human(self.arch.params)} params, {self.est.method}, trainable "
                f"{_human(self.est.trainable)}, seq {self.est.seq_len} × batch {self.est.batch}"
                + (", gradient checkpointing" if self.est.gradient_checkpointing else ""))

    def __str__(self) -> str:
        lines = [self.verdict(), ""] + [f"  {k:<18} {v:>10}" for k, v in self.rows()]
        if self.tips:
            lines += ["", "To fit or to go faster:"] + [f"  - {t}" for t in self.tips]
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        color = "green" if self.fits else "#c00"
        body = "".join(f"<tr><td>{html.escape(k)}</td><td style='text-align:right'>{v}</td></tr>"
                       for k, v in self.rows())
        tips = "".join(f"<li>{html.escape(t)}</li>" for t in self.tips)
        return (f"<div class='llmops-plan'><b style='color:{color}'>{html.escape(self.verdict())}</b>"
                f"<table>{body}</table>" + (f"<ul>{tips}</ul>" if tips else "") + "</div>")


@command("plan", PlanConfig)
def plan(cfg: PlanConfig, env: CommandEnv) -> Plan:
    """Estimate fine-tuning memory (weights, adapters, optimizer, activations) against the detected GPU or CPU RAM,
    say whether it fits and what to change."""
    from llmops_jupyter.models.planning import advise, detect_device, estimate, load_arch

    if cfg.cost and not cfg.model:
        return cost_plan(cfg, env.registry, None, None)
    arch = load_arch(cfg.model, env.registry)
    device = detect_device(cfg.gpu_memory)
    dtype_bytes = 4 if cfg.dtype == "fp32" else 2
    est = estimate(arch, cfg.method, cfg.seq_len, cfg.batch, rank=cfg.rank,
                   gradient_checkpointing=cfg.gradient_checkpointing, dtype_bytes=dtype_bytes,
                   optimizer=cfg.optimizer, device_kind=device.kind)
    result = Plan(arch, est, device, [])
    if not result.fits:
        result.tips = advise(arch, est, device, cfg.rank)
    if cfg.cost:
        from llmops_jupyter.core.display import Bundle

        return Bundle(result, cost_plan(cfg, env.registry, arch, device))
    return result


class CostPlan(Table):
    """``plan --cost``: one row per figure, each with the basis it rests on ("assumed MFU", "measured ...")."""

    def __init__(self, rows: list[list[Any]], values: dict[str, Any], note: str = ""):
        super().__init__(["figure", "value", "basis"], rows, title="Cost estimate", note=note)
        self.values = values


def calibration_rows(cal: Any, cfg: PlanConfig) -> list[list[Any]]:
    """``plan --cost --run``: the runtime estimate in its parts, each measured or calibrated, and the measured
    figures next to it."""
    from llmops_jupyter.models import cost

    def s(v: float | None) -> str:
        return "unknown" if v is None else f"{v:.3g} s"

    lo, hi = cal.spread
    step = (f"median {cal.seconds_per_step:.3g} s/step of {cal.steps_seen} timed steps after the first "
            f"(window medians {lo:.3g}-{hi:.3g} s)")
    rows = [["set-up", s(cal.setup_s), "measured: run start to the training loop (load, tokenise, batching probe)"],
            ["first step", s(cal.first_step_s), "measured (allocation, lazy initialisation)"],
            ["other steps", s(cal.steps_s), f"calibrated: {max(cal.total_steps - 1, 0)} steps x {step}"]]
    for kind, n, each in (("evaluations", cal.evals, cal.eval_s), ("checkpoint saves", cal.saves, cal.save_s)):
        if n:
            rows.append([f"{kind} in the loop", s(None if each is None else n * each),
                         f"{n} x {each:.3g} s measured mean" if each is not None else f"{n} scheduled, none measured "
                         "yet: not in the estimate"])
    unmeasured = f" (without {', '.join(cal.unmeasured)})" if cal.unmeasured else ""
    rows.append(["training loop (calibrated)", s(cal.loop_s), f"first step + other steps + pauses{unmeasured}"])
    if cal.measured_loop_s:
        rows.append(["training loop (measured)", s(cal.measured_loop_s), "the trainer's own train_runtime"])
    rows.append(["loop CPU time (calibrated)", s(cal.loop_cpu_s), f"the same parts in CPU seconds (median "
                 f"{cal.cpu_seconds_per_step:.3g} CPU s/step): other load on the machine does not stretch them"])
    if cal.measured_loop_cpu_s:
        rows.append(["loop CPU time (measured)", s(cal.measured_loop_cpu_s), "the process's CPU seconds in the loop"])
    rows.append(["finish", s(cal.finish_s), "measured: final evaluation, saving the adapter" if cal.finish_s
                 is not None else "not measured yet (the run has not finished): not in the estimate"])
    rows.append(["runtime (calibrated)", s(cal.estimated_runtime_s),
                 f"{cal.total_steps} steps: set-up + training loop + finish, {step}"])
    rows.append(["remaining", s(cal.remaining_s), f"{cal.done_steps}/{cal.total_steps} steps done"])
    if cal.measured_runtime_s:
        rows.append(["runtime (measured)", s(cal.measured_runtime_s), "the finished run, start to end"])
    mfu = cal.mfu
    if mfu is not None:
        rows.append(["MFU (measured)", f"{mfu:.1%}", f"{cal.flops_per_token:.3g} FLOPs/token x "
                     f"{cal.tokens_per_step:.4g} tokens/step / {cal.seconds_per_step:.3g} s/step / "
                     f"{cal.peak_tflops:g} TFLOP/s peak"])
    else:
        rows.append(["MFU (measured)", "unknown", "no known peak TFLOP/s for the device it trained on (CPU or a GPU "
                     "not in the table): not invented"])
    if cfg.usd_per_hour is not None:
        rows.append(["cost (calibrated)", cost.fmt_usd(cal.estimated_runtime_s / 3600 * cfg.usd_per_hour * cfg.gpus),
                     f"runtime (calibrated) x ${cfg.usd_per_hour:g}/h x {cfg.gpus} GPU(s), {step}"])
    return rows


def cost_plan(cfg: PlanConfig, registry: Any, arch: Any, device: Any) -> CostPlan:
    from llmops_jupyter.models import cost

    rows: list[list[Any]] = []
    values: dict[str, Any] = {}
    if arch is not None and cfg.tokens:
        gpu = cfg.gpu or (device.name if device is not None and device.kind == "gpu" else None)
        peak = cfg.peak_tflops or cost.peak_tflops_for(gpu)
        if peak is None:
            from llmops_jupyter.core.errors import ConfigError

            raise ConfigError(f"plan: no known peak TFLOP/s for {gpu or 'this machine (no GPU)'}.", field="gpu",
                              value=gpu, fix="pass --gpu H100 (A100, L4, ...) or --peak-tflops N")
        flops = cost.training_flops(arch.params, cfg.tokens, cfg.method, cfg.gradient_checkpointing)
        measured = cost.measured_mfu(registry, gpu) if gpu else None
        if measured:
            mfu, label = measured[0], f"measured (mean of {measured[1]} fine-tune(s) on {gpu} in the registry)"
        else:
            mfu, label = cfg.mfu or cost.DEFAULT_MFU, "assumed MFU"
        tc = cost.TrainingCost(flops, peak, mfu, label, cfg.usd_per_hour, cfg.gpus)
        rule = ("6" if cfg.method == "full" else "4") + ("+2" if cfg.gradient_checkpointing else "") + "·N·D"
        rows += [["training FLOPs", f"{flops:.3e}", f"{rule}, N={_human(arch.params)}, D={_human(cfg.tokens)}"],
                 ["MFU", f"{mfu:.0%}", label],
                 ["GPU-hours", f"{tc.gpu_hours:.3g}", f"FLOPs / ({peak:g} TFLOP/s x MFU), {label}"],
                 ["wall-clock hours", f"{tc.wall_hours:.3g}", f"on {cfg.gpus} GPU(s), {label}"],
                 ["cost", cost.fmt_usd(tc.usd), f"GPU-hours x ${cfg.usd_per_hour:g}/h, {label}"
                  if cfg.usd_per_hour is not None else "unknown: pass --usd-per-hour"]]
        values["training"] = tc
    if cfg.run:
        cal = cost.calibrate(registry, cfg.run, cfg.calibrate_steps)
        rows += calibration_rows(cal, cfg)
        values["calibration"] = cal
    if cfg.deployment:
        from llmops_jupyter.stages.serve.server import get_deployment

        dep = get_deployment(registry, cfg.deployment)
        hosted = None
        if cfg.hosted:
            from llmops_jupyter.models.endpoints import parse_endpoint

            ep = parse_endpoint(cfg.hosted)
            hosted = cost.PriceTable(cfg.prices).lookup(ep.model, ep.base_url)
        sc = cost.serving_cost(registry, dep["id"], cfg.usd_per_hour, cfg.utilisation, hosted)
        basis = f"measured: {sc.requests} requests, {sc.tokens_in + sc.tokens_out} tokens in {sc.busy_s:.3g} s busy"
        rows += [["throughput", f"{sc.tokens_per_s:.4g} tokens/s", basis],
                 ["$ per 1M tokens", cost.fmt_usd(sc.usd_per_mtok),
                  f"${cfg.usd_per_hour:g}/h at {cfg.utilisation:.0%} utilisation, {basis}"],
                 ["$ per request", cost.fmt_usd(sc.usd_per_request), "the logged traffic mix"]]
        if hosted is not None:
            h = sc.hosted_usd_per_request
            rows.append([f"hosted $ per request ({hosted.model})", cost.fmt_usd(h),
                         f"{hosted.source}, {hosted.date}" if hosted.known else f"unknown: {hosted.note}"])
            be = sc.break_even_requests_per_hour
            rows.append(["break-even volume", f"{be:.4g} requests/h" if be else "unknown",
                         f"above it the deployment is cheaper (capacity {sc.capacity_requests_per_hour:.4g} "
                         "requests/h measured)" if be else "needs a known hosted price"])
        values["serving"] = sc
    if not rows:
        rows.append(["(nothing to cost)", "", "pass --tokens (fine-tune), --run (calibrate) or --deployment"])
    return CostPlan(rows, values, note="Every figure says what it rests on: an assumed MFU or measured runs.")

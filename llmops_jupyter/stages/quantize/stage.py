"""``%llmops quantize``: GPTQ (GPTQModel) or bitsandbytes 4/8-bit export of a full-precision model, with a report.

GPTQ runs through GPTQModel's native API (``GPTQModel.load → quantize → save``); the result is a standard GPTQ
checkpoint (``quantize_config.json`` + ``quantization_config`` in ``config.json``) that transformers (with
optimum + gptqmodel), vLLM and TGI load. auto-gptq is end-of-life and cannot import with transformers 5, so it is
never used: when it is the only GPTQ package installed the stage says so and how to fix it.

Calibration texts come from the versioned dataset (``--data``, default: the dataset upstream of the model in the
lineage), so the quantized artifact's lineage names the exact data it was calibrated on. The report measures the
source and the quantized model the same way: size on disk, perplexity on the eval split, load time and greedy
generation tokens/s; when an ``eval`` stage is installed it is run on both and the metric deltas are reported.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import time
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.config import StageConfig, field_type, option, unwrap_optional
from llmops_jupyter.core.display import Table, fmt_delta, fmt_num, fmt_tps
from llmops_jupyter.core.errors import ConfigError, LlmopsError, MissingDependencyError, ResourceError, require
from llmops_jupyter.core.stage import Stage, register_stage
from llmops_jupyter.models import tools as mt

if TYPE_CHECKING:
    from llmops_jupyter.core.runner import RunContext
    from llmops_jupyter.models.refs import ModelRef
    from llmops_jupyter.stages.data.format import Dataset

METHODS = ("gptq", "bnb-4bit", "bnb-8bit")
GPTQ_BITS = (2, 3, 4, 8)


@dataclasses.dataclass
class QuantizeConfig(StageConfig):
    model: str = option(help="full-precision model to quantize: a merge run ('merge@latest'), a merged/base "
                             "artifact, a checkpoint folder or a provider name")
    method: str = option("gptq", "gptq (GPTQModel, calibrated), bnb-4bit or bnb-8bit (bitsandbytes, no calibration)",
                         choices=METHODS)
    bits: int | None = option(None, "bits per weight (gptq: 2, 3, 4 or 8, default 4; bnb-4bit: 4; bnb-8bit: 8)",
                              choices=GPTQ_BITS)
    group_size: int = option(128, "GPTQ group size (weights sharing one scale); -1 = one group per output column",
                             min=-1)
    desc_act: bool = option(False, "GPTQ act-order (quantize columns by activation size): slightly better quality, "
                                   "slower kernels on some servers")
    data: str | None = option(None, "dataset for calibration and perplexity (default: the dataset upstream of "
                                    "--model in the lineage)")
    calibration_samples: int = option(128, "GPTQ calibration texts drawn from the dataset's train split", min=1,
                                      max=100_000)
    calibration_max_tokens: int = option(512, "truncate each calibration text to this many tokens", min=16,
                                         max=32_768)
    eval_samples: int = option(64, "eval-split texts for the perplexity comparison (0 = skip)", min=0, max=100_000)
    generate_tokens: int = option(32, "tokens to generate for the tokens/s measurement (0 = skip)", min=0, max=4096)
    bnb_quant_type: str = option("nf4", "bnb-4bit data type", choices=("nf4", "fp4"))
    bnb_double_quant: bool = option(True, "bnb-4bit: also quantize the scales (saves ~0.4 bit/weight)")
    compare_eval: bool = option(True, "when an eval stage is installed, run it on source and quantized model and "
                                      "report metric deltas")
    name: str | None = option(None, "name of the quantized artifact (default: <model name>-<method>-<bits>bit)")

    def validate(self) -> None:
        if self.group_size == 0:
            raise self.invalid("group_size", "must be -1 (per column) or a positive group size",
                               fix="use 128 (common), 32/64 (better quality, larger) or -1")
        if self.method == "bnb-4bit" and self.bits not in (None, 4):
            raise self.invalid("bits", "must be 4 with --method bnb-4bit", fix="drop --bits or use --method gptq")
        if self.method == "bnb-8bit" and self.bits not in (None, 8):
            raise self.invalid("bits", "must be 8 with --method bnb-8bit", fix="drop --bits or use --method gptq")

    @property
    def effective_bits(self) -> int:
        if self.bits is not None:
            return self.bits
        return 8 if self.method == "bnb-8bit" else 4


def gptq_backend() -> dict[str, str]:
    """Which GPTQ library will be used, with its version. GPTQModel only; a lone auto-gptq is a clear error."""
    if importlib.util.find_spec("gptqmodel") is not None:
        return {"backend": "gptqmodel", "version": _version("gptqmodel")}
    if importlib.util.find_spec("auto_gptq") is not None:
        raise MissingDependencyError(
            "gptqmodel", "quantize",
            feature=f"GPTQ; auto-gptq {_version('auto-gptq')} is installed but is end-of-life and cannot import with "
                    "transformers 5, so it is not used")
    raise MissingDependencyError("gptqmodel", "quantize", feature="--method gptq")


def gptqmodel_cpu_workers() -> int:
    """Worker count for GPTQModel's CPU thread pool: the usable cores, at least 2 (its model-loader pool asks for
    2 and fails on a smaller parent pool; its own default is cores/2 = 1 on a 2-core box), at most 12 (its cap)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return min(12, max(2, n))


def import_gptqmodel():
    """Import GPTQModel with ``GPTQMODEL_CPU_WORKERS`` set first.

    GPTQModel reads the variable when it first builds its device thread pool (lazily, on first use). peft and
    optimum may have imported ``gptqmodel`` already while probing for it, so the variable is set whenever the user
    has not set it, not only before the first import.
    """
    gptq_backend()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(gptqmodel_cpu_workers()))
    return require("gptqmodel", "quantize", feature="--method gptq")


def _gptq_pool_error(exc: BaseException) -> ResourceError:
    return ResourceError(
        f"GPTQModel could not start its CPU worker pool ({exc}).",
        fix=f"set GPTQMODEL_CPU_WORKERS={gptqmodel_cpu_workers()} (at least 2) in the environment before starting "
            "the kernel")


@register_stage
class QuantizeStage(Stage):
    """Quantize a merged (or base) model with GPTQ or bitsandbytes; report size, perplexity, load time, tokens/s."""

    name = "quantize"
    extras = ("finetune",)

    @classmethod
    def extras_for(cls, config) -> tuple[str, ...]:
        return ("quantize",) if config.method == "gptq" else ("finetune",)
    config_cls = QuantizeConfig
    key_metrics = ("size_ratio", "perplexity_delta", "perplexity", "tokens_per_s")

    def run(self, ctx: RunContext) -> dict[str, Any]:
        cfg: QuantizeConfig = ctx.config
        torch = require("torch", "finetune")
        backend = gptq_backend() if cfg.method == "gptq" else {"backend": "bitsandbytes",
                                                                "version": _version("bitsandbytes")}
        backend_line = f"{backend['backend']} {backend['version']}"
        ctx.log(f"quantize backend: {backend_line}")
        source = self._source(ctx, cfg)
        dataset = mt.load_data(cfg.data, ctx.registry, mt.upstream_dataset(ctx.registry, source.artifact))
        if dataset is None and cfg.method == "gptq":
            raise ConfigError("quantize: GPTQ needs calibration data and no dataset was found upstream of "
                              f"'{cfg.model}'.", field="data",
                              fix="pass --data with a data run or dataset hash (`%llmops runs --stage data`)")
        if dataset is not None and dataset.artifact is not None:
            ctx.use(dataset.artifact)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        bits = cfg.effective_bits
        staging = ctx.staging_dir("quantize")
        steps = 5

        ctx.progress(0, steps, f"quantizing ({cfg.method}, {bits}-bit)")
        t0 = time.perf_counter()
        if cfg.method == "gptq":
            calib = self._calibration(dataset, source, cfg)
            ctx.log(f"GPTQ calibration: {len(calib)} texts from dataset {dataset.version} (train split)")
            details = quantize_gptq(source.path, staging, bits=bits, group_size=cfg.group_size,
                                    desc_act=cfg.desc_act, calibration=calib, device=device,
                                    log_dir=ctx.registry.home / "runs" / ctx.run_id / "gptq-logs")
        else:
            details = quantize_bnb(source.path, staging, method=cfg.method, quant_type=cfg.bnb_quant_type,
                                   double_quant=cfg.bnb_double_quant, device=device)
        quantize_s = time.perf_counter() - t0
        mt.save_tokenizer([staging, source.path], staging)

        ctx.progress(1, steps, "measuring source")
        ppl_texts = mt.split_texts(dataset, cfg.eval_samples, split="eval")
        prompt = (mt.split_texts(dataset, 1, split="eval", fill=True, field="prompt") or [mt.FIXED_PROBES[1]])[0]
        src_m = measure(source.path, ppl_texts, prompt, cfg.generate_tokens, device=device)
        ctx.progress(2, steps, "measuring quantized")
        q_m = measure(staging, ppl_texts, prompt, cfg.generate_tokens, device=device)

        name = cfg.name or f"{source.name}-{cfg.method.replace('-' + str(bits) + 'bit', '')}-{bits}bit"
        src_size = mt_weights_size(source.path)
        q_size = mt_weights_size(staging)
        report = {
            "method": cfg.method, "bits": bits, "backend": backend["backend"], "backend_version": backend["version"],
            "group_size": cfg.group_size if cfg.method == "gptq" else None, "details": details,
            "source": {"ref": source.ref, "hash": source.artifact.hash if source.artifact else None, **src_m,
                       "weights_bytes": src_size},
            "quantized": {**q_m, "weights_bytes": q_size},
            "size_ratio": q_size / src_size if src_size else None,
            "calibration": {"dataset": dataset.version if dataset else None,
                            "samples": details.get("calibration_samples")},
            "quantize_seconds": quantize_s,
        }
        mt.write_model_card(staging, {
            "name": name, "kind": "quantized", "licence": mt.licence_of(source.path),
            "created_by": "llmops-jupyter quantize", "created_at": time.time(), "run_id": ctx.run_id, **report,
        })
        ctx.progress(3, steps, "saving")
        art = ctx.save_artifact(staging, "quantized", name=name, meta={
            "method": cfg.method, "bits": bits, "backend": backend_line, "source": report["source"]["hash"],
            "size_ratio": report["size_ratio"], "perplexity": q_m.get("perplexity")})

        metrics = {"size_bytes": q_size, "source_size_bytes": src_size, "size_ratio": report["size_ratio"],
                   "perplexity": q_m.get("perplexity"), "source_perplexity": src_m.get("perplexity"),
                   "load_s": q_m["load_s"], "source_load_s": src_m["load_s"],
                   "tokens_per_s": q_m.get("tokens_per_s"), "source_tokens_per_s": src_m.get("tokens_per_s"),
                   "quantize_s": quantize_s}
        if src_m.get("perplexity") and q_m.get("perplexity"):
            metrics["perplexity_delta"] = q_m["perplexity"] - src_m["perplexity"]
        ctx.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v == v})

        ctx.progress(4, steps, "eval comparison")
        eval_rows = self._compare_eval(ctx, cfg, source, art.hash, dataset) if cfg.compare_eval else []
        ctx.progress(steps, steps, "done")
        ctx.set_summary(quantized=art.hash, backend=backend_line, method=cfg.method, bits=bits, **{
            k: v for k, v in metrics.items() if v is not None})
        table = Table(["measure", "source", "quantized", "change"], [
            ["weights on disk", _mb(src_size), _mb(q_size), _ratio(report["size_ratio"])],
            ["perplexity (eval split)", fmt_num(src_m.get("perplexity")), fmt_num(q_m.get("perplexity")),
             fmt_delta(src_m.get("perplexity"), q_m.get("perplexity"))],
            ["load time", f"{src_m['load_s']:.2f} s", f"{q_m['load_s']:.2f} s", ""],
            ["generation", fmt_tps(src_m.get("tokens_per_s")), fmt_tps(q_m.get("tokens_per_s")), ""],
            *eval_rows,
        ], title=f"Quantized {source.name} → {cfg.method} {bits}-bit with {backend_line} ({device})",
            note=f"artifact quantized {art.short}; quantization took {quantize_s:.1f} s")
        return {"report": table, "artifact": art, "measurements": report}

    # -- pieces ---------------------------------------------------------------------------------------------------
    def _source(self, ctx: RunContext, cfg: QuantizeConfig) -> ModelRef:
        from llmops_jupyter.models.refs import resolve_model, use_model

        probe = resolve_model(cfg.model, ctx.registry)
        if probe.kind == "adapter":
            raise ConfigError(f"quantize: --model '{cfg.model}' is a LoRA adapter.", field="model", value=cfg.model,
                              fix="merge it first (`%llmops merge --adapter ...`) and quantize the merge run")
        quant = mt.checkpoint_quantization(probe.path)
        if probe.kind == "quantized" or quant:
            raise ConfigError(f"quantize: --model '{cfg.model}' is already quantized ({quant or 'quantized artifact'})"
                              "; quantizing it again compounds the error and GPTQ cannot read packed weights.",
                              field="model", value=cfg.model,
                              fix="quantize the full-precision merged model it came from (see `%llmops lineage`)")
        return use_model(ctx, cfg.model)

    @staticmethod
    def _calibration(dataset: Dataset, source: ModelRef, cfg: QuantizeConfig) -> list[dict[str, list[int]]]:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(source.path))
        texts = mt.split_texts(dataset, cfg.calibration_samples, split="train", fill=True)
        out = []
        for t in texts:
            ids = tok(t, truncation=True, max_length=cfg.calibration_max_tokens)
            out.append({"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]})
        if not out:
            raise ConfigError(f"quantize: dataset {dataset.version} has no texts to calibrate on.", field="data",
                              fix="pass --data with a non-empty dataset")
        return out

    def _compare_eval(self, ctx: RunContext, cfg: QuantizeConfig, source: ModelRef, quantized: str,
                      dataset: Dataset | None) -> list[list[str]]:
        """Run the eval stage (if one is installed) on both models; rows of metric deltas for the report."""
        from llmops_jupyter.core.stage import discover

        cmd = discover().get("eval")
        if cmd is None or cmd.stage_cls is None:
            ctx.log("no eval stage installed: skipping the eval-metric comparison")
            return []
        params: dict[str, Any] = {}
        fields = {f.name: f for f in dataclasses.fields(cmd.config_cls)}
        if "model" not in fields:
            ctx.log("the installed eval stage takes no --model: skipping the eval-metric comparison")
            return []
        if dataset is not None and dataset.artifact is not None and "data" in fields:
            params["data"] = dataset.artifact.hash
        if "limit" in fields and cfg.eval_samples:
            params["limit"] = cfg.eval_samples
        model_tp, _ = unwrap_optional(field_type(cmd.config_cls, fields["model"]))
        as_list = typing.get_origin(model_tp) in (list, tuple)
        results = {}
        for label, ref in (("source", source.artifact.hash if source.artifact else str(source.path)),
                           ("quantized", quantized)):
            try:
                res = ctx.runner.run("eval", {**params, "model": [ref] if as_list else ref}, parent_id=ctx.run_id)
            except LlmopsError as exc:
                ctx.log(f"eval comparison skipped ({label}): {exc}")
                return []
            results[label] = res.metrics
        rows = []
        deltas = {}
        for key in sorted(set(results["source"]) & set(results["quantized"])):
            a, b = results["source"][key], results["quantized"][key]
            if a is None or b is None:
                continue
            deltas[f"eval_delta/{key}"] = b - a
            rows.append([f"eval: {key}", fmt_num(a), fmt_num(b), f"{b - a:+.4g}"])
        if deltas:
            ctx.log_metrics(deltas)
        return rows


def quantize_gptq(source: Path, target: Path, *, bits: int, group_size: int, desc_act: bool,
                  calibration: list[dict[str, list[int]]], device: str,
                  log_dir: Path | None = None) -> dict[str, Any]:
    """GPTQ with GPTQModel's native API; writes a standard GPTQ checkpoint to ``target``.

    GPTQModel writes per-layer logs to ``./logs`` of the working directory (the user's notebook folder);
    ``log_dir`` sends them to the run's own folder instead.
    """
    t_import = time.perf_counter()
    gptqmodel = import_gptqmodel()
    import_s = time.perf_counter() - t_import
    if log_dir is not None:
        try:  # a module global in GPTQModel 7.x; other versions keep their default
            loop_processor = importlib.import_module("gptqmodel.looper.loop_processor")
        except ImportError:
            loop_processor = None
        if hasattr(loop_processor, "_PROJECT_LOG_DIR"):
            loop_processor._PROJECT_LOG_DIR = Path(log_dir)
    qcfg = gptqmodel.QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act)
    try:
        model = gptqmodel.GPTQModel.load(str(source), qcfg, device=device)
        model.quantize(calibration, batch_size=min(8, len(calibration)))
    except ValueError as exc:
        if "Virtual pool" in str(exc):
            raise _gptq_pool_error(exc) from None
        raise
    model.save(str(target))
    (target / "quant_log.csv").unlink(missing_ok=True)  # GPTQModel's per-layer log: noise for servers
    _scrub_gptq_config(target)
    return {"calibration_samples": len(calibration), "import_s": import_s,
            "cpu_workers": os.environ.get("GPTQMODEL_CPU_WORKERS"), "desc_act": desc_act}


def _scrub_gptq_config(target: Path) -> None:
    """Drop GPTQModel's temp offload folder from the saved configs: a random machine path would make identical
    quantizations hash differently in the content-addressed store (and it means nothing to a server)."""
    import json

    from llmops_jupyter.core.files import atomic_write_json

    for name in ("config.json", "quantize_config.json"):
        path = target / name
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        holder = data.get("quantization_config", data) if name == "config.json" else data
        meta = holder.get("meta") if isinstance(holder, dict) else None
        if isinstance(meta, dict) and "offload_to_disk_path" in meta:
            meta.pop("offload_to_disk_path")
            atomic_write_json(path, data)


def quantize_bnb(source: Path, target: Path, *, method: str, quant_type: str, double_quant: bool,
                 device: str) -> dict[str, Any]:
    """bitsandbytes export: load with a BitsAndBytesConfig and save (the config lands in config.json)."""
    torch = require("torch", "finetune")
    transformers = require("transformers", "finetune")
    require("bitsandbytes", "finetune", feature=f"--method {method}")
    if method == "bnb-4bit":
        qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                               bnb_4bit_use_double_quant=double_quant,
                                               bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda"
                                               else torch.float32)
    else:
        qcfg = transformers.BitsAndBytesConfig(load_in_8bit=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(source), quantization_config=qcfg,
                                                              device_map={"": 0} if device == "cuda" else "cpu")
    model.save_pretrained(str(target), safe_serialization=True)
    return {"quant_type": quant_type if method == "bnb-4bit" else "int8",
            "double_quant": double_quant if method == "bnb-4bit" else None}


def measure(path: Path, ppl_texts: list[str], prompt: str, new_tokens: int, *, device: str) -> dict[str, Any]:
    """Load time, perplexity and greedy tokens/s of one checkpoint (quantized ones load their own config)."""
    import gc

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmops_jupyter.models.inference import perplexity

    quantized = mt.checkpoint_quantization(path) is not None
    if quantized and (mt.checkpoint_config(path).get("quantization_config") or {}).get("quant_method") == "gptq":
        import_gptqmodel()
        require("optimum", "quantize", feature="loading GPTQ checkpoints with transformers")
    tok = AutoTokenizer.from_pretrained(str(path))
    t0 = time.perf_counter()
    if quantized:
        model = AutoModelForCausalLM.from_pretrained(str(path), device_map={"": 0} if device == "cuda" else "cpu")
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto").to(device)
    load_s = time.perf_counter() - t0
    model.eval()
    out: dict[str, Any] = {"load_s": load_s}
    if ppl_texts:
        out["perplexity"] = perplexity(model, tok, None, ppl_texts, max_length=512)
    if new_tokens:
        out["tokens_per_s"] = mt.generation_speed(model, tok, prompt, new_tokens)
    del model
    gc.collect()
    return out


def mt_weights_size(path: Path) -> int:
    """Bytes of weight files (safetensors / bin), the part of a checkpoint quantization shrinks."""
    return sum(f.stat().st_size for f in Path(path).iterdir()
               if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt"))


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _ratio(r: float | None) -> str:
    return f"×{r:.3f}" if r else ""

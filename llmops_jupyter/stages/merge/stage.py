"""``%llmops merge``: fold a LoRA adapter into its full-precision base, verify it, store it with lineage.

Why verification: a merge that silently exports the base model (adapter never applied, wrong base, merge into
quantized weights that drops the delta) looks like a normal checkpoint. So the stage compares logits on a probe
set three ways — base, base+adapter (peft, unmerged) and the merged model *reloaded from the saved files* — and
fails with :class:`~llmops_jupyter.core.errors.VerificationError` unless merged ≈ base+adapter and merged ≠ base.

Why ``--dequantize-nf4``: a QLoRA adapter was trained against NF4-quantized base weights. Merging it into the
original weights shifts every layer by the quantization error; round-tripping the base through NF4 first
(quantize → dequantize with bitsandbytes) merges into the weights the adapter actually saw. The merge itself is
always done in full/half precision, never into 4-bit or GPTQ weights.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.display import Table
from llmops_jupyter.core.errors import ConfigError, StageError, VerificationError, require
from llmops_jupyter.core.stage import Stage, register_stage
from llmops_jupyter.models import tools as mt

if TYPE_CHECKING:
    from llmops_jupyter.core.runner import RunContext
    from llmops_jupyter.models.refs import ModelRef


@dataclasses.dataclass
class MergeConfig(StageConfig):
    adapter: str = option(help="adapter to merge: a finetune run ('finetune@latest', run id), an adapter artifact "
                               "hash or an adapter folder")
    base: str | None = option(None, "full/half-precision base to merge into (default: the base recorded with the "
                                    "adapter, or its adapter_config.json)")
    dtype: str = option("auto", "precision to load the base and merge in (auto = the base checkpoint's dtype)",
                        choices=mt.DTYPES)
    dequantize_nf4: bool = option(False, "round-trip the base's linear weights through bitsandbytes NF4 (quantize, "
                                         "dequantize) before merging, to match the numerics a QLoRA adapter was "
                                         "trained against")
    nf4_double_quant: bool | None = option(None, "with --dequantize-nf4: also quantize the NF4 scales (QLoRA double "
                                                 "quantization); default: what the adapter's run recorded, else on")
    data: str | None = option(None, "dataset whose eval prompts probe the verification (default: the dataset the "
                                    "adapter was trained on, else built-in probes)")
    probe_samples: int = option(8, "number of probe prompts for the logit check", min=1, max=4096)
    tolerance: float | None = option(None, "max abs logit difference allowed between base+adapter and merged "
                                           "(default by dtype: 1e-3 float32, 5e-2 float16, 0.25 bfloat16)",
                                     min=0, min_exclusive=True)
    allow_noop: bool = option(False, "accept an adapter that does not change the model's outputs (e.g. untrained); "
                                     "by default that fails verification")
    name: str | None = option(None, "name of the merged artifact (default: <adapter name>-merged)")


@register_stage
class MergeStage(Stage):
    """Merge a LoRA adapter into its base (optionally NF4-dequantized), verify logits, save a merged model."""

    name = "merge"
    extras = ("finetune",)
    config_cls = MergeConfig
    key_metrics = ("merge_max_abs_diff", "adapter_effect_max_abs_diff")

    def run(self, ctx: RunContext) -> dict[str, Any]:
        cfg: MergeConfig = ctx.config
        require("torch", "finetune")
        transformers = require("transformers", "finetune")
        peft = require("peft", "finetune")

        adapter, base = self._resolve(ctx, cfg)
        quant = mt.checkpoint_quantization(base.path)
        if quant:
            raise StageError(
                f"merge: the base '{base.ref}' is stored quantized ({quant}); merging into quantized weights loses "
                "or corrupts the adapter delta.",
                fix="pass --base with the full/half-precision base checkpoint (add --dequantize-nf4 for a QLoRA "
                    "adapter)")
        dtype = mt.checkpoint_dtype(cfg.dtype, base.path)
        tol = cfg.tolerance if cfg.tolerance is not None else mt.default_tolerance(dtype)

        dataset = mt.load_data(cfg.data, ctx.registry, mt.upstream_dataset(ctx.registry, adapter.artifact))
        if dataset is not None and dataset.artifact is not None:
            ctx.use(dataset.artifact)  # recorded as a run input; not a lineage parent of the weights (see below)
        probes = mt.split_texts(dataset, cfg.probe_samples, split="eval", fill=True, field="prompt")
        probe_source = f"dataset {dataset.version} eval split" if probes else "built-in probes"
        probes = probes or list(mt.FIXED_PROBES[: cfg.probe_samples])

        steps = 6
        ctx.progress(0, steps, "loading base")
        t0 = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(str(base.path), dtype=dtype)
        model.eval()
        staging = ctx.staging_dir("merge")
        tokenizer = mt.save_tokenizer([adapter.path, base.path], staging)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        nf4_info: dict[str, Any] = {}
        if cfg.dequantize_nf4:
            ctx.progress(1, steps, "NF4 round trip")
            double = cfg.nf4_double_quant if cfg.nf4_double_quant is not None else _recorded_double_quant(ctx, adapter)
            nf4_info = nf4_roundtrip(model, double_quant=double)
            ctx.log(f"NF4 round trip of {nf4_info['modules']} linear layers (double quant: {double}); "
                    f"mean abs weight change {nf4_info['mean_abs_change']:.3g}")
        ctx.progress(2, steps, "base logits")
        base_logits = mt.batched_logits(model, tokenizer, probes)

        ctx.progress(3, steps, "base+adapter logits")
        from llmops_jupyter.models.inference import without_gptqmodel  # GPTQModel only for a GPTQ base

        with without_gptqmodel(model):
            peft_model = peft.PeftModel.from_pretrained(model, str(adapter.path))
        peft_model.eval()
        adapted_logits = mt.batched_logits(peft_model, tokenizer, probes)

        ctx.progress(4, steps, "merging")
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(str(staging), safe_serialization=True)
        del merged, peft_model, model

        ctx.progress(5, steps, "verifying saved model")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(staging), dtype=dtype)
        reloaded.eval()
        merged_logits = mt.batched_logits(reloaded, tokenizer, probes)
        del reloaded
        d_merge = mt.max_abs_diff(adapted_logits, merged_logits)
        d_effect = mt.max_abs_diff(adapted_logits, base_logits)
        d_base = mt.max_abs_diff(merged_logits, base_logits)
        verification = {"probes": len(probes), "probe_source": probe_source, "tolerance": tol,
                        "max_abs_diff_merged_vs_adapter": d_merge, "max_abs_diff_adapter_vs_base": d_effect,
                        "max_abs_diff_merged_vs_base": d_base, "dtype": str(dtype).replace("torch.", "")}
        ctx.log_metrics({"merge_max_abs_diff": d_merge, "adapter_effect_max_abs_diff": d_effect,
                         "merged_vs_base_max_abs_diff": d_base})
        check_verification(d_merge, d_effect, d_base, tol, allow_noop=cfg.allow_noop)

        name = cfg.name or f"{adapter.name}-merged"
        mt.write_model_card(staging, {
            "name": name, "kind": "merged", "licence": mt.licence_of(base.path),
            "created_by": "llmops-jupyter merge", "created_at": time.time(),
            "base": {"ref": base.ref, "path": str(base.path), "hash": base.artifact.hash if base.artifact else None},
            "adapter": {"ref": adapter.ref, "hash": adapter.artifact.hash if adapter.artifact else None,
                        "run_id": adapter.artifact.run_id if adapter.artifact else None},
            "dequantize_nf4": cfg.dequantize_nf4, "nf4": nf4_info or None, "verification": verification,
            "run_id": ctx.run_id,
        })
        parents = [m.artifact for m in (base, adapter) if m.artifact is not None]
        art = ctx.save_artifact(staging, "merged", name=name, inputs=parents,
                                meta={"base": base.artifact.hash if base.artifact else None, "dtype": verification["dtype"],
                                      "dequantize_nf4": cfg.dequantize_nf4, "verification": verification})
        ctx.progress(steps, steps, "done")
        seconds = time.perf_counter() - t0
        ctx.set_summary(merged=art.hash, base=base.ref, adapter=adapter.ref, dtype=verification["dtype"],
                        dequantize_nf4=cfg.dequantize_nf4, max_abs_diff=d_merge, adapter_effect=d_effect,
                        tolerance=tol, probes=len(probes), probe_source=probe_source, size_bytes=art.size,
                        seconds=seconds)
        report = Table(["check", "value"], [
            ["merged vs base+adapter (max |Δlogit|)", f"{d_merge:.3g} ≤ {tol:.3g} ✓"],
            ["base+adapter vs base (adapter effect)", f"{d_effect:.3g}"],
            ["merged vs base", f"{d_base:.3g} (> merged vs base+adapter) ✓"],
            ["probes", f"{len(probes)} from {probe_source}"],
            ["dtype / NF4 round trip", f"{verification['dtype']} / {'yes' if cfg.dequantize_nf4 else 'no'}"],
            ["artifact", f"merged {art.short} ({art.size / 1e6:.1f} MB)"],
        ], title=f"Merged {adapter.name} into {base.name}")
        return {"report": report, "artifact": art, "verification": verification}

    def _resolve(self, ctx: RunContext, cfg: MergeConfig) -> tuple[ModelRef, ModelRef]:
        from llmops_jupyter.models.refs import FULL_WEIGHT_KINDS, resolve_model, use_model

        adapter = resolve_model(cfg.adapter, ctx.registry)
        if adapter.kind != "adapter":
            raise ConfigError(f"merge: --adapter '{cfg.adapter}' is a {adapter.kind}, not an adapter.",
                              field="adapter", value=cfg.adapter,
                              fix="pass a finetune run or adapter artifact (`%llmops runs --stage finetune`)")
        if cfg.base:
            if adapter.artifact is not None:
                ctx.use(adapter.artifact)
            base = use_model(ctx, cfg.base)
        else:
            if adapter.base is None:
                raise ConfigError(f"merge: cannot tell which base model adapter '{cfg.adapter}' applies to (no "
                                  "base_model_path in its metadata and adapter_config.json names no local folder).",
                                  field="base", fix="pass --base with the base model folder or registry reference")
            adapter = use_model(ctx, cfg.adapter)
            base = adapter.base
        if base.kind not in FULL_WEIGHT_KINDS:
            raise ConfigError(f"merge: the base '{base.ref}' is a {base.kind} model; merge needs the full-precision "
                              "base checkpoint.", field="base", value=cfg.base,
                              fix="pass --base with the original base model")
        return adapter, base


def check_verification(d_merge: float, d_effect: float, d_base: float, tol: float, *, allow_noop: bool) -> None:
    """Raise :class:`VerificationError` unless merged ≈ base+adapter and merged ≠ base (see module docstring)."""
    if d_effect == 0.0 and not allow_noop:
        raise VerificationError("merge: the adapter does not change the model's outputs on the probes (max |Δlogit| "
                                "= 0); the merged model would equal the base.",
                                fix="check the adapter was trained (LoRA B matrices are zero at init), or pass "
                                    "--allow-noop to export anyway")
    if d_merge > tol:
        raise VerificationError(f"merge: merged logits differ from base+adapter by {d_merge:.3g} > tolerance {tol:.3g}"
                                f" (adapter effect {d_effect:.3g}, merged vs base {d_base:.3g}); nothing was saved.",
                                fix="check --base is the model the adapter was trained on (and --dequantize-nf4 for "
                                    "QLoRA), or raise --tolerance for half precision")
    if d_effect > 0.0 and d_base <= d_merge:
        raise VerificationError(f"merge: the merged model is no closer to base+adapter than the base is (merged vs "
                                f"base {d_base:.3g}, merged vs base+adapter {d_merge:.3g}): the adapter was not merged.",
                                fix="report this as a bug with the adapter's adapter_config.json")


def nf4_roundtrip(model: Any, *, double_quant: bool = True, blocksize: int = 64) -> dict[str, Any]:
    """Replace every linear weight (except the output head, which QLoRA keeps unquantized) by its NF4
    quantize→dequantize image, in place, with the bitsandbytes kernels QLoRA training used."""
    import torch

    bnb_f = require("bitsandbytes.functional", "finetune", package="bitsandbytes", feature="--dequantize-nf4")
    head = model.get_output_embeddings()
    count, change, numel = 0, 0.0, 0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, torch.nn.Linear) or module is head:
                continue
            w = module.weight.data
            q, state = bnb_f.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)
            deq = bnb_f.dequantize_4bit(q, state).to(w.dtype).reshape(w.shape)
            change += float((deq.float() - w.float()).abs().sum())
            numel += w.numel()
            module.weight.data = deq
            count += 1
    return {"modules": count, "mean_abs_change": change / max(numel, 1), "double_quant": double_quant,
            "blocksize": blocksize, "quant_type": "nf4"}


def _recorded_double_quant(ctx: RunContext, adapter: ModelRef) -> bool:
    """The double-quant setting the adapter's finetune run recorded (artifact meta or run params), default True."""
    sources: list[dict[str, Any]] = []
    if adapter.artifact is not None:
        sources.append(adapter.artifact.meta)
        if adapter.artifact.run_id:
            try:
                sources.append(ctx.registry.get_run(adapter.artifact.run_id)["params"])
            except Exception:  # noqa: BLE001 - provenance is best effort
                pass
    for src in sources:
        stack = [src]
        while stack:
            d = stack.pop()
            for key, value in d.items():
                if isinstance(value, dict):
                    stack.append(value)
                elif "double_quant" in key and isinstance(value, bool):
                    return value
    return True


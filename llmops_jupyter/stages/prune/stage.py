"""``%llmops prune``: make a full-precision model smaller by measured importance on calibration data.

Methods (details and references in :mod:`llmops_jupyter.stages.prune.engine`):

* ``depth`` — delete whole decoder layers (``--layers N`` or ``--target-params``), chosen by block influence
  (``--criterion bi``, ShortGPT) or as the contiguous block with the smallest angular distance (``--criterion
  angular``, Gromov et al.). Fewer layers: smaller files and faster generation everywhere.
* ``width`` — keep the same number of MLP channels in every layer (``--intermediate-size`` or ``--target-params``)
  by mean activation magnitude (Minitron-style).
* ``wanda`` — zero 50 % of each projection's weights (``--sparsity``) or 2 of every 4 (``--pattern 2:4``) by
  |weight| × input-activation norm. The files keep their size and **no runtime here gets faster** from the zeros: not
  on CPU, not in GGUF or GPTQ files; only GPU 2:4 sparse kernels do. The report says so.
* ``sparsegpt`` — the same targets as wanda (``--sparsity``, ``--pattern 2:4``), but per projection the kept weights
  are updated to compensate for the pruned ones (the inverse Hessian of the layer's calibration inputs, Frantar &
  Alistarh 2023), decoder layer by decoder layer on the outputs of the already-pruned layers. Same note on speed.

The saved folder is a normal transformers checkpoint (``num_hidden_layers`` and every ``layer_idx`` renumbered after
depth pruning), reloaded and checked before it is stored: greedy generation with the KV cache must equal generation
without it. Pruning opens a quality gap; ``%llmops distill --teacher <the unpruned model>`` closes it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.display import Table, fmt_delta, fmt_num, fmt_tps
from llmops_jupyter.core.errors import ConfigError, VerificationError, require
from llmops_jupyter.core.stage import Stage, register_stage
from llmops_jupyter.models import tools as mt

if TYPE_CHECKING:
    from llmops_jupyter.core.runner import RunContext
    from llmops_jupyter.models.refs import ModelRef

METHODS = ("depth", "width", "wanda", "sparsegpt")
SPARSE_METHODS = ("wanda", "sparsegpt")
SPARSITY_NOTE = ("Sparse weights are stored dense: the files keep their size, and zeros give no speed-up on CPU or in "
                 "GGUF/GPTQ files (only GPU 2:4 sparse kernels run them faster).")


@dataclasses.dataclass
class PruneConfig(StageConfig):
    model: str = option(help="full-precision model to prune: a merge/distill/prune run, a merged or base artifact, a "
                             "checkpoint folder or a provider name")
    method: str = option("depth", "depth: remove decoder layers; width: uniform MLP width; wanda: 50% unstructured "
                                  "or 2:4 sparsity by |W|·‖X‖; sparsegpt: the same targets with the kept weights "
                                  "updated by the inverse Hessian of the calibration inputs (sparsity: no speed-up "
                                  "on CPU/GGUF/GPTQ)", choices=METHODS)
    criterion: str = option("bi", "depth: bi = per-layer block influence (1 − cos of a layer's input and output, "
                                  "ShortGPT); angular = the contiguous block with the smallest angular distance "
                                  "(Gromov et al.)", choices=("bi", "angular"))
    layers: int | None = option(None, "depth: number of decoder layers to remove", min=1)
    target_params: float | None = option(None, "depth/width: prune until the model has at most this many parameters "
                                               "(a count such as 1e8, or a fraction of the original such as 0.8)",
                                         min=0, min_exclusive=True)
    intermediate_size: int | None = option(None, "width: MLP channels to keep in every layer", min=1)
    sparsity: float | None = option(None, "wanda/sparsegpt: share of each projection's weights set to zero, "
                                          "strictly between 0 and 1 (default 0.5; 2:4 is always 0.5)")
    pattern: str = option("unstructured", "wanda/sparsegpt: unstructured (wanda: per output row; sparsegpt: per "
                                          "block of 128 columns) or 2:4 (2 zeros in every 4 consecutive weights; "
                                          "GPU sparse kernels only)",
                          choices=("unstructured", "2:4"))
    data: str | None = option(None, "dataset for calibration and perplexity (default: the dataset upstream of "
                                    "--model in the lineage)")
    calibration_samples: int = option(32, "calibration texts from the dataset's train split", min=1, max=100_000)
    calibration_max_tokens: int = option(256, "truncate each calibration text to this many tokens", min=8,
                                         max=32_768)
    eval_samples: int = option(32, "eval-split texts for perplexity before/after (0 = skip)", min=0, max=100_000)
    generate_tokens: int = option(32, "tokens to generate for greedy tokens/s before/after (0 = skip)", min=0,
                                  max=4096)
    name: str | None = option(None, "name of the pruned artifact (default: <model name>-<method>-<what>)")

    def validate(self) -> None:
        if self.sparsity is not None and not 0 < self.sparsity < 1:
            raise self.invalid("sparsity", "must be strictly between 0 and 1", fix="use e.g. --sparsity 0.5")
        given = {k for k in ("layers", "target_params", "intermediate_size", "sparsity") if getattr(self, k) is not None}
        allowed = {"depth": {"layers", "target_params"}, "width": {"intermediate_size", "target_params"},
                   "wanda": {"sparsity"}, "sparsegpt": {"sparsity"}}[self.method]
        for extra in sorted(given - allowed):
            raise self.invalid(extra, f"does not apply to --method {self.method}",
                               fix=f"drop it (--method {self.method} takes "
                                   f"{', '.join('--' + a.replace('_', '-') for a in sorted(allowed))})")
        if self.method == "depth" and len(given) != 1:
            raise self.invalid("layers", "depth pruning needs exactly one of --layers or --target-params",
                               fix="pass --layers N (layers to remove) or --target-params (e.g. 0.8)")
        if self.method == "width" and len(given) != 1:
            raise self.invalid("intermediate_size", "width pruning needs exactly one of --intermediate-size or "
                               "--target-params", fix="pass --intermediate-size N or --target-params (e.g. 0.8)")
        if self.method not in SPARSE_METHODS and self.pattern != "unstructured":
            raise self.invalid("pattern", f"does not apply to --method {self.method}", fix="drop --pattern")
        if self.pattern == "2:4" and self.sparsity not in (None, 0.5):
            raise self.invalid("sparsity", "must be 0.5 with --pattern 2:4", fix="drop --sparsity")

    @property
    def effective_sparsity(self) -> float:
        return 0.5 if self.sparsity is None else self.sparsity


def check_prunable(ref: str, registry: Any) -> ModelRef:
    """Resolve ``--model`` without loading it: GGUF files, adapters and quantized checkpoints are refused."""
    from llmops_jupyter.models.refs import resolve_model

    p = Path(str(ref)).expanduser()
    if p.is_file() and (p.suffix == ".gguf" or p.read_bytes()[:4] == b"GGUF"):
        raise ConfigError(f"prune: --model '{ref}' is a GGUF file; pruning needs the full-precision checkpoint.",
                          field="model", value=ref, fix="prune the merged model it was exported from (see "
                                                        "`%llmops lineage`), then export the pruned one")
    try:
        art = registry.get_artifact(str(ref))
    except Exception:  # noqa: BLE001 - not a registry reference: resolve_model says what it is
        art = None
    if art is not None and art.kind == "gguf":
        raise ConfigError(f"prune: --model '{ref}' is a GGUF export; pruning needs the full-precision checkpoint.",
                          field="model", value=ref, fix="prune the merged model it was exported from")
    m = resolve_model(ref, registry)
    if m.kind == "adapter":
        raise ConfigError(f"prune: --model '{ref}' is a LoRA adapter.", field="model", value=ref,
                          fix="merge it first (`%llmops merge --adapter ...`) and prune the merge run")
    quant = mt.checkpoint_quantization(m.path)
    if m.kind == "quantized" or quant:
        raise ConfigError(f"prune: --model '{ref}' is quantized ({quant or 'quantized artifact'}); pruning needs "
                          "full-precision weights.", field="model", value=ref,
                          fix="prune the full-precision model it came from, then quantize the pruned one")
    return m


@register_stage
class PruneStage(Stage):
    """Prune a full-precision model (depth, width, wanda or sparsegpt sparsity) on calibration data; report size, speed,
    perplexity before/after."""

    name = "prune"
    extras = ("finetune",)
    config_cls = PruneConfig
    key_metrics = ("size_ratio", "params_ratio", "perplexity", "tokens_per_s_ratio", "sparsity")

    def run(self, ctx: RunContext) -> dict[str, Any]:
        cfg: PruneConfig = ctx.config
        torch = require("torch", "finetune")
        transformers = require("transformers", "finetune")
        from llmops_jupyter.models.refs import use_model
        from llmops_jupyter.stages.prune import engine
        from llmops_jupyter.stages.quantize.stage import measure, mt_weights_size

        probe = check_prunable(cfg.model, ctx.registry)
        n_layers = int(mt.checkpoint_config(probe.path).get("num_hidden_layers") or 0)
        if cfg.method == "depth" and cfg.layers is not None and cfg.layers >= n_layers:
            raise ConfigError(f"prune: --layers {cfg.layers} would remove every layer of '{cfg.model}' "
                              f"({n_layers} layers).", field="layers", value=cfg.layers,
                              fix=f"remove fewer than {n_layers} layers")
        dataset = mt.load_data(cfg.data, ctx.registry, mt.upstream_dataset(ctx.registry, probe.artifact))
        if dataset is None:
            raise ConfigError(f"prune: calibration data is needed and no dataset was found upstream of "
                              f"'{cfg.model}'.", field="data",
                              fix="pass --data with a data run or dataset hash (`%llmops runs --stage data`)")
        source = use_model(ctx, cfg.model)
        if dataset.artifact is not None:
            ctx.use(dataset.artifact)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        steps = 6
        t0 = time.perf_counter()
        ctx.progress(0, steps, "loading model")
        dtype = mt.checkpoint_dtype("auto", source.path)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(source.path), dtype=dtype).to(device)
        model.eval()
        tok = transformers.AutoTokenizer.from_pretrained(str(source.path))
        texts = mt.split_texts(dataset, cfg.calibration_samples, split="train", fill=True)
        batches = engine.encode(tok, texts, cfg.calibration_max_tokens)
        if not batches:
            raise ConfigError(f"prune: dataset {dataset.version} has no texts to calibrate on.", field="data",
                              fix="pass --data with a non-empty dataset")
        params_before = engine.count_params(model)
        ctx.progress(1, steps, f"scoring ({cfg.method})")
        details = self._prune(ctx, cfg, model, batches, params_before, n_layers)
        params_after = engine.count_params(model)

        ctx.progress(2, steps, "saving")
        prompt = (mt.split_texts(dataset, 1, split="eval", fill=True, field="prompt") or [mt.FIXED_PROBES[1]])[0]
        probes = texts[:4]
        pruned_logits = mt.batched_logits(model, tok, probes)
        self._verify_cache(engine, model, tok, prompt, "in memory")
        staging = ctx.staging_dir("prune")
        model.save_pretrained(str(staging), safe_serialization=True)
        tok.save_pretrained(str(staging))
        del model
        ctx.progress(3, steps, "verifying saved model")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(staging), dtype=dtype).to(device)
        reloaded.eval()
        diff = mt.max_abs_diff(pruned_logits, mt.batched_logits(reloaded, tok, probes))
        tol = mt.default_tolerance(dtype)
        if diff > tol:
            raise VerificationError(f"prune: the saved checkpoint reloads as a different model (max |Δlogit| "
                                    f"{diff:.3g} > {tol:.3g} vs the pruned model in memory); nothing was saved.",
                                    fix="report this as a bug with the model's config.json (num_hidden_layers, "
                                        "intermediate_size)")
        cached = self._verify_cache(engine, reloaded, tok, prompt, "reloaded")
        n_saved = reloaded.config.num_hidden_layers
        del reloaded
        ctx.progress(4, steps, "measuring before/after")
        ppl_texts = mt.split_texts(dataset, cfg.eval_samples, split="eval")
        src_m = measure(source.path, ppl_texts, prompt, cfg.generate_tokens, device=device)
        new_m = measure(staging, ppl_texts, prompt, cfg.generate_tokens, device=device)
        src_size, new_size = mt_weights_size(source.path), mt_weights_size(staging)
        metrics = {"params": params_after, "source_params": params_before, "params_ratio": params_after / params_before,
                   "size_bytes": new_size, "source_size_bytes": src_size,
                   "size_ratio": new_size / src_size if src_size else None,
                   "perplexity": new_m.get("perplexity"), "source_perplexity": src_m.get("perplexity"),
                   "tokens_per_s": new_m.get("tokens_per_s"), "source_tokens_per_s": src_m.get("tokens_per_s"),
                   "layers": n_saved, "source_layers": n_layers}
        if metrics["tokens_per_s"] and metrics["source_tokens_per_s"]:
            metrics["tokens_per_s_ratio"] = metrics["tokens_per_s"] / metrics["source_tokens_per_s"]
        if details.get("sparsity") is not None:
            metrics["sparsity"] = details["sparsity"]
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
        ctx.log_metrics(metrics)

        name = cfg.name or f"{source.name}-{details['tag']}"
        report = {"method": cfg.method, "details": {k: v for k, v in details.items() if k != "tag"},
                  "source": {"ref": source.ref, "hash": source.artifact.hash if source.artifact else None},
                  "calibration": {"dataset": dataset.version, "texts": len(batches),
                                  "tokens": sum(int(b.numel()) for b in batches)},
                  "metrics": metrics, "cache_check": {"prompt": prompt, "tokens": cached, "equal": True}}
        mt.write_model_card(staging, {"name": name, "kind": "pruned", "licence": mt.licence_of(source.path),
                                      "created_by": "llmops-jupyter prune", "created_at": time.time(),
                                      "run_id": ctx.run_id, **report})
        ctx.progress(5, steps, "storing")
        art = ctx.save_artifact(staging, "pruned", name=name, meta={
            "method": cfg.method, "source": report["source"]["hash"], "layers": n_saved,
            "removed_layers": details.get("removed"), "params": params_after, "source_params": params_before,
            "size_ratio": metrics.get("size_ratio"), "perplexity": metrics.get("perplexity"),
            "sparsity": details.get("sparsity"), "pattern": details.get("pattern"),
            "intermediate_size": details.get("intermediate_size")})
        ctx.progress(steps, steps, "done")
        ctx.set_summary(pruned=art.hash, method=cfg.method, why=details.get("why"),
                        removed_layers=details.get("removed"), seconds=time.perf_counter() - t0, **metrics)
        rows = [
            ["parameters", f"{params_before / 1e6:.3f} M", f"{params_after / 1e6:.3f} M",
             f"×{params_after / params_before:.3f}"],
            ["weights on disk", f"{src_size / 1e6:.2f} MB", f"{new_size / 1e6:.2f} MB",
             f"×{new_size / src_size:.3f}" if src_size else ""],
            ["decoder layers", n_layers, n_saved, ""],
            ["perplexity (eval split)", fmt_num(src_m.get("perplexity")), fmt_num(new_m.get("perplexity")),
             fmt_delta(src_m.get("perplexity"), new_m.get("perplexity"))],
            ["greedy generation", fmt_tps(src_m.get("tokens_per_s")), fmt_tps(new_m.get("tokens_per_s")),
             f"×{metrics['tokens_per_s_ratio']:.2f}" if "tokens_per_s_ratio" in metrics else ""],
        ]
        if details.get("sparsity") is not None:
            rows.append(["measured sparsity", "", f"{100 * details['sparsity']:.2f}% ({details['pattern']})", ""])
        note = f"{details['why']}. Artifact pruned {art.short}. KV-cache check: cached = uncached greedy tokens ✓."
        if cfg.method in SPARSE_METHODS:
            note += " " + SPARSITY_NOTE
        note += " Heal the quality gap with `%llmops distill --teacher <the unpruned model>`."
        table = Table(["measure", "source", "pruned", "change"], rows,
                      title=f"Pruned {source.name} ({cfg.method}) on {len(batches)} calibration texts from "
                            f"{dataset.version}", note=note)
        return {"report": table, "importance_figure": importance_figure(details, cfg.method), "artifact": art,
                "measurements": report}

    @staticmethod
    def _verify_cache(engine: Any, model: Any, tok: Any, prompt: str, where: str) -> list[int]:
        """Greedy tokens with the KV cache must equal those without it (a stale ``layer_idx`` breaks this)."""
        try:
            same, cached, uncached = engine.cache_consistent(model, tok, prompt)
        except (IndexError, RuntimeError, ValueError) as exc:
            raise VerificationError(f"prune: the pruned model ({where}) cannot generate with the KV cache ({exc}); "
                                    "nothing was saved.", fix="report this as a bug (layer_idx renumbering)") from None
        if not same:
            raise VerificationError(f"prune: the pruned model ({where}) generates differently with the KV cache "
                                    f"({cached}) than without it ({uncached}); nothing was saved.",
                                    fix="report this as a bug (layer_idx renumbering)")
        return cached

    # -- methods ------------------------------------------------------------------------------------------------------
    def _prune(self, ctx: RunContext, cfg: PruneConfig, model: Any, batches: list[Any], params: int,
               n_layers: int) -> dict[str, Any]:
        from llmops_jupyter.stages.prune import engine

        if cfg.method == "depth":
            n_remove = cfg.layers
            if n_remove is None:
                target = _target(cfg.target_params, params)
                n_remove = math.ceil(max(0, params - target) / engine.layer_params(model))
                if n_remove < 1 or n_remove >= n_layers:
                    raise ConfigError(f"prune: --target-params {cfg.target_params:g} needs removing {n_remove} of "
                                      f"{n_layers} layers.", field="target_params", value=cfg.target_params,
                                      fix=f"pick a target between the model with 1 and {n_layers - 1} layers removed")
            sim = engine.layer_similarities(model, batches)
            removed, importance, why = engine.choose_layers(sim, n_remove, cfg.criterion)
            angular = engine.angular_distance(sim, n_remove)
            ctx.log(f"depth pruning: {why}")
            engine.remove_layers(model, removed)
            return {"removed": removed, "importance": importance, "angular_distance": angular,
                    "criterion": cfg.criterion, "why": why, "tag": f"depth{n_layers - n_remove}",
                    "calibration_tokens": sim["tokens"]}
        if cfg.method == "width":
            layer0 = engine.decoder_layers(model)[0].mlp
            inter = layer0.down_proj.in_features
            keep = cfg.intermediate_size
            if keep is None:
                target = _target(cfg.target_params, params)
                per_channel = (2 * layer0.gate_proj.in_features + layer0.down_proj.out_features) * n_layers
                keep = inter - math.ceil(max(0, params - target) / per_channel)
            if not 1 <= keep < inter:
                field = "intermediate_size" if cfg.intermediate_size is not None else "target_params"
                raise ConfigError(f"prune: width pruning would keep {keep} of {inter} MLP channels.", field=field,
                                  value=getattr(cfg, field), fix=f"keep between 1 and {inter - 1} channels")
            imp = engine.mlp_channel_importance(model, batches)
            kept = engine.prune_mlp_width(model, imp, keep)
            per_layer_removed = [float(sum(float(x) for j, x in enumerate(v) if j not in set(k)))
                                 / max(float(v.sum()), 1e-12) for v, k in zip(imp, kept, strict=True)]
            why = (f"kept the {keep} of {inter} MLP channels with the largest mean |activation| in every layer "
                   f"(removed channels carried {100 * sum(per_layer_removed) / len(per_layer_removed):.1f}% of the "
                   "activation mass on average)")
            ctx.log(f"width pruning: {why}")
            return {"intermediate_size": keep, "source_intermediate_size": inter, "importance": per_layer_removed,
                    "why": why, "tag": f"width{keep}"}
        sparsity = cfg.effective_sparsity
        if cfg.method == "sparsegpt":
            per, errors = engine.apply_sparsegpt(model, batches, sparsity=sparsity, pattern=cfg.pattern, log=ctx.log)
            measured = engine.measured_sparsity(model)
            why = (f"SparseGPT: zeroed the weights with the lowest w²/[H⁻¹]_jj² "
                   f"({'2 of every 4' if cfg.pattern == '2:4' else 'per block of 128 columns'}) in {len(per)} "
                   f"projections, layer by layer, updating the kept weights with the inverse Hessian of the "
                   f"calibration inputs; measured sparsity {100 * measured:.2f}%")
            ctx.log(f"{why}. {SPARSITY_NOTE}")
            return {"sparsity": measured, "pattern": cfg.pattern, "target_sparsity": sparsity, "matrices": per,
                    "reconstruction_error": errors, "blocksize": engine.SPARSEGPT_BLOCKSIZE,
                    "percdamp": engine.SPARSEGPT_PERCDAMP, "importance": _per_layer(per), "why": why,
                    "tag": f"sparsegpt{'2of4' if cfg.pattern == '2:4' else int(round(sparsity * 100))}",
                    "note": SPARSITY_NOTE}
        # wanda
        norms = engine.input_norms(model, batches)
        per = engine.apply_wanda(model, norms, sparsity=sparsity, pattern=cfg.pattern)
        measured = engine.measured_sparsity(model)
        why = (f"zeroed the weights with the lowest |W|·‖X‖ ({'2 of every 4' if cfg.pattern == '2:4' else 'per row'}) "
               f"in {len(per)} projections; measured sparsity {100 * measured:.2f}%")
        ctx.log(f"wanda: {why}. {SPARSITY_NOTE}")
        return {"sparsity": measured, "pattern": cfg.pattern, "target_sparsity": sparsity, "matrices": per,
                "importance": _per_layer(per), "why": why,
                "tag": f"wanda{'2of4' if cfg.pattern == '2:4' else int(round(sparsity * 100))}",
                "note": SPARSITY_NOTE}


def _per_layer(per: dict[str, float]) -> list[float]:
    """Mean measured sparsity per decoder layer from ``{"layers.<i>.<module>": sparsity}``."""
    layer_sp: dict[int, list[float]] = {}
    for k, v in per.items():
        layer_sp.setdefault(int(k.split(".")[1]), []).append(v)
    return [sum(v) / len(v) for _, v in sorted(layer_sp.items())]


def _target(value: float, params: int) -> float:
    return value * params if value <= 1 else value


def importance_figure(details: dict[str, Any], method: str) -> Any:
    """Bar chart of what the scores said per layer (and which layers went), for the report and saved notebooks."""
    import plotly.graph_objects as go

    imp = details.get("importance") or []
    removed = set(details.get("removed") or [])
    x = list(range(len(imp)))
    if method == "depth":
        colours = ["#d62728" if i in removed else "#1f77b4" for i in x]
        fig = go.Figure(go.Bar(x=x, y=imp, marker_color=colours, name="block influence",
                               hovertext=["removed" if i in removed else "kept" for i in x]))
        ang = details.get("angular_distance") or []
        if details.get("criterion") == "angular" and ang:
            fig.add_trace(go.Scatter(x=list(range(len(ang))), y=ang, mode="lines+markers",
                                     name=f"angular distance of the {len(removed)}-layer block starting here"))
        title = "Block influence per layer (1 − cos input/output); red = removed"
        ytitle = "importance"
    elif method == "width":
        fig = go.Figure(go.Bar(x=x, y=imp, name="activation mass removed"))
        title = f"Share of MLP activation mass in the removed channels per layer (kept {details.get('intermediate_size')})"
        ytitle = "share removed"
    else:
        fig = go.Figure(go.Bar(x=x, y=imp, name="sparsity"))
        title = f"Measured sparsity per layer ({details.get('pattern')}); no speed-up on CPU/GGUF/GPTQ"
        ytitle = "sparsity"
    fig.update_layout(title=title, xaxis_title="decoder layer", yaxis_title=ytitle, height=320,
                      margin={"l": 40, "r": 10, "t": 40, "b": 40})
    return fig

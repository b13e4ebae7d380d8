"""``%llmops explain``: why a model gave this answer, and where another version changed its mind.

::

    %llmops explain --model finetune@latest --prompt "What is the capital of France?" --target "Paris."
    %llmops explain --model tiny-llama --model finetune@latest --prompt "..." --target "..."   # contrast B − A
    %llmops explain --model merge@latest --prompt "..." --attribute                     # + integrated gradients

For one prompt and answer (``--target``, or the first model's greedy answer) it shows, per answer token, the
log-probability, the entropy and the top alternatives; with a second ``--model`` the per-token logprob difference on
the same ids; the logit lens (each layer's hidden state through the model's own final norm and ``lm_head``); with
``--attribute`` (the ``[explain]`` extra, captum) integrated-gradients attribution of every answer token to the prompt
tokens, its convergence delta and a deletion check. Everything is float32 and deterministic; the numbers are stored
as an ``explanation`` artifact derived from the model(s), which ``%llmops report --runs explain@latest`` shows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.errors import ConfigError, require
from llmops_jupyter.core.stage import Stage, register_stage


@dataclasses.dataclass
class ExplainConfig(StageConfig):
    model: list[str] = option([], "model version(s) to explain: registry run or artifact (finetune@latest, "
                                  "merge@latest), checkpoint folder or provider name; a second --model is "
                                  "contrasted with the first on the same prompt and answer (same tokenizer)")
    prompt: str = option("", "the prompt (a user message; see --chat)")
    target: str | None = option(None, "the answer to explain (default: the first model's greedy answer)")
    chat: bool = option(True, "wrap --prompt in the model's chat template as a user message (--no-chat: use the "
                              "text as it is)")
    max_new_tokens: int = option(24, "without --target: tokens of greedy answer to generate", min=1, max=2048)
    top_k: int = option(5, "alternatives shown per answer token", min=0, max=50)
    lens: bool = option(True, "logit lens: each layer's hidden state through the final norm and lm_head "
                              "(llama-style decoders)")
    attribute: bool = option(False, "integrated-gradients attribution of the answer to the prompt tokens (captum, "
                                    "the [explain] extra), with its convergence delta and a deletion check")
    ig_steps: int = option(32, "integrated-gradients steps (more: smaller convergence delta, slower)", min=2,
                           max=1024)
    deletion_k: int = option(3, "deletion check: prompt tokens removed (the top attributed vs random ones)", min=1,
                             max=64)
    device: str | None = option(None, "device (cpu, cuda); default: cuda if available")

    def validate(self) -> None:
        if isinstance(self.model, str):
            self.model = [self.model]
        if not self.model:
            raise self.invalid("model", "needs a model", fix="pass --model tiny-llama (or a run id)")
        if len(self.model) > 2:
            raise self.invalid("model", f"takes one or two models, not {len(self.model)}",
                               fix="pass --model A (explain) or --model A --model B (contrast B with A)")
        if not str(self.prompt).strip():
            raise self.invalid("prompt", "is empty", fix='pass --prompt "your question"')
        if self.target is not None and not str(self.target).strip():
            raise self.invalid("target", "is empty", fix="drop --target to explain the model's own answer")


@register_stage
class ExplainStage(Stage):
    """Explain one answer: per-token logprob/entropy/alternatives, contrast of two versions, logit lens, attribution."""

    name = "explain"
    config_cls = ExplainConfig
    extras = ("finetune",)
    key_metrics = ("logprob_sum", "contrast_sum", "ig_relative_delta")

    @classmethod
    def extras_for(cls, config: Any) -> tuple[str, ...]:
        return ("explain",) if getattr(config, "attribute", False) else ("finetune",)

    def run(self, ctx: Any) -> dict[str, Any]:
        from llmops_jupyter.models.inference import apply_chat, load_model
        from llmops_jupyter.models.refs import use_model
        from llmops_jupyter.stages.explain import engine, plots

        cfg: ExplainConfig = ctx.config
        torch = require("torch", "finetune")
        t0 = time.perf_counter()
        steps = 3 + len(cfg.model)
        refs = [use_model(ctx, m) for m in cfg.model]
        labels = _labels([m.name for m in refs])
        ctx.progress(0, steps, "loading model")
        model, tok = load_model(refs[0], dtype="float32", device=cfg.device, registry=ctx.registry)
        prompt_text = apply_chat(tok, [{"role": "user", "content": cfg.prompt}]) if cfg.chat else cfg.prompt
        limit = engine.context_length(model)
        prompt_ids = list(tok.encode(prompt_text))
        if limit is not None and len(prompt_ids) >= limit:
            raise ConfigError(f"explain: the prompt is {len(prompt_ids)} tokens, longer than the context of "
                              f"'{cfg.model[0]}' ({limit} tokens).", field="prompt", value=len(prompt_ids),
                              fix="shorten --prompt")
        target = cfg.target
        generated = target is None
        if generated:
            ctx.progress(0, steps, "generating the answer")
            with torch.no_grad():
                x = torch.tensor([prompt_ids], device=model.device)
                n_new = min(cfg.max_new_tokens, (limit or 10**9) - len(prompt_ids))
                out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n_new,
                                     do_sample=False, pad_token_id=tok.pad_token_id)
            target = tok.decode(out[0, len(prompt_ids):], skip_special_tokens=True)
            if not target.strip():
                raise ConfigError(f"explain: '{cfg.model[0]}' answers nothing (only special tokens) to this prompt.",
                                  field="target", fix="pass --target with the answer to explain")
        seq = engine.encode(tok, prompt_text, target)
        engine.check_length(seq, limit, cfg.model[0])
        ctx.log(f"explaining {len(seq.answer)} answer tokens after {len(seq.prompt)} prompt tokens")
        ctx.progress(1, steps, "scoring tokens")
        scored = [engine.score(model, tok, seq, cfg.top_k)]
        lens = engine.logit_lens(model, tok, seq) if cfg.lens else None
        attr = deletion = None
        if cfg.attribute:
            ctx.progress(2, steps, "integrated gradients")
            attr = engine.attribute(model, tok, prompt_text, seq, steps=cfg.ig_steps)
            deletion = engine.deletion_check(model, seq, attr, k=cfg.deletion_k)
        del model
        if len(refs) == 2:
            ctx.progress(3, steps, f"scoring {labels[1]}")
            model_b, tok_b = load_model(refs[1], dtype="float32", device=cfg.device, registry=ctx.registry)
            if not engine.same_tokenizer(tok, tok_b, seq, prompt_text, target):
                raise ConfigError(f"explain: '{cfg.model[1]}' splits the text into other tokens than "
                                  f"'{cfg.model[0]}'; a per-token contrast needs the same tokenizer.", field="model",
                                  value=cfg.model[1], fix="contrast versions of one model (base vs fine-tune, merged "
                                                          "vs quantized)")
            engine.check_length(seq, engine.context_length(model_b), cfg.model[1])
            scored.append(engine.score(model_b, tok_b, seq, cfg.top_k))
            del model_b
        diff = engine.contrast(scored[0], scored[1]) if len(scored) == 2 else None

        ctx.progress(steps - 1, steps, "storing")
        answer_tokens = [t["token"] for t in scored[0]["tokens"]]
        metrics: dict[str, float] = {"logprob_sum": scored[0]["logprob_sum"], "n_tokens": len(seq.answer),
                                     "mean_entropy": sum(t["entropy"] for t in scored[0]["tokens"]) / len(seq.answer)}
        if diff is not None:
            metrics.update(contrast_sum=sum(diff), contrast_max_abs=max(abs(d) for d in diff),
                           **{f"{labels[1]}/logprob_sum": scored[1]["logprob_sum"]})
        if attr is not None:
            metrics.update(ig_delta=attr["delta"], ig_relative_delta=attr["relative_delta"],
                           deletion_top_drop=deletion["top_drop"], deletion_random_drop=deletion["random_drop"])
        ctx.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isnan(v)})

        parts = [plots.token_html(labels[0], scored[0])]
        text = [f"{labels[0]}: answer {target!r}, log-likelihood {scored[0]['logprob_sum']:.4f} over "
                f"{len(seq.answer)} tokens"]
        if diff is not None:
            parts.append(plots.token_html(labels[0], scored[1], diff=diff, other=labels[1]))
            text.append(f"{labels[1]} − {labels[0]}: Δ log-likelihood {sum(diff):+.4f} (max |Δ| per token "
                        f"{max(abs(d) for d in diff):.4f})")
        figures: dict[str, Any] = {}
        if lens is not None:
            figures["lens_figure"] = plots.lens_figure(lens, answer_tokens, labels[0])
        if diff is not None:
            figures["contrast_figure"] = plots.contrast_figure(diff, answer_tokens, labels[0], labels[1])
        if attr is not None:
            figures["attribution_figure"] = plots.attribution_figure(attr, labels[0])
            note = (f"Integrated gradients ({attr['steps']} steps): convergence delta {attr['delta']:+.3g} = "
                    f"{100 * attr['relative_delta']:.2f}% of |f(x) − f(baseline)|; deletion check: removing the top "
                    f"{deletion['k']} attributed prompt tokens lowers the answer's logprob by "
                    f"{deletion['top_drop']:.4g}, {deletion['k']} random ones by {deletion['random_drop']:.4g} "
                    f"({'faithful' if deletion['passed'] else 'NOT faithful on this example'}).")
            parts.append(f"<p><small>{note}</small></p>")
            text.append(note)
        view = plots.ExplainView(parts, "\n".join(text))

        record = {"prompt": cfg.prompt, "prompt_text": prompt_text, "target": target, "generated": generated,
                  "models": [{"ref": r.ref, "label": lab, "hash": r.artifact.hash if r.artifact else None}
                             for r, lab in zip(refs, labels)],
                  "prompt_ids": seq.prompt, "answer_ids": seq.answer, "scores": scored, "contrast": diff,
                  "lens": {k: v for k, v in lens.items() if k not in ("logits", "model_logits")} if lens else None,
                  "attribution": attr, "deletion": deletion, "metrics": metrics}
        folder = ctx.staging_dir("explain")
        (folder / "explanation.json").write_text(json.dumps(record, ensure_ascii=False, indent=1))
        (folder / "tokens.html").write_text(view._repr_html_(), encoding="utf-8")
        for key, fig in figures.items():
            (folder / f"{key}.json").write_text(fig.to_json())
        art = ctx.save_artifact(folder, "explanation", name=f"explain {'+'.join(labels)}",
                                meta={"models": [r.ref for r in refs], "prompt": cfg.prompt[:200],
                                      "figures": sorted(figures), "attribution": cfg.attribute})
        ctx.progress(steps, steps, "done")
        ctx.set_summary(explanation=art.hash, target=target, generated=generated, labels=labels,
                        seconds=time.perf_counter() - t0, **metrics)
        return {"view": view, **figures, "explanation": record, "artifact": art}


def _labels(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        n = n or "model"
        out.append(n if n not in out else f"{n}#{len(out) + 1}")
    return out


def report_section(registry: Any, run_id: str) -> tuple[list[tuple[str, str]], list[tuple[str, Any]]]:
    """(sections, figures) of an explain run for ``%llmops report --runs``: the token views as static HTML and the
    stored plotly figures."""
    import plotly.io as pio

    sections: list[tuple[str, str]] = []
    figures: list[tuple[str, Any]] = []
    for art in registry.run_artifacts(run_id):
        if art.kind != "explanation":
            continue
        record = json.loads((art.path / "explanation.json").read_text())
        head = f"Explanation ({run_id}): {record['prompt'][:80]!r} → {record['target'][:80]!r}"
        sections.append((head, (art.path / "tokens.html").read_text(encoding="utf-8")))
        for key in ("lens_figure", "contrast_figure", "attribution_figure"):
            f = art.path / f"{key}.json"
            if f.exists():
                figures.append((f"{key.replace('_figure', '').replace('lens', 'logit lens')} ({run_id})",
                                pio.from_json(f.read_text())))
    return sections, figures

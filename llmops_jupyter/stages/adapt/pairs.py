"""``%llmops pairs --from <eval run(s)> [--deployment D]``: human judgements → a preference dataset for DPO.

Ratings from ``%llmops rate`` (a preferred version per example) and monitoring labels (a 'bad' record with a
corrected response) become (prompt, chosen, rejected) rows, written as a standard ``dataset`` artifact that
``%llmops finetune --method dpo --data <this run>`` trains on. The ratings used are first frozen into a
``ratings`` artifact, so lineage reads eval-results → ratings → pairs dataset → adapter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.stage import Stage, register_stage


@dataclasses.dataclass
class PairsConfig(StageConfig):
    runs: list[str] = option([], "eval run(s) whose ratings (preferred version per example) become pairs "
                                 "(ids, prefixes, eval@latest)", flag="--from")
    deployment: str | None = option(None, "also use monitoring labels of this deployment: 'bad' records with a "
                                          "corrected response (chosen) vs the logged answer (rejected)")
    tokenizer: str | None = option(None, "model whose chat template formats monitoring records (default: the "
                                         "deployment's model)")
    eval_fraction: float = option(0.0, "share of pairs held out as eval (deterministic by pair id)", min=0.0,
                                  max=0.9)
    name: str | None = option(None, "dataset name shown in the registry (default: pairs)")

    def validate(self) -> None:
        if isinstance(self.runs, str):
            self.runs = [r.strip() for r in self.runs.split(",") if r.strip()]
        if not self.runs and not self.deployment:
            raise self.invalid("runs", "needs at least one eval run (or --deployment)",
                               fix="pass --from eval@latest after rating examples with %llmops rate")


@register_stage
class PairsStage(Stage):
    """Turn eval ratings and monitoring labels into a versioned preference (chosen/rejected) dataset."""

    name = "pairs"
    extras = ()

    @classmethod
    def extras_for(cls, config) -> tuple[str, ...]:
        return ("finetune",) if config.deployment or config.tokenizer else ()  # chat template of the model
    config_cls = PairsConfig
    key_metrics = ("pairs", "train", "eval", "ratings")

    def run(self, ctx) -> dict[str, Any]:
        from llmops_jupyter.core.display import Table
        from llmops_jupyter.core.errors import StageError
        from llmops_jupyter.stages.data.format import write_dataset_dir
        from llmops_jupyter.stages.finetune.dpo import label_pairs, rating_pairs, to_examples

        cfg: PairsConfig = ctx.config
        reg = ctx.registry
        run_ids = [reg.resolve_run(r) for r in cfg.runs]
        for rid in run_ids:
            if reg.get_run(rid)["stage"] != "eval":
                raise StageError(f"--from '{rid}' is a {reg.get_run(rid)['stage']} run, not an eval run.",
                                 fix="pass eval runs (`%llmops runs --stage eval`)")
        pairs = rating_pairs(reg, run_ids)
        ratings = [r for rid in run_ids for r in reg.eval_ratings(rid)]
        tokenizer, dep = None, None
        if cfg.deployment:
            from llmops_jupyter.stages.serve.server import get_deployment

            dep = get_deployment(reg, cfg.deployment)
            pairs += label_pairs(reg, dep["id"])
            tok_ref = cfg.tokenizer or dep.get("model")
            if tok_ref:
                from llmops_jupyter.models.inference import load_tokenizer
                from llmops_jupyter.models.refs import resolve_model

                m = resolve_model(tok_ref, reg)
                tokenizer = load_tokenizer(m.base.path if m.kind == "adapter" and m.base else m.path)
        if not pairs:
            raise StageError(
                f"No preference pairs: {len(ratings)} rating(s) in {', '.join(run_ids) or '(no runs)'}"
                + (f" and no corrected 'bad' labels for deployment {dep['id']}" if dep else "") + ".",
                fix="in `%llmops rate <eval run>` pick a preferred version (and save) for examples whose outputs "
                    "differ; or label flagged records 'bad' with a correction in `%llmops monitor`")

        # 1. freeze the judgements used (ratings artifact; lineage eval-results → ratings)
        inputs = []
        for rid in run_ids:
            try:
                inputs.append(reg.get_artifact(f"{rid}:eval-results"))
            except Exception:  # noqa: BLE001 - a run without stored results still has its ratings table rows
                continue
        if dep is not None and dep.get("artifact"):
            inputs.append(reg.get_artifact(dep["artifact"]))
        for art in inputs:
            ctx.use(art)
        snap = ctx.staging_dir("ratings")
        with open(snap / "ratings.jsonl", "w", encoding="utf-8") as fh:
            for r in ratings:
                fh.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
        with open(snap / "labels.jsonl", "w", encoding="utf-8") as fh:
            for p in pairs:
                if p["source"] == "monitor-label":
                    fh.write(json.dumps({k: p[k] for k in ("request", "chosen", "rejected")}, ensure_ascii=False)
                             + "\n")
        ratings_art = ctx.save_artifact(snap, "ratings", name="ratings " + "+".join(run_ids or [dep["id"]]),
                                        inputs=inputs, meta={"ratings": len(ratings), "runs": run_ids,
                                                             "deployment": dep["id"] if dep else None})

        # 2. the pairs dataset (lineage ratings → dataset)
        examples = to_examples(pairs, tokenizer)
        seen, unique = set(), []
        for ex in examples:
            if ex["id"] not in seen:
                seen.add(ex["id"])
                unique.append(ex)

        def is_eval(ex: dict) -> bool:
            return int(hashlib.sha1(ex["id"].encode()).hexdigest(), 16) % 1000 < cfg.eval_fraction * 1000

        ev = [e for e in unique if is_eval(e)] if len(unique) > 1 else []
        train = [e for e in unique if e not in ev] or ev[:1]
        ev = [e for e in ev if e not in train]
        folder = ctx.staging_dir("pairs")
        sources = {s: sum(1 for p in pairs if p["source"] == s) for s in ("rating", "monitor-label")}
        version = write_dataset_dir(folder, train, ev, {
            "name": cfg.name or "pairs", "format": "preference", "fields": ["prompt", "chosen", "rejected"],
            "source": "pairs", "runs": run_ids, "deployment": dep["id"] if dep else None, "sources": sources,
            "chat_template": getattr(tokenizer, "chat_template", None), "counts": {"pairs": len(unique)}})
        art = ctx.save_artifact(folder, "dataset", name=cfg.name or "pairs", inputs=[ratings_art],
                                meta={"version": version, "format": "preference", "counts": sources})
        ctx.log_metrics({"pairs": len(unique), "train": len(train), "eval": len(ev), "ratings": len(ratings),
                         **{f"from_{k.replace('-', '_')}": v for k, v in sources.items()}})
        ctx.set_summary(version=version, dataset=art.hash, ratings=ratings_art.hash)
        rows = [["dataset", art.short], ["version", version], ["pairs", len(unique)], ["train", len(train)],
                ["eval", len(ev)], *[[f"from {k}", v] for k, v in sources.items()]]
        return {"report": Table(["field", "value"], rows, title="Preference pairs"), "pairs": unique}

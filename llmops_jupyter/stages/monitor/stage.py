"""``%llmops monitor``: checks, drift, dashboards and alert gates over a deployment's logged traffic;
``%llmops feedback``: labelled records → a new dataset version (the feedback loop).

The monitor run records a ``monitor-report`` artifact (lineage deployment [+ reference dataset] → report) and
its metrics; ``--check`` turns the alert rules into a gate (``GateError`` fails a papermill run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from typing import Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.display import Table
from llmops_jupyter.core.errors import DataError, StageError
from llmops_jupyter.core.stage import Stage, register_stage
from llmops_jupyter.core.timeparse import parse_when


@dataclasses.dataclass
class MonitorConfig(StageConfig):
    deployment: str | None = option(None, "deployment id (or prefix); default: the newest one", positional=True)
    since: str | None = option(None, "window start: 30m, 2h, 7d, -3600 (seconds ago), a timestamp or an ISO date")
    until: str | None = option(None, "window end, in the same forms as --since")
    last: int | None = option(None, "only the last N records of the window", min=1)
    reference: str | None = option(None, "reference for drift: a dataset (run id / hash / data@latest) or "
                                         "'traffic' (this deployment's records before the window)")
    drift_threshold: float = option(0.3, "embedding drift score above which prompts count as drifted", min=0, max=1)
    self_consistency: int = option(0, "extra samples per record for the self-consistency check (0 = off)",
                                   min=0, max=16)
    consistency_max: int = option(32, "at most this many records get the self-consistency check", min=1)
    toxicity: bool = option(True, "score toxicity when the optional detoxify package is installed")
    check: bool = option(False, "evaluate the alert rules and fail (GateError) when one is breached")
    alert: str | None = option(None, "alert rules, e.g. \"injection_rate<=0.05,p95_latency_s<=2,drift<=0.3\" "
                                     "(default with --check: error/injection/PII/drift rules that apply)")
    plots: bool = option(True, "return the dashboard figures")
    widget: bool = option(True, "in a notebook, show the flagged-records labelling widget")

    def validate(self) -> None:
        parse_when(self.since, field="since", command="monitor")
        parse_when(self.until, field="until", command="monitor")
        if self.alert:
            from llmops_jupyter.stages.monitor.analysis import parse_rules

            parse_rules(self.alert)


def _reference_prompts(ctx, cfg: MonitorConfig, dep: dict[str, Any], window_start: float | None) -> list[str]:
    from llmops_jupyter.stages.data.format import load_dataset
    from llmops_jupyter.stages.monitor.analysis import load_records

    if cfg.reference == "traffic":
        if window_start is None:
            raise StageError("--reference traffic needs a window start to compare against.",
                             fix="pass --since (e.g. --since 1h) so earlier traffic is the reference")
        rows = load_records(ctx.registry, dep["id"], until=window_start)
        return [r["prompt"] for r in rows if r["prompt"]]
    ds = load_dataset(cfg.reference, ctx.registry)
    if ds.artifact is not None:
        ctx.use(ds.artifact)
    prompts = []
    for ex in ds.train + ds.eval:
        users = [m["content"] for m in ex.get("messages") or [] if m["role"] == "user"]
        prompts.append(users[-1] if users else ex.get("prompt", ""))
    return [p for p in prompts if p]


def _drift_history(ctx, dep_id: str) -> list[dict[str, Any]]:
    hist = []
    for run in reversed(ctx.registry.list_runs(stage="monitor", limit=200)):
        if run["summary"].get("deployment") != dep_id or run["id"] == ctx.run_id:
            continue
        m = ctx.registry.metrics(run["id"])
        if m.get("drift") is not None:
            hist.append({"ts": run["created_at"], "drift": m.get("drift"), "length_psi": m.get("length_psi")})
    return hist


@register_stage
class MonitorStage(Stage):
    """Checks, drift and dashboards over a deployment's logged requests; --check gates on alert rules."""

    name = "monitor"
    extras = ()

    @classmethod
    def extras_for(cls, config) -> tuple[str, ...]:
        needs = ("monitor",) if config.reference else ()  # embedding drift (MiniLM)
        return needs + (("finetune",) if config.self_consistency else ())  # re-sampling the model
    config_cls = MonitorConfig
    key_metrics = ("request_count", "flagged_rate", "drift", "p95_latency_s")

    def run(self, ctx) -> dict[str, Any]:
        from llmops_jupyter.stages.monitor import analysis
        from llmops_jupyter.stages.monitor.checks import flagged
        from llmops_jupyter.stages.serve.server import get_deployment

        cfg: MonitorConfig = ctx.config
        reg = ctx.registry
        dep = get_deployment(reg, cfg.deployment or "latest")
        if dep.get("artifact"):
            ctx.use(dep["artifact"])
        now = time.time()
        since = parse_when(cfg.since, field="since", command="monitor", now=now)
        until = parse_when(cfg.until, field="until", command="monitor", now=now)
        rows = analysis.load_records(reg, dep["id"], since=since, until=until, last=cfg.last)
        if not rows:
            raise StageError(f"No logged requests for deployment {dep['id']} in this window.",
                             fix="send traffic first, or widen --since/--until")
        ctx.progress(0, 4, "checks")
        updates: dict[int, dict[str, Any]] = {}
        ok = [r for r in rows if r["status"] == 200]
        # grounding for RAG-style prompts
        logged = _logged_contexts(reg, ok)  # chunks `serve --rag` retrieved, by record id
        rag = [(r, logged.get(r["id"]) or analysis.split_context(r["prompt"] or "")) for r in ok]
        rag = [(r, parts) for r, parts in rag if parts]
        embed_fn = None
        if rag or cfg.reference:
            try:
                from functools import partial

                from llmops_jupyter.models.embeddings import embed

                embed_fn = partial(embed, extra="monitor")
            except ImportError:  # pragma: no cover - the extra is missing
                embed_fn = None
        for r, (context, question) in rag:
            updates.setdefault(r["id"], {}).update(analysis.context_support(context, question, r["response"] or "",
                                                                            embed_fn))
        ctx.progress(1, 4, "checks")
        notes = []
        if cfg.toxicity and ok:
            tox = analysis.toxicity([r["response"] or "" for r in ok])
            if tox is None:
                notes.append("toxicity skipped: detoxify is not installed (pip install detoxify)")
            else:
                for r, t in zip(ok, tox, strict=True):
                    updates.setdefault(r["id"], {}).update(t)
        if cfg.self_consistency:
            rag_ids = {r["id"] for r, _ in rag}
            todo = [r for r in ok if r["id"] not in rag_ids][-cfg.consistency_max:]
            if todo and dep.get("model"):
                results = analysis.self_consistency(dep["model"], todo, cfg.self_consistency, registry=reg)
                for rid, res in results.items():
                    updates.setdefault(rid, {}).update(res)
        if updates:
            by_id = {r["id"]: r for r in rows}
            for rid, extra in updates.items():
                by_id[rid]["checks"].update(extra)
            reg.set_request_checks({rid: by_id[rid]["checks"] for rid in updates})
        ctx.progress(2, 4, "drift")
        metrics = analysis.compute_metrics(rows)
        drift: dict[str, float] = {}
        if cfg.reference:
            ref = _reference_prompts(ctx, cfg, dep, since if since is not None else (rows[0]["ts"] if rows else None))
            cur = [r["prompt"] for r in rows if r["prompt"]]
            if not ref:
                raise DataError(f"The reference '{cfg.reference}' has no prompts.",
                                fix="pass a dataset with user messages, or a window with earlier traffic")
            from llmops_jupyter.stages.monitor.drift import drift_report

            drift = drift_report(ref, cur)
            drift["drifted"] = float(drift["drift"] > cfg.drift_threshold)
            metrics.update(drift)
        ctx.progress(3, 4, "report")
        ctx.log_metrics({k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))})
        rules = analysis.parse_rules(cfg.alert or analysis.DEFAULT_ALERTS)
        alerts = analysis.evaluate_rules(rules, metrics, strict=bool(cfg.alert)) if (cfg.check or cfg.alert) else []
        flagged_rows = [{**r, "flags": flagged(r["checks"])} for r in rows if flagged(r["checks"])]
        report = {"deployment": dep["id"], "model": dep.get("model"), "window": {
            "since": since, "until": until, "first": rows[0]["ts"], "last": rows[-1]["ts"], "records": len(rows)},
            "reference": cfg.reference, "drift_threshold": cfg.drift_threshold, "metrics": _clean(metrics),
            "alerts": alerts, "flagged": [{"id": r["id"], "flags": r["flags"]} for r in flagged_rows],
            "notes": notes}
        folder = ctx.staging_dir("monitor")
        (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
        ctx.save_artifact(folder, "monitor-report", name=f"monitor {dep['id']}")
        ctx.set_summary(deployment=dep["id"], records=len(rows), flagged=len(flagged_rows),
                        drift=metrics.get("drift"), alerts_failed=[a["rule"] for a in alerts if a["ok"] is False])
        ctx.progress(4, 4, "report")
        outputs: dict[str, Any] = {"report": _report_table(dep["id"], metrics, alerts, notes, len(flagged_rows)),
                                   "metrics": metrics, "alerts": alerts, "flagged": flagged_rows}
        if cfg.plots:
            from llmops_jupyter.stages.monitor.plots import dashboard

            hist = _drift_history(ctx, dep["id"])
            if "drift" in metrics:
                hist.append({"ts": now, "drift": metrics["drift"], "length_psi": metrics.get("length_psi")})
            for i, fig in enumerate(dashboard(rows, hist, cfg.drift_threshold)):
                outputs[f"figure_{i}"] = fig
        if cfg.widget and flagged_rows:
            from llmops_jupyter.stages.serve.stage import _in_kernel

            if _in_kernel():
                from llmops_jupyter.stages.monitor.flagged import FlaggedRecords

                outputs["labeller"] = FlaggedRecords(reg, dep["id"], flagged_rows)
        if cfg.check:
            analysis.raise_on_breach(alerts, dep["id"])
        return outputs


def _logged_contexts(reg, rows: list[dict[str, Any]]) -> dict[int, tuple[str, str]]:
    """(context, question) for records served with ``--rag``: the exact chunks logged with the request (their ids
    and index hash are in the record's checks), so grounding is checked against what the model was given."""
    from llmops_jupyter.stages.adapt.augment import format_context

    out: dict[int, tuple[str, str]] = {}
    indexes: dict[str, Any] = {}
    for r in rows:
        chunks, ref = r["checks"].get("rag_chunks"), r["checks"].get("rag_index")
        if chunks is None or not ref:
            continue
        if ref not in indexes:
            from llmops_jupyter.core.errors import LlmopsError
            from llmops_jupyter.stages.adapt.rag import load_index

            try:
                indexes[ref] = load_index(ref, reg)
            except LlmopsError:  # index deleted: fall back to the context found in the prompt
                indexes[ref] = None
        idx = indexes[ref]
        if idx is None:
            continue
        by_id = {c["id"]: c for c in idx.chunks}
        hits = [by_id[c] for c in chunks if c in by_id]
        if hits:
            out[r["id"]] = (format_context(hits), r["prompt"] or "")
    return out


def _clean(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def _report_table(dep_id: str, metrics: dict[str, float], alerts: list[dict], notes: list[str], n_flagged: int):
    rows = [[k, v] for k, v in sorted(metrics.items()) if not (isinstance(v, float) and math.isnan(v))]
    for a in alerts:
        rows.append([f"alert {a['rule']}", {True: "ok", False: "BREACHED", None: "n/a"}[a["ok"]]])
    note = "; ".join(notes + [f"{n_flagged} flagged record(s)"])
    return Table(["metric", "value"], rows, title=f"Monitoring {dep_id}", note=note)


# -- feedback -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FeedbackConfig(StageConfig):
    deployment: str | None = option(None, "deployment whose labelled records to export (default: newest)",
                                    positional=True)
    eval_fraction: float = option(0.2, "share of labelled examples held out as eval", min=0, max=0.9)
    include_bad: bool = option(False, "also export 'bad' records without a correction as eval-only examples "
                                      "(their logged response is kept in the manifest, not trained on)")


@register_stage
class FeedbackStage(Stage):
    """Labelled monitoring records (good, or bad with a corrected response) → a new dataset version."""

    name = "feedback"
    config_cls = FeedbackConfig

    def run(self, ctx) -> dict[str, Any]:
        from llmops_jupyter.stages.data.format import render, write_dataset_dir
        from llmops_jupyter.stages.serve.server import get_deployment

        cfg: FeedbackConfig = ctx.config
        reg = ctx.registry
        dep = get_deployment(reg, cfg.deployment or "latest")
        rows = reg.labelled_requests(dep["id"])
        if not rows:
            raise StageError(f"No new labelled records for deployment {dep['id']}.",
                             fix="label flagged records in the `%llmops monitor` widget first")
        if dep.get("artifact"):
            ctx.use(dep["artifact"])
        tokenizer, tok_path = None, None
        if dep.get("model"):
            try:
                from llmops_jupyter.models.inference import load_tokenizer

                tok_path = str(reg.get_artifact(dep["model"]).path)
                tokenizer = load_tokenizer(tok_path)
            except Exception:  # noqa: BLE001 - fall back to the default template
                tokenizer = None
        examples, skipped = [], 0
        for r in rows:
            msgs = json.loads(r["messages"]) if r["messages"] else [{"role": "user", "content": r["prompt"] or ""}]
            if r["label"] == "good":
                answer = r["response"] or ""
            elif r["corrected"]:
                answer = r["corrected"]
            else:
                skipped += 1
                continue
            ex = render([*msgs, {"role": "assistant", "content": answer}], tokenizer)
            ex["meta"] = {"request": r["id"], "label": r["label"], "deployment": dep["id"]}
            examples.append(ex)
        if not examples:
            raise StageError("Every labelled record is 'bad' without a corrected response.",
                             fix="type a corrected response for the bad records, or mark good ones")
        def is_eval(ex: dict) -> bool:
            return int(hashlib.sha1(ex["id"].encode()).hexdigest(), 16) % 1000 < cfg.eval_fraction * 1000

        ev = [e for e in examples if is_eval(e)] if len(examples) >= 2 else []
        train = [e for e in examples if e not in ev]
        if not train:
            train, ev = ev[:1], ev[1:]
        folder = ctx.staging_dir("feedback")
        labels = {k: sum(1 for r in rows if r["label"] == k) for k in ("good", "bad")}
        version = write_dataset_dir(folder, train, ev, {
            "source": "feedback", "deployment": dep["id"], "model": dep.get("model"), "tokenizer": tok_path,
            "chat_template": getattr(tokenizer, "chat_template", None), "labels": labels,
            "skipped_bad_without_correction": skipped, "pii": "scrubbed when logged (llmops_jupyter.core.pii)",
            "counts": {"labelled": len(rows)}})
        art = ctx.save_artifact(folder, "dataset", name=f"feedback-{dep['id']}", meta={"version": version})
        reg.mark_labels_exported([r["id"] for r in rows], art.hash)
        ctx.log_metrics({"examples": len(examples), "train": len(train), "eval": len(ev), "skipped": skipped})
        ctx.set_summary(deployment=dep["id"], version=version, dataset=art.hash)
        return {"dataset": Table(["field", "value"], [["dataset", art.hash[:12]], ["version", version],
                                                      ["train", len(train)], ["eval", len(ev)],
                                                      ["skipped", skipped]], title="Feedback dataset")}

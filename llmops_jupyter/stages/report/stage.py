"""``%llmops report``: one self-contained HTML page comparing model versions across the lifecycle.

::

    %llmops report --evals base=eval-1a2b finetuned=eval-3c4d gptq=eval-5e6f --runs finetune@latest quantize@latest
    %llmops report --evals eval@latest --out report.html

Each ``LABEL=RUN`` names an eval run (its first version, the one a gated eval compares); a bare run adds all of
its versions. ``--runs`` adds a fine-tuning run's training curves and a quantize run's size / perplexity / speed
table. The page (plotly.js inlined: it opens offline) is stored as a ``report`` artifact derived from the eval
results, and copied to ``--out``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.display import Table
from llmops_jupyter.core.errors import NotFoundError
from llmops_jupyter.core.stage import Stage, register_stage


@dataclasses.dataclass
class ReportConfig(StageConfig):
    evals: list[str] = option([], "eval runs to compare, as LABEL=RUN (its first version) or RUN (all its "
                                  "versions), in the order the columns should appear: base first")
    runs: list[str] = option([], "other runs to include: a finetune run adds its training curves, a quantize "
                                 "run its size / perplexity / speed table, an explain run its token views and "
                                 "pictures, any other run its metrics")
    metrics: list[str] = option([], "metrics in the comparison table (default: every summary metric of the evals)")
    title: str = option("Model lifecycle report", "heading of the page")
    out: str | None = option(None, "also write the HTML page to this file")
    examples: int = option(8, "held-out examples shown with every version's output (0: none)", min=0)
    inline_plotlyjs: bool = option(True, "inline plotly.js (opens offline, ~4 MB) instead of loading it from a CDN")

    def validate(self) -> None:
        if not self.evals:
            raise self.invalid("evals", "needs at least one eval run", fix="pass --evals base=eval-1a2b ft=eval-3c4d")
        for item in self.evals:
            label, _, run = str(item).rpartition("=")
            if not run.strip() or (item.count("=") and not label.strip()):
                raise self.invalid("evals", f"'{item}' is not LABEL=RUN or RUN",
                                   fix="write it as base=eval-1a2b (or just the run id)")

    def parsed_evals(self) -> list[tuple[str | None, str]]:
        out = []
        for item in self.evals:
            label, _, run = str(item).rpartition("=")
            out.append((label.strip() or None, run.strip()))
        return out


@register_stage
class ReportStage(Stage):
    """Compare model versions (eval summaries) with training and quantization facts on one HTML page."""

    name = "report"
    config_cls = ReportConfig
    live_view = None

    def run(self, ctx: Any) -> dict[str, Any]:
        from llmops_jupyter.core.files import atomic_write_text
        from llmops_jupyter.stages.report import html as reporting

        cfg: ReportConfig = ctx.config
        reg = ctx.registry
        versions = reporting.collect_versions(reg, cfg.parsed_evals())
        for run_id in dict.fromkeys(v["run_id"] for v in versions):
            try:
                ctx.use(f"{run_id}:eval-results")
            except NotFoundError:
                ctx.log(f"{run_id} has no eval-results artifact; lineage edge skipped")
        keys = reporting.metric_keys(versions, cfg.metrics)
        figures: list[tuple[str, Any]] = [("Metrics per version", reporting.comparison_figure(versions, keys))]
        sections: list[tuple[str, str]] = []
        gates = reporting.gate_rows(reg, versions)
        if gates:
            sections.append(("Quality gates", reporting._table_html(
                ["version", "rule", "baseline", "candidate", "delta", "95% CI", "result"], gates)))
        eval_runs = list(dict.fromkeys(v["run_id"] for v in versions))
        if any("latency_p50_s" in v["summary"] for v in versions):  # runs that recorded usage: the selection view
            from llmops_jupyter.views.select import Selection, selection_rows

            quality = next((k for k in ("f1", "rougeL", "judge", "exact_match") if k in keys), keys[0] if keys else "f1")
            sel = Selection(selection_rows(reg, eval_runs, quality), quality, "latency_p50_s")
            sections.append(("Model selection (quality vs cost vs latency)", reporting._table_html(
                sel.table.columns, sel.table.rows) + f"<p class='note'>{sel.table.note}</p>"))
            figures.append(("Model selection: Pareto front", sel.figure))
        if cfg.examples:
            examples = reporting.example_rows(reg, versions, cfg.examples)
            sections.append((f"Held-out examples (first {len(examples)})", reporting._table_html(
                ["prompt", "reference", *[v["label"] for v in versions]], examples, wrap=True)))
        run_rows = [reg.get_run(v["run_id"]) for v in dict((v["run_id"], v) for v in versions).values()]
        for ref in cfg.runs:
            run = reg.get_run(reg.resolve_run(ref))
            run_rows.append(run)
            metrics = reg.metrics(run["id"])
            if run["stage"] == "finetune":
                from llmops_jupyter.stages.finetune.plots import training_figure

                figures.append((f"Training ({run['id']})", training_figure(reg.metric_history(run["id"]),
                                                                           title=None)))
                rows = [[k, metrics[k]] for k in ("train_loss", "eval_loss", "train_runtime_s",
                                                    "train_tokens_per_s", "peak_memory_mb") if k in metrics]
                if rows:
                    sections.append((f"Fine-tuning ({run['id']})", reporting._table_html(["measure", "value"], rows)))
            elif run["stage"] == "quantize":
                body = reporting.quantize_section(metrics)
                if body:
                    summary = run.get("summary") or {}
                    title = f"Quantization ({run['id']}: {summary.get('method', '')} {summary.get('bits', '')}-bit)"
                    sections.append((title, body))
            elif run["stage"] == "explain":
                from llmops_jupyter.stages.explain.stage import report_section

                secs, figs = report_section(reg, run["id"])
                sections += secs
                figures += figs
            elif metrics:
                sections.append((f"{run['stage']} ({run['id']})",
                                 reporting._table_html(["metric", "value"], sorted(metrics.items()))))
            for art in reg.run_artifacts(run["id"]):
                ctx.use(art)
        page = reporting.build_html(cfg.title, versions, keys, figures=figures, sections=sections, runs=run_rows,
                                    inline_plotlyjs=cfg.inline_plotlyjs)
        folder = ctx.staging_dir()
        (folder / "report.html").write_text(page, encoding="utf-8")
        art = ctx.save_artifact(folder, "report", name=cfg.title,
                                meta={"file": "report.html", "versions": [v["label"] for v in versions]})
        html_path = art.path / "report.html"
        if cfg.out:
            atomic_write_text(cfg.out, page)
            os.chmod(cfg.out, 0o644)  # a report to share, not a private temp file
        rows = reporting.metrics_rows(versions, keys)
        ctx.log_metrics({f"{v['label']}/{row[0]}": value for row in rows for v, value in zip(versions, row[1:])
                         if isinstance(value, (int, float))})
        ctx.set_summary(report=str(html_path), out=cfg.out, versions=[v["label"] for v in versions])
        columns = ["metric", *[v["label"] for v in versions], *reporting.delta_labels(versions)]
        return {"table": Table(columns, rows, title=f"{cfg.title}: held-out metrics"),
                "figure": figures[0][1], "path": str(cfg.out or html_path), "artifact_path": str(html_path)}

"""Governance views: ``card``, ``audit``, ``doctor``, ``export`` (implementations in :mod:`llmops_jupyter.governance`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.display import Bundle, Table, fmt_time
from llmops_jupyter.core.errors import ConfigError
from llmops_jupyter.core.stage import CommandEnv, command
from llmops_jupyter.stages.export.convert import QUANTS as GGUF_QUANTS


@dataclasses.dataclass
class CardConfig(StageConfig):
    model: str = option(help="model version: a merge/quantize/serve/finetune run (its model output), an artifact "
                             "hash/prefix or '<run>:<kind>'", positional=True)
    intended_use: str | None = option(None, "what the model is for (kept for later cards of the same model)")
    limitations: str | None = option(None, "known limitations, out-of-scope uses and risks (kept likewise)")
    save: bool = option(True, "store the card as a model-card artifact linked from the model")


@command("card", CardConfig)
def card(cfg: CardConfig, env: CommandEnv) -> Any:
    """Model card of a model version from the registry: base+licence, data, config, evals, quantization, lineage."""
    from llmops_jupyter.governance.cards import build_model_card, save_model_card

    result = build_model_card(env.registry, cfg.model, intended_use=cfg.intended_use, limitations=cfg.limitations)
    if cfg.save:
        save_model_card(env.registry, result)
    return result


@dataclasses.dataclass
class AuditConfig(StageConfig):
    run: str | None = option(None, "only entries of this run (id, prefix, '<stage>@latest')")
    user: str | None = option(None, "only entries by this user (JupyterHub user or OS user)")
    since: str | None = option(None, "only entries newer than this: 30m, 2h, 7d, -3600, 2026-11-01 or an ISO datetime")
    event: str | None = option(None, "only this event", choices=["started", "input", "artifact", "finished", "failed",
                                                                 "interrupted", "card", "export"])
    limit: int = option(200, "at most this many (newest) entries", min=1, max=100000)


@command("audit", AuditConfig)
def audit(cfg: AuditConfig, env: CommandEnv) -> Table:
    """Query the append-only audit log: who ran which command from which notebook cell, reading/writing what."""
    from llmops_jupyter.governance import audit as audit_log

    rows = audit_log.entries(env.registry, run=cfg.run, user=cfg.user, since=cfg.since, event=cfg.event,
                             limit=cfg.limit)
    out = []
    for r in rows:
        where = r["notebook"] or ""
        if r["cell"] is not None:
            where += f" [cell {r['cell']}]"
        art = f"{r['kind'] or ''} {(r['artifact'] or '')[:12]}".strip()
        out.append([fmt_time(r["ts"]), r["user"], r["event"], r["run_id"] or "", art, where.strip(),
                    (r["source"] or r["command"] or "").splitlines()[0][:120] if (r["source"] or r["command"]) else ""])
    return Table(["when", "who", "event", "run", "artifact", "notebook [cell]", "command"], out,
                 title=f"Audit log ({len(out)} entries)")


@dataclasses.dataclass
class DoctorConfig(StageConfig):
    cuda: bool = option(True, "import torch to check CUDA, GPUs, free memory and the bitsandbytes backend (slower)")


@command("doctor", DoctorConfig)
def doctor(cfg: DoctorConfig, env: CommandEnv) -> Table:
    """Check Python, torch/CUDA/GPUs, library versions, extras, kernel spec and Lab extension; print the fixes."""
    from llmops_jupyter.governance.doctor import report, run_checks

    return report(run_checks(cuda=cfg.cuda))


@dataclasses.dataclass
class ExportConfig(StageConfig):
    to: str = option(help="destination (gguf: `%llmops gguf --model RUN` with its defaults)",
                     choices=["mlflow", "dir", "gguf"])
    tracking_uri: str | None = option(None, "MLflow tracking URI (http://..., sqlite:///mlflow.db, a folder); "
                                            "default: $MLFLOW_TRACKING_URI or ./mlruns")
    experiment: str = option("llmops-jupyter", "MLflow experiment name")
    run: list[str] = option([], "--to mlflow: only these runs (default: all); --to dir / gguf: the model to "
                                "export", aliases=["model"])
    include_models: bool = option(False, "also upload model folders (adapters, merged, quantized) to MLflow")
    out: str | None = option(None, "--to dir: the folder to write (must be new or empty)")
    overwrite: bool = option(False, "--to dir: replace a non-empty --out folder")
    quant: str | None = option(None, "--to gguf: GGUF tensor type (default q8_0; see %llmops gguf --help)",
                               choices=list(GGUF_QUANTS))
    parity: bool | None = option(None, "--to gguf: run the deploy-parity gate (default on)")
    parity_min: float | None = option(None, "--to gguf: least next-token agreement the gate accepts (default by "
                                            "quant)", min=0, max=1)

    def validate(self) -> None:
        if self.to != "gguf":
            for name in ("quant", "parity", "parity_min"):
                if getattr(self, name) is not None:
                    flag = "--" + name.replace("_", "-")
                    raise self.invalid(name, f"applies only with --to gguf (this export is --to {self.to})",
                                       fix=f"drop {flag}, or export with --to gguf")
        if self.to == "gguf" and len(self.run) != 1:
            raise self.invalid("run", "needs exactly one model (merge run or artifact) with --to gguf",
                               fix="pass --model <merge run>, or use %llmops gguf --model RUN --quant ...")
        if self.to == "dir":
            if not self.out:
                raise self.invalid("out", "is required with --to dir", fix="pass --out PATH")
            if len(self.run) != 1:
                raise self.invalid("run", "needs exactly one model (run or artifact) with --to dir",
                                   fix="pass --run <merge run or artifact hash>")


@command("export", ExportConfig, extras=lambda cfg: {"mlflow": ("mlflow",), "gguf": ("gguf",)}.get(cfg.to, ()))
def export(cfg: ExportConfig, env: CommandEnv) -> Any:
    """Export runs, metrics, artifacts and model cards to MLflow, or one model as a self-contained folder."""
    import os

    from llmops_jupyter.governance import export as exp

    if cfg.to == "gguf":  # a recorded run of the gguf stage (lineage merged → gguf, parity gate)
        given = {k: v for k, v in (("quant", cfg.quant), ("parity", cfg.parity), ("parity_min", cfg.parity_min))
                 if v is not None}
        result = env.runner.run("gguf", {"model": cfg.run[0], **given})
        return result.outputs.get("report")
    if cfg.to == "mlflow":
        uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "mlruns"
        rows = exp.export_mlflow(env.registry, uri, experiment=cfg.experiment, runs=cfg.run or None,
                                 include_models=cfg.include_models)
        return Table(["run", "mlflow run", "status", "params", "metric values", "artifacts"],
                     [[r["run"], r["mlflow_run"], r["status"], r["params"], r["metric_values"], r["artifacts"]]
                      for r in rows], title=f"Exported to MLflow ({uri}, experiment '{cfg.experiment}')")
    if cfg.out is None:  # pragma: no cover - validate() guarantees it
        raise ConfigError("export: --out is required with --to dir.", field="out")
    info = exp.export_bundle(env.registry, cfg.run[0], cfg.out, overwrite=cfg.overwrite)
    summary = Table(["field", "value"], [["folder", info["out"]], ["artifact", info["artifact"]],
                                         ["kind", info["kind"]], ["files", ", ".join(info["files"])],
                                         *[["note", n] for n in info["notes"]]], title="Bundle written")
    return Bundle(summary, info["card"] and _CardLink(info))


class _CardLink:
    def __init__(self, info: dict[str, Any]):
        self.text = f"model card: {info['out']}/README.md (artifact {info['card'].short})"

    def __str__(self) -> str:
        return self.text

    def _repr_html_(self) -> str:
        import html

        return f"<p>{html.escape(self.text)}</p>"

"""Hand-off to the tools teams already run: an MLflow tracking server, or a self-contained model folder.

* :func:`export_mlflow` copies registry runs (params, every metric value with its step, status, timings, tags for
  notebook/git/user, small artifacts and the model cards) into MLflow. Each MLflow run carries the tag
  ``llmops.run_id``; runs already exported are skipped, so exporting again after more work adds only new runs.
* :func:`export_bundle` writes one model version as a folder that ``transformers``, vLLM and TGI load as is:
  weights + config + tokenizer, ``README.md`` (the model card), ``model_card.html``, ``lineage.json`` and
  ``llmops_bundle.json``. Adapters are bundled with a reference to their base (and the card says so).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.errors import ConfigError, require
from llmops_jupyter.core.files import atomic_dir

if TYPE_CHECKING:
    from llmops_jupyter.registry import Artifact, Registry

MODEL_ARTIFACT_KINDS = {"base-model", "adapter", "merged", "pruned", "distilled", "quantized", "deployment"}
SMALL_BYTES = 20 * 2**20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED", "running": "RUNNING",
           "cached": "FINISHED"}


def _key(name: str) -> str:
    """MLflow accepts letters, digits, ``_ - . / space`` in keys (250 chars); anything else becomes ``_``."""
    return re.sub(r"[^\w\-. /]", "_", str(name))[:250]


def _flat_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in params.items():
        key = f"{prefix}{_key(k)}"
        if isinstance(v, dict) and v and "__object__" not in v:
            out.update(_flat_params(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key[:250]] = text[:6000]
    return out


def _mlflow_client(tracking_uri: str):
    require("mlflow", "mlflow", package="mlflow-skinny", feature="export --to mlflow")
    from mlflow.tracking import MlflowClient

    uri = tracking_uri
    if "://" not in uri and not uri.startswith(("databricks", "sqlite:")):
        uri = Path(uri).expanduser().resolve().as_uri()
    if uri.startswith("file:"):
        # MLflow 3 keeps the file store in maintenance mode behind an opt-in; a local folder is a deliberate choice.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri), uri


def export_mlflow(
    registry: Registry,
    tracking_uri: str,
    *,
    experiment: str = "llmops-jupyter",
    runs: list[str] | None = None,
    include_models: bool = False,
    small_bytes: int = SMALL_BYTES,
) -> list[dict[str, Any]]:
    """Export registry runs to MLflow; returns one row per run (registry id, MLflow id, what was logged)."""
    from mlflow.entities import Metric, Param, RunTag

    client, uri = _mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
    if runs:
        selected = [registry.get_run(r) for r in runs]
    else:
        selected = registry.list_runs(limit=None)[::-1]  # oldest first: parents before children
    done = {}
    for r in client.search_runs([exp_id], max_results=50000):
        rid = r.data.tags.get("llmops.run_id")
        if rid:
            done[rid] = r.info.run_id
    report = []
    for run in selected:
        if run["id"] in done:
            report.append({"run": run["id"], "mlflow_run": done[run["id"]], "status": "already exported",
                           "params": 0, "metric_values": 0, "artifacts": 0})
            continue
        tags = {"llmops.run_id": run["id"], "llmops.stage": run["stage"], "llmops.status": run["status"],
                "llmops.registry": str(registry.home), "mlflow.user": run.get("user") or ""}
        for key, tag in (("notebook", "mlflow.source.name"), ("git_commit", "mlflow.source.git.commit"),
                         ("host", "llmops.host"), ("parent_id", "llmops.parent_id"), ("error", "llmops.error")):
            if run.get(key):
                tags[tag] = str(run[key])[:5000]
        start_ms = int((run.get("started_at") or run["created_at"]) * 1000)
        mrun = client.create_run(exp_id, start_time=start_ms, tags=tags, run_name=run.get("name") or run["id"])
        mid = mrun.info.run_id
        params = _flat_params(run.get("params") or {})
        summary = {f"summary.{k}": v for k, v in _flat_params(run.get("summary") or {}).items()}
        history = registry.metric_history(run["id"])
        metrics = [Metric(_key(h["key"]), float(h["value"]), int(h["ts"] * 1000), int(h["step"] or 0))
                   for h in history if h["value"] is not None]
        param_list = [Param(k, v) for k, v in params.items()]
        tag_list = [RunTag(k, v[:5000]) for k, v in summary.items()]
        for i in range(0, len(param_list), 100):  # MLflow's per-call limits: 100 params/tags, 1000 metrics
            client.log_batch(mid, params=param_list[i:i + 100])
        for i in range(0, len(tag_list), 100):
            client.log_batch(mid, tags=tag_list[i:i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(mid, metrics=metrics[i:i + 1000])
        n_art = 0
        outputs = registry.run_artifacts(run["id"], "output")
        for art in outputs:
            for card in _cards_of(registry, art):  # cards always travel, even when the model itself does not
                _log_artifact(client, mid, card, "model-card" if len(outputs) == 1 else f"model-card-{art.short}")
                n_art += 1
            is_model = art.kind in MODEL_ARTIFACT_KINDS
            if (is_model and not include_models) or (not is_model and art.size > small_bytes):
                client.set_tag(mid, _key(f"llmops.artifact.{art.kind}.{art.short}"), f"{art.hash} ({art.size} bytes, "
                               "not uploaded" + ("; use --include-models" if is_model else "") + ")")
                continue
            _log_artifact(client, mid, art, f"{art.kind}-{art.short}")
            n_art += 1
        inputs = registry.run_artifacts(run["id"], "input")
        if inputs:
            client.set_tag(mid, "llmops.inputs", ",".join(a.hash for a in inputs)[:5000])
        if outputs:
            lineage = {a.hash: registry.lineage(a, "up") for a in outputs}
            client.log_dict(mid, lineage, "lineage.json")
        end = run.get("finished_at")
        if run["status"] != "running":  # a run still going stays RUNNING in MLflow (a snapshot)
            client.set_terminated(mid, status=_STATUS.get(run["status"], "FINISHED"),
                                  end_time=int(end * 1000) if end else None)
        report.append({"run": run["id"], "mlflow_run": mid, "status": "exported", "params": len(params),
                       "metric_values": len(metrics), "artifacts": n_art})
    try:
        from llmops_jupyter.governance import audit

        audit.record(registry, "export", detail={"to": "mlflow", "uri": uri, "experiment": experiment,
                                                  "runs": [r["run"] for r in report if r["status"] == "exported"]})
    except Exception:  # noqa: BLE001 - audit rows for views are best effort
        pass
    return report


def _log_artifact(client: Any, run_id: str, art: Artifact, dest: str) -> None:
    if art.path.is_dir():
        client.log_artifacts(run_id, str(art.path), dest)
    elif art.path.exists():
        client.log_artifact(run_id, str(art.path), dest)


def _cards_of(registry: Registry, art: Artifact) -> list[Artifact]:
    return registry.derived_artifacts(art.hash, "model-card", limit=1)


# -- self-contained folder ----------------------------------------------------------------------------------------
def export_bundle(
    registry: Registry,
    ref: str,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    intended_use: str | None = None,
    limitations: str | None = None,
) -> dict[str, Any]:
    """Write ``ref`` (a model artifact or the run that made it) to ``out`` as a loadable, documented folder."""
    from llmops_jupyter.governance.cards import build_model_card, resolve_model_artifact, save_model_card

    model = resolve_model_artifact(registry, ref)
    if not model.path.is_dir() or not any(model.path.glob("*.json")):
        raise ConfigError(f"export: artifact {model.short} ({model.kind}) is not a model folder.", field="ref",
                          value=ref, fix="pass a merged/quantized/adapter artifact or the run that produced it")
    target = Path(out).expanduser()
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"export: '{target}' exists and is not empty.", field="out", value=str(target),
                          fix="choose a new folder or pass --overwrite")
    card = build_model_card(registry, model, intended_use=intended_use, limitations=limitations)
    save_model_card(registry, card)
    chain = registry.lineage_chain(model)
    base = next((a for a in reversed(chain) if a.kind == "base-model" and a.hash != model.hash), None)
    notes = []
    with atomic_dir(target) as tmp:
        for item in model.path.iterdir():
            if item.name in ("README.md",):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        has_tok = any((tmp / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))
        if not has_tok:
            source = next((a.path for a in reversed(chain) if a.path.is_dir() and (a.path / "tokenizer_config.json")
                           .exists()), None)
            if source is not None:
                for name in TOKENIZER_FILES:
                    if (source / name).exists():
                        shutil.copy2(source / name, tmp / name)
                notes.append(f"tokenizer copied from upstream artifact {source.name[:12]}")
            else:
                notes.append("no tokenizer found in the lineage: copy the base model's tokenizer files here")
        if model.kind == "adapter":
            adapter_cfg = tmp / "adapter_config.json"
            base_path = str(base.path) if base is not None else None
            notes.append("LoRA adapter: load with peft on its base model "
                         f"({base_path or 'see adapter_config.json'}), serve with vLLM --enable-lora, "
                         "or `%llmops merge` first for a standalone model")
            if adapter_cfg.exists() and base_path:
                cfg = json.loads(adapter_cfg.read_text())
                cfg.setdefault("base_model_name_or_path", base_path)
                adapter_cfg.write_text(json.dumps(cfg, indent=2))
        (tmp / "README.md").write_text(card.markdown, encoding="utf-8")
        (tmp / "model_card.html").write_text(card.html, encoding="utf-8")
        (tmp / "lineage.json").write_text(json.dumps(registry.lineage(model, "up"), indent=2, default=str))
        (tmp / "llmops_bundle.json").write_text(json.dumps({
            "artifact": model.hash, "kind": model.kind, "run_id": model.run_id, "exported_at": time.time(),
            "card": card.artifact.hash if card.artifact else None, "base": base.hash if base else None,
            "registry": str(registry.home), "notes": notes,
        }, indent=2))
    try:
        from llmops_jupyter.governance import audit

        audit.record(registry, "export", artifact=model.hash, kind=model.kind,
                     detail={"to": "dir", "out": str(target), "card": card.artifact.hash if card.artifact else None})
    except Exception:  # noqa: BLE001
        pass
    return {"out": str(target), "artifact": model.hash, "kind": model.kind, "card": card.artifact, "notes": notes,
            "files": sorted(p.name for p in target.iterdir())}

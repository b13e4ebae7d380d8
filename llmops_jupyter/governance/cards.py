"""Model cards generated from the registry, for every merged / quantized / deployed model version (and adapters).

A card answers what a reviewer asks before a model ships: which base model under which licence, trained on which
data version (hash, size, PII scrubbed), with which configuration, how it scored (and whether it passed its gates),
how it was quantized and what that cost in quality, what it is for and not for, and the full lineage.

Everything is read *generically* from the registry (runs, params, metrics, summaries, artifacts, edges) because
the stages that write those records evolve independently: anything missing renders as "not recorded", never as
an exception. The card is built once as structured sections, then rendered to Markdown (README.md with a
Hugging Face front matter, so a bundle's card shows on any model hub) and to HTML for the notebook.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import html
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.errors import NotFoundError

if TYPE_CHECKING:
    from llmops_jupyter.registry import Artifact, Registry

MODEL_KINDS = ("deployment", "quantized", "distilled", "pruned", "merged", "adapter", "base-model")
CARD_KIND = "model-card"
TRAIN_STAGES = ("finetune", "train", "sft", "dpo", "orpo", "rl", "reward-model")
EVAL_STAGES = ("eval", "evaluate", "judge", "benchmark", "compare")
# words marking quantization-quality metrics (one string: the architecture test reads a bare "drop" literal as SQL)
_QUALITY_WORDS = tuple("delta ppl perplexity loss agree kl drop ratio".split())
_RESOURCE = re.compile(r"(gpu\d*_|cpu_rss)")  # metrics sampled by governance/gpu.py, not results of the stage
UNKNOWN_LICENCE = "unknown — fill in"
PLACEHOLDER_USE = ("_Not filled in._ Describe the tasks, users and languages this model is meant for "
                   "(`%llmops card <model> --intended-use \"...\"`).")
PLACEHOLDER_LIMITS = ("_Not filled in._ Describe known failure modes, out-of-scope uses, biases and risks "
                      "(`%llmops card <model> --limitations \"...\"`).")


@dataclasses.dataclass
class Section:
    title: str
    paragraphs: list[str] = dataclasses.field(default_factory=list)
    tables: list[tuple[list[str], list[list[Any]], str]] = dataclasses.field(default_factory=list)
    mermaid: str | None = None

    def table(self, columns: list[str], rows: list[list[Any]], caption: str = "") -> None:
        self.tables.append((columns, rows, caption))


class ModelCard:
    """A rendered card: ``.markdown``, ``.html``, ``.data`` (structured facts) and, once saved, ``.artifact``."""

    def __init__(self, title: str, front_matter: dict[str, Any], sections: list[Section], data: dict[str, Any]):
        self.title = title
        self.front_matter = front_matter
        self.sections = sections
        self.data = data
        self.artifact: Artifact | None = None

    # -- rendering ----------------------------------------------------------------------------------------------
    @property
    def markdown(self) -> str:
        fm = ["---"]
        for key, value in self.front_matter.items():
            if isinstance(value, list):
                fm.append(f"{key}:")
                fm += [f"- {v}" for v in value]
            elif value:
                fm.append(f"{key}: {value}")
        fm.append("---")
        out = ["\n".join(fm), f"# {self.title}"]
        for s in self.sections:
            out.append(f"## {s.title}")
            out += s.paragraphs
            for cols, rows, caption in s.tables:
                if caption:
                    out.append(f"**{caption}**")
                out.append(_md_table(cols, rows))
            if s.mermaid:
                out.append("```mermaid\n" + s.mermaid + "\n```")
        return "\n\n".join(out) + "\n"

    @property
    def html(self) -> str:
        parts = [f"<div class='llmops-model-card'><h2>{html.escape(self.title)}</h2>"]
        for s in self.sections:
            parts.append(f"<h3>{html.escape(s.title)}</h3>")
            parts += [f"<p>{_md_inline(p)}</p>" for p in s.paragraphs]
            for cols, rows, caption in s.tables:
                head = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in cols)
                body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{_md_inline(_cell(v))}</td>"
                                                for v in r) + "</tr>" for r in rows)
                cap = f"<caption style='text-align:left'><b>{html.escape(caption)}</b></caption>" if caption else ""
                parts.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        parts.append("</div>")
        return "".join(parts)

    def _repr_markdown_(self) -> str:
        return self.markdown

    def _repr_html_(self) -> str:
        saved = ""
        if self.artifact is not None:
            saved = (f"<p><small>saved as {html.escape(CARD_KIND)} <code>{self.artifact.short}</code> "
                     f"({html.escape(str(self.artifact.path))})</small></p>")
        return self.html + saved

    def __str__(self) -> str:
        return self.markdown

    __repr__ = __str__

    def write(self, folder: str | Path) -> Path:
        """Write README.md (the card), model_card.html and model_card.json into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "README.md").write_text(self.markdown, encoding="utf-8")
        (folder / "model_card.html").write_text(
            "<!doctype html><meta charset='utf-8'><title>" + html.escape(self.title) + "</title>" + self.html,
            encoding="utf-8")
        (folder / "model_card.json").write_text(json.dumps(self.data, indent=2, sort_keys=True, default=str),
                                                encoding="utf-8")
        return folder


# -- helpers ----------------------------------------------------------------------------------------------------
def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    return str(v)


def _md_table(cols: list[str], rows: list[list[Any]]) -> str:
    def esc(v: Any) -> str:
        return _cell(v).replace("|", "\\|").replace("\n", " ")

    if not rows:
        return "_none recorded_"
    lines = ["| " + " | ".join(esc(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(esc(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _md_inline(text: str) -> str:
    """The little Markdown the card itself writes (code, bold, italics) as HTML; everything else escaped."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)
    out = re.sub(r"(?<![\w])_([^_]+)_(?![\w])", r"<i>\1</i>", out)
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix or "value": d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v and "__object__" not in v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _front_matter(path: Path) -> dict[str, str]:
    """``key: value`` lines of a README's YAML front matter (no YAML dependency needed for flat keys)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return {}
    out = {}
    for line in m.group(1).splitlines():
        kv = re.match(r"^([A-Za-z_][\w-]*)\s*:\s*(.+?)\s*$", line)
        if kv:
            out[kv.group(1)] = kv.group(2).strip("'\"")
    return out


def model_info(folder: Path | None) -> dict[str, Any]:
    """Name, licence and source of a model folder from ``llmops_model.json``, ``config.json`` or README front matter."""
    info: dict[str, Any] = {}
    if folder is None or not Path(folder).is_dir():
        return info
    folder = Path(folder)
    meta = _read_json(folder / "llmops_model.json")
    cfg = _read_json(folder / "config.json")
    readme = _front_matter(folder / "README.md")
    adapter = _read_json(folder / "adapter_config.json")
    for key in ("licence", "license"):
        info.setdefault("licence", meta.get(key) or cfg.get(key) or readme.get(key))
    if not info.get("licence"):
        info.pop("licence", None)
    name = meta.get("name") or readme.get("model_name") or cfg.get("_name_or_path")
    if name:
        info["name"] = name
    for key in ("source", "revision", "base_model"):
        if meta.get(key) or readme.get(key):
            info[key] = meta.get(key) or readme.get(key)
    if adapter.get("base_model_name_or_path"):
        info["adapter_base"] = adapter["base_model_name_or_path"]
    if cfg.get("model_type"):
        info["architecture"] = cfg.get("model_type")
    q = cfg.get("quantization_config")
    if isinstance(q, dict):
        info["quantization_config"] = q
    return info


def _size(n: int | None) -> str:
    if n is None:
        return ""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def is_resource_metric(name: str) -> bool:
    return _RESOURCE.match(name) is not None


def resolve_model_artifact(registry: Registry, ref: str | Artifact) -> Artifact:
    """A run reference picks that run's model output (deployment > quantized > merged > adapter), else any output."""
    if not isinstance(ref, str):
        return registry.get_artifact(ref)
    hexlike = len(ref) >= 6 and all(c in "0123456789abcdef" for c in ref.lower())
    if ":" not in ref.replace(":latest", "") and not hexlike:
        try:
            run_id = registry.resolve_run(ref)
        except NotFoundError:
            run_id = None
        if run_id:
            outs = registry.run_artifacts(run_id, "output")
            for kind in MODEL_KINDS:
                for art in reversed(outs):
                    if art.kind == kind:
                        return art
            if outs:
                return outs[-1]
            raise NotFoundError(f"Run '{run_id}' has no output artifact to describe.",
                                fix="pass a merge/quantize/serve/finetune run, or an artifact hash")
    return registry.get_artifact(ref)


def _run(registry: Registry, run_id: str | None) -> dict[str, Any] | None:
    if not run_id:
        return None
    try:
        return registry.get_run(run_id)
    except NotFoundError:
        return None


def _metrics(registry: Registry, run_id: str) -> dict[str, float]:
    try:
        return registry.metrics(run_id)
    except NotFoundError:
        return {}


def _gates(summary: dict[str, Any]) -> list[list[Any]]:
    """Gate rows (gate, passed, detail) from whatever shape an eval stage wrote into its summary.

    The eval stage writes ``summary["gate"]``: one entry per candidate version, ``{"candidate": label,
    "results": [GateResult.to_dict(), ...]}`` (see ``stages/eval/stage.py``). A plain ``"gates"`` list or dict
    (other eval-like stages) is read as well.
    """
    rows: list[list[Any]] = []
    if not isinstance(summary, dict):
        return rows
    gate = summary.get("gate")
    for entry in gate if isinstance(gate, list) else []:
        if not isinstance(entry, dict):
            continue
        for res in entry.get("results") or []:
            if not isinstance(res, dict):
                continue
            detail = {"model": entry.get("candidate"), "baseline": res.get("baseline"),
                      "value": res.get("candidate"), "delta": res.get("delta"), "ci": res.get("ci")}
            rows.append([res.get("rule") or res.get("metric") or "gate", _yes_no(res.get("passed")),
                         {k: v for k, v in detail.items() if v is not None}])
    raw = summary.get("gates")
    if isinstance(raw, dict):
        for name, v in raw.items():
            if isinstance(v, dict):
                passed = v.get("passed", v.get("ok"))
                detail = {k: x for k, x in v.items() if k not in ("passed", "ok")}
                rows.append([name, _yes_no(passed), detail or ""])
            else:
                rows.append([name, _yes_no(v) if isinstance(v, bool) else "", "" if isinstance(v, bool) else v])
    elif isinstance(raw, list):
        for v in raw:
            if isinstance(v, dict):
                name = v.get("name") or v.get("gate") or v.get("metric") or v.get("expr") or "gate"
                passed = v.get("passed", v.get("ok"))
                detail = {k: x for k, x in v.items() if k not in ("name", "gate", "passed", "ok")}
                rows.append([name, _yes_no(passed), detail or ""])
            else:
                rows.append([str(v), "", ""])
    elif isinstance(raw, str):
        rows.append([raw, "", ""])
    for key in ("gates_passed", "gate_passed", "passed"):
        if isinstance(summary, dict) and isinstance(summary.get(key), bool) and not rows:
            rows.append(["all gates", _yes_no(summary[key]), ""])
    return rows


def _yes_no(v: Any) -> str:
    if v is True:
        return "pass"
    if v is False:
        return "FAIL"
    return "" if v is None else str(v)


def _previous_fields(registry: Registry, model: Artifact) -> dict[str, str]:
    """Intended use / limitations a person filled in on an earlier card of the same model (kept across regens)."""
    out: dict[str, str] = {}
    for card in registry.derived_artifacts(model.hash, CARD_KIND):
        data = _read_json(card.path / "model_card.json")
        for key in ("intended_use", "limitations"):
            if data.get(key) and data.get(f"{key}_filled") and key not in out:
                out[key] = data[key]
    return out


# -- building ---------------------------------------------------------------------------------------------------
def build_model_card(
    registry: Registry,
    ref: str | Artifact,
    *,
    intended_use: str | None = None,
    limitations: str | None = None,
) -> ModelCard:
    """Collect everything the registry knows about a model version into a :class:`ModelCard` (not saved)."""
    model = resolve_model_artifact(registry, ref)
    try:
        chain = registry.lineage_chain(model)
    except Exception:  # noqa: BLE001 - a broken edge must not cost the whole card
        chain = [model]
    if model.hash not in {a.hash for a in chain}:
        chain.append(model)
    try:
        graph = registry.lineage(model, "up")
    except Exception:  # noqa: BLE001
        graph = {"root": model.hash, "nodes": [], "edges": []}
    runs: dict[str, dict[str, Any]] = {}
    for art in chain:
        run = _run(registry, art.run_id)
        if run is not None:
            runs[run["id"]] = run
    model_run = runs.get(model.run_id or "")
    data: dict[str, Any] = {"model": {"hash": model.hash, "kind": model.kind, "name": model.name, "size": model.size,
                                      "path": str(model.path), "run_id": model.run_id}}
    sections: list[Section] = []

    # Model details + base model and licence ------------------------------------------------------------------
    own = model_info(model.path)
    base_arts = [a for a in chain if a.kind in ("base-model", "model") and a.hash != model.hash]
    base_info: dict[str, Any] = {}
    base_name = None
    base_ref = None
    if base_arts:
        b = base_arts[0]
        base_info = model_info(b.path)
        base_name = base_info.get("name") or b.name or b.short
        base_ref = {"hash": b.hash, "path": str(b.path)}
    else:
        for run in runs.values():
            for key in ("base", "base_model", "model", "base_model_name_or_path"):
                v = run.get("params", {}).get(key)
                if isinstance(v, str) and v:
                    base_name = base_name or v
        base_name = base_name or own.get("adapter_base") or own.get("base_model")
        if base_name and Path(base_name).is_dir():
            base_info = model_info(Path(base_name))
    if model.kind == "base-model":
        base_info, base_name = own, own.get("name") or model.name
    licence = (base_info.get("licence") or (model.meta or {}).get("licence") or (model.meta or {}).get("license")
               or own.get("licence") or UNKNOWN_LICENCE)
    data["base_model"] = {"name": base_name or "unknown — fill in", "licence": licence, "artifact": base_ref,
                          "source": base_info.get("source"), "architecture": base_info.get("architecture")
                          or own.get("architecture")}
    s = Section("Model details")
    s.table(["field", "value"], [
        ["version (artifact)", f"`{model.hash}`"],
        ["kind", model.kind],
        ["name", model.name or ""],
        ["size", _size(model.size)],
        ["produced by run", f"`{model.run_id}`" if model.run_id else "external / not recorded"],
        ["base model", base_name or "unknown — fill in"],
        ["base model version", f"`{base_ref['hash']}`" if base_ref else "not recorded"],
        ["licence (of the base model)", licence],
        ["architecture", data["base_model"]["architecture"] or "not recorded"],
    ])
    if model.kind == "adapter":
        s.paragraphs.append("This is a LoRA adapter: it needs its base model to run "
                            "(load with peft, or merge it first with `%llmops merge`).")
    sections.append(s)

    # Intended use and limitations -------------------------------------------------------------------------------
    previous = _previous_fields(registry, model)
    meta = model.meta or {}
    use = intended_use or meta.get("intended_use") or previous.get("intended_use")
    lim = limitations or meta.get("limitations") or previous.get("limitations")
    data.update(intended_use=use or PLACEHOLDER_USE, intended_use_filled=bool(use),
                limitations=lim or PLACEHOLDER_LIMITS, limitations_filled=bool(lim))
    sections.append(Section("Intended use", [use or PLACEHOLDER_USE]))
    sections.append(Section("Limitations and risks", [lim or PLACEHOLDER_LIMITS]))

    # Training data ----------------------------------------------------------------------------------------------
    datasets = []
    for art in chain:
        if art.kind != "dataset":
            continue
        manifest = _read_json(art.path / "manifest.json")
        am = art.meta or {}
        pii = manifest.get("pii", am.get("pii"))
        counts = manifest.get("counts", am.get("counts")) or {}
        datasets.append({
            "hash": art.hash, "name": art.name or manifest.get("name"), "size": art.size,
            "version": manifest.get("version") or am.get("version"), "counts": counts, "pii": pii,
            "dropped": manifest.get("dropped"), "source": manifest.get("source"),
        })
    data["datasets"] = datasets
    s = Section("Training data")
    if datasets:
        rows = []
        for d in datasets:
            counts = ", ".join(f"{k}={v}" for k, v in d["counts"].items()) if isinstance(d["counts"], dict) else ""
            if d["pii"] is None:
                pii = "not recorded"
            elif isinstance(d["pii"], dict):
                pii = ", ".join(f"{k}: {v}" for k, v in sorted(d["pii"].items())) or "none found"
            else:
                pii = str(d["pii"])
            rows.append([d["name"] or "", f"`{d['hash']}`", d["version"] or "", _size(d["size"]), counts, pii])
        s.table(["dataset", "hash", "version", "size", "examples", "PII scrubbed"], rows)
        for d in datasets:
            if isinstance(d.get("dropped"), dict) and d["dropped"]:
                s.paragraphs.append(f"Dropped while cleaning `{d['hash'][:12]}`: "
                                    + ", ".join(f"{k}: {v}" for k, v in sorted(d["dropped"].items())))
    else:
        s.paragraphs.append("No dataset artifact in this model's lineage (not trained here, or not recorded).")
    sections.append(s)

    # Training configuration -------------------------------------------------------------------------------------
    adapters = {a.run_id for a in chain if a.kind == "adapter" and a.run_id}
    train_runs = [r for r in runs.values() if r["stage"] in TRAIN_STAGES or r["id"] in adapters]
    data["training"] = []
    s = Section("Training configuration")
    if not train_runs:
        s.paragraphs.append("No training run in this model's lineage.")
    for run in train_runs:
        params = _flatten(run.get("params") or {})
        metrics = {k: v for k, v in _metrics(registry, run["id"]).items() if not is_resource_metric(k)}
        data["training"].append({"run_id": run["id"], "stage": run["stage"], "params": run.get("params") or {},
                                 "metrics": metrics, "status": run["status"]})
        s.table(["parameter", "value"], [[k, v] for k, v in sorted(params.items())],
                caption=f"{run['stage']} run `{run['id']}` ({run['status']})")
        if metrics:
            s.table(["metric (final)", "value"], [[k, v] for k, v in sorted(metrics.items())])
    sections.append(s)

    # Evaluation -------------------------------------------------------------------------------------------------
    by_hash = {a.hash: a for a in chain}
    evals = []
    seen: set[str] = set()
    for run_id, used in registry.input_links([a.hash for a in chain]):
        run = _run(registry, run_id)
        if run is None or run_id in seen:
            continue
        if not (run["stage"] in EVAL_STAGES or run["stage"].startswith("eval")):
            continue
        target = by_hash.get(used)
        if target is None or target.kind == "dataset":
            continue  # an eval that only shares the dataset evaluated some other model
        seen.add(run_id)
        metrics = {k: v for k, v in _metrics(registry, run["id"]).items() if not is_resource_metric(k)}
        evals.append({"run_id": run["id"], "stage": run["stage"], "status": run["status"],
                      "artifact": used, "artifact_kind": target.kind if target else None,
                      "metrics": metrics, "gates": _gates(run.get("summary") or {}), "error": run.get("error"),
                      "params": run.get("params") or {}})
    data["evaluations"] = evals
    s = Section("Evaluation")
    if not evals:
        s.paragraphs.append("No evaluation run recorded for this model or its upstream versions "
                            "(run `%llmops eval` on it).")
    for ev in evals:
        what = "this model" if ev["artifact"] == model.hash else f"upstream {ev['artifact_kind']} `{ev['artifact'][:12]}`"
        s.table(["metric", "value"], [[k, v] for k, v in sorted(ev["metrics"].items())],
                caption=f"{ev['stage']} run `{ev['run_id']}` on {what} ({ev['status']})")
        if ev["gates"]:
            s.table(["gate", "result", "detail"], ev["gates"], caption="Gates")
        if ev["status"] == "failed" and ev["error"]:
            s.paragraphs.append(f"Run failed: {ev['error']}")
    sections.append(s)

    # Bias (eval --suite crows-pairs|stereoset) ---------------------------------------------------------------------
    bias_evals = [ev for ev in evals if ev["params"].get("suite")]
    data["bias"] = []
    if bias_evals:
        s = Section("Bias")
        for ev in bias_evals:
            rows, suite = [], ev["params"]["suite"]
            for key, value in sorted(ev["metrics"].items()):
                name = key.rsplit("/", 1)[-1]
                if name.endswith(("_ci_low", "_ci_high")) or not name.startswith(("crows_pairs_", "stereoset_")):
                    continue
                prefix = key[: len(key) - len(name)]
                lo, hi = ev["metrics"].get(f"{prefix}{name}_ci_low"), ev["metrics"].get(f"{prefix}{name}_ci_high")
                ci = f"[{lo:.1f}, {hi:.1f}]" if lo is not None and hi is not None else ""
                rows.append([key, f"{value:.1f}", ci])
                data["bias"].append({"run_id": ev["run_id"], "suite": suite, "figure": key, "value": value,
                                     "ci": [lo, hi]})
            s.table(["figure (by category after the dot)", "value", "95% CI"], rows,
                    caption=f"{suite} (eval run `{ev['run_id']}`, {ev['status']})")
        from llmops_jupyter.stages.eval.suites.bias import LICENCE

        s.paragraphs.append("CrowS-Pairs: % of sentence pairs where the more stereotyping one is likelier (50 is "
                            "ideal). StereoSet: SS (50 ideal), LMS and ICAT (100 ideal). Data: " + LICENCE + ".")
        sections.append(s)

    # Quantization -------------------------------------------------------------------------------------------------
    quant_runs = [r for r in runs.values() if r["stage"].startswith("quant")
                  or any(a.kind == "quantized" and a.run_id == r["id"] for a in chain)]
    data["quantization"] = []
    if quant_runs or model.kind == "quantized" or own.get("quantization_config"):
        s = Section("Quantization")
        for run in quant_runs:
            params = _flatten(run.get("params") or {})
            metrics = {k: v for k, v in _metrics(registry, run["id"]).items() if not is_resource_metric(k)}
            summary = _flatten(run.get("summary") or {})
            quality = {k: v for k, v in {**summary, **metrics}.items()
                       if any(t in k.lower() for t in _QUALITY_WORDS)}
            out_meta: dict[str, Any] = {}
            for a in chain:
                if a.run_id == run["id"]:
                    out_meta.update(a.meta or {})
            # what the run resolved (summary / artifact meta) wins over a parameter left to its default (None)
            resolved = {**params, **{k: v for k, v in {**out_meta, **summary}.items() if v is not None}}
            method = next((str(resolved[k]) for k in ("method", "quant_method", "algorithm", "scheme")
                           if resolved.get(k)), "not recorded")
            head = [["method", method]] + [[k, resolved[k]] for k in ("bits", "backend")
                                           if resolved.get(k) is not None]
            data["quantization"].append({"run_id": run["id"], "method": method, "params": run.get("params") or {},
                                         "bits": resolved.get("bits"), "metrics": metrics, "quality": quality})
            shown = {row[0] for row in head}
            s.table(["parameter", "value"], head + [[k, v] for k, v in sorted(params.items()) if k not in shown],
                    caption=f"{run['stage']} run `{run['id']}` ({run['status']})")
            if quality:
                s.table(["quality measure", "value"], [[k, v] for k, v in sorted(quality.items())],
                        caption="Quality before/after quantization")
            else:
                s.paragraphs.append("Quality delta not recorded by the quantize run.")
        if not quant_runs and own.get("quantization_config"):
            s.table(["field", "value"], [[k, v] for k, v in sorted(_flatten(own["quantization_config"]).items())],
                    caption="quantization_config (from config.json)")
        sections.append(s)

    # Compression (prune / distill) ---------------------------------------------------------------------------------
    comp_runs = [r for r in runs.values() if r["stage"] in ("prune", "distill")]
    data["compression"] = []
    if comp_runs:
        s = Section("Compression")
        keys = {"prune": ("method", "removed_layers", "why", "source_layers", "layers", "params_ratio", "size_ratio",
                          "source_perplexity", "perplexity", "tokens_per_s_ratio", "sparsity"),
                "distill": ("teacher", "student", "distill_mode", "teacher_answers", "loss", "temperature", "student_method", "steps", "kl_to_teacher",
                            "top1_agreement", "teacher_perplexity", "perplexity", "size_ratio", "tokens_per_s_ratio")}
        for run in comp_runs:
            values = {**(run.get("params") or {}), **_metrics(registry, run["id"]), **(run.get("summary") or {})}
            rows = [[k, values[k]] for k in keys[run["stage"]] if values.get(k) is not None]
            data["compression"].append({"run_id": run["id"], "stage": run["stage"], **dict(rows)})
            s.table(["measure", "value"], rows, caption=f"{run['stage']} run `{run['id']}` ({run['status']})")
            if run["stage"] == "prune" and values.get("method") in ("wanda", "sparsegpt"):
                s.paragraphs.append("Sparse weights are stored dense: no speed-up on CPU or in GGUF/GPTQ files.")
        sections.append(s)

    # Pipeline steps + lineage -------------------------------------------------------------------------------------
    s = Section("Lineage")
    step_rows = []
    for art in chain:
        run = runs.get(art.run_id or "")
        step_rows.append([art.kind, f"`{art.hash[:12]}`", art.name or "", _size(art.size),
                          f"{run['stage']} `{run['id']}`" if run else "external"])
    s.table(["artifact", "hash", "name", "size", "produced by"], step_rows, caption="Upstream chain (oldest first)")
    nodes = {n["hash"]: n for n in graph.get("nodes", [])}
    edge_rows = [[f"{nodes.get(e['src'], {}).get('kind', '?')} `{e['src'][:12]}`", e["relation"],
                  f"{nodes.get(e['dst'], {}).get('kind', '?')} `{e['dst'][:12]}`", e.get("run_id") or ""]
                 for e in graph.get("edges", [])]
    if edge_rows:
        s.table(["from", "relation", "to", "run"], edge_rows, caption="Edges")
        lines = ["graph LR"]
        for h, n in nodes.items():
            label = f"{n.get('kind', '?')}<br/>{h[:8]}"
            lines.append(f'  n{h[:10]}["{label}"]')
        for e in graph["edges"]:
            lines.append(f"  n{e['src'][:10]} -->|{e['relation']}| n{e['dst'][:10]}")
        s.mermaid = "\n".join(lines)
    data["lineage"] = graph
    if model_run:
        s.paragraphs.append(f"Produced from notebook `{model_run.get('notebook') or 'not recorded'}` at git commit "
                            f"`{model_run.get('git_commit') or 'not recorded'}` by {model_run.get('user') or '?'}.")
    sections.append(s)

    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections.append(Section("About this card", [f"Generated by llmops-jupyter from the registry on {generated}. "
                                                "Fields marked _Not filled in._ need a person."]))
    data["generated_at"] = generated
    spdx = licence.lower() if licence != UNKNOWN_LICENCE else None
    front = {"license": spdx, "base_model": base_name if base_name and not str(base_name).startswith("/") else None,
             "library_name": "peft" if model.kind == "adapter" else "transformers",
             "tags": ["llmops-jupyter", model.kind]}
    title = f"Model card: {model.name or model.kind} {model.short}"
    return ModelCard(title, front, sections, data)


def save_model_card(registry: Registry, card: ModelCard) -> Artifact:
    """Store the card as a ``model-card`` artifact with a lineage edge from the model it describes."""
    model_hash = card.data["model"]["hash"]
    folder = registry.staging_dir("model-card")
    card.write(folder)
    art = registry.add_artifact(folder, CARD_KIND, name=f"model-card {model_hash[:12]}", move=True,
                                meta={"model": model_hash, "model_kind": card.data["model"]["kind"]},
                                inputs=[model_hash], relation=CARD_KIND)
    card.artifact = art
    try:
        from llmops_jupyter.governance import audit

        audit.record(registry, "card", artifact=art.hash, kind=CARD_KIND, detail={"model": model_hash})
    except Exception:  # noqa: BLE001 - the audit row is best effort for view commands
        pass
    return art


def latest_card(registry: Registry, model: Artifact) -> Artifact | None:
    cards = registry.derived_artifacts(model.hash, CARD_KIND, limit=1)
    return cards[0] if cards else None


# -- automatic cards ----------------------------------------------------------------------------------------------
AUTO_KINDS = ("adapter", "merged", "pruned", "distilled", "quantized", "deployment")
_PENDING: dict[str, list[str]] = {}


def auto_card_listener(event: Any) -> None:
    """Default Runner listener: when a run that produced an adapter/merged/quantized/deployment artifact finishes,
    save its card (so every model version has one, whichever process made it). Evals that come later appear when the card is regenerated with
    ``%llmops card``. ``LLMOPS_AUTO_CARD=0`` turns this off."""
    import os

    from llmops_jupyter.core.runner import EventType

    if event.type is EventType.ARTIFACT and event.data.get("kind") in AUTO_KINDS:
        _PENDING.setdefault(event.run_id, []).append(event.data["hash"])
    elif event.type in (EventType.FAILED, EventType.INTERRUPTED, EventType.DETACHED):
        _PENDING.pop(event.run_id, None)
    elif event.type is EventType.FINISHED:
        hashes = _PENDING.pop(event.run_id, [])
        if not hashes or os.environ.get("LLMOPS_AUTO_CARD", "1").lower() in ("0", "off", "false", "no"):
            return
        registry = event.registry
        if registry is None:
            return
        for h in hashes:
            save_model_card(registry, build_model_card(registry, h))

"""``%llmops data``: load, validate, clean, scrub, template, split and version a fine-tuning dataset."""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.errors import DataError
from llmops_jupyter.core.stage import Stage, register_stage

SUPPORTED = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
ROLE_COLUMNS = {
    "messages": ("messages", "conversations", "conversation", "chat", "dialog"),
    "system": ("system", "system_prompt"),
    "instruction": ("instruction", "prompt", "question", "query", "user"),
    "input": ("input", "context"),
    "response": ("response", "output", "answer", "completion", "assistant", "target"),
}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant",
                  "bot": "assistant", "model": "assistant"}


@dataclasses.dataclass
class DataConfig(StageConfig):
    source: Any = option(help="JSONL/JSON/CSV/TSV/Parquet file or folder of them, or a notebook object ($df: a "
                              "pandas DataFrame, a datasets.Dataset, a list of dicts)", positional=True)
    tokenizer: str | None = option(None, "model whose tokenizer and chat template are applied (path, registry run, "
                                         "or provider such as tiny-llama); default: a ChatML template, no token counts")
    format: str = option("auto", "input layout: instruction/response columns, chat messages, or detect",
                         choices=["auto", "instruction", "chat"])
    columns: dict[str, str] = option({}, "map roles to your column names, e.g. instruction=question response=answer "
                                         "(roles: instruction, input, response, system, messages)")
    system: str | None = option(None, "system prompt added to every example that has none")
    min_chars: int = option(1, "drop examples whose response is shorter than this many characters", min=0)
    max_chars: int = option(20000, "drop examples longer than this many characters in total", min=1)
    max_tokens: int | None = option(None, "drop examples longer than this many tokens after templating (needs "
                                          "--tokenizer)", min=1)
    dedup: bool = option(True, "remove exact duplicates (after whitespace/case normalisation)")
    near_dup: bool = option(True, "remove near duplicates (MinHash LSH over character 5-grams)")
    near_dup_threshold: float = option(0.85, "Jaccard similarity above which two examples are near duplicates",
                                       min=0.5, max=1.0)
    scrub_pii: bool = option(True, "replace emails, phone numbers, card numbers, IPs and SSNs with [TYPE] tokens")
    eval_fraction: float = option(0.1, "fraction held out for evaluation (deterministic by --seed)", min=0.0, max=0.9)
    eval_size: int | None = option(None, "hold out exactly this many examples instead of --eval-fraction", min=0)
    seed: int = option(0, "seed of the train/eval split")
    limit: int | None = option(None, "use only the first N input rows (quick tries)", min=1)
    name: str | None = option(None, "dataset name shown in the registry (default: the source file name)")

    def validate(self) -> None:
        if self.source is None or (isinstance(self.source, str) and not self.source.strip()):
            raise self.invalid("source", "is required", fix="pass a file path or a notebook variable like $df")
        if self.max_tokens is not None and not self.tokenizer:
            raise self.invalid("max_tokens", "needs --tokenizer to count tokens",
                               fix="add --tokenizer <model> or drop --max-tokens")
        bad = set(self.columns) - set(ROLE_COLUMNS)
        if bad:
            raise self.invalid("columns", f"has unknown role(s) {sorted(bad)}",
                               fix=f"use roles {', '.join(ROLE_COLUMNS)}")


# ---------------------------------------------------------------------------------------------------------------
# loading

def _describe_source(src: Any) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    return type(src).__name__


def load_rows(src: Any) -> tuple[list[dict[str, Any]], list[Path]]:
    """Rows as dicts plus the files they came from. Errors name the file (and line for JSONL)."""
    if isinstance(src, (str, Path)):
        path = Path(src).expanduser()
        if not path.exists():
            raise DataError(f"Data source '{src}' does not exist.", path=str(src),
                            fix="check the path (relative paths are relative to the notebook's folder)")
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUPPORTED) if path.is_dir() else [path]
        if not files:
            raise DataError(f"Folder '{src}' has no {'/'.join(SUPPORTED)} files.", path=str(src),
                            fix="point --source at a data file or a folder containing some")
        rows: list[dict[str, Any]] = []
        for f in files:
            rows.extend(_read_file(f))
        return rows, files
    if hasattr(src, "to_dict") and hasattr(src, "columns"):  # pandas DataFrame
        return [dict(r) for r in src.to_dict("records")], []
    if hasattr(src, "column_names") and hasattr(src, "to_list"):  # datasets.Dataset
        return list(src.to_list()), []
    if hasattr(src, "keys") and hasattr(src, "values") and all(hasattr(v, "column_names") for v in src.values()):
        raise DataError("Got a DatasetDict; pass one split (e.g. $ds['train']).", fix="select a split first")
    if isinstance(src, (list, tuple)):
        if not all(isinstance(r, dict) for r in src):
            raise DataError("A list source must hold dicts (one per example).", fix="e.g. [{'instruction': ..., "
                                                                                    "'response': ...}]")
        return [dict(r) for r in src], []
    raise DataError(f"Cannot read a data source of type {type(src).__name__}.",
                    fix="pass a file path, a pandas DataFrame, a datasets.Dataset or a list of dicts")


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and _looks_jsonl(path)):
        from llmops_jupyter.stages.data.format import read_jsonl

        rows = read_jsonl(path)
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {exc.lineno} is not valid JSON ({exc.msg}).", path=str(path),
                            line=exc.lineno, fix="fix the JSON, or use JSON Lines (one object per line)") from None
        rows = data.get("data", data) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a list of objects.", path=str(path), fix="write a JSON array")
    elif suffix in (".csv", ".tsv"):
        import pandas as pd

        try:
            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        except Exception as exc:  # pandas raises several parser error types
            raise DataError(f"{path}: cannot parse as {suffix[1:].upper()} ({exc}).", path=str(path),
                            fix="check quoting and the delimiter") from None
        rows = df.to_dict("records")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 - pyarrow error types vary by version
            raise DataError(f"{path}: cannot read Parquet ({exc}).", path=str(path), fix="re-export the file") from None
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}'.", path=str(path),
                        fix=f"use one of {', '.join(SUPPORTED)}")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {i} is a {type(row).__name__}, not an object.", path=str(path), line=i,
                            fix="each record must be a JSON object with named fields")
    return rows


def _looks_jsonl(path: Path) -> bool:
    with open(path, encoding="utf-8") as fh:
        first = fh.readline().strip()
        second = fh.readline().strip()
    return first.startswith("{") and second.startswith("{")


# ---------------------------------------------------------------------------------------------------------------
# mapping to messages

def resolve_columns(found: list[str], cfg: DataConfig) -> tuple[str, dict[str, str]]:
    """Pick the layout and the column for each role; a clear error lists what was found."""
    lower = {c.lower(): c for c in found}
    mapping: dict[str, str] = {}
    for role, col in cfg.columns.items():
        if col not in found:
            raise DataError(f"Column '{col}' (given for role '{role}') is not in the data; found columns: "
                            f"{', '.join(found) or '(none)'}.", fix=f"use --columns {role}=<one of the found columns>")
        mapping[role] = col
    for role, names in ROLE_COLUMNS.items():
        if role not in mapping:
            for n in names:
                if n in lower:
                    mapping[role] = lower[n]
                    break
    layout = cfg.format
    if layout == "auto":
        layout = "chat" if "messages" in mapping and "response" not in cfg.columns else "instruction"
    if layout == "chat" and "messages" not in mapping:
        raise DataError(f"No chat messages column; found columns: {', '.join(found)}.",
                        fix="use --columns messages=<column> or --format instruction")
    if layout == "instruction" and ("instruction" not in mapping or "response" not in mapping):
        missing = [r for r in ("instruction", "response") if r not in mapping]
        raise DataError(
            f"Missing {' and '.join(missing)} column(s); found columns: {', '.join(found) or '(none)'}.",
            fix="map them with --columns instruction=<col> response=<col> (or --format chat with a messages column)",
        )
    return layout, mapping


def to_messages(row: dict[str, Any], layout: str, mapping: dict[str, str], system: str | None) -> list[dict]:
    msgs: list[dict[str, str]] = []
    if layout == "chat":
        raw = row.get(mapping["messages"])
        if isinstance(raw, str):
            raw = json.loads(raw)
        for m in raw or []:
            if not isinstance(m, dict):
                raise ValueError("a message is not an object")
            role = m.get("role", m.get("from"))
            content = m.get("content", m.get("value"))
            role = SHAREGPT_ROLES.get(str(role).lower())
            if role is None or content is None:
                raise ValueError(f"message with unknown role {m.get('role', m.get('from'))!r}")
            msgs.append({"role": role, "content": str(content)})
    else:
        instr = row.get(mapping["instruction"])
        extra = row.get(mapping["input"]) if "input" in mapping else None
        user = str(instr if instr is not None else "")
        if extra is not None and str(extra).strip():
            user = f"{user}\n\n{extra}"
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": str(row.get(mapping["response"])
                                                                                        or "")}]
        if "system" in mapping and row.get(mapping["system"]):
            msgs.insert(0, {"role": "system", "content": str(row[mapping["system"]])})
    if system and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


_WS = re.compile(r"\s+")


def _norm(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}:{_WS.sub(' ', m['content']).strip().lower()}" for m in messages)


def near_duplicates(texts: list[str], threshold: float, seed: int = 1) -> set[int]:
    """Indices to drop: each later member of a near-duplicate group (MinHash LSH, datasketch)."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=128)
    drop: set[int] = set()
    for i, text in enumerate(texts):
        shingles = {text[j:j + 5] for j in range(max(1, len(text) - 4))}
        mh = MinHash(num_perm=128, seed=seed)
        mh.update_batch([s.encode() for s in shingles])
        if lsh.query(mh):
            drop.add(i)
        else:
            lsh.insert(str(i), mh)
    return drop


def split_key(seed: int, ex_id: str) -> str:
    return hashlib.sha256(f"{seed}:{ex_id}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------

class DataReport:
    """Counts, drops with reasons, PII counts and length stats; HTML in notebooks, text elsewhere."""

    def __init__(self, manifest: dict[str, Any], artifact_hash: str, run_id: str):
        self.manifest = manifest
        self.hash = artifact_hash
        self.run_id = run_id

    def rows(self) -> list[tuple[str, Any]]:
        m = self.manifest
        c = m["counts"]
        out = [("dataset version", m["version"]), ("artifact", self.hash[:12]), ("run", self.run_id),
               ("source", m["source"]), ("layout", m["layout"]), ("input rows", c["input"]),
               ("kept", c["kept"]), ("train", c["train"]), ("eval", c["eval"])]
        out += [(f"dropped: {k}", v) for k, v in sorted(m["dropped"].items())]
        out += [(f"PII scrubbed: {k}", v) for k, v in sorted(m["pii"].items())]
        lens = m.get("lengths", {})
        if lens:
            out.append((f"length ({lens['unit']}) min/median/max", f"{lens['min']}/{lens['median']}/{lens['max']}"))
        return out

    def __str__(self) -> str:
        width = max(len(k) for k, _ in self.rows())
        return "Data report\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in self.rows())

    __repr__ = __str__

    def _repr_html_(self) -> str:
        body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in self.rows())
        return f"<div class='llmops-data-report'><b>Data report</b><table>{body}</table></div>"


def length_figure(train_lengths: list[int], eval_lengths: list[int], unit: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_histogram(x=train_lengths, name="train", opacity=0.75)
    fig.add_histogram(x=eval_lengths, name="eval", opacity=0.75)
    fig.update_layout(barmode="overlay", title=f"Example length ({unit})", xaxis_title=unit,
                      yaxis_title="examples", height=320, margin=dict(l=40, r=10, t=40, b=40))
    return fig


@register_stage
class DataStage(Stage):
    """Load, validate, clean, PII-scrub, template, split and version a dataset."""

    name = "data"
    config_cls = DataConfig
    key_metrics = ("examples", "train", "eval", "dropped", "pii_scrubbed")

    def run(self, ctx) -> dict[str, Any]:
        from llmops_jupyter.core.pii import scrub
        from llmops_jupyter.stages.data.format import DEFAULT_TEMPLATE, Dataset, render, write_dataset_dir

        cfg: DataConfig = ctx.config
        rows, files = load_rows(cfg.source)
        if cfg.limit:
            rows = rows[: cfg.limit]
        source = _describe_source(cfg.source)
        if not rows:
            raise DataError(f"Data source '{source}' has no examples.", path=source,
                            fix="check the file is not empty (and --limit)")
        for f in files:
            ctx.use(ctx.registry.add_reference(f, "raw-data", name=f.name))
        found = sorted({k for r in rows for k in r})
        layout, mapping = resolve_columns(found, cfg)

        tokenizer, tok_info = None, {"tokenizer": None, "tokenizer_hash": None}
        if cfg.tokenizer:
            from llmops_jupyter.models.inference import load_tokenizer
            from llmops_jupyter.models.refs import resolve_model

            mref = resolve_model(cfg.tokenizer, ctx.registry)
            tok_path = mref.base.path if mref.kind == "adapter" and mref.base else mref.path
            tokenizer = load_tokenizer(tok_path, padding_side="right")
            tj = Path(tok_path) / "tokenizer.json"
            tok_info = {"tokenizer": mref.name, "tokenizer_path": str(tok_path),
                        "tokenizer_hash": hashlib.sha256(tj.read_bytes()).hexdigest()[:16] if tj.exists() else None}

        dropped: Counter = Counter()
        pii: Counter = Counter()
        seen: set[str] = set()
        kept: list[list[dict[str, str]]] = []
        total = len(rows)
        for i, row in enumerate(rows):
            try:
                msgs = to_messages(row, layout, mapping, cfg.system)
            except (ValueError, TypeError, json.JSONDecodeError):
                dropped["malformed messages"] += 1
                continue
            msgs = [{"role": m["role"], "content": m["content"].strip()} for m in msgs]
            if not msgs or msgs[-1]["role"] != "assistant":
                dropped["no assistant response"] += 1
                continue
            if any(not m["content"] for m in msgs if m["role"] != "system"):
                dropped["empty text"] += 1
                continue
            if len(msgs[-1]["content"]) < cfg.min_chars:
                dropped[f"response shorter than {cfg.min_chars} chars"] += 1
                continue
            if sum(len(m["content"]) for m in msgs) > cfg.max_chars:
                dropped[f"longer than {cfg.max_chars} chars"] += 1
                continue
            found_pii: Counter = Counter()
            if cfg.scrub_pii:
                clean = []
                for m in msgs:
                    text, counts = scrub(m["content"])
                    found_pii.update(counts)
                    clean.append({"role": m["role"], "content": text})
                msgs = clean
            if cfg.dedup:
                key = _norm(msgs)
                if key in seen:
                    dropped["exact duplicate"] += 1
                    continue
                seen.add(key)
            pii.update(found_pii)
            kept.append(msgs)
            if i % 500 == 0:
                ctx.progress(i + 1, total, "cleaning")
        if cfg.near_dup and len(kept) > 1:
            drop = near_duplicates([_norm(m) for m in kept], cfg.near_dup_threshold)
            dropped["near duplicate"] += len(drop)
            kept = [m for j, m in enumerate(kept) if j not in drop]

        examples = []
        for j, msgs in enumerate(kept):
            ex = render(msgs, tokenizer)
            if cfg.max_tokens and ex["n_tokens"] is not None and ex["n_tokens"] > cfg.max_tokens:
                dropped[f"longer than {cfg.max_tokens} tokens"] += 1
                continue
            examples.append(ex)
            if j % 500 == 0:
                ctx.progress(j + 1, len(kept), "templating")
        if not examples:
            reasons = ", ".join(f"{k}: {v}" for k, v in dropped.items()) or "none"
            raise DataError(f"No examples left after cleaning '{source}' (dropped — {reasons}).", path=source,
                            fix="relax --min-chars/--max-chars/--max-tokens or check the column mapping")

        examples.sort(key=lambda e: split_key(cfg.seed, e["id"]))
        n_eval = cfg.eval_size if cfg.eval_size is not None else round(len(examples) * cfg.eval_fraction)
        if cfg.eval_fraction > 0 and cfg.eval_size is None and len(examples) > 1:
            n_eval = max(1, n_eval)
        n_eval = min(n_eval, len(examples) - 1)
        eval_rows, train_rows = examples[:n_eval], examples[n_eval:]
        for rows_ in (eval_rows, train_rows):
            rows_.sort(key=lambda e: e["id"])

        unit = "tokens" if tokenizer is not None else "chars"
        lens = sorted(e["n_tokens"] if tokenizer is not None else len(e["text"]) for e in examples)
        manifest = {
            "name": cfg.name or (Path(source).stem if isinstance(cfg.source, (str, Path)) else "dataset"),
            "source": source, "files": [str(f) for f in files], "layout": layout, "columns": mapping,
            "counts": {"input": total, "kept": len(examples)}, "dropped": dict(dropped), "pii": dict(pii),
            "chat_template": (tokenizer.chat_template if tokenizer is not None else DEFAULT_TEMPLATE),
            "seed": cfg.seed, "eval_fraction": cfg.eval_fraction, "eval_size": cfg.eval_size,
            "lengths": {"unit": unit, "min": lens[0], "median": lens[len(lens) // 2], "max": lens[-1]},
            **tok_info,
        }
        folder = ctx.staging_dir("data")
        version = write_dataset_dir(folder, train_rows, eval_rows, manifest)
        manifest = json.loads((folder / "manifest.json").read_text())
        art = ctx.save_artifact(folder, "dataset", name=manifest["name"],
                                meta={"version": version, "counts": manifest["counts"], "pii": dict(pii)})
        ctx.log_metrics({"examples": len(examples), "train": len(train_rows), "eval": len(eval_rows),
                         "dropped": sum(dropped.values()), "pii_scrubbed": sum(pii.values())})
        ctx.set_summary(version=version, dataset=art.hash)

        def _len(e: dict) -> int:
            return e["n_tokens"] if tokenizer is not None else len(e["text"])

        return {
            "report": DataReport(manifest, art.hash, ctx.run_id),
            "figure": length_figure([_len(e) for e in train_rows], [_len(e) for e in eval_rows], unit),
            "dataset": Dataset(art.path, art),
        }

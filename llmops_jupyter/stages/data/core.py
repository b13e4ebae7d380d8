"""The data stage's machinery below the stage class: reading sources, columns and templates, duplicates and near
duplicates, the split key and the data report (shared by :mod:`.stage` and the text format in :mod:`.text`)."""

from __future__ import annotations

import hashlib
import html
import json
import numbers
import re
from pathlib import Path
from typing import Any

from llmops_jupyter.core.errors import DataError

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant",
                  "bot": "assistant", "model": "assistant"}
SUPPORTED = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
ROLE_COLUMNS = {
    "messages": ("messages", "conversations", "conversation", "chat", "dialog"),
    "system": ("system", "system_prompt"),
    "instruction": ("instruction", "prompt", "question", "query", "user"),
    "input": ("input", "context"),
    "response": ("response", "output", "answer", "completion", "assistant", "target"),
    "chosen": ("chosen",),
    "rejected": ("rejected",),
}
EVAL_NEAR_COPY = "eval near-copy of train"


# ---------------------------------------------------------------------------------------------------------------
# loading

def _describe_source(src: Any) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    return type(src).__name__


def load_rows(src: Any) -> tuple[list[dict[str, Any]], list[Path], list[str]]:
    """Rows as dicts (keys as text), the files they came from, and where each row came from ("d.jsonl line 3",
    "row 7") so that errors and dropped examples can point at it. Errors name the file (and line)."""
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
        origins: list[str] = []
        for f in files:
            label = str(f.relative_to(path)) if path.is_dir() else f.name
            for where, row in _read_file(f):
                rows.append(_str_keys(row))
                origins.append(f"{label} {where}")
        return rows, files, origins
    if hasattr(src, "to_dict") and hasattr(src, "columns"):  # pandas DataFrame
        records = src.to_dict("records")
        return [_str_keys(r) for r in records], [], [f"row {label}" for label in list(src.index)[:len(records)]]
    if hasattr(src, "column_names") and hasattr(src, "to_list"):  # datasets.Dataset
        records = list(src.to_list())
        return [_str_keys(r) for r in records], [], [f"row {i}" for i in range(len(records))]
    if hasattr(src, "keys") and hasattr(src, "values") and all(hasattr(v, "column_names") for v in src.values()):
        raise DataError("Got a DatasetDict; pass one split (e.g. $ds['train']).", fix="choose one split first")
    if isinstance(src, (list, tuple)):
        if not all(isinstance(r, dict) for r in src):
            raise DataError("A list source must hold dicts (one per example).", fix="e.g. [{'instruction': ..., "
                                                                                    "'response': ...}]")
        return [_str_keys(r) for r in src], [], [f"row {i}" for i in range(len(src))]
    raise DataError(f"Cannot read a data source of type {type(src).__name__}.",
                    fix="pass a file path, a pandas DataFrame, a datasets.Dataset or a list of dicts")


def _str_keys(row: dict) -> dict[str, Any]:
    return {str(k): v for k, v in row.items()}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _read_file(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(where, record)`` pairs. Text formats are decoded strictly as UTF-8 first (a UTF-8 BOM is fine), so a
    wrong encoding is one line naming the byte, never a ``UnicodeDecodeError`` from inside a parser. An empty file
    holds no rows."""
    from llmops_jupyter.stages.data.format import read_jsonl_lines, read_text

    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise DataError(f"{path}: unsupported file type '{suffix}'.", path=str(path),
                        fix=f"use one of {', '.join(SUPPORTED)}")
    if path.stat().st_size == 0:
        return []
    text = read_text(path) if suffix != ".parquet" else ""
    if suffix == ".jsonl" or (suffix == ".json" and _looks_jsonl(text)):
        pairs = [(f"line {i}", row) for i, row in read_jsonl_lines(path, text)]
    elif suffix == ".json":
        if not text.strip():
            return []
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            at_end = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
            cut = " (the file may be truncated)" if at_end else ""
            raise DataError(f"{path}: line {exc.lineno} is not valid JSON ({exc.msg}){cut}.", path=str(path),
                            line=exc.lineno, fix="fix the JSON, or use JSON Lines (one object per line)") from None
        rows = data.get("data", data) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a list of objects, found a {type(rows).__name__}.", path=str(path),
                            fix="write a JSON array of objects (or an object whose 'data' key holds one)")
        pairs = [(f"record {i}", row) for i, row in enumerate(rows, 1)]
    elif suffix in (".csv", ".tsv"):
        import io

        import pandas as pd

        try:
            df = pd.read_csv(io.StringIO(text), sep="\t" if suffix == ".tsv" else ",", dtype=str,
                             keep_default_na=False)
        except pd.errors.EmptyDataError:
            return []
        except Exception as exc:  # noqa: BLE001 - pandas raises several parser error types
            raise DataError(f"{path}: cannot parse as {suffix[1:].upper()} ({_one_line(exc)}).", path=str(path),
                            fix="check quoting and the delimiter (a quote left open often means a truncated "
                                "file)") from None
        pairs = [(f"row {i}", row) for i, row in enumerate(df.to_dict("records"), 1)]
    else:
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as exc:  # noqa: BLE001 - pyarrow error types vary by version
            raise DataError(f"{path}: cannot read Parquet ({_one_line(exc)}).", path=str(path),
                            fix="re-export the file (it may be truncated or not Parquet)") from None
        pairs = [(f"row {i}", row) for i, row in enumerate(rows, 1)]
    for where, row in pairs:
        if not isinstance(row, dict):
            raise DataError(f"{path}: {where} is a {type(row).__name__}, not an object.", path=str(path),
                            line=int(where.split()[-1]), fix="each record must be a JSON object with named fields")
    return pairs


def _looks_jsonl(text: str) -> bool:
    lines = [ln.strip() for ln in text.split("\n", 2)[:2]]
    return len(lines) == 2 and lines[0].startswith("{") and lines[1].startswith("{")


# ---------------------------------------------------------------------------------------------------------------
# mapping to messages

def resolve_columns(found: list[str], cfg: Any) -> tuple[str, dict[str, str]]:
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
        if "chosen" in mapping and "rejected" in mapping:
            layout = "preference"
        else:
            layout = "chat" if "messages" in mapping and "response" not in cfg.columns else "instruction"
    if layout == "preference":
        missing = [r for r in ("chosen", "rejected") if r not in mapping]
        if "messages" not in mapping and "instruction" not in mapping:
            missing.insert(0, "prompt")
        if missing:
            raise DataError(f"Missing {' and '.join(missing)} column(s) for preference pairs; found columns: "
                            f"{', '.join(found) or '(none)'}.",
                            fix="map them with --columns instruction=<prompt col> chosen=<col> rejected=<col> (or "
                                "messages=<col> holding the conversation before the answers)")
        return layout, mapping
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


class NotText(Exception):
    """A value that cannot stand for text (a list, a dict, undecodable bytes); the stage names row and column."""

    def __init__(self, column: str, what: str):
        self.column = column
        self.what = what
        super().__init__(f"column '{column}' holds {what}, not text")


def as_text(value: Any, column: str) -> str:
    """A cell as text. Missing values (None, NaN, pandas NA/NaT) are empty, so they are dropped as empty text rather
    than learned as "nan"; a whole-number float prints without ".0" (pandas turns an int column with gaps into
    floats); containers are refused rather than stringified."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    kind = type(value).__name__
    if kind in ("NAType", "NaTType"):
        return ""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise NotText(column, "bytes that are not UTF-8") from None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Number):
        if isinstance(value, numbers.Real):
            f = float(value)
            if f != f:
                return ""
            if not isinstance(value, numbers.Integral) and f.is_integer() and abs(f) < 1e16:
                return str(int(f))
        return str(value)
    if isinstance(value, (list, tuple, dict, set)) or hasattr(value, "ndim"):
        raise NotText(column, f"a {kind}")
    return str(value)


def _content(value: Any, column: str) -> str:
    """Chat message content: text, or OpenAI-style content parts ``[{"type": "text", "text": ...}]``."""
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(as_text(p.get("text"), column) for p in value)
    return as_text(value, column)


def to_messages(row: dict[str, Any], layout: str, mapping: dict[str, str], system: str | None) -> list[dict]:
    """The example as chat messages; for a preference pair, the conversation that ends in the *chosen* answer (the
    rejected one is read by :func:`rejected_text`)."""
    msgs: list[dict[str, str]] = []
    if layout == "preference":
        chosen = {"role": "assistant", "content": as_text(row.get(mapping["chosen"]), mapping["chosen"])}
        if "messages" in mapping:  # the conversation before the two answers
            context = to_messages(row, "chat", mapping, system)
            if context and context[-1]["role"] == "assistant":
                raise ValueError("the messages before a chosen/rejected pair end with an assistant turn")
            return [*context, chosen]
        return [*to_messages(row, "instruction", {**mapping, "response": mapping["chosen"]}, system)[:-1], chosen]
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
            msgs.append({"role": role, "content": _content(content, mapping["messages"])})
    else:
        user = as_text(row.get(mapping["instruction"]), mapping["instruction"])
        extra = as_text(row.get(mapping["input"]), mapping["input"]) if "input" in mapping else ""
        if extra.strip():
            user = f"{user}\n\n{extra}"
        msgs = [{"role": "user", "content": user},
                {"role": "assistant", "content": as_text(row.get(mapping["response"]), mapping["response"])}]
        sys_text = as_text(row.get(mapping["system"]), mapping["system"]) if "system" in mapping else ""
        if sys_text.strip():
            msgs.insert(0, {"role": "system", "content": sys_text})
    if system and (not msgs or msgs[0]["role"] != "system"):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def rejected_text(row: dict[str, Any], mapping: dict[str, str]) -> str:
    return as_text(row.get(mapping["rejected"]), mapping["rejected"]).strip()


_WS = re.compile(r"\s+")


def _norm(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}:{_WS.sub(' ', m['content']).strip().lower()}" for m in messages)


def _shingles(text: str) -> set[str]:
    return {text[j:j + 5] for j in range(max(1, len(text) - 4))}


def _candidates(threshold: float, seed: int):
    """A MinHash LSH index that only proposes candidates: its bar is lower than ``threshold`` so that pairs just
    above it are rarely missed; the exact Jaccard similarity of the 5-gram sets decides."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=max(0.3, threshold - 0.15), num_perm=128)

    def sketch(shingles: set[str]) -> MinHash:
        mh = MinHash(num_perm=128, seed=seed)
        mh.update_batch([s.encode() for s in shingles])
        return mh

    return lsh, sketch


def _best_match(shingles: set[str], keys: list[str], pool: dict[int, set[str]]) -> tuple[int, float] | None:
    """The most similar of the proposed candidates by exact Jaccard (ties: the earliest)."""
    best: tuple[int, float] | None = None
    for key in keys:
        j = int(key)
        sim = len(shingles & pool[j]) / len(shingles | pool[j])
        if best is None or sim > best[1] or (sim == best[1] and j < best[0]):
            best = (j, sim)
    return best


def near_duplicates(texts: list[str], threshold: float, seed: int = 1) -> dict[int, tuple[int, float]]:
    """Each later member of a near-duplicate group → (the earlier kept index it matched, Jaccard similarity).

    MinHash LSH (datasketch) only proposes candidates; a pair counts when the exact Jaccard similarity of the two
    character-5-gram sets reaches ``threshold``, so the estimate's error alone never drops an example."""
    lsh, sketch = _candidates(threshold, seed)
    kept: dict[int, set[str]] = {}
    drop: dict[int, tuple[int, float]] = {}
    # datasketch's LSH lookup (no database involved), bound once so the loop reads as what it does
    similar_to = lsh.query
    for i, text in enumerate(texts):
        shingles = _shingles(text)
        mh = sketch(shingles)
        best = _best_match(shingles, similar_to(mh), kept)
        if best is not None and best[1] >= threshold:
            drop[i] = best
        else:
            lsh.insert(str(i), mh)
            kept[i] = shingles
    return drop


def near_copies(queries: list[str], corpus: list[str], threshold: float, seed: int = 1) -> dict[int, tuple[int, float]]:
    """Each query with a ``corpus`` text at least ``threshold`` similar → (the most similar corpus index, its
    similarity): the eval split's decontamination against the training split. Same measure as
    :func:`near_duplicates` (exact character-5-gram Jaccard over MinHash LSH candidates)."""
    lsh, sketch = _candidates(threshold, seed)
    pool: dict[int, set[str]] = {}
    for j, text in enumerate(corpus):
        pool[j] = _shingles(text)
        lsh.insert(str(j), sketch(pool[j]))
    similar_to = lsh.query  # datasketch's LSH lookup, no database involved
    hits: dict[int, tuple[int, float]] = {}
    for i, text in enumerate(queries):
        shingles = _shingles(text)
        best = _best_match(shingles, similar_to(sketch(shingles)), pool)
        if best is not None and best[1] >= threshold:
            hits[i] = best
    return hits


def load_tokenizer_info(cfg: Any, ctx) -> tuple[Any, dict[str, Any]]:
    """The tokenizer of ``--tokenizer`` (None without one) and what the manifest records about it."""
    if not cfg.tokenizer:
        return None, {"tokenizer": None, "tokenizer_hash": None}
    from llmops_jupyter.models.inference import load_tokenizer
    from llmops_jupyter.models.refs import resolve_model

    mref = resolve_model(cfg.tokenizer, ctx.registry)
    tok_path = mref.base.path if mref.kind == "adapter" and mref.base else mref.path
    tokenizer = load_tokenizer(tok_path, padding_side="right")
    tj = Path(tok_path) / "tokenizer.json"
    return tokenizer, {"tokenizer": mref.name, "tokenizer_path": str(tok_path),
                       "tokenizer_hash": hashlib.sha256(tj.read_bytes()).hexdigest()[:16] if tj.exists() else None}


def split_key(seed: int, ex_id: str) -> str:
    return hashlib.sha256(f"{seed}:{ex_id}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------

class DataReport:
    """Counts, drops with reasons, PII counts and length stats; HTML in notebooks, text elsewhere. When near-duplicate
    removal was on, the dropped examples are shown beside the ones they matched."""

    def __init__(self, manifest: dict[str, Any], artifact_hash: str, run_id: str, folder: Path | None = None):
        self.manifest = manifest
        self.hash = artifact_hash
        self.run_id = run_id
        self.folder = folder

    def rows(self) -> list[tuple[str, Any]]:
        m = self.manifest
        c = m["counts"]
        out = [("dataset version", m["version"]), ("artifact", self.hash[:12]), ("run", self.run_id),
               ("source", m["source"]), ("layout", m["layout"])]
        if m["layout"] == "text":

            out += report_rows(m)
        else:
            out += [("input rows", c["input"]), ("kept", c["kept"]), ("train", c["train"]), ("eval", c["eval"])]
        out += [(f"dropped: {k}", v) for k, v in sorted(m["dropped"].items())]
        threshold = m.get("near_dup")
        out.append(("near duplicates", f"removed at similarity >= {threshold}" if threshold is not None
                    else "kept (exact duplicates only; --near-dup THRESHOLD to remove them)"))
        if "decontaminate" in m:  # datasets written before cross-split decontamination have no such key
            t = m["decontaminate"]
            out.append(("eval decontamination",
                        f"eval examples at similarity >= {t} to a train example removed "
                        f"({m['dropped'].get(EVAL_NEAR_COPY, 0)})" if t is not None else "off (--no-decontaminate)"))
        if m["dropped"] and self.folder is not None:
            out.append(("dropped examples", f"{self.folder / m.get('dropped_file', 'dropped.jsonl')} "
                                            f"(%llmops show {self.run_id})"))
        out += [(f"PII scrubbed: {k}", v) for k, v in sorted(m["pii"].items())]
        lens = m.get("lengths", {})
        if lens:
            out.append((f"length ({lens['unit']}) min/median/max", f"{lens['min']}/{lens['median']}/{lens['max']}"))
        return out

    def near_dup_table(self, limit: int = 20):
        """The near duplicates and eval near-copies of training examples dropped, beside what they matched (None
        when there are none)."""
        reasons = tuple(r for r in ("near duplicate", EVAL_NEAR_COPY) if self.manifest["dropped"].get(r))
        if not reasons or self.folder is None:
            return None
        from llmops_jupyter.stages.data.format import dropped_table

        return dropped_table(self.folder, reasons=reasons, limit=limit)

    def documents_table(self):
        """Per-document counts of a text dataset (None for other layouts)."""
        if self.manifest.get("layout") != "text":
            return None

        return documents_table(self.manifest)

    def __str__(self) -> str:
        width = max(len(k) for k, _ in self.rows())
        text = "Data report\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in self.rows())
        for table in (self.documents_table(), self.near_dup_table()):
            text = text if table is None else f"{text}\n\n{table}"
        return text

    __repr__ = __str__

    def _repr_html_(self) -> str:
        body = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in self.rows())
        extra = "".join(t._repr_html_() for t in (self.documents_table(), self.near_dup_table()) if t is not None)
        return f"<div class='llmops-data-report'><b>Data report</b><table>{body}</table>{extra}</div>"


def length_figure(train_lengths: list[int], eval_lengths: list[int], unit: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_histogram(x=train_lengths, name="train", opacity=0.75)
    fig.add_histogram(x=eval_lengths, name="eval", opacity=0.75)
    fig.update_layout(barmode="overlay", title=f"Example length ({unit})", xaxis_title=unit,
                      yaxis_title="examples", height=320, margin=dict(l=40, r=10, t=40, b=40))
    return fig


def report_rows(m: dict[str, Any]) -> list[tuple[str, Any]]:
    """The text-layout lines of the data report: documents per split, chunking, skipped files with reasons."""
    c = m["counts"]
    out: list[tuple[str, Any]] = [
        ("documents", f"{c.get('documents', 0)} kept of {c['input']} read"),
        ("documents train/eval", f"{c.get('train_documents', 0)}/{c.get('eval_documents', 0)} (split by document)"),
        ("chunks train/eval", f"{c['train']}/{c['eval']} windows of <= {m['chunk_tokens']} tokens, stride "
                              f"{m['stride']}"),
        ("skipped files", len(m.get("skipped", []))),
    ]
    out += [(f"skipped: {s['file']}", s["reason"]) for s in m.get("skipped", [])[:50]]
    return out


def documents_table(m: dict[str, Any], limit: int | None = 30):
    """Per-document counts (split, characters, tokens, chunks) as a :class:`~core.display.Table`."""
    from llmops_jupyter.core.display import Table

    docs = m.get("documents", [])
    shown = docs if limit is None else docs[:limit]
    rows = [[d["doc"], d["split"], d["chars"], d["tokens"], d["chunks"]] for d in shown]
    note = f"{len(docs) - len(shown)} more in manifest.json" if len(shown) < len(docs) else ""
    return Table(["document", "split", "chars", "tokens", "chunks"], rows, title=f"Documents ({len(docs)})",
                 note=note)

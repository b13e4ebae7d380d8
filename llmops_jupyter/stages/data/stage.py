"""``%llmops data``: load, validate, clean, scrub, template, split and version a fine-tuning dataset."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import html
import json
import numbers
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
NEAR_DUP_HELP = (
    "opt-in: also remove near duplicates, examples whose character-5-gram Jaccard similarity to an earlier kept "
    "example is at least THRESHOLD (MinHash LSH proposes candidates, the exact similarity decides), e.g. --near-dup "
    "0.9. Off by default because short prompts that differ in one number look alike; the report and the dataset's "
    "dropped.jsonl list each dropped example beside the one it matched. --no-near-dup is deprecated and does "
    "nothing (off is the default)"
)


class _NearDupFlag(argparse.Action):
    """``--near-dup THRESHOLD``, plus the deprecated ``--no-near-dup`` (a no-op now that off is the default)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == "--no-near-dup":
            if values is not None:
                parser.error("--no-near-dup takes no value (it is deprecated: near-duplicate removal is off by "
                             "default); put the source before it or drop the flag")
            setattr(namespace, self.dest, False)
        elif values is None:
            parser.error("--near-dup needs a THRESHOLD between 0.5 and 1.0, e.g. --near-dup 0.9")
        else:
            setattr(namespace, self.dest, values)


def _near_dup_option() -> Any:
    f = option(None, NEAR_DUP_HELP, min=0.5, max=1.0)
    meta = {**f.metadata, "argparse": {"aliases": ("--no-near-dup",), "nargs": "?", "action": _NearDupFlag,
                                       "metavar": "THRESHOLD"}}
    return dataclasses.field(default=None, metadata=meta)


DECONTAMINATE_DEFAULT = 0.9
EVAL_NEAR_COPY = "eval near-copy of train"
DECONTAMINATE_HELP = (
    "remove from the eval split every example whose character-5-gram Jaccard similarity to a training example is at "
    "least THRESHOLD (MinHash LSH proposes candidates, the exact similarity decides), so held-out scores do not "
    "reward memorised near-copies; each removal is listed in dropped.jsonl beside the training example it matched. "
    "On by default; --no-decontaminate keeps the eval split as drawn. Short prompts that differ in one number "
    "(\"What is 12 plus 7?\" / \"... 8?\") stay well below 0.9"
)


class _DecontaminateFlag(argparse.Action):
    """``--decontaminate [THRESHOLD]`` (alone: the default threshold) and ``--no-decontaminate``."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == "--no-decontaminate":
            if values is not None:
                parser.error("--no-decontaminate takes no value; put the source before it")
            setattr(namespace, self.dest, None)
        else:
            setattr(namespace, self.dest, DECONTAMINATE_DEFAULT if values is None else values)


def _decontaminate_option() -> Any:
    f = option(DECONTAMINATE_DEFAULT, DECONTAMINATE_HELP, min=0.5, max=1.0)
    meta = {**f.metadata, "argparse": {"aliases": ("--no-decontaminate",), "nargs": "?",
                                       "action": _DecontaminateFlag, "metavar": "THRESHOLD"}}
    return dataclasses.field(default=DECONTAMINATE_DEFAULT, metadata=meta)


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant",
                  "bot": "assistant", "model": "assistant"}


@dataclasses.dataclass
class DataConfig(StageConfig):
    source: Any = option(help="JSONL/JSON/CSV/TSV/Parquet file or folder of them, or a notebook object ($df: a "
                              "pandas DataFrame, a datasets.Dataset, a list of dicts); with --format text also a "
                              "folder or glob of .txt/.md/.rst/.html/.pdf documents", positional=True)
    tokenizer: str | None = option(None, "model whose tokenizer and chat template are applied (path, registry run, "
                                         "or provider such as tiny-llama); default: a ChatML template, no token counts")
    format: str = option("auto", "input layout: instruction/response columns, chat messages, or detect; text: raw "
                                 "documents for continued pretraining (`finetune --objective causal-lm`), chunked "
                                 "into token windows and split by document (needs --tokenizer)",
                         choices=["auto", "instruction", "chat", "text"])
    columns: dict[str, str] = option({}, "map roles to your column names, e.g. instruction=question response=answer "
                                         "(roles: instruction, input, response, system, messages; text for "
                                         "--format text, default the first of text/content/body/document)")
    chunk_tokens: int = option(512, "with --format text: tokens per training window; a document is cut into "
                                    "windows that never cross into the next document, and one shorter than a window "
                                    "is kept whole", min=8, max=1_048_576)
    stride: int | None = option(None, "with --format text: tokens from one window's start to the next (default "
                                      "--chunk-tokens: no overlap; smaller overlaps windows)", min=1)
    system: str | None = option(None, "system prompt added to every example that has none")
    min_chars: int = option(1, "remove examples whose response (with --format text: documents) is shorter than "
                               "this many characters", min=0)
    max_chars: int = option(20000, "remove examples longer than this many characters in total (not with --format "
                                   "text: documents are chunked instead)", min=1)
    max_tokens: int | None = option(None, "remove examples longer than this many tokens after templating (needs "
                                          "--tokenizer)", min=1)
    dedup: bool = option(True, "remove exact duplicates: examples whose every turn is identical after whitespace/"
                               "case normalisation and PII scrubbing")
    near_dup: float | None = _near_dup_option()
    decontaminate: float | None = _decontaminate_option()
    scrub_pii: bool = option(True, "replace emails, phone numbers, card numbers, IPs and SSNs with [TYPE] tokens")
    eval_fraction: float = option(0.1, "fraction held out for evaluation (deterministic by --seed)", min=0.0, max=0.9)
    eval_size: int | None = option(None, "hold out exactly this many examples instead of --eval-fraction", min=0)
    seed: int = option(0, "seed of the train/eval split")
    limit: int | None = option(None, "use only the first N input rows (quick tries)", min=1)
    name: str | None = option(None, "dataset name shown in the registry (default: the source file name)")

    def validate(self) -> None:
        if self.near_dup is False:  # deprecated `--no-near-dup` / near_dup=False: what the default does now
            self.near_dup = None
        elif self.near_dup is True:
            raise self.invalid("near_dup", "takes a similarity THRESHOLD now, not true",
                               fix="pass e.g. --near-dup 0.9 (near_dup=0.9), or leave it out to remove only exact "
                                   "duplicates")
        if self.decontaminate is False:  # --no-decontaminate / decontaminate=False: keep the eval split as drawn
            self.decontaminate = None
        elif self.decontaminate is True:
            self.decontaminate = DECONTAMINATE_DEFAULT
        if self.source is None or (isinstance(self.source, str) and not self.source.strip()):
            raise self.invalid("source", "is required", fix="pass a file path or a notebook variable like $df")
        if self.max_tokens is not None and not self.tokenizer:
            raise self.invalid("max_tokens", "needs --tokenizer to count tokens",
                               fix="add --tokenizer <model> or drop --max-tokens")
        bad = set(self.columns) - set(ROLE_COLUMNS) - ({"text"} if self.format == "text" else set())
        if bad:
            raise self.invalid("columns", f"has unknown role(s) {sorted(bad)}",
                               fix=f"use roles {', '.join(ROLE_COLUMNS)} (text with --format text)")
        if self.format == "text":
            if not self.tokenizer:
                raise self.invalid("tokenizer", "is required with --format text (documents are cut into token "
                                                "windows)", fix="add --tokenizer <the model you will train>")
            if self.max_tokens is not None:
                raise self.invalid("max_tokens", "does not apply to --format text (windows are at most "
                                                 "--chunk-tokens long)", fix="drop --max-tokens; use --chunk-tokens")
            if self.stride is not None and self.stride > self.chunk_tokens:
                raise self.invalid("stride", f"{self.stride} is larger than --chunk-tokens {self.chunk_tokens}, so "
                                             "tokens between windows would be lost",
                                   fix=f"use --stride {self.chunk_tokens} or less")


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


def load_tokenizer_info(cfg: DataConfig, ctx) -> tuple[Any, dict[str, Any]]:
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
            from llmops_jupyter.stages.data.text import report_rows

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
        from llmops_jupyter.stages.data.text import documents_table

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


@register_stage
class DataStage(Stage):
    """Load, validate, clean, PII-scrub, template, split and version a dataset."""

    name = "data"
    extras = ()

    @classmethod
    def extras_for(cls, config) -> tuple[str, ...]:
        # chat templates and token windows need transformers; PDFs (pypdf, [pdf]) are checked when one is read
        return ("finetune",) if config.tokenizer or config.max_tokens else ()
    config_cls = DataConfig
    key_metrics = ("examples", "train", "eval", "dropped", "pii_scrubbed")

    def run(self, ctx) -> dict[str, Any]:
        from llmops_jupyter.core.pii import scrub
        from llmops_jupyter.stages.data.format import (
            DEFAULT_TEMPLATE,
            DROPPED_FILE,
            Dataset,
            example_id,
            render,
            write_dataset_dir,
        )

        cfg: DataConfig = ctx.config
        if cfg.format == "text":
            from llmops_jupyter.stages.data.text import run_text

            return run_text(ctx, cfg)
        rows, files, origins = load_rows(cfg.source)
        if cfg.limit:
            rows, origins = rows[: cfg.limit], origins[: cfg.limit]
        source = _describe_source(cfg.source)
        if not rows:
            raise DataError(f"Data source '{source}' has no examples.", path=source,
                            fix="check the file is not empty (and --limit)")
        for f in files:
            ctx.use(ctx.registry.add_reference(f, "raw-data", name=f.name))
        found = sorted({k for r in rows for k in r})
        try:
            layout, mapping = resolve_columns(found, cfg)
        except DataError as exc:
            raise DataError(f"{source}: {exc.message}", path=source, fix=exc.fix) from None

        tokenizer, tok_info = load_tokenizer_info(cfg, ctx)

        dropped: Counter = Counter()
        dropped_rows: list[dict[str, Any]] = []
        pii: Counter = Counter()
        seen: dict[str, int] = {}  # normalised example → index in `kept`
        kept: list[list[dict[str, str]]] = []
        kept_at: list[int] = []  # input row of each kept example
        total = len(rows)

        def ref(k: int) -> dict[str, Any]:
            return {"id": example_id(kept[k]), "where": origins[kept_at[k]], "messages": kept[k]}

        def drop(i: int, reason: str, msgs: list[dict[str, str]] | None = None, *, scrubbed: bool = False,
                 matched: dict | None = None, similarity: float | None = None) -> None:
            """Count the drop and keep the example (PII-scrubbed like the kept ones) for dropped.jsonl."""
            dropped[reason] += 1
            if msgs is not None and cfg.scrub_pii and not scrubbed:
                msgs = [{"role": m["role"], "content": scrub(m["content"])[0]} for m in msgs]
            dropped_rows.append({"row": i, "where": origins[i], "reason": reason, "messages": msgs,
                                 "matched": matched, "similarity": similarity})

        for i, row in enumerate(rows):
            try:
                msgs = to_messages(row, layout, mapping, cfg.system)
            except NotText as exc:
                raise DataError(f"{source}: {origins[i]}: {exc}.", path=source, fix=(
                    f"map a text column with --columns <role>=<column>, or convert it first (e.g. "
                    f"df['{exc.column}'] = df['{exc.column}'].astype(str)) and pass $df")) from None
            except (ValueError, TypeError, json.JSONDecodeError):
                drop(i, "malformed messages")
                continue
            msgs = [{"role": m["role"], "content": m["content"].strip()} for m in msgs]
            if not msgs or msgs[-1]["role"] != "assistant":
                drop(i, "no assistant response", msgs)
                continue
            if any(not m["content"] for m in msgs if m["role"] != "system"):
                drop(i, "empty text", msgs)
                continue
            if len(msgs[-1]["content"]) < cfg.min_chars:
                drop(i, f"response shorter than {cfg.min_chars} chars", msgs)
                continue
            if sum(len(m["content"]) for m in msgs) > cfg.max_chars:
                drop(i, f"longer than {cfg.max_chars} chars", msgs)
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
                    drop(i, "exact duplicate", msgs, scrubbed=True, matched=ref(seen[key]), similarity=1.0)
                    continue
                seen[key] = len(kept)
            pii.update(found_pii)
            kept.append(msgs)
            kept_at.append(i)
            if i % 500 == 0:
                ctx.progress(i + 1, total, "cleaning")
        if cfg.near_dup is not None and len(kept) > 1:
            near = near_duplicates([_norm(m) for m in kept], cfg.near_dup)
            for j, (k, sim) in near.items():
                drop(kept_at[j], "near duplicate", kept[j], scrubbed=True, matched=ref(k), similarity=round(sim, 4))
            kept_at = [r for j, r in enumerate(kept_at) if j not in near]
            kept = [m for j, m in enumerate(kept) if j not in near]

        examples = []
        example_at: dict[int, int] = {}  # id(example) → its input row
        for j, msgs in enumerate(kept):
            ex = render(msgs, tokenizer)
            if cfg.max_tokens and ex["n_tokens"] is not None and ex["n_tokens"] > cfg.max_tokens:
                drop(kept_at[j], f"longer than {cfg.max_tokens} tokens", msgs, scrubbed=True)
                continue
            examples.append(ex)
            example_at[id(ex)] = kept_at[j]
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
        if cfg.decontaminate is not None and eval_rows and train_rows:
            eval_rows = self._decontaminate(eval_rows, train_rows, cfg.decontaminate, example_at, origins, drop,
                                            source)
        dropped_rows.sort(key=lambda d: d["row"])
        examples = eval_rows + train_rows
        for rows_ in (eval_rows, train_rows):
            rows_.sort(key=lambda e: e["id"])

        unit = "tokens" if tokenizer is not None else "chars"
        lens = sorted(e["n_tokens"] if tokenizer is not None else len(e["text"]) for e in examples)
        manifest = {
            "name": cfg.name or (Path(source).stem if isinstance(cfg.source, (str, Path)) else "dataset"),
            "source": source, "files": [str(f) for f in files], "layout": layout, "columns": mapping,
            "counts": {"input": total, "kept": len(examples)}, "dropped": dict(dropped), "pii": dict(pii),
            "dedup": cfg.dedup, "near_dup": cfg.near_dup, "decontaminate": cfg.decontaminate,
            "dropped_file": DROPPED_FILE,
            "chat_template": (tokenizer.chat_template if tokenizer is not None else DEFAULT_TEMPLATE),
            "seed": cfg.seed, "eval_fraction": cfg.eval_fraction, "eval_size": cfg.eval_size,
            "lengths": {"unit": unit, "min": lens[0], "median": lens[len(lens) // 2], "max": lens[-1]},
            **tok_info,
        }
        folder = ctx.staging_dir("data")
        version = write_dataset_dir(folder, train_rows, eval_rows, manifest, dropped=dropped_rows)
        manifest = json.loads((folder / "manifest.json").read_text())
        art = ctx.save_artifact(folder, "dataset", name=manifest["name"],
                                meta={"version": version, "counts": manifest["counts"], "pii": dict(pii)})
        ctx.log_metrics({"examples": len(examples), "train": len(train_rows), "eval": len(eval_rows),
                         "dropped": sum(dropped.values()), "pii_scrubbed": sum(pii.values())})
        ctx.set_summary(version=version, dataset=art.hash, dropped=dict(dropped),
                        dropped_examples=str(Path(art.path) / DROPPED_FILE))

        def _len(e: dict) -> int:
            return e["n_tokens"] if tokenizer is not None else len(e["text"])

        if dropped.get(EVAL_NEAR_COPY):
            ctx.log(f"{dropped[EVAL_NEAR_COPY]} eval example(s) removed as near-copies of training examples "
                     f"(similarity >= {cfg.decontaminate}); listed in {Path(art.path) / DROPPED_FILE}")
        return {
            "report": DataReport(manifest, art.hash, ctx.run_id, Path(art.path)),
            "figure": length_figure([_len(e) for e in train_rows], [_len(e) for e in eval_rows], unit),
            "dataset": Dataset(art.path, art),
        }

    @staticmethod
    def _decontaminate(eval_rows: list[dict], train_rows: list[dict], threshold: float, example_at: dict[int, int],
                       origins: list[str], drop, source: str) -> list[dict]:
        """The eval split without its near-copies of training examples; each one removed is recorded (``drop``)
        beside the training example it matched. A held-out score on such copies measures memory, not skill."""
        hits = near_copies([_norm(e["messages"]) for e in eval_rows], [_norm(e["messages"]) for e in train_rows],
                           threshold)
        for i, (j, sim) in hits.items():
            ex, match = eval_rows[i], train_rows[j]
            drop(example_at[id(ex)], EVAL_NEAR_COPY, ex["messages"], scrubbed=True, similarity=round(sim, 4),
                 matched={"id": match["id"], "where": origins[example_at[id(match)]], "messages": match["messages"]})
        kept = [e for i, e in enumerate(eval_rows) if i not in hits]
        if not kept:
            raise DataError(f"Every held-out example of '{source}' is a near-copy of a training example (similarity "
                            f">= {threshold}), so the eval split would be empty.", path=source,
                            fix="remove near duplicates first (--near-dup 0.9), raise --decontaminate, or keep "
                                "them with --no-decontaminate")
        return kept

"""``%llmops data DOCS --format text``: raw documents for continued pretraining (``finetune --objective causal-lm``).

A folder or glob of ``.txt``/``.md``/``.rst``/``.html``/``.pdf`` files, or a JSONL/JSON/CSV/Parquet file (or notebook
object) whose text column holds one document per row. Each document is PII-scrubbed, de-duplicated (exact; near
duplicates opt-in) and then cut into token windows (``--chunk-tokens``, ``--stride``) that never cross a document
boundary; a document shorter than one window is one chunk. The eval split is drawn **by document** (every chunk of a
document lands in the same split), and eval documents that are near-copies of a train document are removed, so no
held-out text was trained on, even in part.

Unreadable files in a folder (binary, undecodable, a PDF pypdf cannot read or that has no text layer) are skipped and
listed in the report with the reason; a single named file that cannot be read, or a folder without one readable
document, is one error naming it and nothing is stored.

Each chunk row of the dataset::

    {"id": "<sha1 of document id + chunk index>", "doc": "<file (and line)>", "doc_id": "<sha1 of the document>",
     "chunk": i, "text": "<the window's text>", "n_tokens": int, "eos": bool}

(no ``prompt``/``completion``/``messages``: training on it is the causal-LM objective, loss on every token).
``eos`` is true on each document's last chunk only: training appends the tokenizer's end-of-text token after its
text (the manifest's ``eos_token``), so the model learns where documents end, as LLaMA-Factory's ``pt`` stage and
Unsloth's continued pretraining do (the token is an id added at training, not text in the chunk). ``n_tokens`` is the window's length as trained, that token included, and at most ``--chunk-tokens``;
the manifest's per-document ``tokens`` counts the text alone.
"""

from __future__ import annotations

import glob
import hashlib
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from llmops_jupyter.core.errors import DataError

DOC_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text", ".html", ".htm", ".pdf")
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
TEXT_COLUMNS = ("text", "content", "body", "document", "page_content")
_WS = re.compile(r"\s+")


class Unreadable(Exception):
    """A file that cannot be read as a text document; ``reason`` is what the report lists."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class _HTMLText(HTMLParser):
    """Visible text of an HTML page (stdlib parser: tolerant of broken markup, no dependency); script, style and
    head contents are dropped, block elements become line breaks."""

    SKIP = {"script", "style", "head", "noscript", "template", "svg"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "section", "article", "dt",
             "dd", "table", "ul", "ol", "blockquote", "hr", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.parts).split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def pdf_to_text(path: Path) -> str:
    from llmops_jupyter.core.extras import check

    check(["pdf"], feature=f"reading PDF documents ({path.name})")
    import logging

    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # malformed-PDF chatter goes nowhere; a failure is a reason
    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            try:
                reader.decrypt("")
            except Exception:  # noqa: BLE001 - pypdf raises several types for a password it cannot open
                raise Unreadable("encrypted PDF (needs a password)") from None
        pages = [page.extract_text() or "" for page in reader.pages]
    except Unreadable:
        raise
    except Exception as exc:  # noqa: BLE001 - pypdf's error types vary by what is broken
        raise Unreadable(f"not a readable PDF ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    if not text:
        raise Unreadable(f"PDF has no text layer ({len(pages)} page(s); scanned images need OCR first)")
    return text


def read_document(path: Path) -> str:
    """The text of one document file; :class:`Unreadable` says why not."""
    from llmops_jupyter.stages.data.format import read_text

    suffix = path.suffix.lower()
    if suffix not in DOC_SUFFIXES:
        raise Unreadable(f"not a text document type '{suffix or '(no suffix)'}' (use {', '.join(DOC_SUFFIXES)})")
    if suffix == ".pdf":
        text = pdf_to_text(path)
    else:
        head = path.read_bytes()[:8192]
        if b"\x00" in head and not head.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise Unreadable("binary file (NUL bytes), not text")
        try:
            text = read_text(path)
        except DataError as exc:
            raise Unreadable(exc.message.replace(f"{path}: ", "")) from None
        if suffix in (".html", ".htm"):
            text = html_to_text(text)
    if not text.strip():
        raise Unreadable("no text (empty document)")
    return text


def _has_glob(src: str) -> bool:
    return any(ch in src for ch in "*?[")


def collect_documents(src: Any, text_column: str | None) -> tuple[list[dict[str, str]], list[dict[str, str]],
                                                                   list[Path]]:
    """``(documents, skipped, files)``: documents as ``{"doc": name, "text": text}``; skipped files with their
    reason; the files read (recorded as raw-data references)."""
    if not isinstance(src, (str, Path)):
        return _table_documents(src, text_column), [], []
    s = str(src)
    path = Path(s).expanduser()
    if _has_glob(s) and not path.exists():
        root = None
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not found:
            raise DataError(f"Glob '{s}' matches no file.", path=s, fix="check the pattern (** matches folders)")
    elif not path.exists():
        raise DataError(f"Data source '{s}' does not exist.", path=s,
                        fix="check the path (relative paths are relative to the notebook's folder)")
    elif path.is_dir():
        root = path
        found = sorted(p for p in path.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(path).parts))
    else:
        return _single_file(path, text_column)
    docs: list[dict[str, str]] = []
    skipped: list[dict[str, str]] = []
    files: list[Path] = []
    for f in found:
        label = str(f.relative_to(root)) if root is not None else str(f)
        try:
            if f.suffix.lower() in TABLE_SUFFIXES:
                rows = _table_documents(f, text_column, label=label)
            else:
                rows = [{"doc": label, "text": read_document(f)}]
        except Unreadable as exc:
            skipped.append({"file": label, "reason": exc.reason})
            continue
        except DataError as exc:
            skipped.append({"file": label, "reason": exc.message.replace(f"{f}: ", "")})
            continue
        docs.extend(rows)
        files.append(f)
    if not docs:
        why = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        raise DataError(f"'{s}' has no readable document ({len(found)} file(s){': ' + why if why else ''}).", path=s,
                        fix=f"point it at {', '.join(DOC_SUFFIXES)} files (or a JSONL/Parquet file with a text column)")
    return docs, skipped, files


def _single_file(path: Path, text_column: str | None) -> tuple[list[dict[str, str]], list[dict[str, str]],
                                                                list[Path]]:
    if path.suffix.lower() in TABLE_SUFFIXES:
        return _table_documents(path, text_column), [], [path]
    try:
        return [{"doc": path.name, "text": read_document(path)}], [], [path]
    except Unreadable as exc:
        raise DataError(f"{path}: cannot be read as a text document: {exc.reason}.", path=str(path),
                        fix="convert it to UTF-8 text (or a PDF with a text layer), or pass a folder to skip it") from None


def _table_documents(src: Any, text_column: str | None, label: str | None = None) -> list[dict[str, str]]:
    """One document per row of a table (file, DataFrame, datasets.Dataset, list of dicts), from its text column."""
    from llmops_jupyter.stages.data.core import NotText, as_text, load_rows

    rows, _files, origins = load_rows(src)
    if label is not None:  # a table inside a folder: name rows by the folder-relative path
        origins = [f"{label} {o.split(' ', 1)[1]}" if " " in o else o for o in origins]
    found = sorted({k for r in rows for k in r})
    col = text_column
    if col is None:
        lower = {c.lower(): c for c in found}
        col = next((lower[n] for n in TEXT_COLUMNS if n in lower), None)
    where = label or (str(src) if isinstance(src, (str, Path)) else type(src).__name__)
    if col is None or col not in found:
        given = f"Column '{col}' (--columns text=...) is not in" if col else "No text column in"
        raise DataError(f"{where}: {given} the data; found columns: {', '.join(found) or '(none)'}.", path=where,
                        fix=f"name it with --columns text=<column> (looked for {', '.join(TEXT_COLUMNS)})")
    docs = []
    for row, origin in zip(rows, origins):
        try:
            text = as_text(row.get(col), col)
        except NotText as exc:
            raise DataError(f"{where}: {origin}: {exc}.", path=where,
                            fix="map a text column with --columns text=<column>") from None
        docs.append({"doc": origin, "text": text})
    return docs


def chunk_spans(text: str, tokenizer: Any, chunk_tokens: int, stride: int,
                eos: bool = False) -> tuple[list[tuple[int, int, int, bool]], int]:
    """``([(start char, end char, window tokens, ends the document)], document tokens)``: the windows of one document,
    ``chunk_tokens`` tokens each, the next one ``stride`` tokens later, the last one ending at the document's end; a
    shorter document is one window. Windows are cut at token offsets, so a chunk's text re-tokenizes to (about) its
    window and no window crosses a document.

    With ``eos`` the document is followed by one end-of-text token that counts toward its window's ``chunk_tokens``
    (what ``--seq-len`` must hold): the document's last window ends in it and no other window does. Where it would
    sit alone in a window (the text is a whole number of windows), that window starts at the last text token instead,
    which the window before already learned, so no token is a training target twice. A special token's text inside
a document (a page about tokenizers quoting ``<|endoftext|>``) is text, never that token (``split_special_tokens``),
so no end-of-text token appears mid-document."""
    enc = tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    n = len(offsets)
    if n == 0:
        return [], 0
    total = n + 1 if eos else n
    spans = []
    start = 0
    while True:
        end = min(start + chunk_tokens, total)
        first, stop = min(start, n - 1), min(end, n)  # text tokens [first, stop) of the window
        c0 = offsets[first][0] if first else 0
        c1 = offsets[stop - 1][1] if stop < n else len(text)
        last = end >= total
        spans.append((c0, c1, stop - first + (1 if eos and last else 0), eos and last))
        if last:
            return spans, n
        start += stride


def _norm_text(text: str) -> str:
    return _WS.sub(" ", text).strip().lower()


def doc_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def run_text(ctx: Any, cfg: Any) -> dict[str, Any]:
    """The data stage for ``--format text`` (see module doc)."""
    from llmops_jupyter.core.pii import scrub
    from llmops_jupyter.stages.data.core import (
        EVAL_NEAR_COPY,
        DataReport,
        _describe_source,
        length_figure,
        load_tokenizer_info,
        near_copies,
        near_duplicates,
        split_key,
    )
    from llmops_jupyter.stages.data.format import DROPPED_FILE, Dataset, write_dataset_dir

    source = _describe_source(cfg.source)
    docs, skipped, files = collect_documents(cfg.source, cfg.columns.get("text"))
    if cfg.limit:
        docs = docs[: cfg.limit]
    for f in files:
        ctx.use(ctx.registry.add_reference(f, "raw-data", name=f.name))
    tokenizer, tok_info = load_tokenizer_info(cfg, ctx)
    stride = cfg.stride or cfg.chunk_tokens
    eos_token = getattr(tokenizer, "eos_token", None)  # marks each document's end (its last chunk)
    if eos_token is None:
        ctx.log(f"tokenizer {tok_info['tokenizer']} has no end-of-text token: document ends are not marked")

    dropped: Counter = Counter()
    dropped_rows: list[dict[str, Any]] = []
    pii: Counter = Counter()
    kept: list[dict[str, Any]] = []
    seen: dict[str, int] = {}

    def drop(i: int, reason: str, text: str, matched: dict | None = None, similarity: float | None = None) -> None:
        dropped[reason] += 1
        dropped_rows.append({"row": i, "where": docs[i]["doc"], "reason": reason, "messages": None,
                             "text": text[:300], "matched": matched, "similarity": similarity})

    for i, d in enumerate(docs):
        text = d["text"].strip()
        if not text:
            drop(i, "empty text", "")
            continue
        if len(text) < cfg.min_chars:
            drop(i, f"shorter than {cfg.min_chars} chars", text)
            continue
        if cfg.scrub_pii:
            text, counts = scrub(text)
        else:
            counts = Counter()
        if cfg.dedup:
            key = _norm_text(text)
            if key in seen:
                k = seen[key]
                drop(i, "exact duplicate", text, matched={"where": kept[k]["doc"], "text": kept[k]["text"][:300]},
                     similarity=1.0)
                continue
            seen[key] = len(kept)
        pii.update(counts)
        kept.append({"doc": d["doc"], "text": text, "row": i})
    if cfg.near_dup is not None and len(kept) > 1:
        near = near_duplicates([_norm_text(k["text"]) for k in kept], cfg.near_dup)
        for j, (k, sim) in near.items():
            drop(kept[j]["row"], "near duplicate", kept[j]["text"],
                 matched={"where": kept[k]["doc"], "text": kept[k]["text"][:300]}, similarity=round(sim, 4))
        kept = [d for j, d in enumerate(kept) if j not in near]
    if not kept:
        reasons = ", ".join(f"{k}: {v}" for k, v in dropped.items()) or "none"
        raise DataError(f"No documents left after cleaning '{source}' (dropped — {reasons}).", path=source,
                        fix="relax --min-chars or check the text column")

    # the split is drawn over documents: every chunk of a document goes where the document goes
    for d in kept:
        d["doc_id"] = doc_hash(d["text"])
    kept.sort(key=lambda d: split_key(cfg.seed, d["doc_id"]))
    n_eval = cfg.eval_size if cfg.eval_size is not None else round(len(kept) * cfg.eval_fraction)
    if cfg.eval_fraction > 0 and cfg.eval_size is None and len(kept) > 1:
        n_eval = max(1, n_eval)
    n_eval = min(n_eval, len(kept) - 1)
    eval_docs, train_docs = kept[:n_eval], kept[n_eval:]
    if cfg.decontaminate is not None and eval_docs and train_docs:
        hits = near_copies([_norm_text(d["text"]) for d in eval_docs], [_norm_text(d["text"]) for d in train_docs],
                           cfg.decontaminate)
        for i, (j, sim) in hits.items():
            drop(eval_docs[i]["row"], EVAL_NEAR_COPY, eval_docs[i]["text"],
                 matched={"where": train_docs[j]["doc"], "text": train_docs[j]["text"][:300]},
                 similarity=round(sim, 4))
        eval_docs = [d for i, d in enumerate(eval_docs) if i not in hits]
        if not eval_docs and n_eval:
            raise DataError(f"Every held-out document of '{source}' is a near-copy of a training document "
                            f"(similarity >= {cfg.decontaminate}), so the eval split would be empty.", path=source,
                            fix="remove near duplicates first (--near-dup 0.9), or keep them with --no-decontaminate")

    documents: list[dict[str, Any]] = []
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    for split, group in (("eval", eval_docs), ("train", train_docs)):
        for d in sorted(group, key=lambda d: d["row"]):
            spans, n_doc = chunk_spans(d["text"], tokenizer, cfg.chunk_tokens, stride, eos=eos_token is not None)
            for c, (c0, c1, n, ends) in enumerate(spans):
                splits[split].append({"id": hashlib.sha1(f"{d['doc_id']}:{c}".encode()).hexdigest()[:16],
                                      "doc": d["doc"], "doc_id": d["doc_id"], "chunk": c, "text": d["text"][c0:c1],
                                      "n_tokens": n, "eos": ends})
            documents.append({"doc": d["doc"], "doc_id": d["doc_id"], "split": split, "chars": len(d["text"]),
                              "tokens": n_doc, "chunks": len(spans)})
        ctx.progress(len(documents), len(eval_docs) + len(train_docs), "chunking")
    documents.sort(key=lambda d: d["doc"])
    dropped_rows.sort(key=lambda d: d["row"])
    train_rows, eval_rows = splits["train"], splits["eval"]
    lens = sorted(r["n_tokens"] for r in train_rows + eval_rows)
    manifest = {
        "name": cfg.name or (Path(source).stem.replace("*", "") or "docs" if isinstance(cfg.source, (str, Path))
                             else "documents"),
        "source": source, "files": [str(f) for f in files], "layout": "text",
        "columns": {"text": cfg.columns["text"]} if "text" in cfg.columns else {},
        "counts": {"input": len(docs), "kept": len(train_rows) + len(eval_rows), "documents": len(documents),
                   "train_documents": len(train_docs), "eval_documents": len(eval_docs)},
        "dropped": dict(dropped), "pii": dict(pii), "skipped": skipped, "documents": documents,
        "chunk_tokens": cfg.chunk_tokens, "stride": stride, "eos_token": eos_token,
        "dedup": cfg.dedup, "near_dup": cfg.near_dup, "decontaminate": cfg.decontaminate,
        "dropped_file": DROPPED_FILE, "chat_template": None,
        "seed": cfg.seed, "eval_fraction": cfg.eval_fraction, "eval_size": cfg.eval_size,
        "lengths": {"unit": "tokens", "min": lens[0], "median": lens[len(lens) // 2], "max": lens[-1]},
        **tok_info,
    }
    folder = ctx.staging_dir("data")
    version = write_dataset_dir(folder, train_rows, eval_rows, manifest, dropped=dropped_rows)
    import json

    manifest = json.loads((folder / "manifest.json").read_text())
    art = ctx.save_artifact(folder, "dataset", name=manifest["name"],
                            meta={"version": version, "counts": manifest["counts"], "pii": dict(pii),
                                  "layout": "text"})
    ctx.log_metrics({"examples": len(train_rows) + len(eval_rows), "train": len(train_rows), "eval": len(eval_rows),
                     "documents": len(documents), "dropped": sum(dropped.values()), "skipped_files": len(skipped),
                     "pii_scrubbed": sum(pii.values())})
    ctx.set_summary(version=version, dataset=art.hash, dropped=dict(dropped), skipped=skipped,
                    dropped_examples=str(Path(art.path) / DROPPED_FILE))
    for s in skipped:
        ctx.log(f"skipped {s['file']}: {s['reason']}")
    return {
        "report": DataReport(manifest, art.hash, ctx.run_id, Path(art.path)),
        "figure": length_figure([r["n_tokens"] for r in train_rows], [r["n_tokens"] for r in eval_rows], "tokens"),
        "dataset": Dataset(art.path, art),
    }



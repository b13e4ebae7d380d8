"""Retrieval-augmented generation: chunk documents, embed them with MiniLM, search with faiss.

Why faiss-cpu: it is the maintained reference library for dense vector search, installs as a wheel with no
service to run, stores an index as one file that fits the content-addressed artifact store, and scales from the
exact inner-product index used here (cosine on normalised MiniLM vectors) to IVF/HNSW when corpora grow — while
embedded databases (LanceDB, Chroma) bring their own storage layer we would have to version beside the registry.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.errors import DataError, require

if TYPE_CHECKING:
    from llmops_jupyter.registry import Registry

TEXT_SUFFIXES = (".txt", ".md", ".rst")
CONTEXT_TEMPLATE = "Answer using only this context.\n\nContext:\n{context}\n\nQuestion: {question}"


def chunk_text(text: str, size: int = 500, overlap: int = 50) -> list[tuple[int, str]]:
    """(start offset, chunk) pairs of about ``size`` characters, cut at whitespace, overlapping by ``overlap``."""
    text = re.sub(r"[ \t]+", " ", text).strip()
    if len(text) <= size:
        return [(0, text)] if text else []
    out = []
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind(" ", start + size // 2, end)
            end = cut if cut > start else end
        out.append((start, text[start:end].strip()))
        if end >= len(text):
            break
        nxt = end - overlap
        space = text.find(" ", nxt)
        start = space + 1 if 0 <= space < end else max(nxt, start + 1)
    return out


def load_documents(source: str | Path, text_column: str = "text") -> list[tuple[str, str]]:
    """(document name, text) from a folder of .txt/.md/.rst files, one such file, or a JSONL with a text column."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"Document source '{source}' does not exist.", path=str(source), fix="check the path")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"Folder '{source}' has no {'/'.join(TEXT_SUFFIXES)} files.", path=str(source),
                            fix="point --source at a folder of text/markdown documents")
        return [(p.relative_to(path).as_posix(), p.read_text(encoding="utf-8")) for p in files]
    if path.suffix.lower() == ".jsonl":
        from llmops_jupyter.stages.data.format import read_jsonl

        docs = []
        for i, row in enumerate(read_jsonl(path), 1):
            if text_column not in row:
                raise DataError(f"{path}: line {i} has no '{text_column}' field (found: {', '.join(row)}).",
                                path=str(path), line=i, fix="pass --text-column with the right field")
            docs.append((str(row.get("id", f"{path.name}:{i}")), str(row[text_column])))
        return docs
    return [(path.name, path.read_text(encoding="utf-8"))]


class VectorIndex:
    """A loaded ``index`` artifact: chunks + faiss inner-product index over normalised MiniLM embeddings."""

    def __init__(self, path: Path, artifact: Any = None):
        faiss = require("faiss", "eval", package="faiss-cpu")
        self.path = Path(path)
        self.artifact = artifact  # the registry artifact when loaded by reference (for lineage)
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self.chunks = [json.loads(line) for line in (self.path / "chunks.jsonl").read_text().splitlines() if line]
        self.index = faiss.read_index(str(self.path / "index.faiss"))

    def search(self, queries: list[str], k: int = 3) -> list[list[dict[str, Any]]]:
        from llmops_jupyter.models.embeddings import embed

        vecs = embed(queries).astype("float32")
        scores, ids = self.index.search(vecs, min(k, len(self.chunks)))
        return [[{**self.chunks[i], "score": float(s)} for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]


def build(docs: list[tuple[str, str]], folder: Path, *, chunk_size: int, overlap: int) -> dict[str, Any]:
    faiss = require("faiss", "eval", package="faiss-cpu")
    from llmops_jupyter.models.embeddings import EMBEDDER_NAME, embed

    chunks = []
    for doc, text in docs:
        for start, piece in chunk_text(text, chunk_size, overlap):
            chunks.append({"id": len(chunks), "doc": doc, "start": start, "text": piece})
    if not chunks:
        raise DataError("The documents contain no text to index.", fix="check the source folder/file")
    vecs = embed([c["text"] for c in chunks]).astype("float32")
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(vecs)
    faiss.write_index(index, str(folder / "index.faiss"))
    (folder / "chunks.jsonl").write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in chunks) + "\n")
    manifest = {"embedder": EMBEDDER_NAME, "dims": int(vecs.shape[1]), "chunks": len(chunks), "documents": len(docs),
                "chunk_size": chunk_size, "overlap": overlap, "metric": "cosine (inner product, normalised)"}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def load_index(ref: str | Path, registry: Registry) -> VectorIndex:
    p = Path(str(ref))
    if (p / "index.faiss").exists():
        return VectorIndex(p)
    art = registry.get_artifact(str(ref), kind="index")
    if art.kind != "index":
        raise DataError(f"Artifact '{ref}' is a {art.kind}, not an index.", fix="pass an index run or hash")
    return VectorIndex(art.path, art)


def augment(question: str, hits: list[dict[str, Any]], template: str = CONTEXT_TEMPLATE) -> str:
    context = "\n".join(f"[{i + 1}] {h['text']}" for i, h in enumerate(hits))
    return template.format(context=context, question=question)


def recall_at_k(index: VectorIndex, questions: list[str], expected_docs: list[str], k: int = 3) -> float:
    """Share of questions whose expected document is among the top-k retrieved chunks."""
    hits = index.search(questions, k)
    found = sum(any(h["doc"] == doc for h in hs) for hs, doc in zip(hits, expected_docs))
    return found / max(1, len(questions))

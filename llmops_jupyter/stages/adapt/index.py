"""``%llmops index SOURCE``: build a versioned vector index over documents for retrieval-augmented generation."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.stage import Stage, register_stage


@dataclasses.dataclass
class IndexConfig(StageConfig):
    source: str = option(help="folder of .txt/.md/.rst documents, one such file, or a JSONL with a text field",
                         positional=True)
    chunk_size: int = option(500, "characters per chunk (cut at whitespace)", min=50, max=20000)
    overlap: int = option(50, "characters shared by consecutive chunks", min=0, max=5000)
    text_column: str = option("text", "field holding the text in a JSONL source")
    name: str | None = option(None, "index name shown in the registry (default: the source folder/file name)")
    questions: str | None = option(None, "JSONL of {question, doc} pairs: report retrieval recall@k on them")
    k: int = option(3, "top-k used for the recall report", min=1, max=100)

    def validate(self) -> None:
        if self.overlap >= self.chunk_size:
            raise self.invalid("overlap", f"must be smaller than --chunk-size ({self.chunk_size})",
                               fix="use an overlap of about 10% of the chunk size")


@register_stage
class IndexStage(Stage):
    """Chunk documents with overlap, embed them (MiniLM) and store a faiss index as a registry artifact."""

    name = "index"
    extras = ("eval",)  # sentence-transformers + faiss
    config_cls = IndexConfig
    key_metrics = ("recall_at_*", "chunks", "documents")

    def run(self, ctx) -> dict[str, Any]:
        from llmops_jupyter.core.display import Table
        from llmops_jupyter.stages.adapt.rag import VectorIndex, build, load_documents, recall_at_k

        cfg: IndexConfig = ctx.config
        src = Path(cfg.source).expanduser()
        docs = load_documents(src, cfg.text_column)
        ctx.use(ctx.registry.add_reference(src, "documents", name=src.name))
        folder = ctx.staging_dir("index")
        ctx.progress(0, len(docs), "embedding")
        manifest = build(docs, folder, chunk_size=cfg.chunk_size, overlap=cfg.overlap)
        art = ctx.save_artifact(folder, "index", name=cfg.name or src.stem, meta=manifest)
        metrics = {"chunks": manifest["chunks"], "documents": manifest["documents"]}
        if cfg.questions:
            from llmops_jupyter.stages.data.format import read_jsonl

            qs = read_jsonl(Path(cfg.questions))
            metrics[f"recall_at_{cfg.k}"] = recall_at_k(VectorIndex(art.path), [q["question"] for q in qs],
                                                        [q["doc"] for q in qs], cfg.k)
        ctx.log_metrics(metrics)
        ctx.set_summary(index=art.hash, **manifest)
        return {"report": Table(["field", "value"], [["index", art.short], *sorted(metrics.items()),
                                                     ["embedder", manifest["embedder"]]], title="Vector index")}

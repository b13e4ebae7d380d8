"""Adaptation without new weights: versioned prompts and retrieved context applied to eval items and requests.

One function, :func:`build_messages`, decides how a prompt version and retrieved chunks change the messages a
model sees — the eval stage (``--prompt`` / ``--rag``) and the server (``serve --prompt`` / ``--rag``) both call
it, so an A/B result in eval is exactly what a deployment would send.

* A prompt template's **system part** replaces the example's system message; its **user part** replaces the last
  user message. Variables are filled from the example's fields (a questions JSONL row's keys, or for a dataset
  example ``question`` / ``instruction`` / ``input`` = the last user message), plus ``context`` (the retrieved
  chunks, numbered) when retrieval is on.
* Retrieved chunks go into the template's ``{context}`` variable when it has one, else the user message is wrapped
  with :func:`llmops_jupyter.stages.adapt.rag.augment` ("Context: ... Question: ..."), the layout monitoring's grounding check
  (:func:`llmops_jupyter.stages.monitor.analysis.split_context`) recognises in logged traffic.

Standard library only at top level (the stage modules import it).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.errors import DataError

if TYPE_CHECKING:
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.stages.adapt.prompts import PromptTemplate

#: names under which the last user message is offered to a template (besides the example's own fields)
QUESTION_ALIASES = ("question", "instruction", "input", "query", "user")


# -- messages ------------------------------------------------------------------------------------------------------
def format_context(hits: list[dict[str, Any]]) -> str:
    """Retrieved chunks as the numbered block that :func:`llmops_jupyter.stages.adapt.rag.augment` also writes."""
    return "\n".join(f"[{i + 1}] {h['text']}" for i, h in enumerate(hits))


def build_messages(messages: list[dict[str, str]], *, template: PromptTemplate | None = None,
                   hits: list[dict[str, Any]] | None = None, fields: dict[str, Any] | None = None
                   ) -> list[dict[str, str]]:
    """The conversation (without the answer) as the model should see it under ``template`` and ``hits``."""
    from llmops_jupyter.stages.adapt.rag import augment

    msgs = [dict(m) for m in messages]
    if template is None and not hits:
        return msgs
    user_at = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
    if user_at is None:
        raise DataError("The conversation has no user message to apply the prompt / context to.",
                        fix="each example (or request) needs a user turn")
    question = str(msgs[user_at]["content"])
    if template is None:
        msgs[user_at] = {"role": "user", "content": augment(question, hits or [])}
        return msgs
    values: dict[str, Any] = {k: question for k in QUESTION_ALIASES}
    values.update({k: v for k, v in (fields or {}).items() if v is not None})
    values["context"] = format_context(hits or [])
    rendered = template.render(**values)
    system = next((m["content"] for m in rendered if m["role"] == "system"), None)
    user = next(m["content"] for m in rendered if m["role"] == "user")
    if hits and "context" not in template.variables:
        user = augment(user, hits)
    head = msgs[:user_at]
    if system is not None:
        head = [{"role": "system", "content": system}] + [m for m in head if m["role"] != "system"]
    return [*head, {"role": "user", "content": user}, *msgs[user_at + 1:]]


# -- eval items ------------------------------------------------------------------------------------------------------
def is_questions_file(ref: str) -> bool:
    p = Path(str(ref))
    return p.suffix.lower() == ".jsonl" and p.is_file()


def question_items(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Eval items from a JSONL of ``{question, answer[, doc, ...]}`` rows (the RAG eval set format)."""
    from llmops_jupyter.stages.data.format import read_jsonl

    path = Path(path)
    rows = read_jsonl(path)
    items = []
    for i, row in enumerate(rows, 1):
        q = row.get("question", row.get("instruction"))
        a = row.get("answer", row.get("response", row.get("reference")))
        if not q or a is None:
            raise DataError(f"{path}: line {i} needs 'question' and 'answer' fields (found: {', '.join(row)}).",
                            path=str(path), line=i, fix="write one {\"question\": ..., \"answer\": ...} per line")
        msgs = [{"role": "user", "content": str(q)}, {"role": "assistant", "content": str(a)}]
        ex_id = str(row.get("id") or hashlib.sha1(json.dumps([q, a]).encode()).hexdigest()[:16])
        items.append({"id": ex_id, "messages": msgs, "reference": str(a), "user": str(q),
                      "fields": {k: v for k, v in row.items() if k not in ("answer", "response", "reference")}})
        if limit and len(items) >= limit:
            break
    if not items:
        raise DataError(f"{path} has no questions.", path=str(path), fix="add {\"question\", \"answer\"} lines")
    return items


def item_fields(item: dict[str, Any]) -> dict[str, Any]:
    """Template variables an eval item offers: its own fields, else the last user / system message."""
    if "fields" in item:
        return item["fields"]
    out: dict[str, Any] = {}
    system = next((m["content"] for m in item["messages"] if m["role"] == "system"), None)
    if system:
        out["system"] = system
    return out


def retrieve(index: Any, items: list[dict[str, Any]], k: int) -> None:
    """Attach the top-``k`` chunks for each item's question (``hits``, ``context``) in one batched search."""
    hits = index.search([it["user"] for it in items], k)
    for it, hs in zip(items, hits):
        it["hits"] = [{"id": h["id"], "doc": h["doc"], "score": round(float(h["score"]), 6), "text": h["text"]}
                      for h in hs]
        it["context"] = format_context(hs)


def save_retrievals(registry: Registry, run_id: str, index_hash: str | None, items: list[dict[str, Any]]) -> None:
    """Record which chunks each eval item got (``items`` in eval order, each with ``id`` and its ``hits``)."""
    registry.add_eval_retrievals(run_id, index_hash, [
        {"example_id": it["id"], "chunk_ids": [h["id"] for h in it.get("hits", [])],
         "docs": [h["doc"] for h in it.get("hits", [])], "scores": [h["score"] for h in it.get("hits", [])]}
        for it in items])


def retrievals(registry: Registry, run: str) -> list[dict[str, Any]]:
    """The chunks retrieved per example of an eval run (in eval order)."""
    return registry.eval_retrievals(registry.resolve_run(run))


# -- serving ----------------------------------------------------------------------------------------------------------
class RequestAdapter:
    """Applied by the server to each chat request: the stored prompt's parts and/or retrieved context.

    ``__call__(messages) -> (messages, info)``; ``info`` (prompt ref, index hash, chunk ids, docs) is logged with
    the request so monitoring knows which context the answer should be grounded in.
    """

    def __init__(self, template: PromptTemplate | None = None, index: Any = None, k: int = 3,
                 index_hash: str | None = None):
        self.template, self.index, self.k, self.index_hash = template, index, k, index_hash

    @classmethod
    def from_refs(cls, registry: Registry, prompt: str | None, rag: str | None, k: int = 3) -> RequestAdapter | None:
        if not prompt and not rag:
            return None
        from llmops_jupyter.stages.adapt.prompts import get_prompt
        from llmops_jupyter.stages.adapt.rag import load_index

        template = get_prompt(prompt, registry) if prompt else None
        index = load_index(rag, registry) if rag else None
        art = getattr(index, "artifact", None)
        return cls(template, index, k, index_hash=art.hash if art is not None else rag)

    def __call__(self, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], dict[str, Any]]:
        info: dict[str, Any] = {}
        hits = None
        if self.template is not None:
            info["prompt_ref"] = self.template.ref
        if self.index is not None:
            question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            hits = self.index.search([question], self.k)[0] if question else []
            info.update(rag_index=self.index_hash, rag_chunks=[h["id"] for h in hits],
                        rag_docs=[h["doc"] for h in hits])
        return build_messages(messages, template=self.template, hits=hits), info

"""The generation engine behind the HTTP server: one worker thread owns the model.

Why one thread: a transformers model is not safe to call from several threads at once, and generation must not
block the event loop (``/health`` and the 429 path stay responsive while the model works). Concurrent
non-streaming requests with the same sampling settings are **micro-batched**: the worker drains the queue (waiting
at most ``batch_wait_s`` for company) and runs them as one left-padded batch through
:func:`llmops_jupyter.models.inference.generate`. Streaming requests run alone with a streamer that hands text pieces
back to the event loop thread-safely.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import queue
import threading
import time
from typing import Any

from llmops_jupyter.models.refs import ModelRef

_STOP = object()


@dataclasses.dataclass
class GenRequest:
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = dataclasses.field(default_factory=list)
    #: for streaming: (loop, asyncio.Queue) receiving ("text", str) items then ("end", info)
    stream: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def batch_key(self) -> tuple:
        return (self.max_tokens, self.temperature > 0, round(self.temperature, 4), round(self.top_p, 4))


@dataclasses.dataclass
class GenResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    batch_size: int = 1


def apply_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut ``text`` at the first stop sequence (OpenAI semantics: the stop text itself is not returned)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class _Worker:
    """One worker thread owns the model and takes requests from a queue (what every engine shares)."""

    def _start_worker(self, name: str) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.stats = {"batches": 0, "requests": 0, "max_batch_seen": 0}
        self._thread.start()

    def submit(self, req: GenRequest) -> GenRequest:
        if not self._thread.is_alive():
            req.future.set_exception(RuntimeError("the generation engine is stopped"))
            return req
        self._queue.put(req)
        return req

    def stop(self, timeout: float = 60.0) -> None:
        """Finish what is queued, then end the worker thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _work(self) -> None:  # pragma: no cover - each engine defines it
        raise NotImplementedError


class Engine(_Worker):
    """Loads a model version once and serves generation requests from a single worker thread."""

    kind = "transformers"

    def __init__(self, model: ModelRef | str, *, registry: Any = None, device: str | None = None,
                 max_batch: int = 8, batch_wait_s: float = 0.01):
        from llmops_jupyter.models.inference import load_model, load_tokenizer

        self.model_ref = model
        self.net, self.tokenizer = load_model(model, registry=registry, device=device)
        # A second tokenizer for counting in the event loop: fast tokenizers raise "Already borrowed" when one
        # instance is used from two threads while the worker changes its padding settings.
        tok_path = getattr(self.tokenizer, "name_or_path", None)
        self.count_tokenizer = load_tokenizer(tok_path) if tok_path else self.tokenizer
        self.context_length = int(getattr(self.net.config, "max_position_embeddings", 2048) or 2048)
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self._start_worker("llmops-serve-engine")

    # -- API used by the app ----------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return len(self.count_tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        from llmops_jupyter.models.inference import apply_chat

        return apply_chat(self.count_tokenizer, messages)

    # -- worker -------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        pending: list[GenRequest] = []
        while True:
            item = pending.pop(0) if pending else self._queue.get()
            if item is _STOP:
                for p in pending:  # requests queued behind the stop marker still get served
                    self._run_one(p)
                return
            if item.stream is not None:
                self._run_stream(item)
                continue
            batch = [item]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is not _STOP and nxt.stream is None and nxt.batch_key == item.batch_key:
                    batch.append(nxt)
                else:
                    pending.append(nxt)
                    if nxt is _STOP:
                        break
            self._run_batch(batch)

    def _run_one(self, req: Any) -> None:
        if req is _STOP:
            return
        if req.stream is not None:
            self._run_stream(req)
        else:
            self._run_batch([req])

    def _run_batch(self, batch: list[GenRequest]) -> None:
        from llmops_jupyter.models.inference import generate

        first = batch[0]
        try:
            gens = generate(self.net, self.tokenizer, [r.prompt for r in batch], max_new_tokens=first.max_tokens,
                            batch_size=len(batch), do_sample=first.temperature > 0,
                            temperature=max(first.temperature, 1e-5), top_p=first.top_p, seed=first.seed)
        except BaseException as exc:  # noqa: BLE001 - every waiting request learns about the failure
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(exc)
            return
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(batch))
        for r, g in zip(batch, gens, strict=True):
            text, stopped = apply_stop(g.text, r.stop)
            r.future.set_result(GenResult(text, g.prompt_tokens, g.new_tokens,
                                          "stop" if stopped else g.finish_reason, len(batch)))

    def _run_stream(self, req: GenRequest) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

        loop, out = req.stream  # type: ignore[misc]
        eos = self.tokenizer.eos_token_id
        state = {"tokens": 0, "last": None, "text": ""}

        def push(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(out.put_nowait, (kind, value))

        class _Streamer(TextStreamer):
            def put(self, value):  # noqa: D401 - counts generated tokens as they arrive
                if not self.next_tokens_are_prompt:
                    ids = value.reshape(-1).tolist()
                    state["tokens"] += len(ids)
                    state["last"] = ids[-1] if ids else state["last"]
                super().put(value)

            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    state["text"] += text
                    push("text", text)

        class _Cancel(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return req.cancelled.is_set() or (bool(req.stop) and apply_stop(state["text"], req.stop)[1])

        try:
            enc = self.tokenizer([req.prompt], return_tensors="pt", add_special_tokens=False)
            device = next(self.net.parameters()).device
            enc = {k: v.to(device) for k, v in enc.items()}
            kwargs: dict[str, Any] = {"max_new_tokens": req.max_tokens, "do_sample": req.temperature > 0,
                                      "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": eos,
                                      "streamer": _Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True),
                                      "stopping_criteria": StoppingCriteriaList([_Cancel()])}
            if req.temperature > 0:
                torch.manual_seed(req.seed)
                kwargs.update(temperature=req.temperature, top_p=req.top_p)
            with torch.inference_mode():
                self.net.generate(**enc, **kwargs)
            tokens = state["tokens"]
            finish = "stop" if (state["last"] == eos or apply_stop(state["text"], req.stop)[1]) else "length"
            if state["last"] == eos:
                tokens -= 1
            self.stats["requests"] += 1
            result = GenResult(state["text"], int(enc["input_ids"].shape[1]), tokens, finish)
            req.future.set_result(result)
            push("end", result)
        except BaseException as exc:  # noqa: BLE001
            if not req.future.done():
                req.future.set_exception(exc)
            push("error", exc)


class LlamaCppEngine(_Worker):
    """The same engine interface over llama.cpp (``llama-cpp-python``) for a ``gguf`` model version.

    One worker thread owns the ``Llama`` object (it is not thread-safe); requests run one at a time (llama.cpp's
    own batching is per sequence here, so ``max_batch`` is accepted and ignored). Chat prompts are rendered with the
    chat template stored in the GGUF, as ``Llama.create_chat_completion`` does, so what was parity-checked at export
    is what is served.
    """

    kind = "llama.cpp"

    def __init__(self, model: ModelRef | str, *, registry: Any = None, device: str | None = None,
                 max_batch: int = 8, batch_wait_s: float = 0.01, n_ctx: int = 4096):
        from pathlib import Path

        from llmops_jupyter.stages.export.convert import read_metadata
        from llmops_jupyter.stages.export.parity import gguf_file, load_llama

        self.model_ref = model
        path = gguf_file(Path(getattr(model, "path", model)))
        meta = read_metadata(path)
        arch = meta.get("general.architecture", "llama")
        self.context_length = int(min(n_ctx, int(meta.get(f"{arch}.context_length", n_ctx) or n_ctx)))
        gpu = bool(device and device.startswith("cuda"))
        self.llm = load_llama(path, n_ctx=self.context_length, n_gpu_layers=-1 if gpu else 0)
        self.template = meta.get("tokenizer.chat_template")
        self._bos = self._piece(self.llm.token_bos())
        self._eos = self._piece(self.llm.token_eos())
        self.max_batch = 1
        self._start_worker("llmops-serve-llamacpp")

    def _piece(self, tok: int) -> str:
        return self.llm.detokenize([tok], special=True).decode("utf-8", errors="replace") if tok >= 0 else ""

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        if self.template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            return Jinja2ChatFormatter(template=self.template, eos_token=self._eos, bos_token=self._bos)(
                messages=messages).prompt
        from llmops_jupyter.stages.data.format import render

        return render([*messages, {"role": "assistant", "content": ""}], None)["prompt"]

    def stop(self, timeout: float = 60.0) -> None:
        super().stop(timeout)
        close = getattr(self.llm, "close", None)
        if close is not None and not self._thread.is_alive():
            close()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            self._run(item)

    def _kwargs(self, req: GenRequest) -> dict[str, Any]:
        kw: dict[str, Any] = {"max_tokens": req.max_tokens, "stop": list(req.stop) or None, "seed": req.seed}
        if req.temperature > 0:
            kw.update(temperature=req.temperature, top_p=req.top_p)
        else:
            kw.update(temperature=0.0, top_k=1)
        return kw

    def _run(self, req: GenRequest) -> None:
        try:
            if req.stream is None:
                out = self.llm.create_completion(req.prompt, **self._kwargs(req))
                choice, usage = out["choices"][0], out["usage"]
                result = GenResult(choice["text"], usage["prompt_tokens"], usage["completion_tokens"],
                                   choice.get("finish_reason") or "stop")
                req.future.set_result(result)
            else:
                loop, q = req.stream

                def push(kind: str, value: Any) -> None:
                    loop.call_soon_threadsafe(q.put_nowait, (kind, value))

                text, tokens, finish = "", 0, "length"
                prompt_tokens = self.count_tokens(req.prompt)
                for chunk in self.llm.create_completion(req.prompt, stream=True, **self._kwargs(req)):
                    if req.cancelled.is_set():
                        finish = "stop"
                        break
                    choice = chunk["choices"][0]
                    piece = choice.get("text") or ""
                    if piece:
                        tokens += 1
                        text += piece
                        push("text", piece)
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                result = GenResult(text, prompt_tokens, tokens, finish)
                req.future.set_result(result)
                push("end", result)
            self.stats["requests"] += 1
            self.stats["batches"] += 1
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], 1)
        except BaseException as exc:  # noqa: BLE001 - the waiting request learns about the failure
            if not req.future.done():
                req.future.set_exception(exc)
            if req.stream is not None:
                loop, q = req.stream
                loop.call_soon_threadsafe(q.put_nowait, ("error", exc))


def make_engine(model: ModelRef, **kwargs: Any) -> Engine | LlamaCppEngine:
    """The engine for a model version: llama.cpp for a ``gguf`` artifact, transformers for everything else."""
    if getattr(model, "kind", None) == "gguf":
        return LlamaCppEngine(model, **kwargs)
    return Engine(model, **kwargs)

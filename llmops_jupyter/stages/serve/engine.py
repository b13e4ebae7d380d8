"""The generation engine behind the HTTP server: one worker thread owns the model.

Why one thread: a transformers model is not safe to call from several threads at once, and generation must not
block the event loop (``/health`` and the 429 path stay responsive while the model works). Concurrent requests,
streaming or not, whatever their sampling settings, are **continuously batched** (:mod:`.batching`): they join the
running batch between decode steps and leave it when they finish, so up to ``max_batch`` requests share every
forward pass. A model whose cache cannot be joined row by row (sliding-window attention) is served one request at
a time through ``generate`` (the ``_generate``/``_run_stream`` path below).
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
from llmops_jupyter.stages.serve.results import GenResult, TokenLogprob, apply_stop  # noqa: F401 (re-exported)

_STOP = object()


@dataclasses.dataclass
class GenRequest:
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = dataclasses.field(default_factory=list)
    #: the prompt as token ids (``/v1/completions`` accepts them); when set, ``prompt`` is only for the log
    prompt_ids: list[int] | None = None
    #: log-probabilities of the generated tokens with this many alternatives each (None: none)
    logprobs: int | None = None
    #: also the log-probabilities of the prompt's tokens (``echo`` on ``/v1/completions``)
    echo: bool = False
    #: llguidance grammar (see :mod:`.constrained`) the output must follow
    grammar: str | None = None
    #: the JSON Schema of ``response_format`` (``{"type": "object"}`` for JSON mode): what the llama.cpp engine
    #: constrains with (llama.cpp's own grammar), where the transformers engine uses ``grammar``
    json_schema: dict[str, Any] | None = None
    #: for streaming: (loop, asyncio.Queue) receiving ("text", str) items then ("end", info)
    stream: tuple[asyncio.AbstractEventLoop, asyncio.Queue] | None = None
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def batch_key(self) -> tuple:
        return (self.max_tokens, self.temperature > 0, round(self.temperature, 4), round(self.top_p, 4))


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
        #: set when the model's cache cannot be batched row by row: requests then go through ``generate`` alone
        self._legacy = False
        self._start_worker("llmops-serve-engine")

    # -- API used by the app ----------------------------------------------------------------------------------
    supports = frozenset({"logprobs", "echo", "tools", "response_format", "token_prompts"})

    def count_tokens(self, text: str) -> int:
        return len(self.count_tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def tool_format(self) -> str | None:
        """How the model's chat template writes tool calls (None: it has no tool support)."""
        from llmops_jupyter.stages.serve.tools import template_tools

        return template_tools(getattr(self.count_tokenizer, "chat_template", None))

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        from llmops_jupyter.models.inference import apply_chat

        if tools:
            return self.count_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                            add_generation_prompt=True)
        return apply_chat(self.count_tokenizer, messages)

    def token_text(self, token_id: int) -> str:
        return self.count_tokenizer.decode([token_id])

    def decode(self, ids: list[int]) -> str:
        return self.count_tokenizer.decode(ids)

    def vocab_size(self) -> int:
        return int(self.net.get_output_embeddings().weight.shape[0])

    def check_grammar(self, grammar: str) -> None:
        """Build a matcher once (in the caller's thread) so a grammar the engine cannot run is a 400, not a 500."""
        self._grammar_info().matcher(grammar)

    def _grammar_info(self):
        if getattr(self, "_llg", None) is None:
            from llmops_jupyter.stages.serve.constrained import TokenizerInfo

            self._llg = TokenizerInfo(self.count_tokenizer, self.vocab_size())
        return self._llg

    # -- worker -------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        """Continuous batching (:mod:`.batching`): admit what arrived, run one decode step, repeat. ``max_batch``
        caps the running rows (1 = one request at a time, the benchmark's baseline)."""
        from llmops_jupyter.stages.serve.batching import NotBatchable, Scheduler

        sched = Scheduler(self)
        stopping = False
        while True:
            new: list[Any] = []
            if not sched.rows:
                if stopping:  # requests queued behind the stop marker still get served
                    try:
                        new.append(self._queue.get_nowait())
                    except queue.Empty:
                        return
                else:
                    new.append(self._queue.get())
                    deadline = time.monotonic() + self.batch_wait_s
                    while self.max_batch > 1 and len(new) < self.max_batch and new[-1] is not _STOP:
                        try:  # a moment for company, so that a burst shares one prefill
                            new.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
                        except queue.Empty:
                            break
            while len(sched.rows) + len(new) < self.max_batch and (not new or new[-1] is not _STOP):
                try:
                    new.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            reqs = [x for x in new if x is not _STOP]
            stopping = stopping or len(reqs) < len(new)
            if reqs:
                if self._legacy:
                    for r in reqs:
                        self._run_one(r)
                else:
                    try:
                        sched.admit(reqs)
                    except NotBatchable:  # e.g. sliding-window caches: serve one at a time with generate()
                        self._legacy = True
                        for r in reqs:
                            self._run_one(r)
                    except BaseException as exc:  # noqa: BLE001 - the requests being admitted fail, not the rest
                        for r in reqs:
                            if not r.future.done():
                                r.future.set_exception(exc)
                            sched._push(r, "error", exc)
            if sched.rows:
                try:
                    sched.step()
                except BaseException as exc:  # noqa: BLE001 - every running request learns about the failure
                    sched.fail_all(exc)

    def _run_one(self, req: Any) -> None:
        if req is _STOP:
            return
        if req.stream is not None:
            self._run_stream(req)
        else:
            self._run_batch([req])

    def _prompt_ids(self, req: GenRequest) -> list[int]:
        if req.prompt_ids is not None:
            return list(req.prompt_ids)
        return self.tokenizer(req.prompt, add_special_tokens=False)["input_ids"]

    def _prompt_logprobs(self, ids: list[int], k: int) -> list[tuple[int, float | None, list | None]]:
        """Teacher-forced log-probabilities of a prompt's tokens (the first has no context: None)."""
        import torch

        device = next(self.net.parameters()).device
        with torch.inference_mode():
            logits = self.net(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        out: list[tuple[int, float | None, list | None]] = [(ids[0], None, None)]
        target = torch.tensor(ids[1:], device=device)
        chosen = logp.gather(-1, target[:, None]).squeeze(-1).tolist()
        top = torch.topk(logp, k) if k else None
        for i, t in enumerate(ids[1:]):
            alts = list(zip(top.indices[i].tolist(), top.values[i].tolist())) if top is not None else []
            out.append((t, chosen[i], alts))
        return out

    def _generate(self, batch: list[GenRequest], *, streamer: Any = None, stopping: Any = None,
                  hooks: dict[str, Any] | None = None) -> list[GenResult]:
        """One left-padded ``generate`` call for the batch, with a logits recorder (logprobs) and a grammar
        processor (constrained rows) when a request asks for them."""
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        tok = self.tokenizer
        first = batch[0]
        device = next(self.net.parameters()).device
        prompts = [self._prompt_ids(r) for r in batch]
        width = max(len(p) for p in prompts)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attn[i, width - len(p):] = 1
        procs = LogitsProcessorList()
        recorder = None
        if any(r.logprobs is not None for r in batch):
            recorder = _Recorder(max(r.logprobs or 0 for r in batch))
            procs.append(recorder)  # first: it sees the model's own distribution, before any constraint
            if hooks is not None:
                hooks["recorder"] = recorder
        grammar = None
        if any(r.grammar for r in batch):
            from llmops_jupyter.stages.serve.constrained import GrammarProcessor

            info = self._grammar_info()
            grammar = GrammarProcessor([info.matcher(r.grammar) if r.grammar else None for r in batch],
                                       info.n_vocab, tok.eos_token_id)
            procs.append(grammar)
        eos = tok.eos_token_id
        kwargs: dict[str, Any] = {"max_new_tokens": first.max_tokens, "do_sample": first.temperature > 0,
                                  "use_cache": True, "pad_token_id": pad, "eos_token_id": eos,
                                  "logits_processor": procs, "attention_mask": attn.to(device)}
        if streamer is not None:
            kwargs["streamer"] = streamer
        if stopping is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList(stopping)
        if first.temperature > 0:
            torch.manual_seed(first.seed)
            kwargs.update(temperature=first.temperature, top_p=first.top_p)
        echoes = [self._prompt_logprobs(p, r.logprobs or 0) if r.echo else None for r, p in zip(batch, prompts)]
        with torch.inference_mode():
            out = self.net.generate(input_ids=ids.to(device), **kwargs)
        results = []
        for row, r in enumerate(batch):
            new = out[row, width:].tolist()
            finish = "length"
            if eos is not None and eos in new:
                new = new[: new.index(eos)]
                finish = "stop"
            elif pad != eos:
                while new and new[-1] == pad:
                    new.pop()
            lps = recorder.row(row, new) if recorder is not None and r.logprobs is not None else None
            if lps is not None:
                lps = [(t, lp, alts[: r.logprobs]) for t, lp, alts in lps]
            text, stopped = apply_stop(tok.decode(new, skip_special_tokens=True), r.stop)
            results.append(GenResult(text, len(prompts[row]), len(new), "stop" if stopped else finish, len(batch),
                                     token_ids=new, logprobs=lps, prompt_ids=prompts[row] if r.echo else None,
                                     prompt_logprobs=echoes[row],
                                     grammar_error=grammar.errors[row] if grammar is not None else None))
        return results

    def _run_batch(self, batch: list[GenRequest]) -> None:
        try:
            results = self._generate(batch)
        except BaseException as exc:  # noqa: BLE001 - every waiting request learns about the failure
            for r in batch:
                if not r.future.done():
                    r.future.set_exception(exc)
            return
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(batch))
        for r, res in zip(batch, results, strict=True):
            r.future.set_result(res)

    def _run_stream(self, req: GenRequest) -> None:
        from transformers import StoppingCriteria, TextStreamer

        loop, out = req.stream  # type: ignore[misc]
        state = {"text": ""}
        hooks: dict[str, Any] = {}
        eos = self.tokenizer.eos_token_id

        def push(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(out.put_nowait, (kind, value))

        class _Streamer(TextStreamer):
            def put(self, value):  # a generated token: its log-probability goes out before its text
                recorder = hooks.get("recorder")
                if recorder is not None and not self.next_tokens_are_prompt:
                    for t in value.reshape(-1).tolist():
                        if t != eos:
                            push("logprob", recorder.last(t, req.logprobs or 0))
                super().put(value)

            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    state["text"] += text
                    push("text", text)

        class _Cancel(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return req.cancelled.is_set() or (bool(req.stop) and apply_stop(state["text"], req.stop)[1])

        try:
            streamer = _Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            result = self._generate([req], streamer=streamer, stopping=[_Cancel()], hooks=hooks)[0]
            if apply_stop(state["text"], req.stop)[1]:
                result.finish_reason = "stop"
            self.stats["requests"] += 1
            req.future.set_result(result)
            push("end", result)
        except BaseException as exc:  # noqa: BLE001
            if not req.future.done():
                req.future.set_exception(exc)
            push("error", exc)


class _Recorder:
    """A logits processor that changes nothing: it keeps, per step, each row's log-softmax top-k and the whole
    distribution until the next step reveals which token was chosen."""

    def __init__(self, k: int):
        self.k = k
        self.steps: list[tuple[Any, Any]] = []  # (top values, top indices) per step
        self.chosen: list[list[float]] = []  # log-probability of the chosen token, per step per row
        self._last = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self._last is not None:
            self.chosen.append(self._last.gather(-1, input_ids[:, -1:]).squeeze(-1).tolist())
        logp = torch.log_softmax(scores.float(), dim=-1)
        top = torch.topk(logp, self.k) if self.k else None
        self.steps.append((top.values.tolist(), top.indices.tolist()) if top is not None else ([], []))
        self._last = logp
        return scores

    def last(self, token: int, k: int) -> TokenLogprob:
        """The entry of the token just chosen at the latest step (batch of one: streaming)."""
        values, indices = self.steps[-1]
        return token, float(self._last[0, token]), list(zip(indices[0], values[0]))[:k] if values else []

    def row(self, row: int, tokens: list[int]) -> list[TokenLogprob]:
        out = []
        for step, t in enumerate(tokens):
            if step < len(self.chosen):
                lp = self.chosen[step][row]
            else:  # the last step: its choice is only in the output
                lp = float(self._last[row, t])
            values, indices = self.steps[step]
            alts = list(zip(indices[row], values[row])) if values else []
            out.append((t, lp, alts))
        return out


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

    #: ``response_format`` by llama.cpp's own grammar (GBNF from the JSON Schema); logprobs, echo, tools and
    #: token-id prompts are refused with a 400 naming the field
    supports: frozenset[str] = frozenset({"response_format"})
    tool_format = None

    def check_grammar(self, grammar: str) -> None:
        """The llguidance grammar is not what runs here (see :meth:`check_schema`)."""

    def check_schema(self, schema: dict[str, Any]) -> None:
        """Convert the schema to llama.cpp's GBNF once, in the caller's thread: what it cannot convert is a 400."""
        self._gbnf(schema)

    def _gbnf(self, schema: dict[str, Any]) -> Any:
        import json

        from llama_cpp import LlamaGrammar

        from llmops_jupyter.stages.serve.constrained import GrammarError

        key = json.dumps(schema, sort_keys=True)
        cache = self.__dict__.setdefault("_grammars", {})
        if key not in cache:
            try:
                cache[key] = LlamaGrammar.from_json_schema(key, verbose=False)
            except Exception as exc:  # noqa: BLE001 - the converter raises several kinds
                raise GrammarError(f"llama.cpp's JSON Schema converter rejects it: {exc}") from None
        return cache[key]

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
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
        if req.json_schema is not None:
            kw["grammar"] = self._gbnf(req.json_schema)
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

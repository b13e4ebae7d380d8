"""Continuous (iteration-level) batching for the transformers engine.

Every running request is one row of a single batched decode: each step runs one forward pass for all rows
(one new token each), so concurrent requests share the model's weight reads instead of queueing behind each
other. Between steps, requests that arrived are **admitted** (their prompts prefilled together, left-padded, and
their KV cache rows joined to the running batch) and requests that finished (EOS, ``max_tokens``, a stop string,
a completed grammar, a disconnected client) **leave** (their rows dropped from the cache). Per row, and therefore
per request: greedy or seeded sampling with its own temperature/top-p, stop strings, log-probabilities with top-k
alternatives, and an llguidance grammar mask (:mod:`.constrained`).

Why our own scheduler and not transformers' ``ContinuousBatchingManager`` (``generate_batch`` /
``init_continuous_batching``, installed with transformers 5.24): measured here on CPU, its paged-attention path was
slower than one request at a time (32 prompts x 32 tokens on the tiny model: 25 s vs 20 s serially), its greedy
tokens differed from ``generate``'s, it returns only the chosen token's log-probability (no ``top_logprobs``), and it
takes no per-request logits mask (constrained decoding). What is here is the simple form: a ``DynamicCache``
whose rows are left-padded to a common length, a 2-D attention mask that hides the padding, explicit per-row
position ids. Its costs, documented in docs/serving.md: a long prompt's prefill pauses the running rows for one
step (no chunked prefill), and padding grows with the spread of lengths in the batch (leading all-padding columns
are trimmed whenever rows leave).
"""

from __future__ import annotations

import dataclasses
from typing import Any


class NotBatchable(RuntimeError):
    """The model's cache is not a plain full-attention ``DynamicCache`` (sliding windows, ...): rows cannot be joined."""


@dataclasses.dataclass
class _Row:
    req: Any  # GenRequest
    prompt: list[int]
    out: list[int] = dataclasses.field(default_factory=list)
    logprobs: list | None = None
    prompt_logprobs: list | None = None
    generator: Any = None
    matcher: Any = None
    grammar_error: str | None = None
    sent: str = ""  # streamed text so far
    finish: str | None = None


class Scheduler:
    """Owns the running batch of one :class:`~.engine.Engine` (called only from the engine's worker thread)."""

    def __init__(self, engine: Any):
        import torch

        self.engine = engine
        self.net = engine.net
        self.tok = engine.tokenizer
        self.device = next(self.net.parameters()).device
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else (self.eos or 0)
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.mask: Any = None  # (rows, cache length) long, 0 = padding
        self.logits: Any = None  # (rows, vocab) float: each row's next-token logits
        self._torch = torch

    # -- admission ------------------------------------------------------------------------------------------------
    def admit(self, reqs: list[Any]) -> None:
        """Prefill ``reqs`` together and join them to the running batch."""
        torch = self._torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        rows = []
        for r in reqs:
            try:
                rows.append(self._new_row(r))
            except BaseException as exc:  # noqa: BLE001 - this request fails alone
                if not r.future.done():
                    r.future.set_exception(exc)
                self._push(r, "error", exc)
        if not rows:
            return
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
            attn[i, width - len(r.prompt):] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.net.config)
        with torch.inference_mode():
            out = self.net(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                           position_ids=pos.to(self.device), cache=cache, use_cache=True, logits_to_keep=1)
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise NotBatchable(f"cache layers {sorted({type(x).__name__ for x in cache.layers})}")
        logits = out.logits[:, -1].float()
        attn = attn.to(self.device)
        if not self.rows:
            self.rows, self.cache, self.mask, self.logits = rows, cache, attn, logits
        else:
            t_old, t_new = self.mask.shape[1], attn.shape[1]
            total = max(t_old, t_new)
            for a, b in zip(self.cache.layers, cache.layers, strict=True):
                a.keys = torch.cat([_pad_left(a.keys, total - t_old), _pad_left(b.keys, total - t_new)], 0)
                a.values = torch.cat([_pad_left(a.values, total - t_old), _pad_left(b.values, total - t_new)], 0)
            self.mask = torch.cat([_pad_left(self.mask, total - t_old), _pad_left(attn, total - t_new)], 0)
            self.logits = torch.cat([self.logits, logits], 0)
            self.rows += rows
        stats = self.engine.stats
        stats["prefills"] = stats.get("prefills", 0) + 1
        stats["max_batch_seen"] = max(stats["max_batch_seen"], len(self.rows))

    def _new_row(self, r: Any) -> _Row:
        torch = self._torch
        prompt = self.engine._prompt_ids(r)
        row = _Row(r, prompt, logprobs=[] if r.logprobs is not None else None)
        if r.echo:
            row.prompt_logprobs = self.engine._prompt_logprobs(prompt, r.logprobs or 0)
        if r.temperature > 0:
            row.generator = torch.Generator(device=self.device).manual_seed(int(r.seed))
        if r.grammar:
            row.matcher = self.engine._grammar_info().matcher(r.grammar)
        return row

    # -- one decode step -------------------------------------------------------------------------------------------
    def step(self) -> None:
        """Choose every row's next token, retire finished rows, and run one forward pass for the rest."""
        torch = self._torch
        tokens = self._choose()
        keep = [i for i, r in enumerate(self.rows) if r.finish is None]
        for r in self.rows:
            if r.finish is not None:
                self._finish(r)
        if not keep:
            self.rows, self.cache, self.mask, self.logits = [], None, None, None
            return
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, device=self.device)
            self.rows = [self.rows[i] for i in keep]
            tokens = [tokens[i] for i in keep]
            self.mask = self.mask.index_select(0, index)
            start = int((self.mask.sum(0) > 0).nonzero()[0])  # leading columns that are padding in every row
            for layer in self.cache.layers:
                layer.keys = layer.keys.index_select(0, index)[:, :, start:]
                layer.values = layer.values.index_select(0, index)[:, :, start:]
            self.mask = self.mask[:, start:]
        pos = self.mask.sum(-1, keepdim=True)  # the new token's position: how many real tokens precede it
        self.mask = torch.cat([self.mask, torch.ones_like(pos)], 1)
        with torch.inference_mode():
            out = self.net(input_ids=torch.tensor(tokens, device=self.device)[:, None], attention_mask=self.mask,
                           position_ids=pos, cache=self.cache, use_cache=True)
        self.logits = out.logits[:, -1].float()
        stats = self.engine.stats
        stats["batches"] += 1
        stats["row_steps"] = stats.get("row_steps", 0) + len(self.rows)

    def _choose(self) -> list[int]:
        """Each row's next token from ``self.logits`` (greedy rows in one argmax), with its bookkeeping."""
        torch = self._torch
        from llmops_jupyter.stages.serve.constrained import allocate_bitmask, apply_bitmask, fill_bitmask

        logits = self.logits
        need_logp = any(r.logprobs is not None for r in self.rows)
        logp = torch.log_softmax(logits, dim=-1) if need_logp else None
        constrained = [i for i, r in enumerate(self.rows) if r.matcher is not None]
        scores = logits
        if constrained:
            scores = logits.clone()
            mask = allocate_bitmask(len(constrained), self.engine._grammar_info().n_vocab)
            for j, i in enumerate(constrained):
                fill_bitmask(self.rows[i].matcher, mask, j)
            index = torch.tensor(constrained, device=self.device)
            sub = scores.index_select(0, index)
            apply_bitmask(sub, mask)
            scores[index] = sub
        tokens = scores.argmax(-1).tolist()
        for i, r in enumerate(self.rows):
            if r.req.temperature > 0:
                tokens[i] = _sample(scores[i], r.req.temperature, r.req.top_p, r.generator)
        for i, r in enumerate(self.rows):
            t = tokens[i]
            if r.req.cancelled.is_set():
                r.finish = "stop"
                continue
            if t == self.eos:
                r.finish = "stop"
                continue
            entry = None
            if r.logprobs is not None:
                k = r.req.logprobs or 0
                alts: list[tuple[int, float]] = []
                if k:
                    top = torch.topk(logp[i], k)
                    alts = list(zip(top.indices.tolist(), top.values.tolist()))
                entry = (t, float(logp[i, t]), alts)
                r.logprobs.append(entry)
            r.out.append(t)
            if r.matcher is not None:
                if not r.matcher.consume_token(t):
                    r.grammar_error = r.matcher.get_error() or f"token {t} rejected"
                    r.finish = "stop"
                elif r.matcher.is_stopped():
                    r.finish = "stop"
            if r.req.stream is not None:
                if entry is not None:
                    self._push(r.req, "logprob", entry)
                self._stream_text(r, final=False)
            if r.finish is None and r.req.stop and self._stopped(r):
                r.finish = "stop"
            if r.finish is None and len(r.out) >= r.req.max_tokens:
                r.finish = "length"
        return tokens

    def _stopped(self, r: _Row) -> bool:
        from llmops_jupyter.stages.serve.results import apply_stop

        return apply_stop(self.tok.decode(r.out, skip_special_tokens=True), r.req.stop)[1]

    def _stream_text(self, r: _Row, *, final: bool) -> None:
        text = self.tok.decode(r.out, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        if len(text) > len(r.sent) and text.startswith(r.sent):
            self._push(r.req, "text", text[len(r.sent):])
            r.sent = text

    def _finish(self, r: _Row) -> None:
        from llmops_jupyter.stages.serve.results import GenResult, apply_stop

        text, stopped = apply_stop(self.tok.decode(r.out, skip_special_tokens=True), r.req.stop)
        finish = "stop" if stopped else r.finish
        result = GenResult(text, len(r.prompt), len(r.out), finish, len(self.rows), token_ids=list(r.out),
                           logprobs=r.logprobs, prompt_ids=r.prompt if r.req.echo else None,
                           prompt_logprobs=r.prompt_logprobs, grammar_error=r.grammar_error)
        self.engine.stats["requests"] += 1
        if r.req.stream is not None:
            self._stream_text(r, final=True)
        if not r.req.future.done():
            r.req.future.set_result(result)
        self._push(r.req, "end", result)

    def fail_all(self, exc: BaseException) -> None:
        """A forward pass failed: every running request learns about it; the batch starts empty."""
        for r in self.rows:
            if not r.req.future.done():
                r.req.future.set_exception(exc)
            self._push(r.req, "error", exc)
        self.rows, self.cache, self.mask, self.logits = [], None, None, None

    @staticmethod
    def _push(req: Any, kind: str, value: Any) -> None:
        if req.stream is not None:
            loop, q = req.stream
            loop.call_soon_threadsafe(q.put_nowait, (kind, value))


def _pad_left(t: Any, n: int) -> Any:
    """``t`` with ``n`` zero columns in front of its sequence axis (dim -2 of a KV tensor, dim 1 of a mask)."""
    if n == 0:
        return t
    import torch

    if t.dim() == 2:
        return torch.cat([t.new_zeros((t.shape[0], n)), t], 1)
    shape = list(t.shape)
    shape[-2] = n
    return torch.cat([t.new_zeros(shape), t], -2)


def _sample(scores: Any, temperature: float, top_p: float, generator: Any) -> int:
    """One token from ``softmax(scores / temperature)`` restricted to the top-p nucleus (what ``generate`` does)."""
    import torch

    scores = scores / temperature
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum <= (1 - top_p)
        drop[-1] = False  # keep at least one token
        scores = scores.clone()
        scores[order[drop]] = float("-inf")
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))

"""Constrained decoding with llguidance: JSON mode, JSON Schema (``response_format``) and forced tool calls.

Why llguidance (``bench/bench_grammar.py``, measured on CPU): no dependencies of its own (xgrammar pulls triton and
apache-tvm-ffi into a CPU install), a mask in well under a millisecond per token with no per-schema regex index
(outlines-core builds one), JSON Schema and Lark grammars in one engine, and the same grammars are what
llama.cpp (``LLAMA_LLGUIDANCE``) and vLLM accept. Its own ``apply_token_bitmask_inplace`` is ``torch.compile``'d
(seconds of compilation on a CPU), and importing ``llguidance.torch`` at all imports ``torch._dynamo`` (3-5 s on
2 cores): :func:`allocate_bitmask`, :func:`fill_bitmask` and :func:`apply_bitmask` do the same in plain torch.

A grammar is a string (llguidance's serialized form); :class:`GrammarProcessor` is a transformers
``LogitsProcessor`` holding one matcher per batch row (``None`` = unconstrained row).
"""

from __future__ import annotations

import json
from typing import Any

from llmops_jupyter.core.errors import require

#: compact JSON, as OpenAI's models write it: no unbounded whitespace for a small model to wander into
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A schema or grammar the engine cannot compile (the message says why)."""


def _llg():
    return require("llguidance", "serve")


def check_json_schema(schema: Any) -> None:
    """Raise :class:`GrammarError` unless ``schema`` is a valid JSON Schema that constrained decoding supports."""
    if not isinstance(schema, dict):
        raise GrammarError("must be a JSON object (a JSON Schema)")
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise GrammarError(f"is not a valid JSON Schema: {exc.message} (at {where})") from None
    err = _llg().LLMatcher.validate_grammar(json_schema_grammar(schema, validate=False))
    if err:
        raise GrammarError(f"uses a JSON Schema feature constrained decoding does not support: {err.strip()}")


def json_schema_grammar(schema: dict[str, Any], *, validate: bool = True) -> str:
    if validate:
        check_json_schema(schema)
    return _llg().LLMatcher.grammar_from_json_schema(schema, defaults=_COMPACT)


def json_object_grammar() -> str:
    """``response_format={"type": "json_object"}``: any JSON object."""
    return json_schema_grammar({"type": "object"}, validate=False)


def lark_grammar(text: str) -> str:
    llg = _llg()
    grammar = llg.grammar_from("lark", text)
    err = llg.LLMatcher.validate_grammar(grammar)
    if err:
        raise GrammarError(f"grammar does not compile: {err.strip()}")
    return grammar


def lark_json(schema: dict[str, Any]) -> str:
    """A JSON Schema embedded in a Lark rule (``%json``), compact like :func:`json_schema_grammar`."""
    return "%json " + json.dumps({**schema, "x-guidance": _COMPACT})


def validate(text: str, schema: dict[str, Any] | None) -> str | None:
    """None if ``text`` is JSON (valid against ``schema`` when given), else what is wrong with it."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        return f"not JSON: {exc}"
    if schema is None:
        return None if isinstance(value, dict) else "not a JSON object"
    import jsonschema

    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        return f"violates the schema: {exc.message}"
    return None


class TokenizerInfo:
    """llguidance's view of a tokenizer (built once per engine: it walks the vocabulary)."""

    def __init__(self, tokenizer: Any, n_vocab: int):
        import llguidance.hf

        _llg()
        self.n_vocab = n_vocab
        self.eos = tokenizer.eos_token_id
        self.lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab)

    def matcher(self, grammar: str):
        m = _llg().LLMatcher(self.lltok, grammar)
        if m.is_error():
            raise GrammarError(m.get_error())
        return m


def allocate_bitmask(batch: int, n_vocab: int) -> Any:
    """A packed allowed-token mask: int32, one bit per token, 32 tokens per word (llguidance's layout)."""
    import torch

    return torch.full((batch, (n_vocab + 31) // 32), -1, dtype=torch.int32)


def fill_bitmask(matcher: Any, mask: Any, row: int) -> None:
    """Write ``matcher``'s allowed next tokens into ``mask[row]`` (what ``llguidance.torch`` does, without it)."""
    v = mask[row]
    matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())


def apply_bitmask(logits: Any, mask: Any) -> None:
    """Set the logits of tokens not allowed by the packed int32 ``mask`` (batch, ceil(vocab/32)) to -inf."""
    import torch

    bits = (mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = bits.reshape(mask.shape[0], -1)[:, : logits.shape[-1]].to(logits.device).bool()
    if allowed.shape[-1] < logits.shape[-1]:  # logits wider than the mask: the extra ids are never allowed
        logits[:, allowed.shape[-1]:] = float("-inf")
        logits = logits[:, : allowed.shape[-1]]
    logits.masked_fill_(~allowed, float("-inf"))


class GrammarProcessor:
    """A transformers logits processor: row ``i`` may only produce what ``matchers[i]`` allows.

    On each step it first feeds every constrained row the token chosen at the previous step, then masks. A row
    whose grammar is complete may only produce EOS (the matcher's own mask says so); a row that already produced
    EOS is left alone (transformers pads it). ``errors[i]`` keeps a matcher's error, if any.
    """

    def __init__(self, matchers: list[Any], n_vocab: int, eos: int | None):
        self.matchers = matchers
        self.eos = eos
        self.errors: list[str | None] = [None] * len(matchers)
        self._done = [m is None for m in matchers]
        self._first = True
        self._mask = allocate_bitmask(len(matchers), n_vocab)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if not self._first:
            last = input_ids[:, -1].tolist()
            for i, m in enumerate(self.matchers):
                if self._done[i]:
                    continue
                if last[i] == self.eos and (m.is_stopped() or m.is_accepting()):
                    self._done[i] = True
                    continue
                if not m.consume_token(last[i]):
                    self.errors[i] = m.get_error() or f"token {last[i]} rejected"
                    self._done[i] = True
        self._first = False
        rows = [i for i, d in enumerate(self._done) if not d]
        if not rows:
            return scores
        self._mask.fill_(-1)
        for i in rows:
            fill_bitmask(self.matchers[i], self._mask, i)
        index = torch.tensor(rows, device=scores.device)
        sub = scores.index_select(0, index)
        apply_bitmask(sub, self._mask[rows])
        scores = scores.clone()
        scores[index] = sub
        return scores

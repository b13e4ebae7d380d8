"""What a generation returns (shared by the engines in :mod:`.engine` and the scheduler in :mod:`.batching`)."""

from __future__ import annotations

import dataclasses

#: one scored token: (token id, log-probability, [(alternative id, log-probability), ...] best first)
TokenLogprob = tuple[int, float, list[tuple[int, float]]]


@dataclasses.dataclass
class GenResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    batch_size: int = 1
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    #: with ``echo``: the prompt's tokens, the first one with no log-probability (None)
    prompt_ids: list[int] | None = None
    prompt_logprobs: list[tuple[int, float | None, list[tuple[int, float]] | None]] | None = None
    grammar_error: str | None = None


def apply_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut ``text`` at the first stop sequence (OpenAI semantics: the stop text itself is not returned)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)

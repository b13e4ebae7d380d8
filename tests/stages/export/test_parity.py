"""The parity report's arithmetic on two toy sides (no llama.cpp, no model): which number is gated, how one
quantization flip counts, and what a side that would not stop scores."""

from __future__ import annotations

import numpy as np
import pytest

from llmops_jupyter.stages.export import parity

VOCAB, EOS = 12, 0


class ToySide:
    """A deterministic 'model': the next token depends on the last one, so a flip changes everything after it in
    free-running generation. ``flip_at``: context length where this side picks a different token; ``eos``: the
    tokens this side stops on (an empty set is a file whose EOS metadata is wrong)."""

    def __init__(self, label: str, *, flip_at: int | None = None, eos: set[int] | None = None, template: str = "{}"):
        self.label, self.flip_at, self.template = label, flip_at, template
        self.eos = {EOS} if eos is None else eos

    def next(self, prefix: list[int]) -> int:
        if len(prefix) >= 11:
            return EOS
        tok = (prefix[-1] * 5 + 3) % (VOCAB - 1) + 1
        if self.flip_at is not None and len(prefix) == self.flip_at:
            tok = tok % (VOCAB - 1) + 1
        return tok

    def render(self, conv):
        text = self.template.format(conv[-1]["content"])
        return text, [len(text) % (VOCAB - 1) + 1, 3, 4, 5]

    def greedy(self, ids, n):
        out: list[int] = []
        while len(out) < n:
            tok = self.next(ids + out)
            if tok in self.eos:
                break
            out.append(tok)
        return out

    def logits(self, ids):
        rows = np.zeros((len(ids), VOCAB), dtype=np.float32)
        for i in range(len(ids)):
            rows[i, self.next(ids[: i + 1])] = 10.0
        return rows

    def decode(self, ids):
        return " ".join(map(str, ids))


CONVS = [[{"role": "user", "content": "q"}]]


def test_identical_sides_agree_everywhere():
    r = parity.compare(ToySide("a"), ToySide("b"), CONVS, n_tokens=16, min_agreement=0.99)
    assert r.passed and r.next_token_agreement == 1.0 and r.free_running_agreement == 1.0 and r.exact_match == 1.0
    assert r.max_logit_diff == 0.0
    assert r.examples[0]["next_token_agreement"] == 1.0


def test_one_flip_costs_one_position_teacher_forced_not_the_rest_of_the_answer():
    """Prompt of 4 tokens, A answers 7 tokens then EOS: 8 gated positions. B flips at context length 6 (the 3rd
    answer token): 7/8 teacher-forced, while free-running agreement loses every position after the flip."""
    a, b = ToySide("a"), ToySide("b", flip_at=6)
    r = parity.compare(a, b, CONVS, n_tokens=16, min_agreement=0.85)
    assert r.next_token_agreement == pytest.approx(7 / 8)
    assert r.free_running_agreement <= 3 / 7  # two tokens before the flip, the rest diverges
    assert r.exact_match == 0.0 and r.passed
    r = parity.compare(a, b, CONVS, n_tokens=16, min_agreement=0.9)
    assert not r.passed and r.reason.startswith("next-token agreement 0.875 < --parity-min 0.9 over 8 answer positions")


def test_a_side_that_would_not_stop_disagrees_at_the_stop():
    """Same tokens, but B's stop set lacks A's EOS (wrong EOS metadata): the stop position counts against it."""
    r = parity.compare(ToySide("a"), ToySide("b", eos=set()), CONVS, n_tokens=16, min_agreement=0.9)
    assert r.next_token_agreement == pytest.approx(7 / 8) and not r.passed
    assert r.exact_match == 0.0  # B runs on past the answer


def test_only_the_first_n_answer_tokens_are_gated():
    r = parity.compare(ToySide("a"), ToySide("b", flip_at=9), CONVS, n_tokens=3, min_agreement=0.99)
    assert r.passed and r.next_token_agreement == 1.0  # the flip is past the 3 compared positions


def test_a_different_rendered_prompt_fails_on_the_template_first():
    r = parity.compare(ToySide("a"), ToySide("b", template="<s>{}"), CONVS, min_agreement=0.1,
                       template_name="chat template (tokenizer.chat_template)")
    assert not r.passed and r.next_token_agreement is None
    assert r.reason.startswith("chat template (tokenizer.chat_template) not carried: 1/1 rendered prompts differ "
                               "(first at char 0: 'q' vs '<s>q')")
    assert "parity_next_token_agreement" not in r.metrics()

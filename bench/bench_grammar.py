"""Grammar libraries for constrained decoding, measured on CPU with the tiny tokenizer: import time, grammar
compile time for a small JSON schema, and the per-token cost of computing + applying the allowed-token mask
while walking a fixed valid JSON answer. Run each library in its own process (import time is cold):

    python bench/bench_grammar.py llguidance|xgrammar|outlines_core

Prints one JSON line. The per-token figure is what constrained decoding adds to each generated token (the model
forward is not included). The tiny tokenizer has 512 tokens; real vocabularies (49k for SmolLM2) cost more per
mask, so compare libraries with each other, not with a model's step time.
"""

from __future__ import annotations

import json
import sys
import time

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["city", "n"], "additionalProperties": False}
ANSWER = '{"city": "Paris", "n": 42}'


def main(lib: str) -> dict:
    from llmops_jupyter.testing import build_tokenizer

    tok = build_tokenizer()
    ids = tok(ANSWER, add_special_tokens=False)["input_ids"]
    vocab = len(tok)
    import torch

    t0 = time.perf_counter()
    if lib == "llguidance":
        import llguidance
        import llguidance.hf
        t_import = time.perf_counter() - t0  # not llguidance.torch: it imports torch._dynamo (3-5 s)
        t0 = time.perf_counter()
        lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            SCHEMA, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        m = llguidance.LLMatcher(lltok, grammar)
        t_compile = time.perf_counter() - t0
        from llmops_jupyter.stages.serve.constrained import allocate_bitmask, apply_bitmask, fill_bitmask

        mask = allocate_bitmask(1, vocab)

        def step(logits, t):  # llguidance.torch's apply is torch.compile'd: seconds of compile on CPU; ours is not
            fill_bitmask(m, mask, 0)
            apply_bitmask(logits, mask)
            assert m.consume_token(t), m.get_error()
    elif lib == "xgrammar":
        import xgrammar as xgr
        t_import = time.perf_counter() - t0
        t0 = time.perf_counter()
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
        m = xgr.GrammarMatcher(compiled)
        t_compile = time.perf_counter() - t0
        mask = xgr.allocate_token_bitmask(1, vocab)

        def step(logits, t):
            m.fill_next_token_bitmask(mask)
            xgr.apply_token_bitmask_inplace(logits, mask)
            assert m.accept_token(t)
    elif lib == "outlines_core":
        import outlines_core
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema
        t_import = time.perf_counter() - t0
        t0 = time.perf_counter()
        regex = build_regex_from_schema(json.dumps(SCHEMA))
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        unbyte = {c: b for b, c in bytes_to_unicode().items()}  # byte-level BPE pieces → the text they stand for
        vocab_map: dict[str, list[int]] = {}
        for token, i in tok.get_vocab().items():
            if i != tok.eos_token_id and i not in tok.all_special_ids:
                text = bytes(unbyte[c] for c in token).decode("utf-8", errors="replace")
                vocab_map.setdefault(text, []).append(i)
        index = Index(regex, Vocabulary(tok.eos_token_id, vocab_map))
        guide = Guide(index)
        t_compile = time.perf_counter() - t0
        _ = outlines_core

        def step(logits, t):
            allowed = guide.get_tokens()
            bias = torch.full_like(logits, float("-inf"))
            bias[0, allowed] = 0
            logits += bias
            guide.advance(t)
    else:
        raise SystemExit(f"unknown library {lib!r}")
    logits = torch.zeros(1, vocab)
    t0 = time.perf_counter()
    for t in ids:
        step(logits.zero_(), t)
    per_token = (time.perf_counter() - t0) / len(ids)
    return {"library": lib, "import_s": round(t_import, 4), "compile_s": round(t_compile, 4),
            "per_token_ms": round(per_token * 1e3, 4), "tokens": len(ids), "vocab": vocab}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))

"""Batched generation vs a one-prompt-at-a-time loop, same prompts, same model, greedy decoding.

Reports tokens/s of both, their ratio (the issue's goal: >= 5x) and whether the greedy outputs are identical
(reported, not asserted: on a real model a different batch shape can flip a near-tie in fp arithmetic).

    python bench/bench_generation.py                      # tiny offline model
    python bench/bench_generation.py --model smollm2-135m --n 32 --max-new-tokens 48
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any


def _prompts(tokenizer: Any, n: int) -> list[str]:
    from llmops_jupyter.models.inference import apply_chat
    from llmops_jupyter.testing import tiny_records

    return [apply_chat(tokenizer, [{"role": "user", "content": r["instruction"]}]) for r in tiny_records(n, seed=7)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model reference (default: the tiny offline test model)")
    parser.add_argument("--n", type=int, default=32, help="number of prompts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON (tools/gpu_check.py)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from llmops_jupyter.models.inference import generate, load_model

    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from llmops_jupyter.testing import build_tiny_model

            ref = str(build_tiny_model(os.path.join(tmp, "tiny-llama")))
        else:
            ref = args.model
        from llmops_jupyter.registry import Registry

        net, tok = load_model(ref, device=args.device, registry=Registry(os.path.join(tmp, ".llmops")))
        prompts = _prompts(tok, args.n)
        # warm-up both paths (allocations, kernel selection for every batch shape; matters on GPUs)
        generate(net, tok, prompts, max_new_tokens=4, batch_size=args.batch_size)
        generate(net, tok, prompts[:1], max_new_tokens=4, batch_size=1)

        t0 = time.perf_counter()
        single = [generate(net, tok, [p], max_new_tokens=args.max_new_tokens, batch_size=1)[0] for p in prompts]
        t_single = time.perf_counter() - t0
        t0 = time.perf_counter()
        batched = generate(net, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        t_batched = time.perf_counter() - t0

    tok_single = sum(g.new_tokens for g in single)
    tok_batched = sum(g.new_tokens for g in batched)
    same = sum(a.text == b.text for a, b in zip(single, batched))
    result = {
        "model": args.model or "tiny-llama (built offline)",
        "device": str(next(net.parameters()).device),
        "prompts": len(prompts),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "loop_s": t_single,
        "batched_s": t_batched,
        "loop_tokens_per_s": tok_single / t_single,
        "batched_tokens_per_s": tok_batched / t_batched,
        "throughput_ratio": (tok_batched / t_batched) / (tok_single / t_single),
        "identical_greedy_outputs": same,
        "all_identical": same == len(prompts),
    }
    rows = [("one prompt at a time", f"{t_single:.2f}", f"{result['loop_tokens_per_s']:.0f}", "1.00x"),
            (f"batched (bs={args.batch_size})", f"{t_batched:.2f}", f"{result['batched_tokens_per_s']:.0f}",
             f"{result['throughput_ratio']:.2f}x")]
    print(f"Generation benchmark: {result['model']} on {result['device']}, {len(prompts)} prompts, "
          f"{args.max_new_tokens} new tokens max, greedy")
    print(f"{'mode':<24}{'seconds':>10}{'tokens/s':>12}{'ratio':>10}")
    for r in rows:
        print(f"{r[0]:<24}{r[1]:>10}{r[2]:>12}{r[3]:>10}")
    print(f"identical greedy outputs: {same}/{len(prompts)}")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

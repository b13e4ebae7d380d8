"""GPU only: `%llmops finetune` on real model shapes — tokens/s, MFU, peak memory, vs TRL padding_free.

Shapes are the real configs (random init, no weights): Llama-3.2-1B (hidden 2048, 16 layers, 32 heads × 64, 8 KV
heads, MLP 8192, vocab 128,256, tied) and SmolLM2-135M, at seq 2048. MFU = tokens/s × 4N / dense bf16 peak (the
stage's own ``mfu_pct``; 4N: LoRA's frozen base needs no weight gradients). Goals (issue 16): LoRA bf16 on the 1B
shape MFU ≥ 30% and ≥ 1.3× TRL padding_free (SDPA); QLoRA peak memory ≤ 0.5× LoRA at micro-batch 2 with gradient
checkpointing, tokens/s ≥ 0.8× LoRA. Absolute numbers go to bench/RESULTS.md with the device and date.

    PYTHONPATH=. python bench/bench_gpu_training.py [--steps 30] [--seq-len 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LLAMA_32_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
               "num_hidden_layers": 16, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
               "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "head_dim": 64}


def build(work: Path, shape: dict, n: int, seq_len: int) -> tuple[Path, Path]:
    import random

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmops_jupyter.stages.data.format import render, write_dataset_dir
    from llmops_jupyter.testing import build_tiny_model

    model = build_tiny_model(work / "model", layers=1)
    tok = AutoTokenizer.from_pretrained(str(model))
    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(model))
    rng = random.Random(0)
    words = "red green blue yellow black white model token adapter data train loss".split()
    rows = []
    for _ in range(n):
        k = max(4, min(int(rng.lognormvariate(5.0, 0.9)), seq_len // 3))
        text = " ".join(rng.choice(words) for _ in range(k))
        rows.append(render([{"role": "user", "content": f"Echo: {text}"}, {"role": "assistant", "content": text}],
                           tok))
    data = work / "data"
    write_dataset_dir(data, rows, rows[:8], {"tokenizer": str(model), "chat_template": tok.chat_template})
    return model, data


def stage(model: Path, data: Path, **kw) -> dict:
    import torch

    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.registry import Registry

    os.environ["LLMOPS_HOME"] = tempfile.mkdtemp(prefix="bench-gpu-home-")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    res = Runner(Registry(os.environ["LLMOPS_HOME"])).run("finetune", {
        "model": str(model), "data": str(data), "log_every": 5, "checkpoint_every": 0, "rank": 16, "seed": 0, **kw})
    m, s = res.metrics, res.summary
    return {"status": res.status, "tokens_per_s": m.get("train_tokens_per_s"), "mfu_pct": m.get("mfu_pct"),
            "peak_memory_mb": m.get("peak_memory_mb"), "padding_waste_pct": s.get("padding_waste_pct"),
            "batching": s.get("batching"), "attention_kernel": s.get("attention_kernel"),
            "reason": s.get("batching_reason"), "mfu_rule": s.get("mfu_rule"), "final_loss": m.get("loss")}


def main(argv: list[str] | None = None) -> dict:
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu_training: needs a CUDA GPU; skipped")
        return {"skipped": "no CUDA GPU"}
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args(argv)  # None: the command line (bench/run.py sets sys.argv to the script alone)
    sys.path.insert(0, str(HERE))
    import bench_finetune as bf

    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    model, data = build(work, LLAMA_32_1B, a.steps * a.batch_size, a.seq_len)
    common = {"max_steps": a.steps, "seq_len": a.seq_len}
    r: dict = {"gpu": torch.cuda.get_device_name(), "shape": "Llama-3.2-1B", "settings": vars(a),
               "versions": bf.versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    r["lora"] = stage(model, data, method="lora", dtype="bfloat16", batch_size=a.batch_size, **common)
    r["lora_sdpa_flat"] = stage(model, data, method="lora", dtype="bfloat16", batch_size=a.batch_size,
                                batching="flat", **common)
    r["trl_padding_free"] = bf.variant_baseline(str(model), str(data), a.steps, a.batch_size, a.seq_len,
                                                "trl_padding_free")
    small = {**common, "batch_size": 2, "gradient_checkpointing": True}
    r["lora_mb2_gc"] = stage(model, data, method="lora", dtype="bfloat16", **small)
    r["qlora_mb2_gc"] = stage(model, data, method="qlora", dtype="bfloat16", **small)
    goals = [("LoRA bf16 1B seq 2048 MFU ≥ 30%", (r["lora"]["mfu_pct"] or 0) / 30.0, 1.0),
             ("LoRA ≥ 1.3× TRL padding_free", r["lora"]["tokens_per_s"] / r["trl_padding_free"]["tokens_per_s"], 1.3),
             ("QLoRA peak memory ≤ 0.5× LoRA (mb 2, GC)",
              0.5 / (r["qlora_mb2_gc"]["peak_memory_mb"] / r["lora_mb2_gc"]["peak_memory_mb"]), 1.0),
             ("QLoRA tokens/s ≥ 0.8× LoRA (mb 2, GC)",
              r["qlora_mb2_gc"]["tokens_per_s"] / r["lora_mb2_gc"]["tokens_per_s"], 0.8)]
    r["goals"] = [{"goal": g, "ratio": v, "threshold": t, "holds": v >= t} for g, v, t in goals]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"finetune-gpu-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(r, indent=2, default=str))
    for k in ("lora", "lora_sdpa_flat", "trl_padding_free", "lora_mb2_gc", "qlora_mb2_gc"):
        v = r[k]
        print(f"  {k:<18} {v['tokens_per_s']:>10,.0f} tok/s  MFU {v.get('mfu_pct') or 0:5.1f}%  "
              f"peak {v.get('peak_memory_mb') or 0:>8,.0f} MB  {v.get('batching')} / {v.get('attention_kernel')}")
    for g in r["goals"]:
        print(f"  GOAL {g['goal']:<44} {g['ratio']:.2f}  {'holds' if g['holds'] else 'DOES NOT HOLD'}")
    return r


if __name__ == "__main__":
    main()

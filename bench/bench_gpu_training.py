"""GPU only: LoRA vs QLoRA through `%llmops finetune` on one model — tokens/s, MFU and peak memory.

MFU counts 4 × parameters FLOPs per trained token (forward 2N + backward through frozen weights 2N; LoRA adds
no weight-gradient GEMMs for the frozen base), against the GPU's dense bf16 peak. Ratios (QLoRA ÷ LoRA) are the
result to compare across machines; absolute numbers are recorded in bench/RESULTS.md with the device and date.

    PYTHONPATH=. python bench/bench_gpu_training.py [--hidden 2048 --layers 16 --steps 30]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def main(argv: list[str] | None = None) -> dict:
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu_training: needs a CUDA GPU; skipped")
        return {"skipped": "no CUDA GPU"}
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    args = p.parse_args(argv or [])

    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.testing import build_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    os.environ["LLMOPS_HOME"] = str(work / ".llmops")
    model = build_tiny_model(work / "model", hidden=args.hidden, layers=args.layers)
    reg = Registry(work / ".llmops")
    data = _long_dataset(reg, model, args.seq_len)
    n_params = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 4  # fp32 checkpoint
    gpu = torch.cuda.get_device_name(0)
    rows = {}
    for method, dtype in (("lora", "bfloat16"), ("qlora", "auto")):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        res = Runner(reg).run("finetune", model=str(model), data=data.hash, method=method, dtype=dtype,
                              max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                              gradient_checkpointing=False, log_every=5)
        tps = res.metrics.get("train_tokens_per_s") or res.metrics.get("tokens_per_s")
        peak = peak_tflops(gpu)
        rows[method] = {"tokens_per_s": tps, "peak_memory_mb": res.metrics.get("peak_memory_mb"),
                        "mfu": (4 * n_params * tps / (peak * 1e12)) if peak and tps else None,
                        "batching": res.summary.get("batching"), "final_loss": res.metrics.get("loss")}
    result = {"gpu": gpu, "params_m": round(n_params / 1e6, 1), **{f"{m}_{k}": v for m, r in rows.items()
                                                                  for k, v in r.items()},
              "qlora_vs_lora_memory": rows["qlora"]["peak_memory_mb"] / rows["lora"]["peak_memory_mb"],
              "qlora_vs_lora_tokens_per_s": rows["qlora"]["tokens_per_s"] / rows["lora"]["tokens_per_s"]}
    print(f"{gpu}: {result['params_m']}M params, seq {args.seq_len} x batch {args.batch_size}, {args.steps} steps")
    for m, r in rows.items():
        mfu = f"{r['mfu'] * 100:.1f}%" if r["mfu"] else "n/a"
        print(f"  {m:6s} tokens/s {r['tokens_per_s']:>10.0f}  peak {r['peak_memory_mb']:>8.0f} MB  MFU {mfu}  "
              f"batching {r['batching']}")
    print(f"  QLoRA/LoRA peak memory {result['qlora_vs_lora_memory']:.2f}x, tokens/s "
          f"{result['qlora_vs_lora_tokens_per_s']:.2f}x")
    return result


def _long_dataset(reg, model, seq_len: int):
    """Variable-length examples up to ~seq_len tokens so packing has work to do."""
    import random

    from transformers import AutoTokenizer

    from llmops_jupyter.registry import RunStatus
    from llmops_jupyter.stages.data.format import render, write_dataset_dir

    tok = AutoTokenizer.from_pretrained(str(model))
    rng = random.Random(0)
    words = "red green blue yellow black white model token adapter data train loss".split()
    rows = []
    for _ in range(600):
        k = max(4, min(int(rng.lognormvariate(4.0, 0.8)), seq_len // 3))
        text = " ".join(rng.choice(words) for _ in range(k))
        rows.append(render([{"role": "user", "content": f"Echo: {text}"}, {"role": "assistant", "content": text}],
                           tok))
    run = reg.create_run("data", {"source": "bench"})
    folder = reg.staging_dir()
    write_dataset_dir(folder, rows[32:], rows[:32], {"tokenizer": str(model), "chat_template": tok.chat_template})
    art = reg.add_artifact(folder, "dataset", run_id=run, move=True)
    reg.finish_run(run, RunStatus.FINISHED)
    return art


if __name__ == "__main__":
    main()

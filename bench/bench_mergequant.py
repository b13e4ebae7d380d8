"""Merge + quantize benchmark on the tiny model: every quantized export measured against its own source.

Ratios (size, perplexity, load time, tokens/s) are quantized / source, both measured in this run on this machine,
so the numbers compare across machines. Run: ``python bench/bench_mergequant.py``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any


def _adapter(registry, base_path, dataset):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmops_jupyter.registry import RunStatus

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_path)), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    base = registry.add_reference(base_path, "base-model")
    run_id = registry.create_run("finetune", {"model": str(base_path)})
    registry.link_input(run_id, base)
    folder = registry.staging_dir("finetune")
    model.save_pretrained(str(folder))
    registry.add_artifact(folder, "adapter", name="bench-lora", run_id=run_id, move=True,
                          meta={"base_model_path": str(base_path)}, inputs=[base.hash, dataset.hash])
    registry.finish_run(run_id, RunStatus.FINISHED)
    return run_id


def main() -> dict[str, Any]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from llmops_jupyter.core.display import Table
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.testing import build_tiny_model, write_tiny_dataset

    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_model(Path(tmp) / "tiny")
        reg = Registry(Path(tmp) / ".llmops")
        dataset = write_tiny_dataset(reg, tiny, n=96)
        runner = Runner(reg)
        t0 = time.perf_counter()
        merged = runner.run("merge", adapter=_adapter(reg, tiny, dataset))
        merge_s = time.perf_counter() - t0
        results: dict[str, Any] = {"merge_s": merge_s, "merge_max_abs_diff": merged.metrics["merge_max_abs_diff"]}
        rows = []
        for method, extra in (("gptq", {"group_size": 32}), ("bnb-4bit", {}), ("bnb-8bit", {})):
            res = runner.run("quantize", model=merged.run_id, method=method, calibration_samples=64,
                             eval_samples=24, generate_tokens=32, **extra)
            m = res.metrics
            r = {"size_ratio": m["size_ratio"], "ppl_source": m["source_perplexity"], "ppl": m["perplexity"],
                 "ppl_ratio": m["perplexity"] / m["source_perplexity"], "load_ratio": m["load_s"] / m["source_load_s"],
                 "tokens_per_s_ratio": m["tokens_per_s"] / m["source_tokens_per_s"], "quantize_s": m["quantize_s"]}
            results[method] = r
            rows.append([method, f"{r['size_ratio']:.3f}", f"{r['ppl_source']:.2f} → {r['ppl']:.2f}",
                         f"{r['ppl_ratio']:.3f}", f"{r['load_ratio']:.2f}", f"{r['tokens_per_s_ratio']:.2f}",
                         f"{r['quantize_s']:.1f}"])
    print(Table(["method", "size ×", "perplexity (eval)", "ppl ×", "load time ×", "tokens/s ×", "quantize s"], rows,
                title=f"quantized / source on the tiny model (merge {merge_s:.1f} s, "
                      f"max |Δlogit| {results['merge_max_abs_diff']:.2g})"))
    return results


if __name__ == "__main__":
    main()

"""Checks that only mean something on a CUDA GPU (skipped without one; run on a lent GPU, never required by CI)."""

from __future__ import annotations

import pytest

from llmops_jupyter.core.runner import Runner

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def wider_model(tmp_path_factory):
    from llmops_jupyter.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("gpu") / "m", hidden=1024, layers=8)


def _dataset(registry, model):
    from llmops_jupyter.testing import write_tiny_dataset

    return write_tiny_dataset(registry, model, n=96)


def test_lora_and_qlora_train_on_cuda_and_qlora_uses_less_memory(registry, wider_model):
    # Small batches so the weights dominate peak memory (at large batches QLoRA's fp32 activations win, see
    # bench/RESULTS.md).
    data = _dataset(registry, wider_model)
    common = dict(model=str(wider_model), data=data.hash, max_steps=15, batch_size=1, seq_len=32, lr=1e-3, log_every=1)
    lora = Runner(registry).run("finetune", method="lora", dtype="bfloat16", **common)
    qlora = Runner(registry).run("finetune", method="qlora", **common)
    for res in (lora, qlora):
        hist = [m["value"] for m in registry.metric_history(res.run_id, "loss")]
        assert hist[-1] < hist[0]
        assert res.summary.get("batching") in ("flat", "flat-mask", "grouped")
    assert qlora.summary["optimizer"] == "paged_adamw_8bit"
    assert qlora.metrics["peak_memory_mb"] < lora.metrics["peak_memory_mb"]


def test_batched_generation_matches_sequential_on_cuda(wider_model):
    from llmops_jupyter.models.inference import generate, load_model

    model, tok = load_model(wider_model, dtype="float32", device="cuda")
    prompts = [f"Question: what is {i} plus {i}? Answer:" * (1 + i % 3) for i in range(12)]
    batched = generate(model, tok, prompts, max_new_tokens=12, batch_size=12)
    single = [generate(model, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert [b.text for b in batched] == [s.text for s in single]


def test_plan_detects_the_gpu_and_estimates_a_measured_run(registry, wider_model):
    import torch

    from llmops_jupyter.models.planning import detect_device, estimate, load_arch

    dev = detect_device()
    assert dev.kind == "gpu" and dev.total_gb > 1
    data = _dataset(registry, wider_model)
    torch.cuda.reset_peak_memory_stats()
    res = Runner(registry).run("finetune", model=str(wider_model), data=data.hash, method="lora", dtype="bfloat16",
                               max_steps=5, batch_size=8, seq_len=128, packing=False)
    measured = res.metrics["peak_memory_mb"] * 2**20
    est = estimate(load_arch(str(wider_model), registry), "lora", 128, 8, device_kind="gpu")
    planned = est.total - est.parts["runtime overhead"]  # the CUDA context is not in max_memory_allocated
    assert 0.5 < measured / planned < 2.0, (measured, planned)  # the planner's stated accuracy: within 2×

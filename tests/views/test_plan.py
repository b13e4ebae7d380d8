import subprocess
import sys

import pytest

from llmops_jupyter.models.planning import CATALOG, GB, Arch, advise, detect_device, estimate, load_arch


def test_catalog_parameter_counts_match_published_sizes():
    expected = {"Llama-3.1-8B": 8.03e9, "Mistral-7B-v0.3": 7.25e9, "Qwen2.5-7B": 7.62e9, "SmolLM2-135M": 0.135e9,
                "Llama-3.2-1B": 1.24e9}
    for name, params in expected.items():
        arch = Arch.from_config(name, CATALOG[name])
        assert abs(arch.params - params) / params < 0.03, (name, arch.params)


def test_estimates_order_and_lora_param_count():
    arch = load_arch("Llama-3.1-8B")
    # LoRA r=16 on all 7 projections of Llama-3.1-8B: 41.9M trainable parameters (peft reports the same)
    assert arch.lora_params(16) == 41_943_040
    full = estimate(arch, "full", 2048, 1)
    lora = estimate(arch, "lora", 2048, 1)
    qlora = estimate(arch, "qlora", 2048, 1)
    assert full.total > lora.total > qlora.total
    assert 14 * GB < lora.parts["weights"] < 16 * GB and 4.5 * GB < qlora.parts["weights"] < 6 * GB
    ckpt = estimate(arch, "lora", 2048, 1, gradient_checkpointing=True)
    assert ckpt.parts["activations"] < lora.parts["activations"] / 10


def test_advice_when_it_does_not_fit():
    from llmops_jupyter.models.planning import Device

    arch = load_arch("Llama-3.1-8B")
    device = Device("gpu", "24 GB GPU", 24, 24)
    est = estimate(arch, "lora", 2048, 4)
    tips = advise(arch, est, device, 16)
    assert any("--gradient-checkpointing" in t for t in tips)
    assert any("--method qlora" in t and "fits" in t for t in tips)
    assert any(t.startswith("batch ") and "gradient accumulation" in t for t in tips)


def test_plan_magic_and_models_view(shell, tiny_model, capsys):
    plan = shell.run_line_magic("llmops", "plan --model Llama-3.1-8B --method lora --seq-len 4096 --batch 8 "
                                          "--gpu-memory 24")
    assert not plan.fits and "DOES NOT FIT" in str(plan) and "--method qlora" in str(plan)
    ok = shell.run_line_magic("llmops", f"plan --model {tiny_model} --method qlora")
    assert ok.fits and "FITS" in ok._repr_html_()
    table = shell.run_line_magic("llmops", f"models --path {tiny_model.parent}")
    assert "tiny-llama" in str(table) and "0.1M" in str(table) and "F32" in str(table)


def test_device_detection_without_gpu_uses_ram():
    dev = detect_device()
    assert dev.total_gb > 0 and dev.kind in ("cpu", "gpu")


def test_cli_plan_and_bad_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "llmops_jupyter.frontends.cli", "plan", "--model", "Qwen2.5-7B", "--method",
                          "qlora", "--gpu-memory", "80"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("FITS")
    bad = subprocess.run([sys.executable, "-m", "llmops_jupyter.frontends.cli", "plan", "--model", str(tmp_path / "missing")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1 and "not found" in bad.stderr and "Fix:" in bad.stderr
    usage = subprocess.run([sys.executable, "-m", "llmops_jupyter.frontends.cli", "plan", "--model", "x", "--batch", "0"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert usage.returncode == 2 and "--batch must be >= 1" in usage.stderr


@pytest.mark.parametrize("name", ["SmolLM2-135M", "smollm2-135m"])
def test_catalog_lookup_is_case_insensitive(name):
    assert load_arch(name).name == "SmolLM2-135M"

"""`plan --cost`: closed-form fine-tuning FLOPs / GPU-hours / USD, a fine-tune's runtime calibrated on its first
steps, and a deployment's $ per 1M tokens and break-even volume from its real request log."""

from __future__ import annotations

import pytest

from llmops_jupyter.core.runner import Runner
from llmops_jupyter.models import cost


def test_training_flops_and_gpu_hours_closed_form(shell):
    n, d = 8.03e9, 1e8
    assert cost.training_flops(n, d, "lora") == 4 * n * d == cost.training_flops(n, d, "qlora")
    assert cost.training_flops(n, d, "lora", gradient_checkpointing=True) == 6 * n * d
    assert cost.training_flops(n, d, "full") == 6 * n * d
    assert cost.training_flops(n, d, "full", gradient_checkpointing=True) == 8 * n * d
    tc = cost.TrainingCost(4 * n * d, 989.0, 0.4, "assumed MFU", 2.5, gpus=4)
    assert tc.gpu_hours == pytest.approx(4 * n * d / (989e12 * 0.4) / 3600, rel=1e-12)
    assert tc.usd == pytest.approx(tc.gpu_hours * 2.5, rel=1e-12) and tc.wall_hours == pytest.approx(tc.gpu_hours / 4)

    out = shell.run_line_magic("llmops", "plan --model Llama-3.1-8B --cost --tokens 100000000 --gpu H100 "
                                         "--usd-per-hour 2.5 --gradient-checkpointing")
    table = out.parts[1]
    t = table.values["training"]
    arch_n = out.parts[0].arch.params
    assert t.flops == 6 * arch_n * 1e8 and t.peak_tflops == 989.0 and t.mfu == cost.DEFAULT_MFU
    assert t.usd == pytest.approx(6 * arch_n * 1e8 / (989e12 * 0.35) / 3600 * 2.5, rel=1e-12)
    basis = {r[0]: r[2] for r in table.rows}
    assert basis["training FLOPs"].startswith("4+2·N·D")
    assert all("assumed MFU" in basis[k] and "measured" not in basis[k]
               for k in ("MFU", "GPU-hours", "wall-clock hours", "cost"))
    with pytest.raises(Exception, match="no known peak TFLOP/s"):
        shell.run_line_magic("llmops", "plan --model Llama-3.1-8B --cost --tokens 1000 --gpu Mystery9000")


def test_serving_cost_closed_form():
    assert cost.busy_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4
    hosted = cost.Price("h", None, 0.15, 0.6, "t", "d")
    sc = cost.ServingCost("dep", requests=10, tokens_in=5000, tokens_out=1000, busy_s=20.0, usd_per_hour=3.6,
                          utilisation=0.5, hosted=hosted)
    assert sc.tokens_per_s == 300 and sc.usd_per_mtok == pytest.approx(3.6 / (300 * 3600 * 0.5) * 1e6)
    per_req = (5000 * 0.15 + 1000 * 0.6) / 1e6 / 10
    assert sc.hosted_usd_per_request == pytest.approx(per_req, abs=1e-15)
    assert sc.break_even_requests_per_hour == pytest.approx(3.6 / per_req) and sc.capacity_requests_per_hour == 1800


@pytest.mark.slow  # ~20-40 s of training; the ±25% needs a machine whose load is steady during the run
def test_calibrated_estimate_of_a_tiny_fine_tune_is_within_25_percent(registry, tiny_dataset, tiny_model, shell):
    ft = Runner(registry).run("finetune", {"model": str(tiny_model), "data": tiny_dataset.hash, "batch_size": 4,
                                           "log_every": 1, "checkpoint_every": 0, "seq_len": 64, "max_steps": 120})
    out = shell.run_line_magic("llmops", f"plan --cost --run {ft.run_id} --usd-per-hour 1.2")
    cal = out.values["calibration"]
    measured = ft.metrics["train_runtime_s"]
    assert cal.total_steps == 120 and cal.steps_seen == 20 and cal.measured_runtime_s == measured
    assert abs(cal.estimated_runtime_s - measured) / measured <= 0.25, (cal.estimated_runtime_s, measured)
    basis = {r[0]: r[2] for r in out.rows}
    assert basis["runtime (calibrated)"].count("measured") == 1 and "assumed" not in basis["cost (calibrated)"]


def test_deployment_cost_per_token_from_its_request_log(registry, tiny_model, shell, monkeypatch):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from llmops_jupyter.stages.serve import server

    monkeypatch.setenv("PLAN_SERVE_KEY", "sk-plan-test-0123456789")
    dep = Runner(registry).run("serve", model=str(tiny_model), api_key_env="PLAN_SERVE_KEY", foreground=False)
    try:
        url = dep.outputs["deployment"].info["url"]
        for i in range(3):
            r = httpx.post(f"{url}/chat/completions", headers={"Authorization": "Bearer sk-plan-test-0123456789"},
                           json={"model": "tiny-llama", "max_tokens": 8,
                                 "messages": [{"role": "user", "content": f"count to {i}"}]}, timeout=60)
            assert r.status_code == 200
        dep.outputs["handle"].serve_ctx.log.flush()
        out = shell.run_line_magic("llmops", f"plan --cost --deployment {dep.run_id} --usd-per-hour 2 "
                                             "--utilisation 0.5 --hosted openai:https://api.openai.com/v1#gpt-4o-mini")
    finally:
        server.stop(registry, dep.run_id, timeout=30)
    sc = out.values["serving"]
    rows = [r for r in registry.requests(dep.run_id) if r["status"] == 200]
    assert sc.requests == 3 and sc.tokens_out == sum(r["tokens_out"] for r in rows)
    assert sc.usd_per_mtok == pytest.approx(2 / (sc.tokens_per_s * 3600 * 0.5) * 1e6)
    if sc.hosted.known:  # genai-prices installed: break-even = $/h ÷ hosted $ per request of this traffic
        assert sc.break_even_requests_per_hour == pytest.approx(2 / sc.hosted_usd_per_request)
        assert "break-even volume" in str(out) and "genai-prices" in str(out)

"""Fine-tuning stage on the tiny model: LoRA/QLoRA learn, packing is exact, interrupt + resume equal an
uninterrupted run, lineage, magics, a real kernel's saved notebook, detached workers and the accelerate launcher."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from llmops_jupyter.core.errors import ConfigError, ResourceError, StageError
from llmops_jupyter.testing import sliced_kernel_manager, wait_until

ROOT = Path(__file__).resolve().parents[3]

FAST = {"batch_size": 4, "lr": 1e-2, "log_every": 1, "checkpoint_every": 0, "seq_len": 64}


def run_ft(registry, model, dataset, listeners=(), **kw):
    from llmops_jupyter.core.runner import Runner

    runner = Runner(registry, listeners=list(listeners))
    return runner.run("finetune", {"model": str(model), "data": dataset.hash, **FAST, **kw})


def losses(registry, run_id, key="loss"):
    return [(r["step"], r["value"]) for r in registry.metric_history(run_id, key)]


def test_lora_learns_records_adapter_with_lineage(registry, tiny_model, tiny_dataset):
    res = run_ft(registry, tiny_model, tiny_dataset, max_steps=12, eval_every=6)
    assert res.status == "finished"
    hist = losses(registry, res.run_id)
    assert len(hist) == 12 and hist[-1][1] < hist[0][1]
    for key in ("loss", "eval_loss", "lr", "tokens_per_s", "memory_mb"):
        assert key in res.metrics, key
    art = res.artifact
    assert art.kind == "adapter" and (art.path / "adapter_config.json").exists()
    assert art.meta["dataset"] == tiny_dataset.hash and art.meta["data_version"]
    assert art.meta["base_model_hash"] and art.meta["config"]["method"] == "lora"
    assert art.meta["batching"] in ("flat", "packed", "grouped") and res.summary["batching_reason"]
    chain = {a.kind: a.hash for a in registry.lineage_chain(art)}
    assert chain["dataset"] == tiny_dataset.hash and "base-model" in chain
    fig = res.outputs["loss_figure"]
    assert {t.name for t in fig.data} >= {"loss", "eval_loss", "lr", "tokens_per_s", "memory_mb"}
    # the adapter loads back onto its base with peft
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(art.path))
    assert model.peft_config["default"].r == 16


def test_qlora_learns_on_4bit_base(registry, tiny_model, tiny_dataset):
    res = run_ft(registry, tiny_model, tiny_dataset, method="qlora", max_steps=10)
    hist = losses(registry, res.run_id)
    assert hist[-1][1] < hist[0][1]
    assert res.summary["optimizer"] == "adamw_bnb_8bit"
    assert res.artifact.meta["method"] == "qlora"


def test_packed_batch_loss_equals_padded_batch_loss(tiny_model):
    """Every layout the stage can train with gives the loss of plain padding (the library's packed path: position
    ids restarting per example, no mask, no cache). Kernel noise and leaks: tests/stages/finetune/test_batching.py."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmops_jupyter.stages.finetune.sft import Batcher, tokenize
    from llmops_jupyter.testing import tiny_records

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    rows = [{"prompt": r["instruction"] + "\n", "completion": r["response"]} for r in tiny_records(6)]
    feats = tokenize(rows, tok, 64, completion_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
    with torch.no_grad():
        padded = model(**Batcher("grouped", tok)(feats)).loss
        for mode in ("flat", "packed"):
            packed = model(**Batcher(mode, tok)(feats)).loss  # the batch itself carries use_cache=False
            assert abs(padded.item() - packed.item()) < 1e-5, mode


@pytest.mark.slow
def test_interrupt_keeps_checkpoint_and_resume_equals_uninterrupted(registry, tiny_model, tiny_dataset):
    from safetensors.torch import load_file

    from llmops_jupyter.core.runner import EventType, RunInterrupted
    from llmops_jupyter.stages.finetune.train import last_checkpoint

    opts = {"max_steps": 8, "checkpoint_every": 3, "dropout": 0.1}
    full = run_ft(registry, tiny_model, tiny_dataset, **opts)

    def ctrl_c_at_step_5(event):
        if event.type is EventType.PROGRESS and event.data.get("done") == 5:
            raise KeyboardInterrupt

    with pytest.raises(RunInterrupted) as info:
        run_ft(registry, tiny_model, tiny_dataset, listeners=[ctrl_c_at_step_5], **opts)
    cut = info.value.run_id
    assert registry.get_run(cut)["status"] == "interrupted"
    assert f"--resume {cut}" in str(info.value)
    step, ckpt = last_checkpoint(registry, cut)
    assert step == 3 and (ckpt / "adapter_model.safetensors").exists()

    resumed = run_ft(registry, tiny_model, tiny_dataset, resume=cut)
    assert resumed.summary["resumed_from"] == cut and resumed.summary["resumed_at_step"] == 3
    a, b = dict(losses(registry, full.run_id)), dict(losses(registry, resumed.run_id))
    assert sorted(b) == [4, 5, 6, 7, 8]
    for s in b:
        assert b[s] == pytest.approx(a[s], rel=1e-5, abs=1e-6), s
    wa = load_file(full.artifact.path / "adapter_model.safetensors")
    wb = load_file(resumed.artifact.path / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() < 1e-6, k


def test_magic_finetune_and_attach(shell, tiny_model, tiny_dataset):
    shell.run_line_magic("llmops", f"finetune --model {tiny_model} --data {tiny_dataset.hash[:12]} --max-steps 4 "
                                   "--batch-size 4 --log-every 2 --rank 4 --target-modules q_proj,v_proj")
    result = shell.user_ns["_"] if "_" in shell.user_ns else None
    from llmops_jupyter.registry import Registry

    reg = Registry.open()
    run = reg.get_run("finetune@latest")
    assert run["status"] == "finished" and run["params"]["rank"] == 4
    assert run["params"]["target_modules"] == ["q_proj", "v_proj"]
    art = reg.get_artifact(f"{run['id']}:adapter")
    assert set(json.loads((art.path / "adapter_config.json").read_text())["target_modules"]) == {"q_proj", "v_proj"}
    del result
    fig = shell.run_line_magic("llmops", f"attach {run['id']} --wait")
    assert fig.data[0].name == "loss" and len(fig.data[0].x) == 2


def test_config_errors_name_the_field():
    from llmops_jupyter.stages.finetune.config import FinetuneConfig

    with pytest.raises(ConfigError, match="--method"):
        FinetuneConfig(method="rlhf")
    with pytest.raises(ConfigError, match="--launcher is not supported with --method dpo"):
        FinetuneConfig(method="dpo", launcher="accelerate")
    with pytest.raises(ConfigError, match="--num-processes"):
        FinetuneConfig(num_processes=2)
    with pytest.raises(ConfigError, match="--rank"):
        FinetuneConfig(rank=0)
    assert all(f.metadata["help"] for f in __import__("dataclasses").fields(FinetuneConfig))


def test_cuda_oom_becomes_resource_error_with_plan_advice():
    import torch

    from llmops_jupyter.stages.finetune.config import FinetuneConfig
    from llmops_jupyter.stages.finetune.train import oom_guard

    with pytest.raises(ResourceError, match="%llmops plan --model big") as info:
        with oom_guard(FinetuneConfig(model="big"), "big"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "--gradient-checkpointing" in str(info.value) and "--method qlora" in str(info.value)
    assert info.value.__suppress_context__  # shown as one line, not a CUDA traceback


def test_accelerate_command_line():
    from llmops_jupyter.stages.finetune.launch import accelerate_command

    cmd = accelerate_command(2, Path("spec.json"), cpu=True, port=29999)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "2" and "--multi_gpu" in cmd and "--cpu" not in cmd
    assert cmd[-5:] == ["-m", "llmops_jupyter.stages.finetune.launch", "train", "--spec", "spec.json"]
    assert "--cpu" in accelerate_command(1, Path("s"), cpu=True)


@pytest.mark.slow
def test_accelerate_launcher_two_cpu_processes(registry, tiny_model, tiny_dataset, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = run_ft(registry, tiny_model, tiny_dataset, max_steps=4, launcher="accelerate", num_processes=2)
    assert res.status == "finished" and res.artifact.kind == "adapter"
    # 36 training examples, 4 per process, 2 processes → 4.5 steps per epoch (1 process would be 9)
    assert res.metrics["epoch"] == pytest.approx(4 / 5)
    assert len(losses(registry, res.run_id)) == 4  # rank 0's metrics relayed into the parent's run


@pytest.mark.slow
def test_detached_worker_death_is_reported(registry, tiny_model, tiny_dataset, monkeypatch):
    from llmops_jupyter.core.runner import Runner

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    res = Runner(registry).run("finetune", {"model": str(tiny_model), "data": tiny_dataset.hash, **FAST,
                                            "max_steps": 100000, "detach": True})
    handle = res.outputs["run"]
    assert handle.run_id == res.run_id  # one training, one run
    wait_until(lambda: "loss" in registry.metrics(handle.run_id), 120, what="the detached worker's first loss",
               details=lambda: handle.log.read_text()[-2000:])
    assert registry.get_run(handle.run_id)["pid"] == handle.pid
    os.kill(handle.pid, signal.SIGKILL)
    with pytest.raises(StageError, match="SIGKILL"):
        handle.wait(timeout=60)
    run = registry.get_run(handle.run_id)
    assert run["status"] == "failed" and "worker process killed by signal SIGKILL" in run["error"]


@pytest.mark.slow
def test_saved_notebook_shows_static_loss_figure(tiny_model, tiny_dataset, home, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext llmops_jupyter"),
        nbformat.v4.new_code_cell(f"%llmops finetune --model {tiny_model} --data {tiny_dataset.hash} --max-steps 4 "
                                  "--batch-size 4 --log-every 1"),
        nbformat.v4.new_code_cell("import sys; print(sys.executable)"),
    ]
    env = {"LLMOPS_HOME": str(home), "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
                       kernel_manager_class=sliced_kernel_manager()).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    path = tmp_path / "saved.ipynb"
    nbformat.write(nb, path)
    saved = nbformat.read(path, as_version=4)
    figs = [o["data"]["application/vnd.plotly.v1+json"] for o in saved.cells[1].outputs
            if o.get("output_type") == "display_data" and "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert figs, [o.get("data", {}).keys() for o in saved.cells[1].outputs]
    loss = next(t for t in figs[-1]["data"] if t["name"] == "loss")
    assert len(loss["y"]) == 4
    assert saved.cells[2].outputs[0]["text"].strip() == sys.executable  # the kernel is the venv's python3 kernelspec


def test_dashboard_draws_curves_and_eta_from_events():
    from llmops_jupyter.core.runner import Event, EventType
    from llmops_jupyter.stages.finetune import dashboard as dash

    shown = []
    view = dash.TrainingDashboard(front_end="magic", display=shown.append)
    view(Event(EventType.STARTED, "r", "finetune", {}))
    assert shown, "widgets are displayed when the run starts"
    for step in range(1, 6):
        view(Event(EventType.PROGRESS, "r", "finetune", {"done": step, "total": 10, "desc": "finetune"}))
        view(Event(EventType.METRIC, "r", "finetune", {"values": {"loss": 5.0 - step, "lr": 1e-3}, "step": step}))
    assert "ETA" in view.status_text() and "loss 0.0000" in view.status_text()
    view(Event(EventType.INTERRUPTED, "r", "finetune", {}))
    loss = next(t for t in view._fig.data if t.name == "loss")
    assert list(loss.y) == [4.0, 3.0, 2.0, 1.0, 0.0]
    static = shown[-1]  # an interrupted run still leaves a static figure in the output
    assert type(static).__name__ == "Figure" and "interrupted" in static.layout.title.text
    assert dash.fmt_eta(3725) == "1:02:05"
    # supervised runs have a plain loss panel; a DPO run's panel says what the second curve is, live and static
    assert view._fig.layout.annotations[0].text == "loss" == static.layout.annotations[0].text
    dpo = dash.TrainingDashboard(front_end="magic", display=shown.append)
    dpo(Event(EventType.STARTED, "d", "finetune", {}))
    dpo(Event(EventType.METRIC, "d", "finetune", {"values": {"loss": 0.69, "rewards/margins": 0.1}, "step": 1}))
    dpo.close()
    assert dpo._fig.layout.annotations[0].text == "loss + reward margin (DPO)"

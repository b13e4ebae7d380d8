"""Benchmark: `%llmops finetune` (verified packing) vs a plain transformers Trainer + peft baseline with padding.

Same model, same variable-length data, same steps, seed and LoRA config. Each variant runs in a fresh process so
peak memory (CUDA max allocated, or peak RSS on CPU) is its own. Reported as ratios measured in this run:
useful (non-padding) tokens/s, peak memory, and the live dashboard's overhead as the share of training time spent
inside its event handler (FigureWidget updates included).

    PYTHONPATH=. python bench/bench_finetune.py [--steps 30] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LORA = {"rank": 16, "alpha": 32.0, "dropout": 0.05, "lr": 2e-4, "seed": 0}


def make_inputs(work: Path, hidden: int, layers: int, n: int, seq_len: int) -> tuple[Path, Path]:
    """A wider tiny Llama and a dataset whose lengths follow a long-tailed distribution (as real chat data)."""
    import random

    from transformers import AutoTokenizer

    from llmops_jupyter.stages.data.format import render, write_dataset_dir
    from llmops_jupyter.testing import build_tiny_model

    model = build_tiny_model(work / "model", hidden=hidden, layers=layers)
    tok = AutoTokenizer.from_pretrained(str(model))
    rng = random.Random(0)
    words = "red green blue yellow black white model token adapter data train loss".split()
    rows = []
    for _ in range(n):
        k = max(1, min(int(rng.lognormvariate(3.0, 1.0)), seq_len // 2))
        text = " ".join(rng.choice(words) for _ in range(k))
        rows.append(render([{"role": "user", "content": f"Echo: {text}"}, {"role": "assistant", "content": text}],
                           tok))
    data = work / "data"
    write_dataset_dir(data, rows, rows[:8], {"tokenizer": str(model), "chat_template": tok.chat_template})
    return model, data


def peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def variant_stage(model: Path, data: Path, steps: int, bs: int, seq_len: int, dashboard: bool,
                  method: str = "lora", packing: bool = True) -> dict:
    os.environ["LLMOPS_HOME"] = tempfile.mkdtemp(prefix="bench-home-")
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.stages.finetune.dashboard import TrainingDashboard

    listeners, spent = [], [0.0]
    if dashboard:
        view = TrainingDashboard(front_end="magic", display=lambda obj: None)

        def timed(event):  # widget creation (STARTED, before the model loads) is not training overhead
            t = time.perf_counter()
            view(event)
            if event.type.value != "started":
                spent[0] += time.perf_counter() - t

        listeners.append(timed)
    res = Runner(Registry(os.environ["LLMOPS_HOME"]), listeners=listeners).run("finetune", {
        "model": str(model), "data": str(data), "max_steps": steps, "batch_size": bs, "seq_len": seq_len,
        "log_every": 1, "checkpoint_every": 0, "completion_only_loss": True, "method": method, "packing": packing,
        **LORA})
    m = res.metrics
    return {"tokens_per_s": m["train_tokens_per_s"], "peak_mb": peak_mb(), "train_s": m["train_runtime_s"],
            "tokens": res.summary["tokens"], "batching": res.summary["batching"], "dashboard_s": spent[0],
            "final_loss": m["loss"]}


def variant_baseline(model: Path, data: Path, steps: int, bs: int, seq_len: int) -> dict:
    """What one writes by hand: Trainer + peft, pad to the longest example of each random batch."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from llmops_jupyter.stages.data.format import Dataset
    from llmops_jupyter.stages.finetune.sft import tokenize
    from llmops_jupyter.stages.finetune.train import TokenCounter, resolve_dtype

    ds = Dataset(data)
    tok = AutoTokenizer.from_pretrained(str(model))
    feats = tokenize(ds.train, tok, seq_len, True)
    dtype = resolve_dtype("auto")
    cuda = torch.cuda.is_available()
    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype, **({"device_map": {"": 0}} if cuda else {}))
    set_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"],
                                                 lora_dropout=LORA["dropout"], target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    counter = TokenCounter()
    peft_model.register_forward_pre_hook(counter, with_kwargs=True)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=bs, max_steps=steps,
                             learning_rate=LORA["lr"], lr_scheduler_type="cosine", seed=0, data_seed=0,
                             report_to=[], disable_tqdm=True, logging_steps=1, save_strategy="no",
                             remove_unused_columns=False, use_cpu=not cuda, bf16=cuda and dtype == torch.bfloat16,
                             optim="adamw_torch_fused" if cuda else "adamw_torch")
    trainer = Trainer(model=peft_model, args=args, train_dataset=feats,
                      data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100))
    out = trainer.train()
    rt = out.metrics["train_runtime"]
    loss = [x["loss"] for x in trainer.state.log_history if "loss" in x][-1]
    return {"tokens_per_s": counter.tokens / rt, "peak_mb": peak_mb(), "train_s": rt, "tokens": counter.tokens,
            "batching": "padded", "final_loss": loss}


def _child(kind: str, spec: dict) -> dict:
    code = (f"import json,sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'bench')!r}); "
            f"import bench_finetune as b; spec=json.loads(sys.argv[1]); "
            f"r=b.variant_{kind}(**spec); print('RESULT'+json.dumps(r))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[6:])
    raise RuntimeError(f"{kind} failed:\n{out.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--no-grouped", action="store_true",
                   help="skip packed vs the stage's own length-grouped padding (--no-packing), LoRA and QLoRA")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model, data = make_inputs(Path(tmp), a.hidden, a.layers, a.examples, a.seq_len)
        spec = {"model": str(model), "data": str(data), "steps": a.steps, "bs": a.batch_size, "seq_len": a.seq_len}
        base = _child("baseline", spec)
        stage = _child("stage", {**spec, "dashboard": False})
        dash = _child("stage", {**spec, "dashboard": True})
        grouped = {}
        if not a.no_grouped:  # QLoRA: bitsandbytes' 4-bit CPU kernels; the packing check must see through their noise
            grouped["lora"] = (stage, _child("stage", {**spec, "dashboard": False, "packing": False}))
            grouped["qlora"] = (_child("stage", {**spec, "dashboard": False, "method": "qlora"}),
                                _child("stage", {**spec, "dashboard": False, "method": "qlora", "packing": False}))
    result = {
        "steps": a.steps, "batch_size": a.batch_size, "batching": stage["batching"],
        "tokens_per_s_ratio": stage["tokens_per_s"] / base["tokens_per_s"],
        "peak_memory_ratio": stage["peak_mb"] / base["peak_mb"],
        "same_tokens": stage["tokens"] == base["tokens"],
        "dashboard_overhead_pct": 100 * dash["dashboard_s"] / dash["train_s"],
        "stage": stage, "baseline": base, "stage_with_dashboard": dash,
    }
    for method, (packed, padded) in grouped.items():
        result[f"{method}_vs_grouped"] = {"batching": packed["batching"], "packed": packed, "grouped": padded,
                                          "tokens_per_s_ratio": packed["tokens_per_s"] / padded["tokens_per_s"]}
    rows = [("useful tokens/s  stage ÷ padded baseline", f"{result['tokens_per_s_ratio']:.2f}×", "goal ≥ 1.5×"),
            ("peak memory      stage ÷ padded baseline", f"{result['peak_memory_ratio']:.2f}×", "goal ≤ 1.0×"),
            ("dashboard time   share of training time", f"{result['dashboard_overhead_pct']:.2f}%", "goal < 2%"),
            ("batching chosen by the packing check", stage["batching"], ""),
            ("tokens trained   stage / baseline", f"{stage['tokens']} / {base['tokens']}", "must be equal")]
    print(f"bench_finetune: {a.steps} steps × {a.batch_size} examples, hidden {a.hidden}, {a.layers} layers")
    for method in grouped:
        q = result[f"{method}_vs_grouped"]
        rows.append((f"{method:<6} packed ({q['batching']}) ÷ --no-packing", f"{q['tokens_per_s_ratio']:.2f}×",
                     "length-grouped padding: no goal, reported"))
    for name, value, goal in rows:
        print(f"  {name:<44} {value:>14}   {goal}")
    return result


if __name__ == "__main__":
    main()

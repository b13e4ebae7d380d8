"""Guards: the failure modes of reward-driven training, each detected from the logged metrics and samples.

Each guard fires once per run, with what it saw and what to change. The stage shows it in the cell (a warning)
and writes it to the run's log; with ``--guard-action stop`` it also ends training cleanly (status ``pruned``
with the reason). Pure logic: metric dicts and sample rows in, :class:`Alert` out (tested without training).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any


@dataclasses.dataclass
class Alert:
    guard: str
    step: int
    message: str

    def __str__(self) -> str:
        return f"rl guard '{self.guard}' at step {self.step}: {self.message}"


class Guards:
    """Fed every log (:meth:`observe`) and every held-out check (:meth:`observe_check`)."""

    ZERO_STD_LOGS = 3

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.fired: dict[str, Alert] = {}
        self._zero_run = 0
        self._length0: float | None = None
        self._rewards: list[float] = []
        self._checks: list[tuple[int, float]] = []  # (step, held-out check score)
        self._dominant_run: tuple[str, int] = ("", 0)

    def _fire(self, guard: str, step: int, message: str) -> list[Alert]:
        if guard in self.fired:
            return []
        alert = Alert(guard, step, message)
        self.fired[guard] = alert
        return [alert]

    def observe(self, step: int, logs: dict[str, float], samples: list[dict[str, Any]] | None = None) -> list[Alert]:
        cfg, out = self.cfg, []
        zero = logs.get("frac_reward_zero_std")
        if zero is not None:
            self._zero_run = self._zero_run + 1 if zero > cfg.zero_std_max else 0
            if self._zero_run >= self.ZERO_STD_LOGS:
                out += self._fire("zero-variance", step, (
                    f"{zero:.0%} of groups had identical rewards for {self._zero_run} logs in a row "
                    f"(frac_reward_zero_std > {cfg.zero_std_max:g}): they have zero advantage and train nothing. "
                    f"Raise --num-generations (now {cfg.num_generations}) or --temperature (now {cfg.temperature:g}), "
                    "give partial credit in the reward, or use easier prompts"))
        length = logs.get("completions/mean_length")
        if length is not None:
            if self._length0 is None:
                self._length0 = length
            elif self._length0 > 0 and length > cfg.length_ratio_max * self._length0:
                out += self._fire("length", step, (
                    f"mean completion length {length:.0f} tokens is over {cfg.length_ratio_max:g}× its start "
                    f"({self._length0:.0f}): a reward may be paying for length. Add the overlong penalty "
                    "(--reward ...,overlong) or check what rises with length"))
        clipped = logs.get("completions/clipped_ratio")
        if clipped is not None and clipped > cfg.clipped_max:
            out += self._fire("length", step, (
                f"{clipped:.0%} of completions were cut at --max-completion-length {cfg.max_completion_length} "
                f"(clipped ratio > {cfg.clipped_max:g}): their rewards judge unfinished answers. Raise "
                "--max-completion-length, add the overlong penalty (--reward ...,overlong) or ask for shorter answers"))
        kl = logs.get("kl")
        if kl is not None and kl > cfg.kl_max:
            out += self._fire("kl", step, (
                f"KL to the base model {kl:.3g} is over --kl-max {cfg.kl_max:g}: the policy is drifting far from "
                "its base. Raise --beta, lower --lr, or stop at an earlier checkpoint"))
        if "reward" in logs:
            self._rewards.append(logs["reward"])
        if samples:
            out += self._dominance(step, samples)
        return out

    def _dominance(self, step: int, samples: list[dict[str, Any]]) -> list[Alert]:
        names = list(samples[0]["rewards"])
        if len(names) < 2 or len(samples) < 4:
            return []
        weights = dict(zip(names, getattr(self.cfg, "reward_weights", None) or [1.0] * len(names)))
        var = {}
        for n in names:
            vals = [s["rewards"][n] * weights.get(n, 1.0) for s in samples if s["rewards"][n] == s["rewards"][n]]
            var[n] = statistics.pvariance(vals) if len(vals) > 1 else 0.0
        total = sum(var.values())
        if total <= 0:
            return []
        top = max(var, key=var.get)
        share = var[top] / total
        if share <= self.cfg.dominance_max:
            self._dominant_run = ("", 0)
            return []
        prev, count = self._dominant_run
        self._dominant_run = (top, count + 1 if prev == top else 1)
        if self._dominant_run[1] >= 3:  # for 3 logs in a row: one batch's variance is noisy
            quiet = ", ".join(n for n in names if n != top)
            return self._fire("dominance", step, (
                f"reward '{top}' carries {share:.0%} of the reward variance (> {self.cfg.dominance_max:g}): "
                f"{quiet} barely steer training. Rescale with --reward-weights or make the others graded"))
        return []

    def observe_check(self, step: int, score: float) -> list[Alert]:
        """A held-out verifiable check (greedy answers scored by --check-reward): reward rising while it is flat."""
        self._checks.append((step, score))
        if len(self._checks) < 3 or len(self._rewards) < 6:
            return []
        s0, s1 = self._checks[0][1], self._checks[-1][1]
        r0, r1 = statistics.fmean(self._rewards[:3]), statistics.fmean(self._rewards[-3:])
        if r1 - r0 > 0.1 and s1 <= s0 + 0.02:
            return self._fire("reward-vs-check", step, (
                f"training reward rose {r0:.3f} → {r1:.3f} while the held-out check ({self.cfg.check_reward}) went "
                f"{s0:.3f} → {s1:.3f}: the reward may be gamed. Inspect the completions table and tighten the reward"))
        return []

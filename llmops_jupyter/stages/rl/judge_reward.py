"""``--reward judge`` (RLAIF): the project's LLM judge (:mod:`llmops_jupyter.stages.eval.judge`) as a reward.

Each completion is graded against the rubric (1-5, parsed as the eval stage parses it) and scaled to 0-1. Scores
are cached by the hash of (prompt, completion) — in memory and in the run's ``judge_cache.jsonl``, so a repeated
pair never costs a second call, across a resume too — and the number of judge calls is capped
(``--judge-max-calls``): past the cap an unseen pair gets ``None`` ("does not apply") and one warning. A judge
that is the model being trained is refused: a policy grading itself rewards whatever it already says.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Any

from llmops_jupyter.core.errors import ConfigError


def pair_key(prompt: str, completion: str) -> str:
    return hashlib.sha256(json.dumps([prompt, completion], ensure_ascii=False).encode()).hexdigest()


class JudgeReward:
    """A reward callable around a :class:`~llmops_jupyter.stages.eval.judge.Judge`; ``calls`` counts real calls."""

    __name__ = "judge"

    def __init__(self, judge: Any, *, rubric: str | None = None, max_calls: int = 2000,
                 cache_path: Path | None = None):
        self.judge, self.rubric, self.max_calls = judge, rubric, max_calls
        self.cache: dict[str, float | None] = {}
        self.cache_path = cache_path
        self.calls = 0
        self._warned = False
        if cache_path is not None and cache_path.exists():
            for line in cache_path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.cache[row["key"]] = row["score"]

    @classmethod
    def from_config(cls, cfg: Any, registry: Any, *, policy: Any, cache_path: Path | None = None) -> JudgeReward:
        from llmops_jupyter.stages.eval.judge import is_endpoint, make_judge

        ref = cfg.judge
        if not is_endpoint(ref):
            from llmops_jupyter.models.refs import resolve_model

            judge_model = resolve_model(ref, registry)
            same = Path(judge_model.path).resolve() == Path(policy.path).resolve() or ref == cfg.model
            base = getattr(judge_model, "base", None)
            if same or (base is not None and Path(base.path).resolve() == Path(policy.path).resolve()):
                raise ConfigError(f"rl: --judge {ref} is the model being trained (or an adapter on it); a policy "
                                  "grading itself rewards whatever it already says.", field="judge", value=ref,
                                  fix="pass a different, stronger model or an OpenAI-compatible URL as --judge")
        judge = make_judge(ref, registry=registry, model=cfg.judge_model, api_key_env=cfg.judge_api_key_env)
        return cls(judge, rubric=cfg.judge_rubric, max_calls=cfg.judge_max_calls, cache_path=cache_path)

    def __call__(self, prompts: list, completions: list, answer: Any = None, **_: Any) -> list[float | None]:
        refs = answer if isinstance(answer, list) else [answer or ""] * len(completions)
        keys = [pair_key(str(p), str(c)) for p, c in zip(prompts, completions)]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        seen: dict[str, int] = {}
        unique = []
        for i in todo:
            if keys[i] not in seen:
                seen[keys[i]] = i
                unique.append(i)
        room = max(0, self.max_calls - self.calls)
        if len(unique) > room and not self._warned:
            self._warned = True
            from llmops_jupyter.core.capture import LlmopsWarning

            warnings.warn(LlmopsWarning(f"judge reward: --judge-max-calls {self.max_calls} reached; unseen "
                                        "completions get no judge score from now on"), stacklevel=2)
        graded = unique[:room]
        if graded:
            verdicts = self.judge.grade([(str(prompts[i]), str(refs[i]), str(completions[i])) for i in graded],
                                        self.rubric)
            self.calls += len(graded)
            new = []
            for i, v in zip(graded, verdicts):
                score = None if math.isnan(v.score) else (v.score - 1.0) / 4.0
                self.cache[keys[i]] = score
                new.append({"key": keys[i], "score": score})
            if self.cache_path is not None:
                with open(self.cache_path, "a", encoding="utf-8") as fh:
                    for row in new:
                        fh.write(json.dumps(row) + "\n")
        return [self.cache.get(k) for k in keys]

    def close(self) -> None:
        self.judge.close()

"""LLM-as-judge: a second model grades each output against the reference with a rubric.

The judge is either any model reference the eval stage accepts (loaded with :mod:`llmops_jupyter.models.inference`, so
a local base, adapter, merged or quantized model works) or the URL of an OpenAI-compatible endpoint (our own
``%llmops serve``, vLLM, a hosted API), called through :mod:`llmops_jupyter.models.endpoints`. The API key is read from an
environment variable whose *name* is configured, never from the key itself, so no secret lands in the registry.

The rubric is a Jinja template (``{{ prompt }}``, ``{{ reference }}``, ``{{ output }}``) or a ``str.format``
template (``{prompt}``...). Every judge prompt and raw verdict is stored with the example, so scores can be
audited and re-parsed later.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

from llmops_jupyter.core.errors import ConfigError

DEFAULT_RUBRIC = """You are a strict grader. Compare the answer with the reference answer for the request below.

Request:
{{ prompt }}

Reference answer:
{{ reference }}

Answer to grade:
{{ output }}

Rate the answer from 1 (wrong, irrelevant or unsafe) to 5 (correct and complete, as good as the reference).
Reply with one line "Score: <1-5>" and then one short sentence saying why."""

_SCORE = re.compile(r"score\s*[:=]?\s*\**\s*([1-5])(?:\s*/\s*5)?\b", re.IGNORECASE)
_DIGIT = re.compile(r"(?<![\d.])([1-5])(?![\d.])")


def parse_score(raw: str) -> float:
    """1-5 from a verdict ("Score: 4 ..." preferred, else the first lone digit 1-5); NaN if none."""
    m = _SCORE.search(raw or "") or _DIGIT.search(raw or "")
    return float(m.group(1)) if m else math.nan


def load_rubric(rubric: str | None) -> str:
    """``None`` → the default rubric; an existing file path → its text; otherwise the text itself."""
    if not rubric:
        return DEFAULT_RUBRIC
    p = Path(rubric).expanduser()
    if "\n" not in rubric and len(rubric) < 4096 and p.is_file():
        return p.read_text(encoding="utf-8")
    return rubric


def render_rubric(template: str, *, prompt: str, reference: str, output: str) -> str:
    values = {"prompt": prompt, "reference": reference, "output": output}
    if "{{" in template or "{%" in template:
        import jinja2

        try:
            return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(template).render(**values)
        except jinja2.TemplateError as exc:
            raise ConfigError(f"eval: --judge-rubric template error: {exc}.", field="judge_rubric",
                              fix="use the variables {{ prompt }}, {{ reference }} and {{ output }}") from None
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"eval: --judge-rubric format error ({exc!r}).", field="judge_rubric",
                          fix="use the fields {prompt}, {reference} and {output} (double other braces)") from None


def is_endpoint(ref: str) -> bool:
    return ref.startswith(("http://", "https://"))


@dataclasses.dataclass
class Verdict:
    prompt: str
    raw: str
    score: float


class Judge:
    """Grades (prompt, reference, output) triples; ``name`` is what the registry records."""

    name: str = "judge"

    def complete(self, prompts: list[str]) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def grade(self, items: list[tuple[str, str, str]], rubric: str | None = None) -> list[Verdict]:
        template = load_rubric(rubric)
        prompts = [render_rubric(template, prompt=p, reference=r, output=o) for p, r, o in items]
        raws = self.complete(prompts) if prompts else []
        return [Verdict(p, raw, parse_score(raw)) for p, raw in zip(prompts, raws)]

    def close(self) -> None:
        pass


class LocalJudge(Judge):
    """Any model the registry resolves, prompted through its chat template, greedy decoding."""

    def __init__(self, model: Any, *, max_new_tokens: int = 48, batch_size: int = 8, name: str | None = None):
        from llmops_jupyter.models.inference import load_model

        self.net, self.tokenizer = load_model(model)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.name = name or str(getattr(model, "ref", model))

    def complete(self, prompts: list[str]) -> list[str]:
        from llmops_jupyter.models.inference import apply_chat, generate

        chats = [apply_chat(self.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
        gens = generate(self.net, self.tokenizer, chats, max_new_tokens=self.max_new_tokens,
                        batch_size=self.batch_size)
        return [g.text for g in gens]

    def close(self) -> None:
        self.net = None


class EndpointJudge(Judge):
    """An OpenAI-compatible chat-completions endpoint, temperature 0, through the same client as endpoint
    candidates (:mod:`llmops_jupyter.models.endpoints`: retries, timeout, cache, budget, usage and cost per call).
    A failed call is a verdict with no score (its error kept as the raw verdict), not a failed run."""

    def __init__(self, base_url: str, *, model: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 max_tokens: int = 48, timeout: float = 60.0, client: Any = None):
        from llmops_jupyter.models.endpoints import Endpoint, EndpointClient

        self.model = model or "default"
        self.max_tokens = max_tokens
        self.name = f"{base_url}#{self.model}"
        if client is None:
            key = os.environ.get(api_key_env) if api_key_env else None
            client = EndpointClient(Endpoint(f"openai:{self.name}", base_url.rstrip("/"), self.model), key=key,
                                    timeout=timeout, retries=1)
        self.client = client
        self.calls: list[Any] = []

    def complete(self, prompts: list[str]) -> list[str]:
        calls = self.client.chat_many([[{"role": "user", "content": p}] for p in prompts],
                                      {"max_tokens": self.max_tokens, "temperature": 0.0})
        self.calls = calls
        return [c.text if c.ok else f"[judge call failed: {c.error}]" for c in calls]

    def close(self) -> None:
        self.client.close()


def make_judge(ref: str, *, registry: Any = None, model: str | None = None, api_key_env: str = "OPENAI_API_KEY",
               max_new_tokens: int = 48, batch_size: int = 8, client: Any = None) -> Judge:
    """A judge from ``--judge``: an http(s) URL → :class:`EndpointJudge`, anything else → :class:`LocalJudge`."""
    if is_endpoint(ref):
        return EndpointJudge(ref, model=model, api_key_env=api_key_env, max_tokens=max_new_tokens, client=client)
    from llmops_jupyter.models.refs import resolve_model
    from llmops_jupyter.registry import Registry

    m = resolve_model(ref, registry or Registry.open())
    return LocalJudge(m, max_new_tokens=max_new_tokens, batch_size=batch_size, name=ref)

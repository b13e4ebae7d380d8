"""A checked request (:class:`Plan`: prompts, logprobs, tools, output grammar), and the OpenAI shapes of what
comes back: ``message``/``tool_calls``, chat ``logprobs.content`` and completions ``logprobs``.

Log-probabilities are the model's own distribution (fp32 log-softmax of its logits), before temperature, top-p
and any grammar mask — what vLLM reports too; with ``echo`` the prompt's tokens are scored teacher-forced, the first
one with ``null`` as the OpenAI API does.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from llmops_jupyter.stages.serve.constrained import (
    GrammarError,
    check_json_schema,
    json_object_grammar,
    json_schema_grammar,
    validate,
)
from llmops_jupyter.stages.serve.fields import FieldError
from llmops_jupyter.stages.serve.tools import parse


def check_response_format(rf: Any) -> dict[str, Any]:
    """``response_format`` → {type, schema, name, grammar}; a 400 (FieldError) names what is wrong."""
    if not isinstance(rf, dict):
        raise FieldError("'response_format' must be an object such as {'type': 'json_object'}.", "response_format")
    kind = rf.get("type")
    extra = set(rf) - {"type", "json_schema"}
    if extra:
        raise FieldError(f"response_format.{sorted(extra)[0]} is not a response_format field.",
                         f"response_format.{sorted(extra)[0]}")
    if kind == "text":
        return {"type": "text"}
    if kind == "json_object":
        return {"type": "json_object", "schema": None, "name": None, "grammar": json_object_grammar()}
    if kind != "json_schema":
        raise FieldError(f"Invalid value for 'response_format.type': {kind!r}; supported: 'text', 'json_object', "
                         "'json_schema'.", "response_format.type")
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise FieldError("response_format.json_schema is required with type 'json_schema'.",
                         "response_format.json_schema")
    name = js.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise FieldError("response_format.json_schema.name must be 1-64 letters, digits, '_' or '-'.",
                         "response_format.json_schema.name")
    extra = set(js) - {"name", "schema", "strict", "description"}
    if extra:
        raise FieldError(f"response_format.json_schema.{sorted(extra)[0]} is not supported.",
                         f"response_format.json_schema.{sorted(extra)[0]}")
    schema = js.get("schema")
    if schema is None:
        raise FieldError("response_format.json_schema.schema is required.", "response_format.json_schema.schema")
    try:
        check_json_schema(schema)
    except GrammarError as exc:
        raise FieldError(f"Invalid schema for response_format '{name}': the schema {exc}.",
                         "response_format.json_schema.schema") from None
    return {"type": "json_schema", "schema": schema, "name": name,
            "grammar": json_schema_grammar(schema, validate=False)}


@dataclasses.dataclass
class Plan:
    prompts: list[Any] = dataclasses.field(default_factory=list)  # rendered text, or token ids
    logprobs: int | None = None  # alternatives per token; None = no logprobs
    echo: bool = False
    tools: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # offered (empty: none, or 'none')
    names: set[str] = dataclasses.field(default_factory=set)
    choice: Any = "none"
    tool_format: str | None = None
    parallel: bool = True
    grammar: str | None = None
    response_format: dict[str, Any] | None = None
    # filled in as the answer is read
    n_calls: int = 0
    calls: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    stream_calls: list[dict[str, Any]] | None = None
    stream_problems: list[str] | None = None
    violation: str | None = None
    validated: bool = False

    @property
    def structured(self) -> bool:
        return bool(self.response_format) and self.response_format["type"] != "text"

    def json_schema(self) -> dict[str, Any] | None:
        """The schema the output must follow when it comes from ``response_format`` (JSON mode: any object)."""
        rf = self.response_format
        if not rf or rf["type"] == "text" or self.grammar != rf["grammar"]:
            return None
        return rf["schema"] if rf["schema"] is not None else {"type": "object"}

    def message(self, text: str, finish: str) -> tuple[dict[str, Any], str]:
        """The assistant message (content and/or tool_calls) and the finish reason, as OpenAI shapes them."""
        content: str | None = text
        if self.tools:
            content, calls, self.problems = parse(text, self.tool_format or "hermes", self.names)
            if not self.parallel and len(calls) > 1:
                self.problems.append(f"{len(calls) - 1} more call(s) dropped: parallel_tool_calls=false")
                calls = calls[:1]
            self.calls = calls
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if self.calls:
            msg["tool_calls"] = self.calls
            finish = "tool_calls"
        elif self.structured:
            self._validate(text)
        return msg, finish

    def _validate(self, text: str) -> None:
        self.violation = validate(text, self.response_format.get("schema") if self.response_format else None)
        self.validated = True

    def checks(self, grammar_error: str | None = None, *, text: str | None = None) -> dict[str, Any]:
        """What the request log keeps: tools offered and called, parse problems, schema violations."""
        out: dict[str, Any] = {}
        if self.stream_calls is not None:
            self.calls, self.problems = self.stream_calls, list(self.stream_problems or [])
        if self.tools:
            choice = self.choice if isinstance(self.choice, str) else f"function:{self.choice['function']['name']}"
            out["tools"] = {"offered": sorted(self.names), "choice": choice, "forced": self.grammar is not None,
                            "called": [c["function"]["name"] for c in self.calls], "problems": self.problems}
        if self.structured:
            if text is not None and not self.validated and not self.calls:
                self._validate(text)
            out["structured"] = {"type": self.response_format["type"], "name": self.response_format.get("name"),
                                 "checked": self.validated, "valid": self.validated and self.violation is None,
                                 "violation": self.violation}
        if grammar_error:
            out["grammar_error"] = grammar_error
        return out


def _entry(engine: Any, token: int, logprob: float) -> dict[str, Any]:
    text = engine.token_text(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(engine: Any, result: Any) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat completion: one entry per generated token, each with its top alternatives."""
    content = []
    for token, lp, alts in result.logprobs or []:
        content.append({**_entry(engine, token, lp), "top_logprobs": [_entry(engine, t, v) for t, v in alts]})
    return {"content": content, "refusal": None}


def completion_logprobs(engine: Any, result: Any, k: int) -> dict[str, Any]:
    """``choices[].logprobs`` of a (legacy) completion: tokens, token_logprobs, top_logprobs, text_offset; with
    echo the prompt's tokens come first (the very first without a log-probability)."""
    rows: list[tuple[int, float | None, list[tuple[int, float]] | None]] = []
    if result.prompt_logprobs is not None:
        rows += result.prompt_logprobs
    rows += [(t, lp, alts) for t, lp, alts in (result.logprobs or [])]
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = 0
    for token, lp, alts in rows:
        text = engine.token_text(token)
        tokens.append(text)
        token_lps.append(lp)
        tops.append(None if alts is None else {engine.token_text(t): v for t, v in alts[:k]})
        offsets.append(pos)
        pos += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

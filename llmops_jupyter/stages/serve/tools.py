"""Tool calls: request checks, rendering through the model's own chat template, grammars that force a call,
and parsing the model's text back into OpenAI ``tool_calls`` (whole answers and streams).

The template decides how a model sees tools and how it writes a call; this server never invents a prompt format.
A template that reads a ``tools`` variable supports tools. Two call formats are recognised, by the template:

* ``hermes`` — ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (Qwen2.5/3, Hermes, SmolLM3 and
  most chatml tool templates);
* ``json`` — a bare ``{"name": ..., "parameters": {...}}`` answer (Llama 3.1+ templates).

``tool_choice`` ``required`` or a named function is *forced*: generation is constrained (see
:mod:`.constrained`) to one well-formed call of an offered tool whose arguments follow its JSON Schema. ``auto``
lets the model decide and parses what it wrote; ``none`` renders no tools and parses nothing.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from llmops_jupyter.stages.serve.constrained import GrammarError, check_json_schema, lark_grammar, lark_json
from llmops_jupyter.stages.serve.fields import FieldError

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
OPEN = "<tool_call>"


def template_tools(template: str | None) -> str | None:
    """The call format of a chat template that supports tools (``hermes``/``json``), or None."""
    if not template:
        return None
    import jinja2
    import jinja2.meta

    try:
        names = jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return None
    if "tools" not in names:
        return None
    if "<tool_call>" in template:
        return "hermes"
    if '"parameters"' in template or "<|python_tag|>" in template or "ipython" in template:
        return "json"
    return "hermes"


def check_tools(tools: Any, tool_choice: Any) -> tuple[list[dict[str, Any]], str | dict[str, Any]]:
    """Validate ``tools`` and ``tool_choice`` as the OpenAI API does; returns (tools, choice)."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise FieldError("'tool_choice' is only allowed when 'tools' are specified.", "tool_choice")
        return [], "none"
    if not isinstance(tools, list) or not tools:
        raise FieldError("'tools' must be a non-empty array of {type: 'function', function: {...}}.", "tools")
    names = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise FieldError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}} (only function tools).",
                             f"tools[{i}]")
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise FieldError(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-'.",
                             f"tools[{i}].function.name")
        if name in names:
            raise FieldError(f"tools[{i}].function.name '{name}' is given twice.", f"tools[{i}].function.name")
        names.append(name)
        params = fn.get("parameters")
        if params is not None:
            try:
                check_json_schema(params)
            except GrammarError as exc:
                raise FieldError(f"tools[{i}].function.parameters {exc}.", f"tools[{i}].function.parameters") \
                    from None
        extra = set(fn) - {"name", "description", "parameters", "strict"}
        if extra:
            raise FieldError(f"tools[{i}].function.{sorted(extra)[0]} is not supported.",
                             f"tools[{i}].function.{sorted(extra)[0]}")
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise FieldError(f"tool_choice '{choice}' is not one of 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}.", "tool_choice")
        return tools, choice
    if not isinstance(choice, dict) or choice.get("type") != "function" or \
            not isinstance(choice.get("function"), dict):
        raise FieldError("tool_choice must be 'none', 'auto', 'required' or "
                         "{'type': 'function', 'function': {'name': ...}}.", "tool_choice")
    name = choice["function"].get("name")
    if name not in names:
        raise FieldError(f"Invalid value for 'tool_choice': no function named '{name}' was specified in the "
                         f"'tools' parameter (offered: {', '.join(names)}).", "tool_choice")
    return tools, choice


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages → what HF chat templates read: ``tool_calls[].function.arguments`` as a dict (templates
    write it with ``tojson``), ``developer`` as ``system``."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if m.get("role") == "developer":
            m["role"] = "system"
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"] or "{}")
                    except ValueError:
                        pass
                calls.append({"id": c.get("id"), "type": "function", "function": fn})
            m["tool_calls"] = calls
            m.setdefault("content", "")
        out.append(m)
    return out


def _call_schema(tool: dict[str, Any], args_key: str) -> dict[str, Any]:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": fn["name"]}, args_key: params},
            "required": ["name", args_key], "additionalProperties": False}


def forced_grammar(tools: list[dict[str, Any]], choice: str | dict[str, Any], fmt: str) -> str | None:
    """The grammar of one call (``required``: of any offered tool; named: of that one), or None if not forced."""
    if choice in ("auto", "none"):
        return None
    if isinstance(choice, dict):
        tools = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
    args_key = "parameters" if fmt == "json" else "arguments"
    schemas = [_call_schema(t, args_key) for t in tools]
    body = lark_json(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})
    if fmt == "json":
        return lark_grammar(f"start: {body}")
    return lark_grammar('start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: ' + body)


def _call(obj: Any) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def parse(text: str, fmt: str, names: set[str]) -> tuple[str | None, list[dict[str, Any]], list[str]]:
    """(content, tool_calls, problems) from a whole answer. A call block that is not JSON, or names a tool that was
    not offered, stays in the content and is reported in ``problems`` (the request log records them)."""
    calls: list[dict[str, Any]] = []
    problems: list[str] = []
    if fmt == "json":
        stripped = text.strip().removeprefix("<|python_tag|>")
        if stripped.startswith("{"):
            try:
                call = _call(json.loads(stripped))
            except ValueError:
                call = None
                problems.append("answer looks like a call but is not JSON")
            if call and call["function"]["name"] in names:
                return None, [call], problems
            if call:
                problems.append(f"call of unknown tool '{call['function']['name']}'")
        return text, [], problems
    kept = []
    pos = 0
    for m in _HERMES.finditer(text):
        kept.append(text[pos:m.start()])
        pos = m.end()
        try:
            call = _call(json.loads(m.group(1)))
        except ValueError:
            call = None
        if call is None:
            problems.append("tool_call block is not a JSON {name, arguments} object")
            kept.append(m.group(0))
        elif call["function"]["name"] not in names:
            problems.append(f"call of unknown tool '{call['function']['name']}'")
            kept.append(m.group(0))
        else:
            calls.append(call)
    kept.append(text[pos:])
    if OPEN in text[pos:]:
        problems.append("unterminated tool_call block")
    content = "".join(kept).strip() if calls else text
    return (content or None), calls, problems


class StreamParser:
    """Splits streamed text into content pieces and complete tool calls (``hermes`` format).

    Text that could be the start of ``<tool_call>`` is held back until it is clear; a call is emitted once its
    closing tag arrives (its arguments in one delta). ``json``-format templates are buffered whole and parsed at
    the end, since a bare JSON answer is only known to be a call once complete.
    """

    def __init__(self, fmt: str, names: set[str]):
        self.fmt, self.names = fmt, names
        self.buf = ""
        self.problems: list[str] = []
        self.calls: list[dict[str, Any]] = []

    def feed(self, piece: str) -> list[tuple[str, Any]]:
        self.buf += piece
        if self.fmt == "json":
            return []
        out: list[tuple[str, Any]] = []
        while True:
            start = self.buf.find(OPEN)
            if start < 0:
                keep = max((k for k in range(1, len(OPEN)) if self.buf.endswith(OPEN[:k])), default=0)
                text, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                if text:
                    out.append(("content", text))
                return out
            if start:
                out.append(("content", self.buf[:start]))
                self.buf = self.buf[start:]
            m = _HERMES.match(self.buf)
            if m is None:
                return out
            _, calls, problems = parse(m.group(0), "hermes", self.names)
            self.problems += problems
            if calls:
                self.calls += calls
                out.append(("call", calls[0]))
            else:
                out.append(("content", m.group(0)))
            self.buf = self.buf[m.end():]

    def close(self) -> list[tuple[str, Any]]:
        buf, self.buf = self.buf, ""
        if not buf:
            return []
        content, calls, problems = parse(buf, self.fmt, self.names)
        self.problems += problems
        self.calls += calls
        return [("call", c) for c in calls] + ([("content", content)] if content and not calls else [])

"""Which OpenAI request fields this server honours, and the 400 for every other one.

A client that sends ``frequency_penalty=1.2`` or ``audio={...}`` and gets a 200 believes the server did what it
asked. So a field is either implemented, or sent with the API's own default (``n=1``, ``frequency_penalty=0``,
``store=false``: nothing to do), or refused with a 400 naming it (``param`` = the field, as the OpenAI API does).
Fields outside the OpenAI schema get OpenAI's own "Unrecognized request argument supplied" 400. The lists follow
the ``openai`` package's typed request params (a test enumerates them from there).
"""

from __future__ import annotations

from typing import Any

#: chat fields implemented here
CHAT_HONOURED = frozenset({
    "messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
    "stream_options", "stop", "seed", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
    "response_format", "user", "safety_identifier",
})
#: completions fields implemented here
COMPLETION_HONOURED = frozenset({
    "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
    "logprobs", "echo", "user",
})

#: fields not implemented but harmless with these values (the API's defaults): field → accepted values
_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "best_of": (1,),
    "store": (False,), "modalities": (["text"],), "service_tier": ("auto", "default"), "metadata": ({},),
    "suffix": ("",),
}

#: what to say for a field that is refused (default: "is not supported by this server")
_WHY: dict[str, str] = {
    "functions": "is deprecated by OpenAI; send 'tools' instead",
    "function_call": "is deprecated by OpenAI; send 'tool_choice' instead",
    "frequency_penalty": "is not supported by this server (only 0)",
    "presence_penalty": "is not supported by this server (only 0)",
    "logit_bias": "is not supported by this server",
    "best_of": "is not supported by this server (only 1)",
    "suffix": "is not supported by this server (no fill-in-the-middle)",
    "audio": "is not supported: this server generates text only",
    "modalities": "is not supported: this server generates text only (['text'])",
    "store": "is not supported: this server does not store completions",
    "metadata": "is not supported: this server does not store completions",
    "prediction": "is not supported by this server (no predicted outputs)",
    "reasoning_effort": "is not supported by this server",
    "verbosity": "is not supported by this server",
    "web_search_options": "is not supported: this server has no web search",
    "service_tier": "is not supported by this server (only 'auto')",
    "prompt_cache_key": "is not supported by this server (no prompt cache)",
    "prompt_cache_retention": "is not supported by this server (no prompt cache)",
    "prompt_cache_options": "is not supported by this server (no prompt cache)",
    "moderation": "is not supported by this server",
}

#: every field of the OpenAI request schema (the ``openai`` package's typed params, checked by a test)
CHAT_SCHEMA = CHAT_HONOURED | {
    "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "metadata", "modalities",
    "moderation", "prediction", "presence_penalty", "prompt_cache_key", "prompt_cache_options",
    "prompt_cache_retention", "reasoning_effort", "service_tier", "store", "verbosity", "web_search_options",
}
COMPLETION_SCHEMA = COMPLETION_HONOURED | {"best_of", "frequency_penalty", "logit_bias", "presence_penalty", "suffix"}

#: fields a message may carry (per role, OpenAI's message params); anything else is refused
MESSAGE_FIELDS = {
    "system": {"role", "content", "name"}, "developer": {"role", "content", "name"},
    "user": {"role", "content", "name"}, "assistant": {"role", "content", "name", "tool_calls", "refusal"},
    "tool": {"role", "content", "tool_call_id"},
}


class FieldError(ValueError):
    """A request field refused with a 400; ``param`` is the field's path as OpenAI names it."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


def check_fields(body: dict[str, Any], *, chat: bool) -> None:
    """Raise :class:`FieldError` for the first field of ``body`` (the request as sent) that is not honoured."""
    honoured = CHAT_HONOURED if chat else COMPLETION_HONOURED
    schema = CHAT_SCHEMA if chat else COMPLETION_SCHEMA
    endpoint = "chat completions" if chat else "completions"
    for name, value in body.items():
        if name in honoured or value is None:
            continue
        if name not in schema:
            if not chat and name in CHAT_SCHEMA:
                raise FieldError(f"'{name}' is a chat completions field; /v1/completions does not take it.", name)
            if chat and name == "echo":
                raise FieldError("'echo' is not a chat completions field (it exists on /v1/completions only).", name)
            raise FieldError(f"Unrecognized request argument supplied: {name}", name)
        if name in _DEFAULTS and any(value == d and type(value) is type(d) for d in _DEFAULTS[name]):
            continue
        why = _WHY.get(name, "is not supported by this server")
        raise FieldError(f"'{name}' {why}; leave it out of the {endpoint} request.", name)
    if chat:
        for i, m in enumerate(body.get("messages") or []):
            role = m.get("role") if isinstance(m, dict) else None
            allowed = MESSAGE_FIELDS.get(role)
            if allowed is None:
                raise FieldError(f"messages[{i}].role '{role}' is not one of {sorted(MESSAGE_FIELDS)}.",
                                 f"messages[{i}].role")
            for k, v in m.items():
                if k not in allowed and v is not None:
                    raise FieldError(f"messages[{i}].{k} is not supported for a '{role}' message by this server.",
                                     f"messages[{i}].{k}")
    opts = body.get("stream_options")
    if opts:
        if not body.get("stream"):
            raise FieldError("'stream_options' is only allowed with stream=true.", "stream_options")
        for k, v in opts.items():
            if k != "include_usage" and v not in (None, False):
                raise FieldError(f"stream_options.{k} is not supported by this server (only include_usage).",
                                 f"stream_options.{k}")

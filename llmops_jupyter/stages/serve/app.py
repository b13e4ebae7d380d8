"""The OpenAI-compatible FastAPI app: ``/v1/models``, ``/v1/chat/completions`` (with SSE streaming),
``/v1/completions`` and ``/health``.

Limits are enforced before any generation: request body size (413), ``max_tokens`` and prompt length (400 with
a message naming the limit and the flag), concurrency (bounded wait for a slot, then 429 with ``Retry-After`` —
never an unbounded hang). Errors use OpenAI's ``{"error": {...}}`` shape so official clients raise their typed
exceptions. Every request, including rejected ones, is handed to the :class:`~.reqlog.RequestLog`.
"""

# No `from __future__ import annotations`: FastAPI and pydantic read the route and model annotations at runtime.

import asyncio
import dataclasses
import hashlib
import hmac
import json
import time
import uuid
from types import SimpleNamespace
from typing import Any

from llmops_jupyter.stages.serve.constrained import GrammarError
from llmops_jupyter.stages.serve.engine import Engine, GenRequest, GenResult, apply_stop
from llmops_jupyter.stages.serve.fields import FieldError, check_fields
from llmops_jupyter.stages.serve.request import Plan, chat_logprobs, check_response_format, completion_logprobs
from llmops_jupyter.stages.serve.tools import StreamParser, check_tools, forced_grammar, template_messages


@dataclasses.dataclass
class Limits:
    max_request_bytes: int = 1 << 20
    max_tokens: int = 512
    default_max_tokens: int = 128
    max_prompt_tokens: int | None = None
    max_concurrency: int = 16
    queue_timeout: float = 10.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key_hash: str) -> str:
    """What the log and manifests record for a client: a short prefix of the key's hash, never the key."""
    return "k-" + key_hash[:10]


@dataclasses.dataclass
class ServeContext:
    engine: Engine
    limits: Limits
    deployment: str
    model_name: str
    model_hash: str | None
    key_hashes: list[str]  # empty → no auth (loopback only; checked by the stage config)
    log: Any = None  # RequestLog
    adapter: Any = None  # llmops_jupyter.stages.adapt.augment.RequestAdapter: stored prompt and/or retrieved context
    started: float = dataclasses.field(default_factory=time.time)

    def served_names(self) -> set[str]:
        names = {self.model_name, self.deployment, "default"}
        if self.model_hash:
            names |= {self.model_hash, self.model_hash[:12]}
        return names


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Pure ASGI middleware: reject bodies over the limit from ``Content-Length`` or while streaming them in."""

    def __init__(self, app: Any, ctx: ServeContext):
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.ctx.limits.max_request_bytes
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._reject(scope, send, int(length))
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await self._reject(scope, send, seen)

    async def _reject(self, scope, send, size: int) -> None:
        err = APIError(413, f"Request body of {size} bytes exceeds this deployment's limit of "
                            f"{self.ctx.limits.max_request_bytes} bytes (--max-request-bytes).",
                       code="request_too_large")
        body = json.dumps(err.body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        _log(self.ctx, {"endpoint": scope.get("path"), "status": 413, "error": err.message, "latency_s": 0.0})


def _log(ctx: ServeContext, rec: dict[str, Any]) -> None:
    if ctx.log is None:
        return
    base = {"request_id": rec.get("request_id") or uuid.uuid4().hex[:16], "ts": time.time(),
            "deployment": ctx.deployment, "model": ctx.model_hash, "model_name": ctx.model_name}
    ctx.log.log({**base, **rec})


def _stop_list(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    return [str(s) for s in stop][:4]


def create_app(ctx: ServeContext):
    """Build the FastAPI app for one deployment."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: str
        content: str | list[dict[str, Any]] | None = None

    class _Common(BaseModel):
        model_config = ConfigDict(extra="allow")
        model: str = "default"
        max_tokens: int | None = Field(None, ge=1)
        temperature: float | None = Field(1.0, ge=0, le=2)
        top_p: float | None = Field(1.0, gt=0, le=1)
        n: int | None = 1
        stream: bool | None = False
        stop: str | list[str] | None = None
        seed: int | None = None
        stream_options: dict[str, Any] | None = None

    class ChatRequest(_Common):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)

    class CompletionRequest(_Common):
        prompt: str | list[str] | list[int] | list[list[int]]

    app = FastAPI(title=f"llmops-jupyter: {ctx.model_name}", docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    slots: dict[str, asyncio.Semaphore] = {}

    def sem() -> asyncio.Semaphore:
        if "s" not in slots:
            slots["s"] = asyncio.Semaphore(ctx.limits.max_concurrency)
        return slots["s"]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", []) if p != "body")
        msg = f"Invalid request: {loc or 'body'}: {first.get('msg', 'invalid value')}."
        _log(ctx, {"endpoint": request.url.path, "status": 400, "error": msg, "latency_s": 0.0})
        return JSONResponse(APIError(400, msg, param=loc or None).body(), status_code=400)

    def authenticate(request: Request) -> str | None:
        if not ctx.key_hashes:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token:
            h = hash_key(token.strip())
            for known in ctx.key_hashes:
                if hmac.compare_digest(h, known):
                    return key_id(known)
        _log(ctx, {"endpoint": request.url.path, "status": 401, "error": "invalid or missing API key",
                   "latency_s": 0.0})
        raise APIError(401, "Invalid or missing API key. Send it as 'Authorization: Bearer <key>'.",
                       type="authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "deployment": ctx.deployment, "model": ctx.model_name,
                "uptime_s": round(time.time() - ctx.started, 3),
                "engine": getattr(ctx.engine, "kind", "transformers"), "max_batch": getattr(ctx.engine, "max_batch", 1)}

    @app.get("/v1/models")
    async def models(request: Request):
        authenticate(request)
        return {"object": "list", "data": [{"id": ctx.model_name, "object": "model", "created": int(ctx.started),
                                            "owned_by": "llmops-jupyter", "artifact": ctx.model_hash}]}

    def check_common(body: _Common, prompts: list[int]) -> int:
        if body.model not in ctx.served_names():
            raise APIError(404, f"The model '{body.model}' is not served here; this deployment serves "
                                f"'{ctx.model_name}'.", code="model_not_found", param="model")
        if body.n not in (None, 1):
            raise APIError(400, "Only n=1 is supported.", param="n")
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if max_tokens is None:
            max_tokens = min(ctx.limits.default_max_tokens, ctx.limits.max_tokens)
        if max_tokens > ctx.limits.max_tokens:
            raise APIError(400, f"max_tokens={max_tokens} exceeds this deployment's limit of "
                                f"{ctx.limits.max_tokens} (--max-tokens).", param="max_tokens",
                           code="max_tokens_exceeded")
        budget = ctx.engine.context_length - max_tokens
        if ctx.limits.max_prompt_tokens is not None:
            budget = min(budget, ctx.limits.max_prompt_tokens)
        for n_prompt in prompts:
            if n_prompt > budget:
                raise APIError(400, f"The prompt has {n_prompt} tokens; this deployment accepts at most {budget} "
                                    f"with max_tokens={max_tokens} (context {ctx.engine.context_length}). "
                                    "Shorten the prompt or lower max_tokens.", param="messages",
                               code="context_length_exceeded")
        return max_tokens

    async def acquire() -> None:
        try:
            await asyncio.wait_for(sem().acquire(), timeout=ctx.limits.queue_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise APIError(429, f"Server busy: all {ctx.limits.max_concurrency} generation slots stayed taken for "
                                f"{ctx.limits.queue_timeout:g}s (--max-concurrency/--queue-timeout). Retry later.",
                           type="rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(max(1, round(ctx.limits.queue_timeout)))}) from None

    def prepare(raw: dict[str, Any], *, chat: bool) -> Plan:
        """Check every field and turn the request into prompts and generation options (raises FieldError)."""
        check_fields(raw, chat=chat)
        engine = ctx.engine
        supports = getattr(engine, "supports", frozenset())
        plan = Plan()
        lp = raw.get("logprobs")
        if chat:
            top = raw.get("top_logprobs")
            if lp not in (None, False, True):
                raise FieldError("'logprobs' must be a boolean on chat completions.", "logprobs")
            if top is not None:
                if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20:
                    raise FieldError(f"Invalid 'top_logprobs': {top!r}; it must be an integer from 0 to 20.",
                                     "top_logprobs")
                if not lp:
                    raise FieldError("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
            plan.logprobs = (top or 0) if lp else None
        else:
            if lp is not None and (not isinstance(lp, int) or isinstance(lp, bool) or not 0 <= lp <= 5):
                raise FieldError(f"Invalid 'logprobs': {lp!r}; on completions it is an integer from 0 to 5.",
                                 "logprobs")
            plan.logprobs = lp
            plan.echo = bool(raw.get("echo"))
        for name, on in (("logprobs", plan.logprobs is not None), ("echo", plan.echo)):
            if on and name not in supports:
                raise FieldError(f"'{name}' is not supported by this deployment's {engine.kind} engine; serve the "
                                 "transformers model version for it, or leave it out.", name)
        if raw.get("stream") and not chat and (plan.logprobs is not None or plan.echo):
            raise FieldError("'logprobs'/'echo' with stream=true is not supported on completions by this server; "
                             "send stream=false.", "logprobs" if plan.logprobs is not None else "echo")
        if chat:
            tool_list, choice = check_tools(raw.get("tools"), raw.get("tool_choice"))
            if tool_list and "tools" not in supports:
                raise FieldError(f"'tools' is not supported by this deployment's {engine.kind} engine; serve the "
                                 "transformers model version for tool calls.", "tools")
            plan.choice = choice
            if tool_list and choice != "none":
                plan.tool_format = engine.tool_format
                if plan.tool_format is None:
                    raise FieldError(
                        f"The model '{ctx.model_name}' cannot be offered tools: its chat template has no tool "
                        "support (it never reads 'tools'). Serve a model whose template supports tools (Qwen2.5, "
                        "Llama 3.1, SmolLM3, ...), or give this one such a chat_template in its "
                        "tokenizer_config.json, or leave 'tools' out.", "tools")
                plan.tools = tool_list
                plan.names = {t["function"]["name"] for t in tool_list}
                plan.parallel = raw.get("parallel_tool_calls") is not False
                try:
                    plan.grammar = forced_grammar(tool_list, choice, plan.tool_format)
                except GrammarError as exc:
                    raise FieldError(f"tools cannot be forced: {exc}.", "tools") from None
            rf = raw.get("response_format")
            if rf is not None:
                plan.response_format = check_response_format(rf)
                if plan.response_format["type"] != "text":
                    if "response_format" not in supports:
                        raise FieldError(f"'response_format' is not supported by this deployment's {engine.kind} "
                                         "engine; serve the transformers model version for it.", "response_format")
                    if plan.tools and plan.grammar is None:
                        raise FieldError("response_format with tools and tool_choice 'auto' is not supported: "
                                         "use tool_choice 'none' for structured content or 'required' for a "
                                         "call.", "response_format")
                    if plan.grammar is None:
                        plan.grammar = plan.response_format["grammar"]
                    check_schema = getattr(engine, "check_schema", None)
                    if check_schema is not None:  # an engine with its own grammar engine (llama.cpp)
                        try:
                            check_schema(plan.json_schema())
                        except GrammarError as exc:
                            raise FieldError(f"response_format cannot be enforced: {exc}", "response_format") from None
        else:
            p = raw["prompt"]
            if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
                p = [p]
            if not p:
                raise FieldError("'prompt' is empty.", "prompt")
            if raw.get("stream") and len(p) != 1:
                raise FieldError("Send one prompt per streaming request.", "prompt")
            for item in p:
                if isinstance(item, list):
                    if "token_prompts" not in supports:
                        raise FieldError(f"token-id prompts are not supported by the {engine.kind} engine.",
                                         "prompt")
                    if not item or not all(isinstance(t, int) and 0 <= t < engine.vocab_size() for t in item):
                        raise FieldError("a token-id prompt must be a non-empty list of ids of this model's "
                                         "vocabulary.", "prompt")
            plan.prompts = p
        if plan.grammar is not None:
            try:
                engine.check_grammar(plan.grammar)
            except GrammarError as exc:
                raise FieldError(f"the output grammar cannot be compiled: {exc}", "response_format") from None
        return plan

    async def handle(request: Request, body: _Common, *, chat: bool):
        t0 = time.perf_counter()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        endpoint = request.url.path
        raw = body.model_dump(exclude_unset=True)
        adapted: dict[str, Any] = {}
        if chat:
            messages = [{"role": m.role, "content": _content(m.content)} for m in body.messages]  # type: ignore[attr-defined]
            shown = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        else:
            messages = None
            p = body.prompt  # type: ignore[attr-defined]
            shown = p if isinstance(p, str) else json.dumps(p)[:2000]
        rec: dict[str, Any] = {"request_id": rid, "endpoint": endpoint, "prompt": shown, "messages": messages,
                               "stream": bool(body.stream)}
        try:
            rec["key_id"] = authenticate(request)
            try:
                plan = prepare(raw, chat=chat)
            except FieldError as exc:
                raise APIError(400, str(exc), param=exc.param) from None
            if chat:
                full = template_messages([{**mm.model_dump(exclude_none=True), "content": _content(mm.content)}
                                          for mm in body.messages])  # type: ignore[attr-defined]
                if ctx.adapter is not None:  # the stored prompt / retrieved context, logged as the model saw it
                    full, adapted = await asyncio.to_thread(ctx.adapter, full)
                    rec["messages"] = [{"role": m["role"], "content": m.get("content")} for m in full]
                plan.prompts = [ctx.engine.chat_prompt(full, tools=plan.tools or None)]
            rec["checks"] = {**adapted, **plan.checks()}
            end_user = raw.get("safety_identifier") or raw.get("user")
            if end_user:  # the client's end-user id, kept hashed (it may be an email): per-user monitoring
                rec["checks"]["end_user"] = "u-" + hash_key(str(end_user))[:10]
            counts = [len(x) if isinstance(x, list) else ctx.engine.count_tokens(x) for x in plan.prompts]
            rec["tokens_in"] = sum(counts)
            max_tokens = check_common(body, counts)
            await acquire()
        except APIError as exc:
            if exc.status != 401:  # 401 is logged (without the body) by authenticate
                _log(ctx, {**rec, "status": exc.status, "error": exc.message,
                           "latency_s": time.perf_counter() - t0})
            raise
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        gens = [GenRequest(x if isinstance(x, str) else "", max_tokens, temperature=temperature, top_p=top_p,
                           seed=body.seed or 0, stop=_stop_list(body.stop),
                           prompt_ids=x if isinstance(x, list) else None, logprobs=plan.logprobs, echo=plan.echo,
                           grammar=plan.grammar, json_schema=plan.json_schema()) for x in plan.prompts]
        if body.stream:
            return _stream(request, ctx, gens[0], rec, t0, chat=chat, release=sem().release, rid=rid, body=body,
                           plan=plan)
        try:
            for g in gens:
                ctx.engine.submit(g)
            results: list[GenResult] = [await asyncio.wrap_future(g.future) for g in gens]
        except Exception as exc:
            _log(ctx, {**rec, "status": 500, "error": f"{type(exc).__name__}: {exc}",
                       "latency_s": time.perf_counter() - t0})
            raise APIError(500, f"Generation failed: {type(exc).__name__}.", type="server_error") from None
        finally:
            sem().release()
        latency = time.perf_counter() - t0
        choices = []
        for i, result in enumerate(results):
            if chat:
                message, finish = plan.message(result.text, result.finish_reason)
                choices.append({"index": i, "message": message, "finish_reason": finish,
                                "logprobs": chat_logprobs(ctx.engine, result) if plan.logprobs is not None
                                else None})
            else:
                text = result.text
                if plan.echo:
                    prompt_text = plan.prompts[i]
                    shown_prompt = prompt_text if isinstance(prompt_text, str) else ctx.engine.decode(prompt_text)
                    text = shown_prompt + text
                choices.append({"index": i, "text": text, "finish_reason": result.finish_reason,
                                "logprobs": completion_logprobs(ctx.engine, result, plan.logprobs)
                                if plan.logprobs is not None else None})
        rec["checks"] = {**rec.get("checks", {}), **plan.checks(results[0].grammar_error)}
        _log(ctx, {**rec, "response": results[0].text if len(results) == 1 else json.dumps([r.text for r in results]),
                   "status": 200, "latency_s": latency, "tokens_out": sum(r.completion_tokens for r in results),
                   "finish_reason": choices[0]["finish_reason"]})
        prompt_tokens = sum(r.prompt_tokens for r in results)
        completion_tokens = sum(r.completion_tokens for r in results)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": ctx.model_name, "choices": choices, "usage": usage,
                "system_fingerprint": ctx.model_hash[:12] if ctx.model_hash else None}

    def _stream(request, ctx, gen: GenRequest, rec, t0, *, chat: bool, release, rid: str, body: _Common,
                plan: Plan):
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        gen.stream = (loop, out)
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        parser = StreamParser(plan.tool_format, plan.names) if chat and plan.tools else None

        pending: list[Any] = []  # log-probabilities of tokens whose text has not gone out yet

        def chunk(delta_text: str | None, finish: str | None = None, *, first: bool = False,
                  tool_call: dict[str, Any] | None = None) -> str:
            logprobs = None
            if plan.logprobs is not None and not first and (delta_text or finish):
                logprobs = chat_logprobs(ctx.engine, SimpleNamespace(logprobs=list(pending)))
                pending.clear()
            if chat:
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                    delta["content"] = ""
                if delta_text:
                    delta["content"] = delta_text
                if tool_call is not None:
                    delta["tool_calls"] = [tool_call]
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}
            data = {"id": rid, "object": obj, "created": created, "model": ctx.model_name, "choices": [choice]}
            return f"data: {json.dumps(data)}\n\n"

        def emit(events: list[tuple[str, Any]]) -> list[str]:
            lines = []
            for kind, value in events:
                if kind == "content":
                    lines.append(chunk(value))
                    continue
                if not plan.parallel and plan.n_calls:
                    continue
                index = plan.n_calls
                plan.n_calls += 1
                lines.append(chunk(None, tool_call={"index": index, "id": value["id"], "type": "function",
                                                    "function": {"name": value["function"]["name"],
                                                                 "arguments": ""}}))
                lines.append(chunk(None, tool_call={"index": index,
                                                    "function": {"arguments": value["function"]["arguments"]}}))
            return lines

        async def events():
            text = ""
            status, error, result = 200, None, None
            finish = None
            try:
                ctx.engine.submit(gen)
                if chat:
                    yield chunk(None, first=True)
                while True:
                    kind, value = await out.get()
                    if kind == "logprob":
                        pending.append(value)
                    elif kind == "text":
                        cut, stopped = apply_stop(text + value, gen.stop)
                        piece = cut[len(text):]
                        text = cut
                        if piece:
                            if parser is not None:
                                for line in emit(parser.feed(piece)):
                                    yield line
                            else:
                                yield chunk(piece)
                        if stopped:
                            gen.cancelled.set()
                    elif kind == "end":
                        result = value
                        finish = "stop" if apply_stop(result.text, gen.stop)[1] else result.finish_reason
                        if parser is not None:
                            for line in emit(parser.close()):
                                yield line
                            if plan.n_calls:
                                finish = "tool_calls"
                        yield chunk(None, finish)
                        if include_usage:
                            usage = {"prompt_tokens": result.prompt_tokens,
                                     "completion_tokens": result.completion_tokens,
                                     "total_tokens": result.prompt_tokens + result.completion_tokens}
                            yield f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': ctx.model_name, 'choices': [], 'usage': usage})}\n\n"
                        yield "data: [DONE]\n\n"
                        break
                    else:
                        status, error = 500, f"{type(value).__name__}: {value}"
                        err = APIError(500, f"Generation failed: {type(value).__name__}.", type="server_error")
                        yield f"data: {json.dumps(err.body())}\n\n"
                        break
            except asyncio.CancelledError:
                status, error = 499, "client disconnected"
                gen.cancelled.set()
                raise
            finally:
                release()
                if parser is not None:
                    plan.stream_calls, plan.stream_problems = parser.calls, parser.problems
                checks = {**rec.get("checks", {}),
                          **plan.checks(result.grammar_error if result else None, text=text if result else None)}
                _log(ctx, {**rec, "checks": checks, "response": text, "status": status, "error": error,
                           "latency_s": time.perf_counter() - t0,
                           "tokens_out": result.completion_tokens if result else None,
                           "finish_reason": finish})

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        return await handle(request, body, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await handle(request, body, chat=False)

    return BodyLimitMiddleware(app, ctx)


def _content(content: Any) -> str:
    """OpenAI content may be a list of parts; only text parts are supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise APIError(400, f"Unsupported content part type '{part.get('type')}'; send text.", param="messages")
        parts.append(str(part.get("text") or ""))
    return "\n".join(parts)

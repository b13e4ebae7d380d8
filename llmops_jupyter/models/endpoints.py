"""Remote models: any OpenAI-compatible chat endpoint as one more kind of model reference.

::

    openai:https://api.openai.com/v1#gpt-4o-mini      a hosted provider, vLLM, Ollama, llama.cpp...
    openai:http://127.0.0.1:8000/v1#served            any OpenAI-compatible server
    deployment:serve-1a2b3c4d                          a deployment of this project, by id (prefix, latest)

Used by ``eval`` (candidates and the judge) through :class:`EndpointClient`: bounded concurrency, retries with
exponential backoff (``Retry-After`` honoured) on 429/5xx and connection errors, a per-request timeout (a hung
request becomes a failed example, never a hung cell; it is not retried, since the provider may have billed it and a
hung server usually stays hung), a disk cache keyed by (endpoint, model, messages, sampling parameters) so a rerun
sends no request, and a shared :class:`Budget` that refuses a request whose worst-case cost would take the spend
past ``--budget-usd``.

The API key is read from the environment variable *named* by ``--api-key-env`` (for a deployment of this project
without one: its generated 0600 key file). The key is never stored, logged, cached or put in a message.
Standard library at import; ``httpx`` is imported when a client is made.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from llmops_jupyter.core.errors import ConfigError, NotFoundError

PREFIXES = ("openai:", "deployment:")
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})


def is_endpoint_ref(ref: Any) -> bool:
    return isinstance(ref, str) and ref.startswith(PREFIXES)


@dataclasses.dataclass
class Endpoint:
    """A resolved remote model: where to send chat requests and which model to ask for."""

    ref: str
    base_url: str
    model: str
    deployment: str | None = None
    key_file: Path | None = dataclasses.field(default=None, repr=False)
    artifact: Any = None  # the registry's ``endpoint`` manifest (lineage), set by :func:`use_endpoint`
    kind: str = "endpoint"
    base: Any = None

    @property
    def name(self) -> str:
        if self.deployment:
            return f"{self.deployment}#{self.model}"
        parts = urlsplit(self.base_url)
        return f"{self.model}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")

    def manifest(self) -> dict[str, Any]:
        """What lineage records: never the key."""
        return {"ref": self.ref, "base_url": self.base_url, "model": self.model, "deployment": self.deployment}


def parse_endpoint(ref: str, registry: Any = None) -> Endpoint:
    """``openai:BASE_URL#MODEL`` or ``deployment:ID[#MODEL]``; a bad reference is one line with the right form."""
    if ref.startswith("openai:"):
        body = ref[len("openai:"):]
        url, sep, model = body.rpartition("#")
        parts = urlsplit(url)
        if not sep or not model.strip() or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"eval: --model '{ref}' is not an endpoint reference.", field="model", value=ref,
                              fix="write openai:BASE_URL#MODEL, e.g. openai:https://api.openai.com/v1#gpt-4o-mini")
        return Endpoint(ref, url.rstrip("/"), model.strip())
    if ref.startswith("deployment:"):
        from llmops_jupyter.registry import Registry
        from llmops_jupyter.stages.serve.server import api_key_path, get_deployment

        dep_ref, _, model = ref[len("deployment:"):].partition("#")
        reg = registry or Registry.open()
        dep = get_deployment(reg, dep_ref or None)
        if dep["status"] != "running":
            raise NotFoundError(f"Deployment {dep['id']} is {dep['status']}, not running.",
                                fix="start it again (`%llmops serve --model ...`) or pick a running one "
                                    "(`%llmops deployments`)")
        key = api_key_path(reg.home, dep["id"])
        return Endpoint(ref, str(dep["url"]).rstrip("/"), model or dep["model_name"] or "default", dep["id"],
                        key if key.is_file() else None)
    raise ConfigError(f"'{ref}' is not an endpoint reference.", field="model", value=ref,
                      fix="write openai:BASE_URL#MODEL or deployment:ID")


def use_endpoint(ctx: Any, ref: str) -> Endpoint:
    """Resolve an endpoint for a running stage and record its manifest (URL, model; no key) as a run input."""
    ep = parse_endpoint(ref, ctx.registry)
    folder = ctx.staging_dir("endpoint")
    (folder / "endpoint.json").write_text(json.dumps(ep.manifest(), indent=1, sort_keys=True))
    art = ctx.registry.add_artifact(folder / "endpoint.json", "endpoint", name=ep.name, meta=ep.manifest())
    ep.artifact = ctx.use(art)
    return ep


def api_key(api_key_env: str | None, endpoint: Endpoint | None = None, *, field: str = "api_key_env") -> str | None:
    """The key from the named variable (a named but unset variable is an error, not a silent anonymous call);
    without a name, a deployment's generated key file; else no key."""
    if api_key_env:
        value = os.environ.get(api_key_env)
        if not value:
            raise ConfigError(f"--{field.replace('_', '-')} {api_key_env}: that environment variable is not set.",
                              field=field, value=api_key_env,
                              fix=f"export {api_key_env}=... before starting Jupyter, or name another variable")
        return value
    if endpoint is not None and endpoint.key_file is not None:
        return endpoint.key_file.read_text().strip()
    return None


# -- cache ------------------------------------------------------------------------------------------------------
class ResponseCache:
    """One JSON file per (endpoint, model, messages, parameters) under ``<registry home>/cache/endpoints``.

    Only successful answers are cached; failures are asked again on the next run."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(base_url: str, model: str, messages: Sequence[dict[str, Any]], params: dict[str, Any]) -> str:
        blob = json.dumps({"endpoint": base_url.rstrip("/"), "model": model, "messages": list(messages),
                           "params": params}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)


# -- budget -----------------------------------------------------------------------------------------------------
class Budget:
    """A USD limit shared by every endpoint (and the judge) of one run.

    A request reserves its worst-case cost (prompt estimate × input price + max_tokens × output price) before it
    is sent; it is refused when ``spent + reserved + that`` would pass the limit, and from then on every later
    request is refused too (the run stops spending). The actual cost replaces the reservation when it returns; a
    timed-out request keeps its reservation (it may have been billed)."""

    def __init__(self, limit_usd: float | None):
        self.limit = limit_usd
        self.spent = 0.0
        self.reserved = 0.0
        self.exhausted = False
        self.refused = 0
        self.max_estimate = 0.0
        self._lock = threading.Lock()

    def reserve(self, amount: float) -> bool:
        with self._lock:
            self.max_estimate = max(self.max_estimate, amount)
            if self.limit is None:
                self.reserved += amount
                return True
            if self.exhausted or self.spent + self.reserved + amount > self.limit:
                self.exhausted = True
                self.refused += 1
                return False
            self.reserved += amount
            return True

    def settle(self, reserved: float, actual: float) -> None:
        with self._lock:
            self.reserved -= reserved
            self.spent += actual

    def to_dict(self) -> dict[str, Any]:
        return {"limit_usd": self.limit, "spent_usd": self.spent, "refused": self.refused,
                "stopped": self.exhausted, "max_request_estimate_usd": self.max_estimate}


# -- calls ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Call:
    """One chat request's outcome, as stored with the example (``generation``)."""

    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float | None = None
    ttft_s: float | None = None
    finish_reason: str | None = None
    attempts: int = 0
    cached: bool = False
    error: str | None = None
    status: int | None = None
    cost_usd: float | None = None  # what this answer costs at the price (cached answers too)
    spent_usd: float = 0.0  # what this run paid for it (0 when served from the cache)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("text")
        d["new_tokens"] = self.completion_tokens
        return d


@dataclasses.dataclass
class Stats:
    requests: int = 0  # HTTP requests sent (retries included)
    retries: int = 0
    cache_hits: int = 0
    timeouts: int = 0
    errors: int = 0


class EndpointClient:
    """Chat completions against one endpoint with the behaviour in the module docstring. Thread-safe."""

    def __init__(self, endpoint: Endpoint, *, key: str | None = None, concurrency: int = 4, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.5, stream: bool = False, cache: ResponseCache | None = None,
                 price: Any = None, budget: Budget | None = None):
        from llmops_jupyter.core.errors import require

        self._httpx = require("httpx", "eval", feature="OpenAI-compatible endpoints")
        self.endpoint = endpoint
        self.concurrency = concurrency
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.stream = stream
        self.cache = cache
        self.price = price
        self.budget = budget or Budget(None)
        self.stats = Stats()
        self._ratio = 0.0  # largest prompt_tokens / estimate seen: tightens the budget's prompt estimate
        self._lock = threading.Lock()
        self._closed = threading.Event()
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._http = self._httpx.Client(headers=headers, timeout=self._httpx.Timeout(timeout),
                                        limits=self._httpx.Limits(max_connections=concurrency))

    def close(self) -> None:
        self._closed.set()
        self._http.close()

    # -- public -------------------------------------------------------------------------------------------------
    def chat_many(self, conversations: Sequence[Sequence[dict[str, Any]]], params: dict[str, Any],
                  progress: Callable[[int, int], None] | None = None) -> list[Call]:
        """Answers in input order; at most ``concurrency`` requests in flight."""
        out: list[Call | None] = [None] * len(conversations)
        done = 0
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self.chat, msgs, params): i for i, msgs in enumerate(conversations)}
            for fut in concurrent.futures.as_completed(futures):
                out[futures[fut]] = fut.result()
                done += 1
                if progress:
                    progress(done, len(conversations))
        return [c for c in out if c is not None]

    def chat(self, messages: Sequence[dict[str, Any]], params: dict[str, Any]) -> Call:
        ep = self.endpoint
        key = ResponseCache.key(ep.base_url, ep.model, messages, params)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                with self._lock:
                    self.stats.cache_hits += 1
                call = Call(text=hit["text"], prompt_tokens=hit.get("prompt_tokens"),
                            completion_tokens=hit.get("completion_tokens"), latency_s=hit.get("latency_s"),
                            ttft_s=hit.get("ttft_s"), finish_reason=hit.get("finish_reason"), cached=True,
                            status=200)
                call.cost_usd = self._cost(call)
                return call
        estimate = self._estimate(messages, int(params.get("max_tokens") or 0))
        if not self.budget.reserve(estimate):
            return Call(error=f"not sent: --budget-usd {self.budget.limit:g} would be exceeded")
        call = Call()
        charged = 0.0
        try:
            call = self._send(messages, params)
            if call.ok:
                call.cost_usd = self._cost(call)
                charged = call.cost_usd or 0.0
                call.spent_usd = charged
                if call.prompt_tokens:
                    with self._lock:
                        self._ratio = max(self._ratio, call.prompt_tokens / max(self._raw_estimate(messages), 1))
                if self.cache is not None:
                    self.cache.put(key, {"text": call.text, "prompt_tokens": call.prompt_tokens,
                                         "completion_tokens": call.completion_tokens, "latency_s": call.latency_s,
                                         "ttft_s": call.ttft_s, "finish_reason": call.finish_reason,
                                         "created": time.time()})
            elif call.status is None and "timed out" in (call.error or ""):
                charged = estimate  # it may have been billed
                call.spent_usd = estimate
        finally:
            self.budget.settle(estimate, charged)
        return call

    # -- internals ----------------------------------------------------------------------------------------------
    def _cost(self, call: Call) -> float | None:
        return self.price.cost(call.prompt_tokens, call.completion_tokens) if self.price is not None else None

    @staticmethod
    def _raw_estimate(messages: Sequence[dict[str, Any]]) -> int:
        """An upper bound on prompt tokens before any answer: UTF-8 bytes + 8 per message (template tokens)."""
        return sum(len(str(m.get("content") or "").encode()) + 8 for m in messages)

    def _estimate(self, messages: Sequence[dict[str, Any]], max_tokens: int) -> float:
        if self.price is None or not self.price.known:
            return 0.0
        raw = self._raw_estimate(messages)
        prompt = raw * min(1.0, self._ratio * 1.25) if self._ratio else raw
        return self.price.cost(math.ceil(prompt), max_tokens) or 0.0

    def _delay(self, attempt: int, response: Any) -> float:
        after = response.headers.get("retry-after") if response is not None else None
        if after is not None:
            try:
                return min(max(float(after), 0.0), 60.0)
            except ValueError:
                pass
        return self.backoff * (2 ** (attempt - 1)) * (1 + 0.25 * random.random())

    def _send(self, messages: Sequence[dict[str, Any]], params: dict[str, Any]) -> Call:
        httpx = self._httpx
        body = {"model": self.endpoint.model, "messages": list(messages), **params}
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        url = self.endpoint.base_url + "/chat/completions"
        attempt = 0
        while True:
            attempt += 1
            with self._lock:
                self.stats.requests += 1
            t0 = time.perf_counter()
            response = None
            try:
                if self.stream:
                    call, response = self._stream(url, body, t0)
                else:
                    response = self._http.post(url, json=body)
                    call = self._parse(response, t0)
            except httpx.TimeoutException:
                with self._lock:
                    self.stats.timeouts += 1
                    self.stats.errors += 1
                return Call(error=f"timed out after {self.timeout:g}s (--request-timeout); not retried",
                            attempts=attempt, latency_s=time.perf_counter() - t0)
            except (httpx.TransportError, ValueError) as exc:
                call = Call(error=f"{type(exc).__name__}: {str(exc)[:200]}")
            call.attempts = attempt
            retryable = (call.status in RETRY_STATUS) or (call.status is None and not call.ok)
            if call.ok or not retryable or attempt > self.retries or self._closed.is_set():
                if not call.ok:
                    with self._lock:
                        self.stats.errors += 1
                return call
            with self._lock:
                self.stats.retries += 1
            if self._closed.wait(self._delay(attempt, response)):
                return call

    def _parse(self, response: Any, t0: float) -> Call:
        latency = time.perf_counter() - t0
        if response.status_code != 200:
            return Call(error=f"HTTP {response.status_code}: {_error_text(response)}", status=response.status_code,
                        latency_s=latency)
        data = response.json()
        choice = (data.get("choices") or [{}])[0]
        usage = data.get("usage") or {}
        return Call(text=(choice.get("message") or {}).get("content") or "", status=200, latency_s=latency,
                    finish_reason=choice.get("finish_reason"), prompt_tokens=usage.get("prompt_tokens"),
                    completion_tokens=usage.get("completion_tokens"))

    def _stream(self, url: str, body: dict[str, Any], t0: float) -> tuple[Call, Any]:
        deadline = t0 + self.timeout
        with self._http.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                response.read()
                return self._parse(response, t0), response
            parts: list[str] = []
            call = Call(status=200)
            for line in response.iter_lines():
                if time.perf_counter() > deadline:
                    raise self._httpx.ReadTimeout("stream exceeded --request-timeout")
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if call.ttft_s is None:
                            call.ttft_s = time.perf_counter() - t0
                        parts.append(piece)
                    if choice.get("finish_reason"):
                        call.finish_reason = choice["finish_reason"]
                usage = chunk.get("usage")
                if usage:
                    call.prompt_tokens = usage.get("prompt_tokens")
                    call.completion_tokens = usage.get("completion_tokens")
            call.text = "".join(parts)
            call.latency_s = time.perf_counter() - t0
            return call, response


def _error_text(response: Any) -> str:
    try:
        data = response.json()
        err = data.get("error") if isinstance(data, dict) else None
        msg = (err.get("message") if isinstance(err, dict) else err) or data.get("detail") or json.dumps(data)
    except ValueError:
        msg = response.text
    return str(msg)[:200]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), NaN for no values."""
    vals = sorted(v for v in values if v is not None and not math.isnan(v))
    if not vals:
        return math.nan
    pos = (len(vals) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)

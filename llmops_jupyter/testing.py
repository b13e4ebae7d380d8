"""Test helpers for tests, CI notebooks and quick tries: tiny records and datasets, out-of-process file reads.

The tiny model itself lives in :mod:`llmops_jupyter.models.tiny` (production code uses it as the ``tiny-llama``
provider); it is re-exported here because notebooks and docs import it from this module.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmops_jupyter.models.tiny import CHAT_TEMPLATE, TINY_NAME, build_tiny_model, build_tokenizer

__all__ = ["CHAT_TEMPLATE", "TINY_NAME", "build_tiny_model", "build_tokenizer", "read_bytes_elsewhere",
           "tiny_model_path", "tiny_records", "write_tiny_dataset"]


def tiny_model_path(cache: str | os.PathLike | None = None) -> Path:
    """Build (once) and return the tiny model in the local model cache."""
    from llmops_jupyter.models.refs import model_cache_dir

    target = Path(cache) if cache else model_cache_dir() / TINY_NAME
    if not (target / "config.json").exists():
        build_tiny_model(target)
    return target


def tiny_records(n: int = 48, seed: int = 0) -> list[dict[str, str]]:
    """Small, deterministic instruction/response pairs with variable lengths (arithmetic, colours, echo)."""
    import random

    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "black", "white"]
    rows = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            rows.append({"instruction": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."})
        elif kind == 1:
            c = rng.choice(colours)
            rows.append({"instruction": f"Repeat the colour {c}.", "response": f"The colour is {c}."})
        else:
            words = " ".join(rng.choice(colours) for _ in range(rng.randint(1, 12)))
            rows.append({"instruction": f"Echo: {words}", "response": words})
    return rows


def write_tiny_dataset(registry, tokenizer_path, n: int = 48, eval_fraction: float = 0.25, seed: int = 0):
    """The tiny records as a dataset version, made by the real data stage (templated with the tiny tokenizer; the
    records repeat a few short examples on purpose, so exact-duplicate removal is off)."""
    from llmops_jupyter.core.runner import Runner

    records = tiny_records(n, seed)
    res = Runner(registry, defaults=False).run(
        "data", {"source": records, "tokenizer": str(tokenizer_path), "eval_size": max(1, int(n * eval_fraction)),
                 "seed": seed, "scrub_pii": False, "dedup": False, "name": "tiny"})
    return res.artifact


def read_bytes_elsewhere(paths: list[str | os.PathLike]) -> dict[str, bytes]:
    """Raw bytes of files read by a child process: the way to grep a *live* SQLite registry for leaked secrets.

    Opening and closing a database file in the process that holds SQLite connections to it drops every POSIX lock
    those connections hold (locks are per process, released by any ``close``). Another process then believes it is
    the last user, checkpoints and removes the WAL under the open connections, and the next query fails with
    "database disk image is malformed".
    """
    import pickle
    import subprocess
    import sys

    code = ("import pickle, sys\nfrom pathlib import Path\n"
            "sys.stdout.buffer.write(pickle.dumps({p: Path(p).read_bytes() for p in sys.argv[1:] if Path(p).is_file()}))")
    out = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, check=True)
    return pickle.loads(out.stdout)


class FakeOpenAI:
    """A tiny OpenAI-compatible chat server on 127.0.0.1 for tests: answers from the prompt, reports usage, and can
    be told to answer 429 (``throttle`` requests, ``Retry-After: 0``) or to hang on a prompt (``hang_on``, until
    :meth:`close`). It counts every request and records the usage of each answer and the most requests it had in
    flight at once. Standard library only. Use as a context manager."""

    def __init__(self, model: str = "fake-mini"):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.model = model
        self.requests = 0
        self.statuses: list[int] = []
        self.usage: list[dict[str, int]] = []
        self.auth: list[str | None] = []
        self.throttle = 0
        self.hang_on: str | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self.release = threading.Event()
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.requests += 1
                    fake.auth.append(self.headers.get("Authorization"))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    throttled = fake.throttle > 0
                    fake.throttle -= 1 if throttled else 0
                try:
                    fake._answer(self, body, throttled)
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            def log_message(self, *args):
                pass

        import json

        self._json = json
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @staticmethod
    def reply_for(messages: list[dict]) -> str:
        words = str(messages[-1].get("content") or "").split()
        return " ".join(["the", "answer", "is", *words[:2]])

    def _send(self, handler, status: int, payload: dict, headers: dict | None = None) -> None:
        data = self._json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)

    def _answer(self, handler, body: dict, throttled: bool) -> None:
        msgs = body.get("messages") or []
        if throttled:
            self.statuses.append(429)
            self._send(handler, 429, {"error": {"message": "rate limited", "type": "rate_limit"}}, {"Retry-After": "0"})
            return
        if self.hang_on and any(self.hang_on in str(m.get("content")) for m in msgs):
            self.release.wait(60)
            return
        text = self.reply_for(msgs)
        words = text.split()[: int(body.get("max_tokens") or 16)]
        usage = {"prompt_tokens": sum(len(str(m.get("content") or "").split()) + 3 for m in msgs),
                 "completion_tokens": len(words)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        with self._lock:
            self.statuses.append(200)
            self.usage.append(usage)
        if not body.get("stream"):
            self._send(handler, 200, {"id": "chatcmpl-fake", "object": "chat.completion", "model": body.get("model"),
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": " ".join(words)}}],
                                      "usage": usage})
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.end_headers()

        def event(obj: dict | str) -> None:
            data = obj if isinstance(obj, str) else self._json.dumps(obj)
            handler.wfile.write(f"data: {data}\n\n".encode())
            handler.wfile.flush()

        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": body.get("model")}
        event(base | {"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        for i, w in enumerate(words):
            event(base | {"choices": [{"index": 0, "delta": {"content": (" " if i else "") + w}}]})
        event(base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        event(base | {"choices": [], "usage": usage})
        event("[DONE]")

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

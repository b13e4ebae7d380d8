"""The request log: every request/response of a deployment, PII-scrubbed *before* it is stored.

One writer thread drains a queue and inserts in transactions, so concurrent requests never race on SQLite and no
record is lost: :meth:`RequestLog.close` (called on server shutdown and at interpreter exit) flushes what is left.
Cheap checks (:func:`llmops_jupyter.stages.monitor.checks.sync_checks`) run on the raw text in the writer thread, then
the prompt, messages, response and error are scrubbed with the same scrubber the data stage uses.
"""

from __future__ import annotations

import atexit
import json
import queue
import sys
import threading
import time
from collections import Counter
from typing import Any

from llmops_jupyter.core.pii import scrub, scrub_secrets
from llmops_jupyter.registry import Registry

_STOP = object()


def scrub_record(rec: dict[str, Any]) -> dict[str, Any]:
    """Run the sync checks on the raw text, then scrub every free-text field. Returns a new dict."""
    from llmops_jupyter.stages.monitor.checks import sync_checks

    out = dict(rec)
    checks = sync_checks(rec.get("prompt") or "", rec.get("response"), finish_reason=rec.get("finish_reason"),
                         status=int(rec.get("status") or 0))
    checks.update(rec.get("checks") or {})
    counts: Counter = Counter()
    for key in ("prompt", "response", "error"):
        if out.get(key):
            out[key], c = scrub(scrub_secrets(str(out[key])))
            counts.update(c)
    if out.get("messages"):
        msgs = []
        for m in out["messages"]:
            content, _ = scrub(scrub_secrets(str(m.get("content") or "")))  # counted once, through `prompt`
            msgs.append({"role": m.get("role"), "content": content})
        out["messages"] = json.dumps(msgs, ensure_ascii=False)
    out["pii"] = json.dumps(dict(counts), sort_keys=True)
    out["checks"] = json.dumps(checks, sort_keys=True)
    out["stream"] = int(bool(out.get("stream")))
    return out


class RequestLog:
    """Queue + single writer thread. ``log(record)`` never blocks the caller on SQLite."""

    def __init__(self, registry: Registry, *, batch: int = 256, exporter: Any = None):
        self.registry = registry
        self.batch = batch
        self.exporter = exporter
        self._queue: queue.Queue = queue.Queue()
        self.written = 0
        self.errors = 0
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="llmops-request-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def log(self, record: dict[str, Any]) -> None:
        if self._closed:  # after close (e.g. a late request during shutdown): write synchronously, never drop
            self._write([scrub_record(record)])
            return
        self._queue.put(record)

    def flush(self, timeout: float | None = 30.0) -> None:
        """Block until everything queued so far is committed."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(60)
        atexit.unregister(self.close)

    # -- writer thread ------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            items = [self._queue.get()]
            while len(items) < self.batch:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            records = [i for i in items if isinstance(i, dict)]
            if records:
                self._write([scrub_record(r) for r in records])
            for i in items:
                if isinstance(i, threading.Event):
                    i.set()
            if any(i is _STOP for i in items):
                return

    def _write(self, rows: list[dict[str, Any]]) -> None:
        for attempt in range(20):
            try:
                self.written += self.registry.log_requests(rows)
                break
            except Exception as exc:  # noqa: BLE001 - retry; losing a record is worse than a late one
                self.errors += 1
                if attempt == 19:
                    print(f"llmops: request log write failed: {exc}", file=sys.stderr)
                    return
                time.sleep(0.1 * (attempt + 1))
        if self.exporter is not None:
            for r in rows:
                try:
                    self.exporter.export(r)
                except Exception as exc:  # noqa: BLE001 - tracing is best effort
                    print(f"llmops: trace export failed: {exc}", file=sys.stderr)
                    self.exporter = None
                    break

"""Test helpers for tests, CI notebooks and quick tries: tiny records and datasets, out-of-process file reads, and
:func:`wait_until`, the one way the test suite waits for something to happen.

The tiny model itself lives in :mod:`llmops_jupyter.models.tiny` (production code uses it as the ``tiny-llama``
provider); it is re-exported here because notebooks and docs import it from this module.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from llmops_jupyter.models.tiny import CHAT_TEMPLATE, TINY_NAME, build_tiny_model, build_tokenizer

__all__ = ["CHAT_TEMPLATE", "TINY_NAME", "TOOL_CHAT_TEMPLATE", "build_tiny_model", "build_tokenizer",
           "read_bytes_elsewhere", "run_logged", "tiny_model_path", "tiny_records", "tiny_tool_model", "wait_until",
           "write_tiny_dataset"]

T = TypeVar("T")

#: a chatml template with tool support, in the shape of Qwen2.5's (tools listed in the system turn, calls written
#: as ``<tool_call>`` JSON blocks, tool results given back as ``<tool_response>`` in a user turn)
TOOL_CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}You are a helpful assistant."
    "{% endif %}\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n"
    "{% elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' and message.get('tool_calls') %}<|im_start|>assistant\n"
    "{% if message['content'] %}{{ message['content'] }}\n{% endif %}"
    "{% for tc in message['tool_calls'] %}<tool_call>\n{\"name\": \"{{ tc['function']['name'] }}\", "
    "\"arguments\": {{ tc['function']['arguments'] | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n"
    "</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_model_path(cache: str | os.PathLike | None = None) -> Path:
    """Build (once) and return the tiny model in the local model cache."""
    from llmops_jupyter.models.refs import model_cache_dir

    target = Path(cache) if cache else model_cache_dir() / TINY_NAME
    if not (target / "config.json").exists():
        build_tiny_model(target)
    return target


def tiny_tool_model(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """A copy of the tiny model at ``src`` whose chat template supports tools (:data:`TOOL_CHAT_TEMPLATE`): the
    same weights, so what differs in serving is only how the template renders tools and calls. Tool definitions
    take many tokens of the tiny 512-token vocabulary, so its context is 2048 (RoPE: nothing to learn)."""
    import json

    from transformers import AutoTokenizer

    from llmops_jupyter.core.files import atomic_dir

    src, dst = Path(src), Path(dst)
    if (dst / "config.json").exists():
        return dst
    with atomic_dir(dst) as tmp:
        for f in src.iterdir():
            if f.is_file() and f.name != "chat_template.jinja":
                (tmp / f.name).write_bytes(f.read_bytes())
        config = json.loads((tmp / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}, indent=2))
        tok = AutoTokenizer.from_pretrained(str(src))
        tok.chat_template = TOOL_CHAT_TEMPLATE
        tok.save_pretrained(tmp)
    return dst


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


DOC_WORDS = ("river stone lamp orchard copper violin harbor meadow lantern quartz falcon ember glacier thistle canyon "
             "saddle pepper marble willow beacon cobalt hazel tundra velvet signal prism anchor basil cedar "
             "delta").split()


def tiny_document(seed: int, sentences: int, words: tuple[str, ...] = DOC_WORDS) -> str:
    """A document of random sentences over ``words``: two documents share an 8-word run with negligible
    probability (what the no-leak tests of ``data --format text`` rely on)."""
    import random

    rng = random.Random(seed)
    return " ".join(" ".join(rng.choice(words) for _ in range(rng.randint(6, 12))).capitalize() + "."
                    for _ in range(sentences))


def write_tiny_text_dataset(registry, tokenizer_path, folder: str | os.PathLike, n: int = 12, chunk_tokens: int = 32,
                            eval_fraction: float = 0.25):
    """``n`` tiny documents written to ``folder`` as .txt files, made a text dataset (``data --format text``) by the
    real data stage."""
    from llmops_jupyter.core.runner import Runner

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        (folder / f"doc{k:02d}.txt").write_text(tiny_document(k, 4 + k % 5))
    res = Runner(registry, defaults=False).run(
        "data", {"source": str(folder), "format": "text", "tokenizer": str(tokenizer_path),
                 "chunk_tokens": chunk_tokens, "eval_fraction": eval_fraction, "name": "tiny-docs"})
    return res.artifact


def toy_train_cell(steps: int) -> str:
    """A notebook cell defining and running a toy training stage (``rank`` is the notebook's parameter): ``steps``
    loss metrics, then one ``adapter`` artifact named ``toy-<rank>``. What sweep and concurrency tests fan out
    without a model."""
    return f"""
import dataclasses
from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.runner import Runner
from llmops_jupyter.core.stage import Stage

@dataclasses.dataclass
class C(StageConfig):
    rank: int = option(1, "rank", min=1)

class Toy(Stage):
    name = "toy-train"
    config_cls = C

    def run(self, ctx):
        for step in range({steps}):
            ctx.log_metrics({{"loss": 1.0 / (step + 1)}}, step=step)
        out = ctx.staging_dir()
        (out / "w.txt").write_text(str(ctx.config.rank))
        ctx.save_artifact(out, "adapter", name=f"toy-{{ctx.config.rank}}")

Runner().run(Toy(), {{"rank": rank}})
"""


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


def wait_until(predicate: Callable[[], T], timeout: float = 120.0, *, what: str,
               abort: Callable[[], Any] | None = None, details: Callable[[], str] | None = None,
               interval: float = 0.05, max_interval: float = 1.0) -> T:
    """Poll ``predicate`` until it returns something truthy and return that; fail after ``timeout`` seconds.

    The test suite's only way to wait: on the condition the next line needs, never a fixed sleep (a sleep long
    enough on a busy 2-core machine is slow everywhere else, and still races under more load). The pause between
    polls starts at ``interval`` and grows to ``max_interval`` (backoff, so a slow wait costs few polls).

    ``what`` names the condition for the failure message ("timed out after 120 s waiting for <what>"). ``abort``
    is checked on each poll and ends the wait at once with its truthy result in the message (e.g. the process that
    should produce the condition exited); ``details`` adds text to a failure (a log tail). The timeout is generous
    on purpose: it bounds a hang, it is not a timing assertion.
    """
    deadline = time.monotonic() + timeout
    pause = interval
    while True:
        value = predicate()
        if value:
            return value
        reason = abort() if abort is not None else None
        if reason:
            extra = f"\n{details()}" if details is not None else ""
            raise AssertionError(f"gave up waiting for {what}: {reason}{extra}")
        if time.monotonic() >= deadline:
            extra = f"\n{details()}" if details is not None else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 1.5, max_interval)


def run_logged(argv: list[str], budget_s: float, log: str | os.PathLike, tail_lines: int = 40,
               **popen_kw) -> tuple[int, str]:
    """Run ``argv`` with its stdout and stderr written to ``log`` as they come; return (exit status, output).

    For slow tests that start a long child (the demo): within ``budget_s`` seconds, or the child's whole process
    group (its kernel, its servers) is stopped and a ``TimeoutError`` says where it was, with the last
    ``tail_lines`` lines of its progress, instead of only a thread dump from pytest-timeout. Set the test's
    ``@pytest.mark.timeout`` from the same budget plus a margin, so this fires first.
    """
    import signal
    import subprocess

    log = Path(log)
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                **popen_kw)
        def stop() -> None:
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue

        try:
            code = proc.wait(timeout=budget_s)
        except BaseException as exc:  # past the budget, or interrupted (Ctrl-C, pytest-timeout): stop the group
            stop()
            if not isinstance(exc, subprocess.TimeoutExpired):
                raise
            raise TimeoutError(f"{Path(argv[0]).name} {' '.join(argv[1:3])} ... outlived its {budget_s:.0f} s budget; "
                               f"its last output ({log}):\n{output_tail(log, tail_lines)}") from None
    return code, log.read_text(errors="replace")


def output_tail(log: str | os.PathLike, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file (what a failing or timed-out test prints)."""
    text = Path(log).read_text(errors="replace") if Path(log).exists() else ""
    return "\n".join(text.splitlines()[-lines:])


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


def sliced_kernel_manager() -> type:
    """The kernel manager a test's ``NotebookClient`` / ``papermill.execute_notebook`` gets, as pipeline runs do
    (``kernel_manager_class=``): its client never sleeps through a reply whose wake-up pyzmq lost
    (:mod:`llmops_jupyter.pipelines.kernel_client`). Imported on call: jupyter_client is in the [batch] extra."""
    from llmops_jupyter.pipelines.kernel_client import SlicedPollKernelManager

    return SlicedPollKernelManager

"""Serving benchmark (issue 28): output tokens/s and latency p50/p95 at 1, 8 and 32 concurrent official-``openai``
client requests, for

- this server with continuous batching (``--max-batch 32``),
- this server one request at a time (``--max-batch 1``, the same engine with one row: the baseline),
- llama.cpp's own OpenAI server (``python -m llama_cpp.server``, llama-cpp-python) on a GGUF converted from the same
  weights at f32 (the precision this server runs them in on CPU),

on the tiny model and SmolLM2-135M, all in the same run, alternating, ``--repeats`` times (medians with min-max
spread). Every server runs in its own process (ours detached), the clients in this one. Then, on SmolLM2, 100
JSON-schema requests through the batched server (all must validate) and the constrained-decoding overhead per
token (one client, the same prompts and ``max_tokens`` with and without the schema).

All requests are ``/v1/completions`` with the same prompt strings, ``temperature=0`` and a fixed ``max_tokens``
(so every server does the same work; chat templates differ between the servers). Raw JSON goes to
``bench/results/serve-<host>-<time>.json``.

    python bench/bench_serve.py [--models tiny,smollm2] [--repeats 3] [--levels 1,8,32] [--max-tokens 24]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).parent
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "city": {"type": "string", "maxLength": 12}},
          "required": ["name", "age", "city"], "additionalProperties": False}


def _prompt(i: int) -> str:
    topics = ["the sea", "a small town", "bread", "winter", "trains", "a garden", "the moon", "music"]
    return f"Write a short story about {topics[i % len(topics)]} and the number {i}.\n"


def _load() -> float:
    return os.getloadavg()[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Ours:
    def __init__(self, model: str, max_batch: int, max_tokens: int):
        from llmops_jupyter.core.runner import Runner
        from llmops_jupyter.registry import Registry

        self.reg = Registry.open()
        res = Runner(self.reg).run("serve", model=model, auth=False, detach=True, max_batch=max_batch,
                                   max_concurrency=128, queue_timeout=600, max_tokens=max(max_tokens, 96))
        self.run_id = res.run_id
        self.url = res.outputs["deployment"].info["url"]
        self.model = "default"

    def close(self) -> None:
        from llmops_jupyter.stages.serve import server

        server.stop(self.reg, self.run_id, timeout=120)


class _LlamaServer:
    def __init__(self, gguf: Path, log: Path):
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}/v1"
        self.model = "model"
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "model",
                 "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", str(os.cpu_count()),
                 "--verbose", "False"], stdout=fh, stderr=subprocess.STDOUT)
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama_cpp.server did not start; see {log}")
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def _drive(url: str, model: str, concurrency: int, n: int, max_tokens: int, *, offset: int = 0,
           schema: dict | None = None) -> dict:
    """``n`` requests from ``concurrency`` client threads (each sends its next request when the last returns)."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
    lat: list[float] = []
    toks: list[int] = []
    texts: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()
    todo = list(range(n))

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            t = time.perf_counter()
            try:
                if schema is None:
                    out = client.completions.create(model=model, prompt=_prompt(offset + i), max_tokens=max_tokens,
                                                    temperature=0)
                    text = out.choices[0].text
                else:
                    out = client.chat.completions.create(
                        model=model, max_tokens=max_tokens, temperature=0.7, seed=offset + i,
                        messages=[{"role": "user", "content": "Invent a person as JSON. " + _prompt(offset + i)}],
                        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema,
                                                                                "strict": True}})
                    text = out.choices[0].message.content
            except Exception as exc:  # noqa: BLE001 - counted, reported
                with lock:
                    errors.append(repr(exc)[:200])
                continue
            with lock:
                lat.append(time.perf_counter() - t)
                toks.append(out.usage.completion_tokens)
                texts.append(text)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=20, method="inclusive") if len(lat) > 1 else lat * 19
    return {"concurrency": concurrency, "requests": n, "ok": len(lat), "errors": errors[:5], "wall_s": wall,
            "output_tokens": sum(toks), "tokens_per_s": sum(toks) / wall, "p50_s": statistics.median(lat),
            "p95_s": q[18], "texts": texts}


def _gguf(model_dir: Path, work: Path) -> Path:
    from llmops_jupyter.stages.export.convert import convert

    out = work / f"{model_dir.name}-f32.gguf"
    if not out.exists():
        convert(model_dir, out, outtype="f32", log_file=work / "convert.log")
    return out


def _med(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--json-requests", type=int, default=100)
    ap.add_argument("--no-llamacpp", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("LLMOPS_HOME", tempfile.mkdtemp() + "/.llmops")
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    from llmops_jupyter.models.refs import PROVIDERS, model_cache_dir

    names = {"tiny": "tiny-llama", "smollm2": "smollm2-135m"}
    levels = [int(x) for x in args.levels.split(",")]
    results: dict = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(),
                     "cpus": os.cpu_count(), "max_tokens": args.max_tokens, "levels": levels,
                     "repeats": args.repeats, "models": {}, "load_before": _load()}
    goals = []
    try:
        import llama_cpp.server.app  # noqa: F401 - its [server] dependencies are there

        llamacpp = not args.no_llamacpp
    except ImportError as exc:
        llamacpp = False
        results["llamacpp_skipped"] = f"llama_cpp.server cannot be imported: {exc}"
    for key in args.models.split(","):
        model_dir = Path(PROVIDERS[names[key]](model_cache_dir()))
        gguf = None
        if llamacpp:
            from llmops_jupyter.core.errors import StageError

            try:
                gguf = _gguf(model_dir, work)
            except StageError as exc:  # the tiny model's toy tokenizer is not one llama.cpp's converter knows
                results.setdefault("llamacpp_skipped_for", {})[key] = str(exc).splitlines()[0]
        systems = ["batched", "one_at_a_time"] + (["llama.cpp"] if gguf is not None else [])
        raw: dict[str, list[list[dict]]] = {s: [] for s in systems}
        for rep in range(args.repeats):
            for system in systems:
                if system == "llama.cpp":
                    srv = _LlamaServer(gguf, work / "llama-server.log")
                else:
                    srv = _Ours(str(model_dir), 32 if system == "batched" else 1, args.max_tokens)
                try:
                    _drive(srv.url, srv.model, 2, 2, 4)  # warm up
                    runs = []
                    for c in levels:
                        n = max(8, c)  # at 32 clients: a burst of 32 at once
                        r = _drive(srv.url, srv.model, c, n, args.max_tokens)
                        r["load"] = _load()
                        print(f"{key:8} rep {rep} {system:14} c={c:<3} {r['tokens_per_s']:8.1f} tok/s  "
                              f"p50 {r['p50_s']:.3f}s  p95 {r['p95_s']:.3f}s  ok {r['ok']}/{n}  load {r['load']:.1f}",
                              flush=True)
                        runs.append(r)
                    raw[system].append(runs)
                finally:
                    srv.close()
        summary: dict = {}
        for system in systems:
            summary[system] = {}
            for li, c in enumerate(levels):
                reps = [raw[system][rep][li] for rep in range(args.repeats)]
                summary[system][str(c)] = {"tokens_per_s": _med([r["tokens_per_s"] for r in reps]),
                                           "p50_s": _med([r["p50_s"] for r in reps]),
                                           "p95_s": _med([r["p95_s"] for r in reps]),
                                           "lost": sum(r["requests"] - r["ok"] for r in reps)}
        # greedy outputs: batched == one at a time (same engine, fp32), per level
        same = all(raw["batched"][rep][li]["texts"] and sorted(raw["batched"][rep][li]["texts"])
                   == sorted(raw["one_at_a_time"][rep][li]["texts"])
                   for rep in range(args.repeats) for li in range(len(levels)))
        ratios = {str(c): [raw["batched"][rep][li]["tokens_per_s"] / raw["one_at_a_time"][rep][li]["tokens_per_s"]
                           for rep in range(args.repeats)] for li, c in enumerate(levels)}
        entry = {"summary": summary, "batched_over_one_at_a_time": {c: _med(v) for c, v in ratios.items()},
                 "greedy_texts_equal": same,
                 "raw": {s: [[{k: v for k, v in r.items() if k != "texts"} for r in runs] for runs in raw[s]]
                         for s in systems}}
        if gguf is not None:
            entry["batched_over_llamacpp"] = {
                str(c): _med([raw["batched"][rep][li]["tokens_per_s"] / raw["llama.cpp"][rep][li]["tokens_per_s"]
                              for rep in range(args.repeats)]) for li, c in enumerate(levels)}
        top = str(max(levels))
        target = 4.0 if key == "tiny" else 2.0
        med = entry["batched_over_one_at_a_time"][top]["median"]
        goals.append({"goal": f"{key}: {top} clients batched >= {target:g}x one-at-a-time", "ratio": med,
                      "holds": med >= target})
        results["models"][key] = entry
    if "smollm2" in args.models.split(",") and args.json_requests:
        results["json_schema"] = _json_schema(Path(PROVIDERS["smollm2-135m"](model_cache_dir())), args)
    results["load_after"] = _load()
    results["goals"] = goals
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"serve-{platform.node().split('.')[0] or 'host'}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"raw results: {path}")
    for g in goals:
        print(f"  {g['goal']}: {g['ratio']:.2f}x -> {'holds' if g['holds'] else 'DOES NOT HOLD'}")
    return {"goals": goals, "file": str(path)}


def _json_schema(model_dir: Path, args) -> dict:
    """100 schema requests at 32 clients through the batched server (every answer validated), then the per-token
    cost of the constraint at one client: the same requests with and without ``response_format``."""
    import jsonschema

    srv = _Ours(str(model_dir), 32, 96)
    try:
        _drive(srv.url, srv.model, 2, 2, 4)
        r = _drive(srv.url, srv.model, 32, args.json_requests, 96, schema=PERSON)
        valid = 0
        problems = []
        for text in r["texts"]:
            try:
                jsonschema.validate(json.loads(text), PERSON)
                valid += 1
            except (ValueError, jsonschema.ValidationError) as exc:
                problems.append(f"{exc}"[:120])
        per_token = {"constrained": [], "free": []}
        import openai

        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=600)
        for _ in range(args.repeats):
            for kind in ("free", "constrained"):
                t, toks = 0.0, 0
                for i in range(6):
                    kw = {} if kind == "free" else {"response_format": {
                        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
                    t0 = time.perf_counter()
                    out = client.chat.completions.create(
                        model=srv.model, max_tokens=48, temperature=0,
                        messages=[{"role": "user", "content": "Invent a person as JSON. " + _prompt(i)}], **kw)
                    t += time.perf_counter() - t0
                    toks += out.usage.completion_tokens
                per_token[kind].append(1000 * t / max(toks, 1))
        free, cons = statistics.median(per_token["free"]), statistics.median(per_token["constrained"])
        res = {"requests": args.json_requests, "ok": r["ok"], "valid": valid, "problems": problems[:5],
               "wall_s": r["wall_s"], "tokens_per_s": r["tokens_per_s"], "ms_per_token": per_token,
               "overhead_ms_per_token": cons - free, "overhead_ratio": cons / free}
        print(f"json-schema: {valid}/{args.json_requests} valid; ms/token free {free:.2f}, constrained {cons:.2f} "
              f"(+{cons - free:.2f} ms)", flush=True)
        return res
    finally:
        srv.close()


if __name__ == "__main__":
    main()

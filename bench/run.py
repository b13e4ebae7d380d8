"""`make bench`: run every bench/bench_*.py (each has main() -> dict) and write bench/out/latest.json.

Benchmarks report ratios against a baseline measured in the same run (these machines are noisy); absolute times
are recorded from GPU runs in bench/RESULTS.md. Run one with `python bench/run.py finetune`.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).parent


def main(argv: list[str]) -> int:
    only = set(argv)
    results: dict[str, object] = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform()}
    failed = []
    for path in sorted(HERE.glob("bench_*.py")):
        name = path.stem.removeprefix("bench_")
        if only and name not in only:
            continue
        print(f"\n=== {name} ===", flush=True)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(mod)
            sys.argv = [str(path)]  # each benchmark parses its own defaults, not run.py's arguments
            results[name] = mod.main()
        except Exception:  # noqa: BLE001 - report and continue with the other benchmarks
            traceback.print_exc()
            failed.append(name)
            results[name] = {"error": traceback.format_exc(limit=3)}
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2, default=str))
    goals = [(name, g) for name, r in results.items() if isinstance(r, dict) for g in r.get("goals", [])]
    if goals:
        print("\ngoals:")
        for name, g in goals:
            print(f"  [{name}] {g['goal']}: {g['ratio']:.2f}× → {'holds' if g['holds'] else 'DOES NOT HOLD'}")
    print(f"\nresults: {out / 'latest.json'}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

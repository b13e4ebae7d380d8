"""bench/_common.py: raw results of benchmarks started in the same second (parallel seeds) are each kept."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "_common.py")
common = importlib.util.module_from_spec(spec)
sys.modules["bench_common"] = common
spec.loader.exec_module(common)


def test_results_written_in_the_same_second_do_not_overwrite_each_other(tmp_path, monkeypatch):
    monkeypatch.setattr(common.time, "strftime", lambda fmt, *a: "20261203-144505")
    paths = [common.write_result({"seed": s}, tmp_path, "rlhf") for s in range(3)]
    assert len(set(paths)) == 3
    assert [json.loads(p.read_text())["seed"] for p in paths] == [0, 1, 2]
    assert paths[0].name == "rlhf-cpu-20261203-144505.json" and paths[2].name == "rlhf-cpu-20261203-144505-2.json"

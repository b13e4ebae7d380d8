"""`make gpu-check`: refuses in one line without CUDA, prints its plan anywhere, carries its wheels in parts that
fit one call each, and runs its steps each within its own budget, going on past a failing or hung one."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # its dataclass looks its module up
spec.loader.exec_module(gpu_check)


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(_cuda(), reason="a CUDA device is here: the check would run")
def test_refuses_in_one_line_without_cuda():
    before = set((ROOT / "bench" / "results").glob("gpu-*.json"))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py")], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: refused: ") and "CUDA" in lines[0], proc.stderr
    assert proc.stdout == ""
    assert set((ROOT / "bench" / "results").glob("gpu-*.json")) == before  # nothing ran, nothing written


def test_dry_run_prints_the_plan_within_eight_minutes():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--dry-run"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    plan = gpu_check.steps("python", ROOT / "build" / "x")
    assert sum(s.budget_s for s in plan) <= gpu_check.TOTAL_BUDGET_S < 8 * 60
    for s in plan:
        assert f"{s.name} " in proc.stdout and f"{s.budget_s} s" in proc.stdout
        script = next((a for a in s.argv if a.endswith(".py")), None)
        assert script is None or (ROOT / script).is_file(), script  # the benchmarks it names exist
    goals = [g for s in plan for g in s.goals]
    assert [line.strip().removeprefix("GOAL ") for line in proc.stdout.splitlines()
            if line.strip().startswith("GOAL ")] == goals
    assert {"LoRA ≥ 1.3× TRL padding_free", "QLoRA peak memory ≤ 0.5× LoRA (mb 2, GC)"} <= set(goals)


def test_the_carried_distributions_leave_torch_to_the_gpu_machine():
    wanted = gpu_check.wanted_distributions()
    assert {"transformers", "peft", "trl", "papermill", "ipykernel", "plotly", "openai", "pytest"} <= set(wanted)
    assert not [n for n in wanted if gpu_check.NEVER.match(n)]
    assert "torch" not in wanted and "llmops-jupyter" not in wanted


def test_parts_fit_one_call_each_and_reassemble(tmp_path):
    staging, carry = tmp_path / "staging", tmp_path / "carry"
    staging.mkdir()
    sizes = {"a.whl": 700, "b.whl": 200, "c.whl": 90, "model.whl": 2500}
    for i, (name, n) in enumerate(sizes.items()):
        (staging / name).write_bytes(bytes((i * 7 + k) % 251 for k in range(n)))
    manifest = gpu_check.write_parts(staging, [["a.whl", "b.whl", "c.whl"], ["model.whl"]], carry, limit=1000)
    parts = sorted(carry.glob("part-*"))
    assert len(parts) == manifest["parts"] == 4  # the wheels in one part, the model cut in three
    assert {f.name for f in (carry / "part-1").iterdir()} == {"a.whl", "b.whl", "c.whl", "manifest.json"}
    for part in parts:
        assert sum(f.stat().st_size for f in part.iterdir() if f.name != "manifest.json") <= 1000
    assert len(manifest["files"]["model.whl"]["pieces"]) == 3  # cut, in order

    files, missing = gpu_check.assemble(carry, tmp_path / "out")
    assert missing == [] and sorted(f.name for f in files) == sorted(sizes)
    for f in files:
        assert f.read_bytes() == (staging / f.name).read_bytes()

    # A part that did not arrive: the files it holds (pieces included) are missing, the others are rebuilt.
    import shutil

    shutil.rmtree(carry / "part-3")
    files, missing = gpu_check.assemble(carry, tmp_path / "out2")
    names_lost = {n for n, info in manifest["files"].items() if any(p["part"] == 3 for p in info["pieces"])}
    assert set(missing) == names_lost == {"model.whl"}
    assert {f.name for f in files} == set(sizes) - names_lost
    for f in files:
        assert hashlib.sha256(f.read_bytes()).hexdigest() == manifest["files"][f.name]["sha256"]


def test_each_step_runs_within_its_budget_and_a_failing_one_does_not_stop_the_rest(tmp_path, monkeypatch, capsys):
    """The step loop itself, with the CUDA device (which cannot exist here) faked at its boundary and quick
    stand-in commands: a passing step, a failing one, one past its budget, one that writes its raw result."""
    py = sys.executable

    def plan(_py, out):
        gen = out / "generation.json"
        return [
            gpu_check.Step("tests-gpu", 30, "stand-in", ["tests pass"], [py, "-c", "print('== 3 passed in 1.0s ==')"]),
            gpu_check.Step("training", 30, "stand-in", ["g1", "g2"], [py, "-c", "import sys; sys.exit(3)"]),
            gpu_check.Step("demo", 2, "stand-in", ["demo finishes"], [py, "-c", "import time; time.sleep(600)"]),
            gpu_check.Step("generation", 30, "stand-in", ["batched ≥ 5×"],
                           [py, "-c", f"import json; json.dump({{'throughput_ratio': 7.5, 'identical_greedy_outputs':"
                                      f" 4, 'prompts': 4}}, open({str(gen)!r}, 'w'))"]),
        ]

    monkeypatch.setattr(gpu_check, "refuse_without_cuda", lambda: None)
    monkeypatch.setattr(gpu_check, "versions", lambda: {"device": "stand-in", "torch": "x", "cuda": "x"})
    monkeypatch.setattr(gpu_check, "steps", plan)
    monkeypatch.setattr(gpu_check, "BUILD", tmp_path / "build")
    monkeypatch.setattr(gpu_check, "CARRY", tmp_path / "build" / "gpu-carry")
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path / "results")
    assert gpu_check.main([]) == 1  # not every goal passed
    out = capsys.readouterr().out
    goal_lines = [line for line in out.splitlines() if line.startswith("GOAL ")]
    assert goal_lines == [
        "GOAL tests pass  FIGURE 3 passed in 1.0s  pass",
        "GOAL g1  FIGURE failed (exit status 3)  unmeasured",
        "GOAL g2  FIGURE failed (exit status 3)  unmeasured",
        "GOAL demo finishes  FIGURE timed out after 2 s  unmeasured",
        "GOAL batched ≥ 5×  FIGURE 7.50× (4/4 identical greedy outputs)  pass",
    ]
    (raw,) = (tmp_path / "results").glob("gpu-*.json")
    report = json.loads(raw.read_text())
    assert report["steps"]["demo"]["status"] == "timed out after 2 s"
    assert report["steps"]["generation"]["raw"]["throughput_ratio"] == 7.5
    assert [g["verdict"] for g in report["goals"]] == ["pass", "unmeasured", "unmeasured", "unmeasured", "pass"]

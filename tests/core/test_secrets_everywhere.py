"""One secret scrubber (core.pii.scrub_secrets) for the audit log, the request log and recorded run errors."""

from __future__ import annotations

import pytest

KEY = "sk-live-abcdef0123456789"


def test_request_log_never_stores_an_api_key():
    from llmops_jupyter.stages.serve.reqlog import scrub_record

    rec = scrub_record({"prompt": f"use my key {KEY} please", "response": f"ok {KEY}", "status": 200,
                        "messages": [{"role": "user", "content": f"use my key {KEY} please"}]})
    assert KEY not in str(rec) and "[SECRET]" in rec["prompt"]


def test_a_failed_run_error_is_scrubbed(registry):
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.core.stage import Stage

    class Leaky(Stage):
        name = "leaky"

        def run(self, ctx):
            raise RuntimeError(f"could not connect to postgres://bob:hunter2pass@db/x with api_key='{KEY}'")

    with pytest.raises(RuntimeError):
        Runner(registry).run(Leaky())
    (run,) = registry.list_runs(stage="leaky")
    assert run["status"] == "failed" and KEY not in run["error"] and "hunter2pass" not in run["error"]
    assert "[SECRET]" in run["error"]

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


def test_an_endpoint_key_reaches_the_endpoint_and_nothing_else(registry, tmp_path, monkeypatch):
    """eval --api-key-env: the key goes in the Authorization header and nowhere on disk (registry, artifacts, the
    response cache, the run log) nor into the cell's outputs."""
    import json

    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.testing import FakeOpenAI, read_bytes_elsewhere

    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": f"what is {i}?", "answer": f"{i}"}) + "\n" for i in range(3)))
    monkeypatch.setenv("ENDPOINT_TEST_KEY", KEY)
    with FakeOpenAI() as fake:
        res = Runner(registry).run("eval", model=[f"openai:{fake.url}#fake-mini"], data=str(questions),
                                   metrics=["f1"], api_key_env=["ENDPOINT_TEST_KEY"])
    assert res.status == "finished" and fake.auth == [f"Bearer {KEY}"] * 3
    files = [p for p in registry.home.rglob("*") if p.is_file()]
    assert any("cache" in p.parts for p in files)  # the response cache was written ...
    blobs = read_bytes_elsewhere(files)
    assert blobs and not [name for name, data in blobs.items() if KEY.encode() in data]  # ... without the key
    assert KEY not in repr(res.outputs) + str(res.outputs["summary"]) + json.dumps(res.summary, default=str)

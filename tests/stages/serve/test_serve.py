"""The OpenAI-compatible server, driven by the official ``openai`` client against a real uvicorn on 127.0.0.1."""

from __future__ import annotations

import json
import os
import threading
from types import SimpleNamespace

import pytest

from llmops_jupyter.testing import wait_until

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

KEY = "sk-test-servemon-0123456789"


def _db_bytes(reg) -> bytes:
    """The registry database and its WAL, read out of process (reading them here would drop SQLite's locks)."""
    from llmops_jupyter.testing import read_bytes_elsewhere

    return b"".join(read_bytes_elsewhere([reg.db_path.with_name(reg.db_path.name + s) for s in ("", "-wal")]).values())


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.stages.serve import server

    home = tmp_path_factory.mktemp("serve") / ".llmops"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMOPS_HOME", str(home))
        mp.setenv("SERVE_TEST_KEY", KEY)
        reg = Registry(home)
        res = Runner(reg).run("serve", model=str(tiny_model), api_key_env="SERVE_TEST_KEY", max_concurrency=2,
                              queue_timeout=0.5, max_tokens=64, default_max_tokens=16,
                              max_request_bytes=64 * 1024, foreground=False)
        info = res.outputs["deployment"].info
        client = openai.OpenAI(base_url=info["url"], api_key=KEY, max_retries=0, timeout=60)
        ns = SimpleNamespace(reg=reg, res=res, url=info["url"], dep=res.run_id, client=client,
                             handle=res.outputs["handle"], home=home)
        yield ns
        if ns.dep in server.LOCAL:
            server.stop(reg, ns.dep, timeout=30)


def test_chat_nonstreaming_streaming_and_completions(served):
    c = served.client
    assert [m.id for m in c.models.list().data] == ["tiny-llama"]
    msgs = [{"role": "user", "content": "What is two plus two?"}]
    out = c.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=12, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason in ("stop", "length")
    assert 0 < out.usage.completion_tokens <= 12 and out.usage.prompt_tokens > 0

    chunks = list(c.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == out.choices[0].finish_reason
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == out.choices[0].message.content  # greedy: the streamed text is the same answer
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens

    comp = c.completions.create(model="tiny-llama", prompt="The quick brown", max_tokens=5, temperature=0)
    assert comp.object == "text_completion" and comp.usage.completion_tokens <= 5


def test_auth_and_limits(served):
    bad = openai.OpenAI(base_url=served.url, api_key="sk-wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.APIStatusError) as big:
        served.client.chat.completions.create(model="tiny-llama",
                                              messages=[{"role": "user", "content": "x" * 100_000}])
    assert big.value.status_code == 413 and "--max-request-bytes" in big.value.message
    with pytest.raises(openai.BadRequestError) as many:
        served.client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=1000)
    assert "--max-tokens" in many.value.message
    with pytest.raises(openai.NotFoundError):
        served.client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    served.handle.serve_ctx.log.flush()
    statuses = {r["status"] for r in served.reg.requests()}
    assert {401, 413, 400, 404} <= statuses


def test_twenty_concurrent_requests_none_hang_none_lost(served):
    results: list[str] = []

    def call(i: int) -> None:
        try:
            served.client.chat.completions.create(
                model="tiny-llama", messages=[{"role": "user", "content": f"concurrency probe {i}"}], max_tokens=24)
            results.append("ok")
        except openai.RateLimitError as exc:
            assert exc.response.headers.get("retry-after")
            results.append("429")
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            results.append(repr(exc))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert len(results) == 20 and set(results) <= {"ok", "429"}, results
    served.handle.serve_ctx.log.flush()
    rows = [r for r in served.reg.requests() if (r["prompt"] or "").startswith("concurrency probe ")]
    assert len(rows) == 20
    assert sum(r["status"] == 200 for r in rows) == results.count("ok")
    assert sum(r["status"] == 429 for r in rows) == results.count("429")


def test_busy_server_answers_429_with_retry_after(served, monkeypatch):
    """Both generation slots held (the engine is made to wait): the next request waits --queue-timeout, then gets
    429 with Retry-After, and the refusal is in the request log. Deterministic: no race on generation speed."""
    engine = served.handle.serve_ctx.engine
    gate = threading.Event()
    real_submit = engine.submit
    holding: list[object] = []

    def held(req):  # called after the request took its slot
        holding.append(req)
        threading.Thread(target=lambda: (gate.wait(60), real_submit(req)), daemon=True).start()
        return req

    monkeypatch.setattr(engine, "submit", held)
    holders = [threading.Thread(target=lambda: served.client.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hold a slot"}], max_tokens=4)) for _ in range(2)]
    for t in holders:
        t.start()
    wait_until(lambda: len(holding) >= 2, 300, what="both generation slots to be held before the probe")
    with pytest.raises(openai.RateLimitError) as info:
        served.client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "busy?"}],
                                              max_tokens=4)
    gate.set()
    for t in holders:
        t.join(60)
    assert not any(t.is_alive() for t in holders), "a held request never finished"
    assert info.value.response.headers["retry-after"] == "1"
    assert "generation slots" in str(info.value)
    served.handle.serve_ctx.log.flush()
    assert any(r["status"] == 429 and r["prompt"] == "busy?" for r in served.reg.requests())


def test_pii_is_scrubbed_before_storage(served):
    raw = ["jane.doe@example.org", "4111 1111 1111 1111", "+1 415 555 0199", "203.0.113.77"]
    prompt = f"My email is {raw[0]}, card {raw[1]}, phone {raw[2]}, server {raw[3]}. Summarise."
    served.client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=8)
    served.client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=8, stream=True).close()
    served.handle.serve_ctx.log.flush()
    rows = [r for r in served.reg.requests() if (r["prompt"] or "").startswith("My email is")]
    assert rows and all("[EMAIL]" in r["prompt"] and "[CARD]" in r["prompt"] for r in rows)
    assert rows[0]["checks"]["pii_prompt"] == ["CARD", "EMAIL", "IP", "PHONE"]
    blob = _db_bytes(served.reg)
    for secret in [*raw, KEY]:
        assert secret.encode() not in blob


def test_deployment_artifact_status_and_lineage(served):
    reg = served.reg
    art = reg.get_artifact(f"{served.dep}:deployment")
    manifest = json.loads((art.path / "deployment.json").read_text())
    assert manifest["url"] == served.url and manifest["limits"]["max_tokens"] == 64
    assert manifest["key_ids"] and KEY not in json.dumps(manifest)
    chain = reg.lineage_chain(art)
    assert [a.kind for a in chain] == ["base-model", "deployment"]
    assert chain[0].hash == manifest["model"]["hash"]
    from llmops_jupyter.stages.serve.server import get_deployment

    row = get_deployment(reg, served.dep)
    assert row["status"] == "running" and row["artifact"] == art.hash


def test_detached_process_serves_and_stops(tiny_model, served):
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.stages.serve import server

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMOPS_HOME", str(served.home))
        res = Runner(served.reg).run("serve", model=str(tiny_model), detach=True, auth=False, max_batch=3)
        row = server.get_deployment(served.reg, res.run_id)
        assert row["mode"] == "process" and row["pid"] != os.getpid() and row["status"] == "running"
        import httpx

        health = httpx.get(row["url"].removesuffix("/v1") + "/health", timeout=30).json()
        assert health["engine"] == "transformers" and health["max_batch"] == 3  # the flag reached the child
        client = openai.OpenAI(base_url=row["url"], api_key="unused", max_retries=0, timeout=60)
        out = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=4)
        assert out.choices[0].message.content is not None
        assert server.stop(served.reg, res.run_id, timeout=60) == [res.run_id]
        assert server.get_deployment(served.reg, res.run_id)["status"] == "stopped"
        # the child flushed its log before exiting
        assert len(served.reg.requests(res.run_id)) == 1


def test_stop_via_magic_finishes_in_flight_stream(served, shell, monkeypatch):
    monkeypatch.setenv("LLMOPS_HOME", str(served.home))
    got: dict = {}
    first_chunk = threading.Event()

    def stream() -> None:
        chunks = []
        for chunk in served.client.chat.completions.create(
                model="tiny-llama", messages=[{"role": "user", "content": "in flight"}], max_tokens=64, stream=True):
            chunks.append(chunk)
            first_chunk.set()
        got["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]

    t = threading.Thread(target=stream)
    t.start()
    assert first_chunk.wait(60), "the stream never started"  # stop only once the request is really in flight
    shell.run_line_magic("llmops", f"serve --stop {served.dep}")
    t.join(60)
    assert not t.is_alive(), "the in-flight stream never ended"
    assert got.get("finish") in (["stop"], ["length"])  # completed, not cut off
    from llmops_jupyter.stages.serve.server import get_deployment

    assert get_deployment(served.reg, served.dep)["status"] == "stopped"
    assert sum(r["prompt"] == "in flight" and r["status"] == 200 for r in served.reg.requests()) == 1
    with pytest.raises(openai.APIConnectionError):
        served.client.models.list()

"""Continuous batching in the transformers engine: requests join the running batch between decode steps and leave
when they finish, and what each one gets is what it would get alone (greedy, fp32), logprobs, stop strings and
grammar included; through the server, many concurrent official-client requests (streaming and not) are all answered
and all logged."""

from __future__ import annotations

import json
import threading

import pytest

from llmops_jupyter.testing import wait_until

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tiny_model):
    from llmops_jupyter.stages.serve.engine import Engine

    eng = Engine(str(tiny_model), max_batch=6, device="cpu", batch_wait_s=0.0)
    yield eng
    eng.stop()


def _requests():
    from llmops_jupyter.stages.serve.constrained import json_schema_grammar
    from llmops_jupyter.stages.serve.engine import GenRequest

    reqs = [GenRequest(f"Question {i}: what is {7 * i} plus {i}?" + " again" * (i % 4), 6 + 5 * (i % 4))
            for i in range(10)]
    for r in reqs:  # the chosen tokens' log-probabilities show any difference in what the model computed
        r.logprobs = 0
    reqs[3].logprobs = 3
    reqs[5].stop = ["e"]
    reqs[7].grammar = json_schema_grammar(PERSON)
    reqs[7].max_tokens = 60
    reqs[8].echo, reqs[8].logprobs = True, 2
    return reqs


def test_batched_greedy_equals_one_at_a_time(engine):
    """Ten requests of different lengths through a batch of at most six: the second half is submitted while the
    first half is decoding (so rows join mid-flight and leave at different steps); each result equals ``generate``
    on that request alone."""
    import torch

    from llmops_jupyter.stages.serve.constrained import validate

    assert next(engine.net.parameters()).dtype == torch.float32
    batched = _requests()
    before = dict(engine.stats)
    for r in batched[:5]:
        engine.submit(r)
    wait_until(lambda: engine.stats["batches"] > before["batches"], 60, what="the first rows to be decoding")
    for r in batched[5:]:
        engine.submit(r)
    got = [r.future.result(timeout=120) for r in batched]
    assert engine.stats["prefills"] - before.get("prefills", 0) >= 2  # admitted in more than one group
    assert engine.stats["max_batch_seen"] > 1
    assert engine.stats["max_batch_seen"] <= 6

    alone = [engine._generate([r])[0] for r in _requests()]  # one at a time through generate()
    for i, (b, a) in enumerate(zip(got, alone, strict=True)):
        assert b.token_ids[: len(a.token_ids)] == a.token_ids or b.text == a.text, i
        assert b.text == a.text, i
        assert b.prompt_tokens == a.prompt_tokens
    assert got[5].finish_reason == "stop" and "e" not in got[5].text  # stop string honoured mid-batch
    assert [r.finish_reason for r in got] == [r.finish_reason for r in alone]
    # every row's log-probabilities equal the lone run's: the padding, positions and cache rows are right
    for i, (b, a) in enumerate(zip(got, alone, strict=True)):
        n = min(len(b.logprobs), len(a.logprobs))
        assert n and [x[1] for x in b.logprobs[:n]] == pytest.approx([x[1] for x in a.logprobs[:n]], abs=1e-4), i
    for (t1, lp1, alt1), (t2, lp2, alt2) in zip(got[3].logprobs, alone[3].logprobs, strict=True):
        assert t1 == t2 and lp1 == pytest.approx(lp2, abs=1e-4)
        assert [a for a, _ in alt1] == [a for a, _ in alt2]
    assert len(got[3].logprobs) == got[3].completion_tokens
    # echo: prompt log-probabilities too
    assert got[8].prompt_logprobs[0][1] is None
    assert [x[1] for x in got[8].prompt_logprobs[1:]] == pytest.approx([x[1] for x in alone[8].prompt_logprobs[1:]],
                                                                        abs=1e-4)
    # the constrained row validates and stopped by itself when the object was complete
    assert validate(got[7].text, PERSON) is None and got[7].finish_reason == "stop", got[7].text


def test_one_at_a_time_engine_gives_the_same_tokens(tiny_model, engine):
    """``max_batch=1`` (the benchmark's baseline) runs the same scheduler with one row: same outputs."""
    from llmops_jupyter.stages.serve.engine import Engine, GenRequest

    solo = Engine(str(tiny_model), max_batch=1, device="cpu")
    try:
        prompts = [f"Tell me about {w}" for w in ("cats", "the sea", "numbers 1 2 3", "x")]
        a = [solo.submit(GenRequest(p, 12)) for p in prompts]
        b = [engine.submit(GenRequest(p, 12)) for p in prompts]
        assert [r.future.result(60).token_ids for r in a] == [r.future.result(60).token_ids for r in b]
        assert solo.stats["max_batch_seen"] == 1
    finally:
        solo.stop()


def test_sampled_rows_are_reproducible_per_seed(engine):
    from llmops_jupyter.stages.serve.engine import GenRequest

    def run(seed: int) -> list[list[int]]:
        reqs = [GenRequest(f"Say {i}", 10, temperature=1.0, top_p=0.9, seed=seed + i) for i in range(4)]
        for r in reqs:
            engine.submit(r)
        return [r.future.result(60).token_ids for r in reqs]

    first = run(1)
    assert run(1) == first  # a request's seed fixes its sample, whatever else is in the batch
    assert run(100) != first


def test_many_concurrent_openai_clients_all_answered_and_logged(tiny_model, tmp_path, monkeypatch):
    """24 official-client requests at once (a third streaming) against a deployment batching up to 8: none lost,
    none refused, greedy streams equal their non-streamed twins, every request in the request log."""
    openai = pytest.importorskip("openai")
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.stages.serve import server

    monkeypatch.setenv("LLMOPS_HOME", str(tmp_path / ".llmops"))
    reg = Registry(tmp_path / ".llmops")
    run = Runner(reg).run("serve", model=str(tiny_model), auth=False, foreground=False, max_batch=8,
                          max_tokens=32)
    ctx = run.outputs["handle"].serve_ctx
    client = openai.OpenAI(base_url=run.outputs["deployment"].info["url"], api_key="unused", max_retries=0,
                           timeout=120)
    results: dict[int, tuple[str, str]] = {}

    def one(i: int) -> None:
        msgs = [{"role": "user", "content": f"Count to {i % 8}, please" + "!" * (i % 3)}]
        try:
            if i % 3 == 0:
                chunks = list(client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=8 + i,
                                                             temperature=0, stream=True))
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                results[i] = (chunks[0].id, text)
            else:
                out = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=8 + i,
                                                     temperature=0)
                results[i] = (out.id, out.choices[0].message.content)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = ("error", repr(exc))

    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert len(results) == 24 and not [r for r in results.values() if r[0] == "error"], results
        assert ctx.engine.stats["max_batch_seen"] > 1
        # a streamed request's text equals the same request sent without streaming
        for i in (0, 3, 9):
            msgs = [{"role": "user", "content": f"Count to {i % 8}, please" + "!" * (i % 3)}]
            out = client.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=8 + i, temperature=0)
            assert out.choices[0].message.content == results[i][1]
        ctx.log.flush()
        logged = {r["request_id"]: r for r in reg.requests(run.run_id)}
        for rid, _ in results.values():
            assert rid in logged and logged[rid]["status"] == 200
        assert json.loads(json.dumps(ctx.engine.stats))["requests"] >= 24
    finally:
        server.stop(reg, run.run_id, timeout=30)


def test_a_sliding_window_model_falls_back_to_one_at_a_time(tiny_model, tmp_path):
    """Sliding-window cache layers cannot have rows joined: detected at the first prefill, those requests and all
    later ones are served through ``generate`` alone, with the same answers."""
    import shutil

    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from llmops_jupyter.stages.serve.engine import Engine, GenRequest

    for f in tiny_model.iterdir():
        if f.is_file() and "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, tmp_path / f.name)
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, sliding_window=8,
                        pad_token_id=3, bos_token_id=1, eos_token_id=2)
    MistralForCausalLM(cfg).save_pretrained(tmp_path)
    eng = Engine(str(tmp_path), max_batch=4, device="cpu")
    try:
        reqs = [eng.submit(GenRequest(f"hello {i} " * (i + 1), 10)) for i in range(3)]
        got = [r.future.result(60) for r in reqs]
        assert eng._legacy
        assert [g.text for g in got] == [eng._generate([GenRequest(f"hello {i} " * (i + 1), 10)])[0].text
                                         for i in range(3)]
    finally:
        eng.stop()

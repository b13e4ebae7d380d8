"""Serving for chains and agents, driven by clients nobody here wrote (the official ``openai`` SDK, LangChain):
request fields the server does not honour are 400s naming them, logprobs equal the model's own log-softmax,
tool calls round-trip through the model's own chat template, and JSON-schema output always validates.

The tiny model has random weights: it never calls a tool or writes JSON by itself. Calls and JSON here are
*forced* by constrained decoding (``tool_choice`` required/named, ``response_format``); what the tests prove is
that the grammar, the template rendering, the parsing and the OpenAI shapes are right, not that the model is
good at tools.
"""

from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from llmops_jupyter.stages.serve.fields import CHAT_HONOURED, CHAT_SCHEMA, COMPLETION_HONOURED, COMPLETION_SCHEMA  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                   "required": ["city"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "age", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def agent(tiny_model, tmp_path_factory):
    """Two deployments of the same tiny weights: one whose template supports tools, one (the plain tiny model)
    whose template does not."""
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.stages.serve import server
    from llmops_jupyter.testing import tiny_tool_model

    root = tmp_path_factory.mktemp("agent")
    tool_model = tiny_tool_model(tiny_model, root / "tiny-tools")
    home = root / ".llmops"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMOPS_HOME", str(home))
        reg = Registry(home)
        runs = [Runner(reg).run("serve", model=str(m), auth=False, foreground=False, max_concurrency=8,
                                max_batch=8, max_tokens=96) for m in (tool_model, tiny_model)]
        urls = [r.outputs["deployment"].info["url"] for r in runs]
        ns = SimpleNamespace(
            reg=reg, url=urls[0], plain_url=urls[1], dep=runs[0].run_id, model_path=tool_model,
            client=openai.OpenAI(base_url=urls[0], api_key="unused", max_retries=0, timeout=120),
            plain=openai.OpenAI(base_url=urls[1], api_key="unused", max_retries=0, timeout=120),
            ctx=runs[0].outputs["handle"].serve_ctx)
        yield ns
        for r in runs:
            if r.run_id in server.LOCAL:
                server.stop(reg, r.run_id, timeout=30)


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def _logged(agent, request_id: str) -> dict:
    agent.ctx.log.flush()
    rows = [r for r in agent.reg.requests(agent.dep) if r["request_id"] == request_id]
    assert len(rows) == 1
    return rows[0]


# -- 1. strictness: every field of the OpenAI schema is honoured or refused ------------------------------------

#: a value that asks for something (not the API default) for every schema field this server does not honour
CHAT_ASKS = {
    "audio": {"voice": "alloy", "format": "wav"}, "frequency_penalty": 0.5, "function_call": "auto",
    "functions": [{"name": "f", "parameters": {"type": "object"}}], "logit_bias": {"42": 5}, "metadata": {"a": "b"},
    "modalities": ["text", "audio"], "moderation": {"type": "auto"}, "prediction": {"type": "content", "content": "x"},
    "presence_penalty": 0.5, "prompt_cache_key": "k", "prompt_cache_options": {"mode": "x"},
    "prompt_cache_retention": "24h", "reasoning_effort": "low", "service_tier": "flex", "store": True,
    "verbosity": "low", "web_search_options": {},
}
COMPLETION_ASKS = {"best_of": 2, "frequency_penalty": 0.5, "logit_bias": {"42": 5}, "presence_penalty": 0.5,
                   "suffix": "end"}


def _schema(module) -> set[str]:
    return set(module.CompletionCreateParamsStreaming.__annotations__)


def test_the_field_lists_follow_the_openai_package():
    """A field the openai package adds is neither honoured nor refused until someone decides (this fails)."""
    import openai.types.chat.completion_create_params as chat
    import openai.types.completion_create_params as comp

    assert _schema(chat) == CHAT_SCHEMA and _schema(comp) == COMPLETION_SCHEMA
    assert _schema(chat) - CHAT_HONOURED == set(CHAT_ASKS)
    assert _schema(comp) - COMPLETION_HONOURED == set(COMPLETION_ASKS)


@pytest.mark.parametrize("field", sorted(CHAT_ASKS))
def test_unhonoured_chat_field_is_a_400_naming_it(agent, field):
    with pytest.raises(openai.BadRequestError) as err:
        agent.client.chat.completions.create(model="tiny-llama", messages=ASK, max_tokens=2,
                                             extra_body={field: CHAT_ASKS[field]})
    assert err.value.body["param"] == field and f"'{field}'" in err.value.message


@pytest.mark.parametrize("field", sorted(COMPLETION_ASKS))
def test_unhonoured_completion_field_is_a_400_naming_it(agent, field):
    with pytest.raises(openai.BadRequestError) as err:
        agent.client.completions.create(model="tiny-llama", prompt="The quick", max_tokens=2,
                                        extra_body={field: COMPLETION_ASKS[field]})
    assert err.value.body["param"] == field


def test_defaults_of_unhonoured_fields_and_unknown_fields(agent):
    ok = agent.client.chat.completions.create(model="tiny-llama", messages=ASK, max_tokens=2, n=1,
                                              frequency_penalty=0, presence_penalty=0, store=False,
                                              logit_bias={}, modalities=["text"], user="u-1")
    assert ok.choices[0].finish_reason in ("stop", "length")
    assert _logged(agent, ok.id)["checks"]["end_user"].startswith("u-")  # `user` is kept, hashed
    r = _post(agent.url, "/chat/completions", {"messages": ASK, "max_tokens": 2, "mirostat": 2})
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "Unrecognized request argument supplied: mirostat", "type": "invalid_request_error",
        "param": "mirostat", "code": None}
    r = _post(agent.url, "/chat/completions", {"messages": [{"role": "user", "content": "hi", "audio": {"id": "a"}}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].audio"


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"echo": True}, "echo", "completions"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "0 to 20"),
    ({"top_logprobs": 3}, "top_logprobs", "requires 'logprobs'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "send_email"}}}, "tool_choice",
     "send_email"),
    ({"tool_choice": "required"}, "tool_choice", "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
     "tools[0].function.parameters", "not a valid JSON Schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": 5}}}},
     "response_format.json_schema.schema", "not a valid JSON Schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p",
                                                                 "schema": {"properties": {"a": {"minimum": "x"}}}}}},
     "response_format.json_schema.schema", "not a valid JSON Schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
])
def test_bad_input_is_a_400_naming_the_field(agent, body, param, words):
    r = _post(agent.url, "/chat/completions", {"messages": ASK, "max_tokens": 2, **body})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and words in err["message"], err


def test_completion_logprobs_range_and_streaming(agent):
    with pytest.raises(openai.BadRequestError) as err:
        agent.client.completions.create(model="tiny-llama", prompt="x", max_tokens=1, logprobs=6)
    assert err.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as err:  # not implemented: refused, never silently dropped
        agent.client.completions.create(model="tiny-llama", prompt="x", max_tokens=1, echo=True, stream=True)
    assert err.value.body["param"] == "echo"


# -- 2. logprobs ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(agent):
    """The served weights loaded here, in fp32: the model's own log-softmax to compare with."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(agent.model_path))
    net = AutoModelForCausalLM.from_pretrained(str(agent.model_path), dtype=torch.float32).eval()

    def logsoftmax(ids: list[int]):
        with torch.inference_mode():
            return torch.log_softmax(net(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)

    return SimpleNamespace(tok=tok, logsoftmax=logsoftmax)


def test_chat_top_logprobs_equal_the_models_log_softmax(agent, reference):
    out = agent.client.chat.completions.create(model="tiny-llama", messages=ASK, max_tokens=6, temperature=0,
                                               logprobs=True, top_logprobs=5)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    ids = reference.tok.apply_chat_template(ASK, add_generation_prompt=True, tokenize=False)
    ids = reference.tok(ids, add_special_tokens=False)["input_ids"]
    assert out.usage.prompt_tokens == len(ids)
    for entry in content:  # greedy: each step's token is the argmax of the model's distribution after the prefix
        lp = reference.logsoftmax(ids)[-1]
        top = lp.topk(5)
        chosen = int(top.indices[0])
        assert entry.token == reference.tok.decode([chosen]) and entry.bytes == list(entry.token.encode())
        assert abs(entry.logprob - float(lp[chosen])) < 1e-5
        assert [t.token for t in entry.top_logprobs] == [reference.tok.decode([int(i)]) for i in top.indices]
        assert max(abs(t.logprob - float(v)) for t, v in zip(entry.top_logprobs, top.values)) < 1e-5
        ids.append(chosen)
    assert out.choices[0].message.content == reference.tok.decode(ids[-6:], skip_special_tokens=True)


def test_streamed_chat_logprobs_are_the_same_as_whole(agent):
    kw = {"model": "tiny-llama", "messages": ASK, "max_tokens": 8, "temperature": 0, "logprobs": True,
          "top_logprobs": 3}
    whole = agent.client.chat.completions.create(**kw).choices[0].logprobs.content
    chunks = list(agent.client.chat.completions.create(**kw, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in whole] and len(whole) == 8
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=1e-5)
    assert [[t.token for t in e.top_logprobs] for e in streamed] == [[t.token for t in e.top_logprobs] for e in whole]


def test_completion_echo_logprobs_as_lm_eval_sends_them(agent, reference):
    """lm-eval's local-completions: token-id prompts, echo=True, logprobs=1, max_tokens=1; it reads
    token_logprobs/top_logprobs of the prompt's tokens."""
    texts = ["The quick brown fox", "A language model predicts"]
    prompts = [reference.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    out = agent.client.completions.create(model="tiny-llama", prompt=prompts, echo=True, logprobs=1, max_tokens=1,
                                          temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    for ids, choice in zip(prompts, out.choices):
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        ref = reference.logsoftmax(ids)
        for i in range(1, len(ids)):
            assert abs(lp.token_logprobs[i] - float(ref[i - 1, ids[i]])) < 1e-5
            (alt, value), = lp.top_logprobs[i].items()
            assert abs(value - float(ref[i - 1].max())) < 1e-5 and alt == reference.tok.decode([int(ref[i - 1].argmax())])
        assert abs(lp.token_logprobs[-1] - float(ref[-1].max())) < 1e-5  # the generated token (greedy)
        assert choice.text.startswith(reference.tok.decode(ids))
    text = agent.client.completions.create(model="tiny-llama", prompt=texts[0], echo=True, logprobs=0, max_tokens=1)
    assert text.choices[0].logprobs.token_logprobs[1:len(prompts[0])] == pytest.approx(
        out.choices[0].logprobs.token_logprobs[1:len(prompts[0])], abs=1e-6)


# -- 3. tool calls -------------------------------------------------------------------------------------------------

def _call_ok(call, tool) -> dict:
    import jsonschema

    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


def test_tool_call_round_trip_with_the_openai_sdk(agent, reference):
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = agent.client.chat.completions.create(model="tiny-llama", messages=ASK, tools=[WEATHER, TIME],
                                               tool_choice=named, max_tokens=80, temperature=0)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    _call_ok(choice.message.tool_calls[0], WEATHER)
    row = _logged(agent, out.id)
    assert row["checks"]["tools"] == {"offered": ["get_time", "get_weather"], "choice": "function:get_weather",
                                      "forced": True, "called": ["get_weather"], "problems": []}

    # the next turn: the assistant's call and the tool's answer go back through the model's own template
    call = choice.message.tool_calls[0]
    history = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "22 C and sunny"}]
    answer = agent.client.chat.completions.create(model="tiny-llama", messages=history, tools=[WEATHER, TIME],
                                                  max_tokens=8, temperature=0)
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.tool_calls is None
    expected = reference.tok.apply_chat_template(
        [*ASK, {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": json.loads(call.function.arguments)}}]},
         {"role": "tool", "content": "22 C and sunny"}],
        tools=[WEATHER, TIME], tokenize=False, add_generation_prompt=True)
    assert "<tool_response>\n22 C and sunny\n</tool_response>" in expected
    assert answer.usage.prompt_tokens == len(reference.tok(expected, add_special_tokens=False)["input_ids"])


def test_required_tool_choice_and_streaming_tool_calls(agent):
    kw = {"model": "tiny-llama", "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "required",
          "max_tokens": 80, "temperature": 0}
    whole = agent.client.chat.completions.create(**kw).choices[0].message.tool_calls
    assert len(whole) == 1 and whole[0].function.name in ("get_weather", "get_time")
    chunks = list(agent.client.chat.completions.create(**kw, stream=True))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas and {d.index for d in deltas} == {0}
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == whole[0].function.name
    assert "".join(d.function.arguments or "" for d in deltas) == whole[0].function.arguments  # greedy: same call
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == \
        ["tool_calls"]
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices).strip()
    # the SDK's own stream accumulator reads the same call
    with agent.client.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.arguments == whole[0].function.arguments


def test_a_template_without_tool_support_is_a_clear_400(agent):
    with pytest.raises(openai.BadRequestError) as err:
        agent.plain.chat.completions.create(model="tiny-llama", messages=ASK, tools=[WEATHER],
                                            tool_choice="required")
    assert err.value.body["param"] == "tools"
    assert "'tiny-llama'" in err.value.message and "chat template has no tool support" in err.value.message
    # tool_choice none: no tools are rendered, so any template serves it
    ok = agent.plain.chat.completions.create(model="tiny-llama", messages=ASK, tools=[WEATHER], tool_choice="none",
                                             max_tokens=2)
    assert ok.choices[0].message.tool_calls is None


def test_parsing_model_written_calls():
    """tool_choice auto: what a model wrote is parsed back (here real text, since the tiny model never writes a
    call by itself); malformed blocks and unknown tools stay content and are reported."""
    from llmops_jupyter.stages.serve.tools import StreamParser, parse

    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>')
    content, calls, problems = parse(text, "hermes", {"get_weather", "get_time"})
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "C"} and problems == []
    content, calls, problems = parse("<tool_call>\n{not json}\n</tool_call>", "hermes", {"get_weather"})
    assert calls == [] and problems == ["tool_call block is not a JSON {name, arguments} object"]
    assert parse('<tool_call>{"name": "rm", "arguments": {}}</tool_call>', "hermes", {"x"})[2] == \
        ["call of unknown tool 'rm'"]
    assert parse('{"name": "get_time", "parameters": {"city": "Rome"}}', "json", {"get_time"})[1][0]["function"][
        "arguments"] == '{"city": "Rome"}'
    parser = StreamParser("hermes", {"get_weather", "get_time"})
    events = [e for i in range(0, len(text), 3) for e in parser.feed(text[i:i + 3])] + parser.close()
    assert "".join(v for k, v in events if k == "content") == "Let me check.\n\n"
    assert [v["function"]["name"] for k, v in events if k == "call"] == ["get_weather", "get_time"]


# -- 4. structured output ------------------------------------------------------------------------------------------

def test_parse_with_a_pydantic_model(agent):
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=8)
        population: int = Field(ge=0, le=999)
        capital: bool

    out = agent.client.chat.completions.parse(model="tiny-llama", messages=[{"role": "user", "content": "A city?"}],
                                              response_format=City, max_tokens=64, temperature=0)
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, City) and out.choices[0].finish_reason == "stop"
    assert City.model_validate_json(out.choices[0].message.content) == parsed
    assert _logged(agent, out.id)["checks"]["structured"] == {"type": "json_schema", "name": "City", "checked": True,
                                                             "valid": True, "violation": None}


def test_json_schema_output_validates_on_100_of_100_requests(agent):
    """Sampled (temperature 1, a seed each), 8 at a time so the engine batches them: every answer parses and
    validates, and the request log agrees (zero schema violations)."""
    import jsonschema

    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    results: list = [None] * 100

    def one(i: int) -> None:
        try:
            out = agent.client.chat.completions.create(
                model="tiny-llama", messages=[{"role": "user", "content": f"Person number {i}?"}],
                response_format=rf, max_tokens=90, temperature=1.0, seed=i)
            results[i] = out
        except Exception as exc:  # noqa: BLE001 - asserted below
            results[i] = exc

    for start in range(0, 100, 8):
        threads = [threading.Thread(target=one, args=(i,)) for i in range(start, min(start + 8, 100))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    errors = [r for r in results if not hasattr(r, "choices")]
    assert not errors, errors[:3]
    answers = [json.loads(r.choices[0].message.content) for r in results]
    for a in answers:
        jsonschema.validate(a, PERSON)
    assert len({json.dumps(a, sort_keys=True) for a in answers}) > 10  # sampled: really different answers
    assert {r.choices[0].finish_reason for r in results} == {"stop"}
    agent.ctx.log.flush()
    ids = {r.id for r in results}
    rows = [r for r in agent.reg.requests(agent.dep) if r["request_id"] in ids]
    assert len(rows) == 100 and all(r["checks"]["structured"]["valid"] for r in rows)
    assert agent.ctx.engine.stats["max_batch_seen"] > 1


def test_json_object_mode_and_streamed_structured_output(agent):
    out = agent.client.chat.completions.create(model="tiny-llama", messages=ASK, max_tokens=96, temperature=0,
                                               response_format={"type": "json_object"})
    assert out.choices[0].finish_reason == "stop" and isinstance(json.loads(out.choices[0].message.content), dict)
    assert _logged(agent, out.id)["checks"]["structured"]["valid"]
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    chunks = list(agent.client.chat.completions.create(model="tiny-llama", messages=ASK, max_tokens=90,
                                                       temperature=0, response_format=rf, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    import jsonschema

    jsonschema.validate(json.loads(text), PERSON)
    assert _logged(agent, chunks[0].id)["checks"]["structured"]["valid"]


# -- 5. LangChain --------------------------------------------------------------------------------------------------

def test_langchain_chat_openai_tools_and_structured_output(agent):
    lc = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        """Current weather in a city."""

        city: str = Field(max_length=10)
        unit: str = Field(pattern="^(C|F)$")

    llm = lc.ChatOpenAI(model="tiny-llama", base_url=agent.url, api_key="unused", temperature=0, max_tokens=80,
                        max_retries=0)
    msg = llm.bind_tools([Weather], tool_choice="Weather").invoke("What is the weather in Paris?")
    assert len(msg.tool_calls) == 1 and msg.tool_calls[0]["name"] == "Weather"
    Weather.model_validate(msg.tool_calls[0]["args"])
    got = llm.with_structured_output(Weather).invoke("What is the weather in Paris?")
    assert isinstance(got, Weather)


# -- 6. monitoring sees them ---------------------------------------------------------------------------------------

def test_monitoring_metrics_see_tool_calls_and_structured_output(agent):
    """Runs after the tests above in this module: the same deployment's log, as %llmops monitor reads it."""
    from llmops_jupyter.stages.monitor.analysis import compute_metrics
    from llmops_jupyter.stages.monitor.checks import flagged

    agent.ctx.log.flush()
    rows = agent.reg.requests(agent.dep)
    m = compute_metrics(rows)
    assert m["schema_violation_rate"] == 0
    assert 0 < m["tool_call_rate"] < 1 and m["tool_parse_failure_rate"] == 0
    assert flagged({"structured": {"checked": True, "valid": False}, "tools": {"problems": ["x"]}}) == \
        ["schema_violation", "tool_parse"]


# -- the llama.cpp engine: what it does not implement is refused, never dropped ------------------------------------

@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"messages": ASK, "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"messages": ASK, "tools": [WEATHER]}, "tools"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt"),
])
def test_an_engine_without_these_features_refuses_them(agent, path, body, param):
    """llama-cpp-python is not installed here (it builds llama.cpp from source), so the app is given the served
    transformers engine declaring what LlamaCppEngine declares (``supports``, ``kind``): the refusal is the app's."""
    from fastapi.testclient import TestClient

    from llmops_jupyter.stages.serve.app import create_app
    from llmops_jupyter.stages.serve.engine import LlamaCppEngine

    engine = agent.ctx.engine
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "supports", LlamaCppEngine.supports, raising=False)
        mp.setattr(engine, "kind", LlamaCppEngine.kind, raising=False)
        ctx = SimpleNamespace(**{**vars(agent.ctx), "log": None})
        r = TestClient(create_app(ctx)).post(path, json={"max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.json()
    assert "llama.cpp" in r.json()["error"]["message"]

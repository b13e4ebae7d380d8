"""The GGUF export through llama.cpp's runtime (``llama-cpp-python``, the [gguf] extra): the deploy-parity gate,
the parity command, and serving the file through the same OpenAI-compatible app. Run with ``make test-gguf``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# pytest-timeout counts fixture set-up: the first test here also trains the tiny model (once per machine) and runs
# the module's two exports, 755 s with four CPU-burning processes beside it on 2 cores (2026-12-02), close to the
# suite's 900 s. The module's budget is twice that; the demo test has its own (below).
MODULE_BUDGET_S = 1500
pytestmark = [pytest.mark.gguf, pytest.mark.timeout(MODULE_BUDGET_S)]

pytest.importorskip("llama_cpp")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(trained_model, tmp_path_factory):
    """One registry with the f16 and q8_0 exports of the trained tiny model (real gguf runs)."""
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.registry import Registry

    home = tmp_path_factory.mktemp("gguf") / ".llmops"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMOPS_HOME", str(home))
        reg = Registry(home)
        runner = Runner(reg)
        runs = {q: runner.run("gguf", model=str(trained_model), quant=q) for q in ("f16", "q8_0")}
        yield reg, runs


def test_f16_export_passes_parity_exactly(exported, trained_model):
    reg, runs = exported
    res = runs["f16"]
    assert res.status == "finished"
    m = res.metrics
    assert m["parity_prompt_identity"] == 1.0 and m["parity_next_token_agreement"] == 1.0
    assert m["parity_free_running_agreement"] == 1.0 and m["parity_exact_match"] == 1.0 and m["parity_max_logit_diff"] < 0.05
    art = res.artifact
    assert art.kind == "gguf" and art.meta["quant"] == "f16" and art.meta["chat_template"]
    files = sorted(p.name for p in art.path.iterdir())
    assert files == sorted([art.meta["file"], "Modelfile", "parity.json"])
    assert json.loads((art.path / "parity.json").read_text())["passed"] is True
    parents = [n for n in reg.lineage(art, "up")["nodes"] if n["hash"] != art.hash]
    assert [n["kind"] for n in parents] == ["base-model"]  # lineage: the exported checkpoint → gguf


def test_q8_0_export_has_high_agreement(exported):
    m = exported[1]["q8_0"].metrics
    assert m["parity_prompt_identity"] == 1.0
    assert m["parity_next_token_agreement"] >= 0.9 and m["parity_exact_match"] >= 0.75
    assert m["parity_max_logit_diff"] < 1.0


def test_k_quant_goes_through_llama_cpps_quantizer(trained_model, registry, capfd):
    """llama.cpp's quantizer, with its per-tensor fallback warnings (rows not a multiple of 256) in the run's log,
    not in the cell: the C library's log lines go through Python logging into run.log."""
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.stages.export.convert import read_metadata
    from llmops_jupyter.stages.export.parity import gguf_file

    res = Runner(registry).run("gguf", model=str(trained_model), quant="q4_k_m", parity_min=0.5)
    assert res.status == "finished" and res.metrics["parity_next_token_agreement"] >= 0.5
    assert read_metadata(gguf_file(res.artifact.path))["general.file_type"] == 15  # MOSTLY_Q4_K_M
    shown = capfd.readouterr()
    assert "falling back" not in shown.out + shown.err and "llama_model" not in shown.out + shown.err
    assert "falling back to" in (registry.home / "runs" / res.run_id / "run.log").read_text()


def test_wrong_eos_in_the_template_fails_the_gate_naming_the_template(trained_model, registry):
    """A template that ends turns with <|endoftext|> instead of the model's <|im_end|> (the classic broken export):
    the prompts llama.cpp renders differ, the gate fails with one line, nothing is stored."""
    from llmops_jupyter.core.errors import GateError
    from llmops_jupyter.core.runner import Runner

    broken = (trained_model / "chat_template.jinja").read_text().replace("<|im_end|>", "<|endoftext|>")
    with pytest.raises(GateError) as info:
        Runner(registry).run("gguf", model=str(trained_model), quant="f16", chat_template=broken)
    msg = str(info.value.message)
    assert "\n" not in msg and "chat template (tokenizer.chat_template) not carried" in msg
    assert "<|endoftext|>" in msg or "endoftext" in msg
    assert registry.list_artifacts(kind="gguf") == []  # refused: nothing stored


def test_parity_command_compares_two_versions(exported, trained_model, shell, monkeypatch):
    reg, runs = exported
    monkeypatch.setenv("LLMOPS_HOME", str(reg.home))
    table = shell.run_line_magic("llmops", f"parity --model {runs['q8_0'].artifact.hash[:12]} --model {trained_model} "
                                           "--samples 3 --tokens 8")
    text = str(table)
    assert "rendered prompts identical" in text and "100% of 3" in text and "passed" in text


def test_export_to_gguf_through_the_governance_command(trained_model, shell, home):
    """The issue's spelling: `export --to gguf --model RUN --quant ...`, the gguf options passed through."""
    from llmops_jupyter.registry import Registry

    out = shell.run_line_magic("llmops", f"export --to gguf --model {trained_model} --quant f16 --parity-min 0.99")
    assert "GGUF export" in str(out) and "passed" in str(out) and "f16" in str(out)
    (art,) = Registry(home).list_artifacts(kind="gguf")
    assert art.meta["quant"] == "f16"


def test_served_gguf_answers_the_openai_client(exported, trained_model):
    """Served through llama.cpp behind the same app (auth, request log): the answer is the one the model gives in
    transformers, the version that was evaluated."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.stages.export.parity import HFSide
    from llmops_jupyter.stages.serve import server

    reg, runs = exported
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    hf = HFSide(str(trained_model))
    expected = hf.decode(hf.greedy(hf.render(msgs)[1], 16))
    assert expected
    art = runs["q8_0"].artifact
    res = Runner(reg).run("serve", model=art.hash[:12], foreground=False, max_tokens=32)
    dep = res.outputs["deployment"]
    try:
        assert dep.info["model"]["kind"] == "gguf"
        client = openai.OpenAI(base_url=dep.info["url"], api_key=dep.api_key, max_retries=0, timeout=60)
        out = client.chat.completions.create(model=art.name, messages=msgs, max_tokens=16, temperature=0)
        assert out.choices[0].message.content == expected
        assert out.choices[0].finish_reason == "stop" and out.usage.prompt_tokens > 0
        chunks = list(client.chat.completions.create(model=art.name, messages=msgs, max_tokens=16, temperature=0,
                                                     stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        bad = openai.OpenAI(base_url=dep.info["url"], api_key="sk-wrong", max_retries=0, timeout=30)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=art.name, messages=msgs, max_tokens=4)
        assert reg.request_counts().get(res.run_id, 0) >= 2  # the request log records GGUF traffic too
    finally:
        server.stop(reg, res.run_id, timeout=30)


def test_detached_deployment_serves_a_gguf_from_its_own_process(exported, trained_model, monkeypatch):
    """``serve --detach`` of a gguf version: a separate process loads the file in llama.cpp (not transformers) and
    answers like the model in transformers; the manifest says the engine generates one request at a time."""
    import os

    openai = pytest.importorskip("openai")
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.stages.export.parity import HFSide
    from llmops_jupyter.stages.serve import server

    reg, runs = exported
    monkeypatch.setenv("LLMOPS_HOME", str(reg.home))
    msgs = [{"role": "user", "content": "Name a primary color."}]
    hf = HFSide(str(trained_model))
    expected = hf.decode(hf.greedy(hf.render(msgs)[1], 12))
    art = runs["f16"].artifact
    res = Runner(reg).run("serve", model=art.hash[:12], detach=True, auth=False)
    try:
        row = server.get_deployment(reg, res.run_id)
        assert row["mode"] == "process" and row["pid"] != os.getpid() and row["status"] == "running"
        info = res.outputs["deployment"].info
        assert info["model"]["kind"] == "gguf" and info["batching"]["engine"] == "llama.cpp"
        import httpx

        health = httpx.get(row["url"].removesuffix("/v1") + "/health", timeout=30).json()
        assert health["engine"] == "llama.cpp" and health["max_batch"] == 1  # the child loaded the file in llama.cpp
        client = openai.OpenAI(base_url=row["url"], api_key="unused", max_retries=0, timeout=60)
        out = client.chat.completions.create(model=art.name, messages=msgs, max_tokens=12, temperature=0)
        assert out.choices[0].message.content == expected
        log = (reg.home / "logs" / f"{res.run_id}.log").read_text()
        assert "serving" in log
    finally:
        assert server.stop(reg, res.run_id, timeout=60) == [res.run_id]
    assert server.get_deployment(reg, res.run_id)["status"] == "stopped"
    assert len(reg.requests(res.run_id)) == 1  # the child's request log reached the registry


# The demo-export test's one time budget: the subprocess's limit, and pytest-timeout's is the same plus a margin
# for what the test reads afterwards, so the budget fires first and prints where the demo was. Measured 2026-12-02
# by `make test-gguf` from a fresh clone on 2 cores with two CPU-burning processes beside it (and, for its first hour,
# other test runs at the same priority): the demo took 4,543 s (100 QLoRA steps at 20-90 s a step under that load),
# the 12 tests 4,734 s. Twice the measurement.
DEMO_MEASURED_S = 4550
DEMO_BUDGET_S = 2 * DEMO_MEASURED_S
# What the test needs of the demo is section 11 on a fine-tuned, merged, gated SmolLM2, not the demo's scores
# (`make demo` reports those): its 100 QLoRA steps and its fine-tune gate (40 steps left the model merged on the
# NF4-dequantized base worse than the base: held-out ppl 4.97 -> 7.28, measured 2026-12-02), but 16 evaluated
# examples (not 40), 16 GPTQ calibration prompts (not 64) with the GPTQ gate on held-out perplexity (at 16 examples
# one answer is 0.06 of exact match; scales written wrong still fail it) and 2 requests (not 6).
DEMO_PARAMS = {"eval_limit": "16", "calibration_samples": "16", "requests": "2", "gptq_gate": "ppl<=+50%"}


@pytest.mark.slow
@pytest.mark.timeout(DEMO_BUDGET_S + 120)
def test_the_demo_exports_its_fine_tuned_smollm2_to_gguf_and_serves_it(tmp_path):
    """`make demo` with the [gguf] extra, scaled down (DEMO_PARAMS): SmolLM2-135M-Instruct is fine-tuned with
    QLoRA, merged and gated, then section 11 exports the merged model at q8_0, the parity gate passes, and
    llama.cpp serves the stored file to the openai client behind the same API. On a timeout or a failure the test
    prints the demo's last progress lines (which stage, which step)."""
    import os
    import sys

    import nbformat

    from llmops_jupyter.registry import Registry
    from llmops_jupyter.testing import output_tail, run_logged

    home = tmp_path / ".llmops"
    argv = [sys.executable, "-m", "llmops_jupyter.demo", "--out", str(tmp_path / "out"), "--home", str(home),
            *(x for k, v in DEMO_PARAMS.items() for x in ("-p", k, v))]
    env = {k: v for k, v in os.environ.items() if k != "LLMOPS_HOME"}
    log = tmp_path / "demo.log"
    code, output = run_logged(argv, DEMO_BUDGET_S, log, env=env, cwd=tmp_path)
    assert code == 0, f"the demo exited with {code}; its last output:\n{output_tail(log, 60)}"

    reg = Registry(home)
    (gguf,) = reg.list_artifacts(kind="gguf")
    assert gguf.meta["quant"] == "q8_0" and gguf.meta["chat_template"] and gguf.meta["modelfile_family"] == "chatml"
    parity = gguf.meta["parity"]
    assert parity["parity_passed"] == 1.0 and parity["parity_prompt_identity"] == 1.0
    assert parity["parity_next_token_agreement"] >= 0.9
    up = {n["kind"] for n in reg.lineage(gguf, "up")["nodes"]}
    assert {"merged", "adapter", "dataset"} <= up  # data → fine-tune → merged → gguf
    assert f"GGUF               {gguf.path / gguf.meta['file']}  (q8_0, parity next-token agreement" in output

    nb = nbformat.read(tmp_path / "out" / "02_qlora_merge_gptq_serve.ipynb", as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and 'find_spec("llama_cpp")' in c.source)
    text = "\n".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)
    assert "GGUF export of" in text and "passed" in text and "skipped" not in text
    answers = [line for line in text.splitlines() if line.strip().startswith("gguf (llama.cpp): ")]
    assert len(answers) == 2 and all(a.split(": ", 1)[1] not in ("''", '""') for a in answers)
    deps = [d for d in reg.deployments() if d["model"] == gguf.hash]
    assert len(deps) == 1 and deps[0]["status"] == "stopped"  # the cell stopped its deployment
    assert len(reg.requests(deps[0]["id"])) == 2  # the two questions, in the request log


GO_RENDER = Path(__file__).parent / "gotemplate" / "render.go"
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Opposite of hot?"}],
    [{"role": "user", "content": "Convert 2 kg to g."}, {"role": "assistant", "content": "2000 g"},
     {"role": "user", "content": "And 3 kg?"}],
]


def go_render(template: str, conversations: list) -> list[str]:
    """Ollama's template engine (Go's text/template) on ``conversations``: what `ollama run` sends to the model.
    ``make test-gguf`` installs Go (Debian's golang-go) when it is missing."""
    import shutil
    import subprocess

    if shutil.which("go") is None:
        pytest.skip("Go not installed (make test-gguf installs golang-go)")
    proc = subprocess.run(["go", "run", str(GO_RENDER)], input=json.dumps({"template": template,
                                                                          "conversations": conversations}),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("default_system", [None, "You are a helpful AI assistant named SmolLM."])
def test_every_modelfile_template_renders_in_go_as_the_family_it_was_matched_to(default_system):
    """The Go TEMPLATE of each family, executed by Go's text/template, gives exactly the rendering the chat
    template was matched against (so the match carries over to Ollama)."""
    from llmops_jupyter.stages.export.modelfile import FAMILIES, PROBES

    convs = [*PROBES, *CONVERSATIONS]
    for fam in FAMILIES:
        assert go_render(fam.go_template(default_system), convs) == [fam.render(m, default_system) for m in convs], \
            fam.name


def test_the_exported_modelfile_gives_ollama_the_prompt_llama_cpp_was_checked_with(exported):
    """The Modelfile's TEMPLATE, run by Go's text/template, renders every conversation exactly as llama.cpp renders
    it from the chat template in the GGUF (the rendering the parity gate checked), default system prompt included;
    its stops are the tokens llama.cpp stops on."""
    from llmops_jupyter.stages.export.modelfile import parse_modelfile
    from llmops_jupyter.stages.export.parity import GGUFSide, gguf_file

    reg, runs = exported
    art = runs["q8_0"].artifact
    mf = parse_modelfile((art.path / "Modelfile").read_text())
    assert mf["FROM"] == f"./{art.meta['file']}" and (art.path / art.meta["file"]).exists()
    side = GGUFSide(gguf_file(art.path))
    try:
        expected = [side.render(c)[0] for c in CONVERSATIONS]
        stops = {v for k, v in mf["parameters"] if k == "stop"}
        assert stops and all(side.llm.tokenize(s.encode(), add_bos=False, special=True)[0] in side.eos
                             for s in stops)
    finally:
        side.close()
    assert "You are a helpful AI assistant named SmolLM" in expected[0]  # SmolLM2's default system prompt
    assert go_render(mf["TEMPLATE"], CONVERSATIONS) == expected


def test_llama_cpp_engine_enforces_json_schema_with_its_own_grammar(smollm_tok_model, tmp_path):
    """``response_format`` on a GGUF deployment: llama.cpp's grammar sampler (GBNF converted from the schema) makes
    even a random-weight model's answer valid JSON of the schema, through the app and the OpenAI shapes."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from llmops_jupyter.stages.export.convert import convert
    from llmops_jupyter.stages.serve.app import Limits, ServeContext, create_app
    from llmops_jupyter.stages.serve.constrained import validate
    from llmops_jupyter.stages.serve.engine import LlamaCppEngine

    gguf = convert(smollm_tok_model, tmp_path / "m.gguf", outtype="f16")
    engine = LlamaCppEngine(str(gguf), n_ctx=512)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    try:
        client = TestClient(create_app(ServeContext(engine, Limits(), "dep", "m", None, [])))
        ask = [{"role": "user", "content": "Answer in JSON."}]
        for seed in range(3):
            r = client.post("/v1/chat/completions", json={
                "messages": ask, "max_tokens": 64, "temperature": 0.8, "seed": seed,
                "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})
            assert r.status_code == 200, r.json()
            text = r.json()["choices"][0]["message"]["content"]
            assert validate(text, schema) is None, text
        r = client.post("/v1/chat/completions", json={"messages": ask, "max_tokens": 2, "logprobs": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"  # still refused, by name
    finally:
        engine.stop()

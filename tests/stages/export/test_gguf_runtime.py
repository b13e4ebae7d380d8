"""The GGUF export through llama.cpp's runtime (``llama-cpp-python``, the [gguf] extra): the deploy-parity gate,
the parity command, and serving the file through the same OpenAI-compatible app. Run with ``make test-gguf``."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.gguf

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
    assert m["parity_prompt_identity"] == 1.0 and m["parity_token_agreement"] == 1.0
    assert m["parity_exact_match"] == 1.0 and m["parity_max_logit_diff"] < 0.05
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
    assert m["parity_token_agreement"] >= 0.9 and m["parity_exact_match"] >= 0.75
    assert m["parity_max_logit_diff"] < 1.0


def test_k_quant_goes_through_llama_cpps_quantizer(trained_model, registry):
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.stages.export.convert import read_metadata
    from llmops_jupyter.stages.export.parity import gguf_file

    res = Runner(registry).run("gguf", model=str(trained_model), quant="q4_k_m", parity_min=0.5)
    assert res.status == "finished" and res.metrics["parity_token_agreement"] >= 0.5
    assert read_metadata(gguf_file(res.artifact.path))["general.file_type"] == 15  # MOSTLY_Q4_K_M


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
    out = shell.run_line_magic("llmops", f"export --to gguf --run {trained_model}")
    assert "GGUF export" in str(out) and "passed" in str(out)


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

"""Adaptation beyond LoRA on the tiny model: prompt A/B eval, RAG eval + serving + monitoring, ratings → pairs → DPO.

Everything goes through the real stages (magics or the Runner), the real faiss index and MiniLM embedder, a real
uvicorn server called with the official ``openai`` client, the real rating widget driven with ``.click()`` and
TRL's DPOTrainer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llmops_jupyter
from llmops_jupyter.core.errors import ConfigError, DataError, StageError
from llmops_jupyter.core.runner import Runner
from llmops_jupyter.core.stage import discover
from llmops_jupyter.stages.adapt import augment as adapt
from llmops_jupyter.stages.eval import store as evalstore

discover()  # stage modules register their tables before the fixtures open a registry
pytest.importorskip("transformers")
CORPUS = Path(llmops_jupyter.__file__).parent / "data" / "rag_corpus"
QUESTIONS = CORPUS / "questions.jsonl"


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """A second tiny model (another seed): its outputs differ, so a rater has something to prefer."""
    from llmops_jupyter.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("other") / "tiny-other", seed=1)


def _index(registry):
    pytest.importorskip("faiss")
    pytest.importorskip("sentence_transformers")
    return Runner(registry).run("index", {"source": str(CORPUS), "chunk_size": 200, "overlap": 40})


# -- prompts ------------------------------------------------------------------------------------------------------------
def test_prompt_ab_eval_with_per_example_diff_gate_and_lineage(shell, registry, tiny_dataset, tiny_model):
    shell.run_cell_magic("llmops", "prompt qa", "system: You are terse.\nuser: {question}")
    shell.run_cell_magic("llmops", "prompt qa", "system: You answer in one short sentence.\nuser: Q: {question}\nA:")
    res = shell.run_line_magic(
        "llmops", f"eval --model {tiny_model} --data {tiny_dataset.hash} --prompt qa@1 --prompt qa@2 --limit 6 "
                  "--max-new-tokens 6 --metrics ppl,f1 --gate 'ppl<=+50%'")
    assert res.status == "finished"
    assert [v["model_ref"] for v in evalstore.versions(registry, res.run_id)] == ["qa@1", "qa@2"]
    assert {"qa@1/ppl", "qa@2/ppl", "qa@2/delta.ppl"} <= set(res.metrics)
    diff = evalstore.diff(registry, res.run_id, res.run_id, a_model="qa@1", b_model="qa@2")
    assert len(diff) == 6 and all("ppl" in d["delta"] for d in diff)
    rows = {ref: registry.eval_examples(res.run_id, ref)[0] for ref in ("qa@1", "qa@2")}
    assert "You are terse." in rows["qa@1"]["prompt"] and "Q: " not in rows["qa@1"]["prompt"]
    assert "one short sentence" in rows["qa@2"]["prompt"] and "\nA:" in rows["qa@2"]["prompt"]
    assert res.summary["gate"][0]["candidate"] == "qa@2"  # the gate compares prompt versions like model versions
    kinds = [a.kind for a in registry.lineage_chain(res.artifact)]
    assert kinds.count("prompt") == 2 and {"dataset", "base-model"} <= set(kinds) and kinds[-1] == "eval-results"

    from llmops_jupyter.stages.eval.stage import EvalConfig

    assert EvalConfig.from_dict({"model": ["m"], "prompt": "qa@1,qa@2"}).prompt == ["qa@1", "qa@2"]  # pipelines
    shell.run_cell_magic("llmops", "prompt needs-topic", "user: {topic}: {question}")
    with pytest.raises(ConfigError, match="needs variable\\(s\\) topic"):
        Runner(registry).run("eval", {"model": [str(tiny_model)], "data": tiny_dataset.hash,
                                      "prompt": ["needs-topic@1"], "limit": 2})


# -- RAG ------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_rag_eval_retrieves_the_right_chunk_and_grounds_answers(registry, tiny_model):
    from llmops_jupyter.stages.adapt.rag import load_index, recall_at_k

    idx = _index(registry)
    runner = Runner(registry)
    common = {"model": [str(tiny_model)], "data": str(QUESTIONS), "max_new_tokens": 6,
              "metrics": ["f1", "groundedness", "groundedness_ref"]}
    plain = runner.run("eval", common)
    rag = runner.run("eval", {**common, "rag": idx.run_id, "rag_k": 2})
    qs = [json.loads(line) for line in QUESTIONS.read_text().splitlines() if line.strip()]
    index = load_index(idx.run_id, registry)
    recall = recall_at_k(index, [q["question"] for q in qs], [q["doc"] for q in qs], k=2)
    assert rag.metrics["retrieval_hit"] == pytest.approx(recall) and recall >= 0.875  # recall@2 of the eval
    assert rag.metrics["context_relevance"] > 0.3
    # model-independent: the reference answers are supported by the retrieved context, not by the bare question
    assert rag.metrics["groundedness_ref"] >= 0.8 > plain.metrics["groundedness_ref"] + 0.3
    assert "groundedness" in rag.metrics and "groundedness" in plain.metrics  # the tiny model's own answers

    got = adapt.retrievals(registry, rag.run_id)
    assert len(got) == len(qs) and all(len(r["chunk_ids"]) == 2 for r in got)
    assert got[0]["docs"][0] == qs[0]["doc"] == "zephyr-battery.md" and got[0]["index_hash"] == idx.artifact.hash
    rows = evalstore.load_examples(registry, rag.run_id)
    assert "Context:\n[1]" in rows[0]["prompt"] and "2 hours" in rows[0]["prompt"]
    results = [json.loads(line) for line in (rag.artifact.path / "results.jsonl").read_text().splitlines()]
    assert results[0]["retrieved"] == got[0]["chunk_ids"]
    kinds = [a.kind for a in registry.lineage_chain(rag.artifact)]
    # parents in dependency order; siblings (the index, the base model) come in hash order, which varies per run
    assert kinds[-1] == "eval-results" and "base-model" in kinds
    assert kinds.index("documents") < kinds.index("index") < kinds.index("eval-results")


def test_serve_with_prompt_and_rag_is_monitored_against_the_logged_context(registry, tiny_model):
    openai = pytest.importorskip("openai")
    from llmops_jupyter.stages.monitor.analysis import load_records
    from llmops_jupyter.stages.serve import server

    idx = _index(registry)
    runner = Runner(registry)
    runner.run("prompt", {"name": "support", "template": "system: Answer from the context only.\nuser: {question}"})
    res = runner.run("serve", {"model": str(tiny_model), "prompt": "support@1", "rag": idx.run_id, "rag_k": 2,
                               "auth": False, "max_tokens": 16, "foreground": False})
    try:
        client = openai.OpenAI(base_url=res.outputs["deployment"].info["url"], api_key="none", max_retries=0)
        for q in ("How long does a full charge take?", "How many years of warranty?"):
            out = client.chat.completions.create(model="tiny-llama", max_tokens=8, temperature=0,
                                                 messages=[{"role": "system", "content": "be rude"},
                                                           {"role": "user", "content": q}])
            assert out.choices[0].message.role == "assistant"
    finally:
        server.stop(registry, res.run_id, timeout=30)
    recs = load_records(registry, res.run_id)
    assert len(recs) == 2
    msgs = json.loads(recs[0]["messages"])
    assert msgs[0] == {"role": "system", "content": "Answer from the context only."}  # the stored prompt's system
    assert "Context:\n[1]" in msgs[-1]["content"] and "How long does a full charge take?" in msgs[-1]["content"]
    assert recs[0]["checks"]["prompt_ref"] == "support@1" and len(recs[0]["checks"]["rag_chunks"]) == 2
    battery = [c["id"] for c in __import__("llmops_jupyter.stages.adapt.rag", fromlist=["x"]).load_index(
        idx.run_id, registry).chunks if c["doc"] == "zephyr-battery.md"]
    assert recs[0]["checks"]["rag_chunks"][0] in battery
    mon = runner.run("monitor", {"deployment": res.run_id, "plots": False, "widget": False, "toxicity": False})
    checked = load_records(registry, res.run_id)
    assert all("support_lexical" in r["checks"] and "unsupported" in r["checks"] for r in checked)
    assert "unsupported_rate" in mon.metrics
    kinds = {a.kind for a in registry.lineage_chain(registry.get_artifact(f"{res.run_id}:deployment"))}
    assert {"index", "prompt", "base-model", "deployment"} <= kinds


# -- DPO ------------------------------------------------------------------------------------------------------------------
def test_widget_ratings_become_pairs_and_dpo_raises_the_reward_margin(shell, registry, tiny_dataset, tiny_model,
                                                                      other_model):
    pytest.importorskip("trl")
    from llmops_jupyter.stages.eval.rate import CompareView

    runner = Runner(registry)
    ev = runner.run("eval", {"model": [str(tiny_model), str(other_model)], "data": tiny_dataset.hash, "limit": 8,
                             "max_new_tokens": 8, "metrics": ["f1"]})
    with pytest.raises(StageError, match="No preference pairs"):
        runner.run("pairs", {"runs": [ev.run_id]})
    view = CompareView(registry, [ev.run_id])
    for _ in view.ids:  # a rater prefers the first version on every example
        view.preferred.value = 0
        view.thumbs[0].value = 1
        view.thumbs[1].value = -1
        view.save_button.click()
    assert len(view.saved) == 2 * len(view.ids)
    pairs = shell.run_line_magic("llmops", f"pairs --from {ev.run_id}")
    assert pairs.metrics["pairs"] == len(view.ids) == 8
    rows = pairs.outputs["pairs"]
    outputs = {r["model_ref"]: r["output"] for r in evalstore.load_examples(registry, ev.run_id)[:1]}
    assert rows and {"prompt", "chosen", "rejected"} <= set(rows[0])
    first = evalstore.load_examples(registry, ev.run_id, evalstore.versions(registry, ev.run_id)[0]["model_ref"])
    assert {r["chosen"] for r in rows} == {r["output"] for r in first} and outputs

    ft = shell.run_line_magic("llmops", f"finetune --model {tiny_model} --data {pairs.run_id} --method dpo "
                                        "--max-steps 24 --batch-size 4 --lr 5e-3 --log-every 4 --checkpoint-every 12")
    m = ft.metrics
    assert m["dpo_margin_start"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before training
    assert m["dpo_margin_end"] > m["dpo_margin_start"] + 0.5 and m["dpo_accuracy_end"] >= 0.75
    assert m["dpo_reward_chosen_end"] > m["dpo_reward_rejected_end"]
    margins = [r["value"] for r in registry.metric_history(ft.run_id, "rewards/margins")]
    assert len(margins) >= 3 and margins[-1] > margins[0]  # streamed per logging step (dashboard)
    from llmops_jupyter.stages.finetune.train import checkpoints, run_dir

    assert [s for s, _ in checkpoints(run_dir(registry, ft.run_id) / "checkpoints")] == [12, 24]
    art = ft.outputs["adapter"]
    assert art.kind == "adapter" and art.meta["method"] == "dpo"
    kinds = [a.kind for a in registry.lineage_chain(art)]
    last = {k: len(kinds) - 1 - kinds[::-1].index(k) for k in kinds}  # siblings come in hash order: compare places
    assert kinds[-1] == "adapter" and "base-model" in kinds
    assert last["eval-results"] < last["ratings"] < last["dataset"] < last["adapter"]
    # the adapter is a model version like any other: evaluable with the same gate
    check = runner.run("eval", {"model": [str(tiny_model), ft.run_id], "data": tiny_dataset.hash, "limit": 4,
                                "max_new_tokens": 4, "metrics": ["ppl"]})
    assert check.status == "finished"

    with pytest.raises(DataError, match="not a preference dataset"):
        runner.run("finetune", {"model": str(tiny_model), "data": tiny_dataset.hash, "method": "dpo",
                                "max_steps": 1})


def test_monitor_labels_become_pairs(registry, tiny_model):
    """Real traffic: a served model answers two questions through the openai client, the monitor checks them, a
    reviewer labels one answer bad (with a correction) and one good; `pairs --deployment` makes the bad one a pair."""
    openai = pytest.importorskip("openai")
    from llmops_jupyter.stages.monitor.analysis import load_records
    from llmops_jupyter.stages.monitor.flagged import FlaggedRecords
    from llmops_jupyter.stages.serve import server

    runner = Runner(registry)
    res = runner.run("serve", {"model": str(tiny_model), "auth": False, "max_tokens": 8, "foreground": False})
    dep = res.run_id
    try:
        client = openai.OpenAI(base_url=res.outputs["deployment"].info["url"], api_key="none", max_retries=0)
        for q in ("What is the warranty?", "Is it waterproof?"):
            client.chat.completions.create(model="tiny-llama", max_tokens=6, temperature=0,
                                           messages=[{"role": "user", "content": q}])
    finally:
        server.stop(registry, dep, timeout=30)
    runner.run("monitor", {"deployment": dep, "plots": False, "widget": False, "toxicity": False})
    recs = sorted(load_records(registry, dep), key=lambda r: r["ts"])
    assert [r["prompt"] for r in recs] == ["What is the warranty?", "Is it waterproof?"]
    widget = FlaggedRecords(registry, dep, recs)
    widget.label(recs[0]["id"], "bad", "Three years.")
    widget.label(recs[1]["id"], "good")
    res = runner.run("pairs", {"deployment": dep})
    (row,) = res.outputs["pairs"]
    assert row["chosen"] == "Three years." and row["rejected"] == recs[0]["response"] != "Three years."
    assert "What is the warranty?" in row["prompt"] and res.metrics["from_monitor_label"] == 1


@pytest.mark.slow
def test_dpo_on_a_qlora_base_and_prompt_as_pipeline_parameter(registry, tiny_model, tiny_dataset, other_model):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("trl")
    import nbformat

    from llmops_jupyter.pipelines.params import resolve_parameters
    from llmops_jupyter.stages.eval.rate import CompareView

    # a preference dataset from the real stages: eval of two versions → ratings in the widget → pairs
    runner = Runner(registry)
    ev = runner.run("eval", {"model": [str(tiny_model), str(other_model)], "data": tiny_dataset.hash, "limit": 6,
                             "max_new_tokens": 8, "metrics": ["f1"]})
    view = CompareView(registry, [ev.run_id])
    for _ in view.ids:  # the rater prefers the first version on every example
        view.preferred.value = 0
        view.save_button.click()
    pairs = runner.run("pairs", {"runs": [ev.run_id]})
    assert pairs.metrics["pairs"] == 6
    ft = runner.run("finetune", {"model": str(tiny_model), "data": pairs.run_id, "method": "dpo",
                                 "dpo_base": "qlora", "max_steps": 12, "batch_size": 3, "lr": 5e-3, "log_every": 4,
                                 "checkpoint_every": 0})
    assert ft.summary["optimizer"] == "adamw_bnb_8bit"  # the QLoRA optimizer choice, reused
    assert ft.metrics["dpo_margin_end"] > ft.metrics["dpo_margin_start"] + 0.3

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('model = "tiny-llama"\nprompt = ""')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("%llmops eval --model $model --prompt $prompt")]
    # The injected value keeps the notebook's type (str); `--prompt $prompt` splits "a@1,a@2" into the list.
    assert resolve_parameters(nb, {"prompt": "qa@2"}).values["prompt"] == "qa@2"
    assert resolve_parameters(nb, {"prompt": "qa@1,qa@2"}).values["prompt"] == "qa@1,qa@2"
    from llmops_jupyter.core.stage import get_command
    from llmops_jupyter.frontends.argparsing import parse_config

    cfg = parse_config(get_command("eval").config_cls, ["--model", "$model", "--prompt", "$prompt"], prog="eval",
                       namespace={"model": "tiny-llama", "prompt": "qa@1,qa@2"})
    assert cfg.prompt == ["qa@1", "qa@2"]


def test_build_messages_places_prompt_parts_and_context():
    from llmops_jupyter.stages.adapt.prompts import PromptTemplate

    convo = [{"role": "system", "content": "old"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "How long to charge?"}]
    hits = [{"id": 3, "doc": "a.md", "score": 0.9, "text": "Charging takes 2 hours."}]
    with_ctx = PromptTemplate.parse("p", "system: Use the notes.\nuser: Notes:\n{context}\nAsk: {question}")
    out = adapt.build_messages(convo, template=with_ctx, hits=hits)
    assert out[0] == {"role": "system", "content": "Use the notes."} and [m["role"] for m in out] == \
        ["system", "user", "assistant", "user"]
    assert out[-1]["content"] == "Notes:\n[1] Charging takes 2 hours.\nAsk: How long to charge?"
    plain = adapt.build_messages(convo, template=PromptTemplate.parse("q", "Q: {question}"), hits=hits)
    assert plain[0]["content"] == "old" and "Context:\n[1] Charging takes 2 hours." in plain[-1]["content"]
    assert plain[-1]["content"].endswith("Question: Q: How long to charge?")
    assert adapt.build_messages(convo) == convo
    with pytest.raises(DataError, match="no user message"):
        adapt.build_messages([{"role": "system", "content": "x"}], hits=hits)

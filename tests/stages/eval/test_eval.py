"""Evaluation: metrics vs hand-computed values, batched inference, the eval stage, gates, judge, ratings widget,
the magic and a notebook run through a real kernel. Everything on the tiny offline model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from llmops_jupyter.core.errors import ConfigError, GateError, MissingDependencyError, StageError
from llmops_jupyter.core.runner import Runner
from llmops_jupyter.stages.eval import store as evalstore
from llmops_jupyter.stages.eval.metrics import (
    METRICS,
    bleu,
    chrf,
    corpus_scores,
    exact_match,
    is_refusal,
    normalize_answer,
    register_metric,
    rouge_l,
    token_f1,
)
from llmops_jupyter.testing import sliced_kernel_manager

pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def damaged_model(tiny_model, tmp_path_factory):
    """The tiny model with Gaussian noise added to every weight, saved as another checkpoint folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("damaged") / "tiny-damaged"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(path)
    return path


def run_eval(registry, **params):
    return Runner(registry).run("eval", {"max_new_tokens": 8, "limit": 6, "metrics": ["ppl", "f1", "rougeL"],
                                         **params})


# -- metrics ---------------------------------------------------------------------------------------------------------
def test_text_metrics_match_hand_computed_values():
    import sacrebleu

    assert normalize_answer("  The  Cat, sat! ") == "cat sat"
    assert exact_match("The cat!", "cat") == 1.0 and exact_match("a dog", "cat") == 0.0
    # pred tokens [cat, sat, on, mat], gold [cat, on, mat]: P = 3/4, R = 1 → F1 = 6/7
    assert token_f1("the cat sat on the mat", "cat on mat") == pytest.approx(6 / 7)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("dog", "cat") == 0.0
    # LCS(the cat sat on the mat, the cat on the mat) = 5: P = 5/6, R = 1 → F = 10/11
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("x y", "a b") == 0.0
    outs = ["the cat sat on the mat", "a quick brown fox", "hello there"]
    refs = ["the cat is on the mat", "the quick brown fox jumps", "hello there"]
    for o, r in zip(outs, refs):
        assert bleu(o, r) == pytest.approx(sacrebleu.sentence_bleu(o, [r]).score)
        assert chrf(o, r) == pytest.approx(sacrebleu.sentence_chrf(o, [r]).score)
    assert bleu("hello there general kenobi", "hello there general kenobi") == pytest.approx(100.0)
    corpus = corpus_scores(outs, refs)
    assert corpus["bleu_corpus"] == pytest.approx(sacrebleu.corpus_bleu(outs, [refs]).score)
    assert corpus["chrf_corpus"] == pytest.approx(sacrebleu.corpus_chrf(outs, [refs]).score)
    assert is_refusal("I'm sorry, but I can't help with that.") == 1.0 and is_refusal("Paris.") == 0.0


def test_custom_metric_by_name_and_unknown_metric_error(registry):
    @register_metric("mentions_blue")
    def mentions_blue(output: str, reference: str, example: dict) -> float:
        return float("blue" in output.lower())

    try:
        assert METRICS["mentions_blue"].compute(["Blue sky", "red"], ["", ""]) == [1.0, 0.0]
        from llmops_jupyter.stages.eval.stage import EvalConfig

        cfg = EvalConfig(model=["tiny-llama"], metrics=["mentions_blue", "em"])
        assert cfg.metrics == ["mentions_blue", "exact_match"]
    finally:
        METRICS.pop("mentions_blue")
    with pytest.raises(ConfigError, match=r"Unknown metric 'rogueL'.*did you mean 'rougeL'"):
        EvalConfig(model=["tiny-llama"], metrics=["rogueL"])


def test_embedding_similarity_with_packaged_minilm(model_cache):
    pytest.importorskip("sentence_transformers")
    from llmops_jupyter.stages.eval.metrics import embed_sim

    close, far = embed_sim(["The cat sat on the mat.", "The cat sat on the mat."],
                           ["A cat was sitting on a rug.", "Stock markets fell sharply today."])
    assert 0.5 < close <= 1.0001 and far < 0.3


# -- inference helpers -----------------------------------------------------------------------------------------------
def test_perplexity_matches_manual_torch_computation(tiny_model):
    import torch

    from llmops_jupyter.models.inference import load_model, loglikelihood, perplexity

    net, tok = load_model(tiny_model, device="cpu")
    prompts = ["<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n", "Echo: red",
               "Question: What color is the sky? Answer:"]
    comps = ["2 plus 2 is 4.<|im_end|>\n", " red green blue", " blue."]
    got = loglikelihood(net, tok, prompts, comps, batch_size=3)
    total, count = 0.0, 0
    for (lp, n), p, c in zip(got, prompts, comps):
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        c_ids = tok(c, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + c_ids])
        with torch.no_grad():
            logp = torch.log_softmax(net(input_ids=ids).logits[0].double(), -1)
        manual = sum(float(logp[len(p_ids) + j - 1, t]) for j, t in enumerate(c_ids))
        assert n == len(c_ids)
        assert lp == pytest.approx(manual, abs=1e-3)
        total, count = total + manual, count + len(c_ids)
    assert perplexity(net, tok, prompts, comps) == pytest.approx(math.exp(-total / count), rel=1e-4)

    # whole texts (prompts=None, as quantize measures): the model's own LM loss, token-weighted over texts,
    # whatever the batch size; special tokens (BOS) as the tokenizer adds them
    texts = [p + c for p, c in zip(prompts, comps)]
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            nll += float(net(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    for bs in (1, 3):
        assert perplexity(net, tok, None, texts, batch_size=bs) == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert math.isnan(perplexity(net, tok, None, []))


def test_batched_generation_equals_one_at_a_time(tiny_model):
    from llmops_jupyter.models.inference import apply_chat, generate, load_model

    net, tok = load_model(tiny_model, device="cpu")
    questions = ["Hi", "What is 7 plus 8?", "Echo: red green blue yellow black white red",
                 "Repeat the colour blue.", "Summarize: The meeting was moved to Tuesday because the room was booked.",
                 "2+2?"]
    prompts = [apply_chat(tok, [{"role": "user", "content": q}]) for q in questions]
    batched = generate(net, tok, prompts, max_new_tokens=12, batch_size=4)
    single = [generate(net, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.new_tokens for g in batched] == [g.new_tokens for g in single]
    a = generate(net, tok, prompts[:3], max_new_tokens=8, do_sample=True, seed=3)
    b = generate(net, tok, prompts[:3], max_new_tokens=8, do_sample=True, seed=3)
    assert [g.text for g in a] == [g.text for g in b]  # seeded sampling is reproducible


# -- the eval stage, registry storage, lineage, gate ---------------------------------------------------------------
def test_eval_stores_examples_summary_lineage_and_gates(registry, tiny_dataset, tiny_model, damaged_model):
    base = run_eval(registry, model=[str(tiny_model)], data=tiny_dataset.hash)
    assert base.status == "finished"
    assert {"ppl", "loss", "f1", "rougeL", "n_examples"} <= set(base.metrics)
    rows = evalstore.load_examples(registry, base.run_id)
    assert len(rows) == 6 and all(r["prompt"].endswith("<|im_start|>assistant\n") for r in rows)
    assert rows[0]["reference"] and "nll" in rows[0]["metrics"] and "f1" in rows[0]["metrics"]
    assert evalstore.summaries(registry, base.run_id)[str(tiny_model)]["ppl"] == pytest.approx(base.metrics["ppl"])
    art = base.artifact
    assert art.kind == "eval-results" and (art.path / "results.jsonl").exists()
    parents = {n["kind"] for n in registry.lineage(art, "up")["nodes"]}
    assert {"dataset", "base-model", "eval-results"} <= parents
    assert "application/vnd.plotly" not in str(base.outputs["figure"])  # a plotly Figure object, not text
    assert base.outputs["figure"].to_plotly_json()["data"]

    # identical version vs the baseline: every delta 0, gate passes
    same = run_eval(registry, model=[str(tiny_model)], data=tiny_dataset.hash, baseline=base.run_id,
                    gate="rougeL>=-0.01,ppl<=+5%")
    assert same.status == "finished" and same.metrics["delta.ppl"] == 0 and same.metrics["delta.rougeL"] == 0
    assert "pass" in str(same.outputs["gate"]) and "FAIL" not in str(same.outputs["gate"])

    # damaged version: the gate fails naming the metric, the delta + CI and the examples that got worse
    with pytest.raises(GateError) as err:
        run_eval(registry, model=[str(damaged_model)], data=tiny_dataset.hash, baseline=base.run_id,
                 gate="rougeL>=-0.01,ppl<=+5%")
    msg = str(err.value)
    assert "ppl: delta +" in msg and "95% CI" in msg and "examples worse" in msg
    assert any(r["id"] in msg for r in rows)
    assert err.value.failures[0]["metric"] == "ppl" and err.value.failures[0]["worse"]
    failed = registry.list_runs(stage="eval", limit=1)[0]
    assert failed["status"] == "failed" and "Regression gate failed" in failed["error"]
    assert len(evalstore.load_examples(registry, failed["id"])) == 6  # results stored before failing

    # two versions in one run: per-version metric keys, gate of the second vs the first
    with pytest.raises(GateError, match="ppl"):
        run_eval(registry, model=[str(tiny_model), str(damaged_model)], data=tiny_dataset.hash, gate="ppl<=+5%")
    two = registry.list_runs(stage="eval", limit=1)[0]["id"]
    keys = set(registry.metrics(two))
    assert "tiny-llama/ppl" in keys and "tiny-damaged/ppl" in keys and "tiny-damaged/delta.ppl" in keys
    assert [v["model_ref"] for v in evalstore.versions(registry, two)] == [str(tiny_model), str(damaged_model)]
    d = evalstore.diff(registry, two, two, a_model=str(tiny_model), b_model=str(damaged_model))
    assert len(d) == 6 and all(x["delta"]["ppl"] > 0 for x in d)
    assert [x["id"] for x in evalstore.diff(registry, base.run_id, same.run_id)] == [r["id"] for r in rows]

    # a baseline evaluated on other examples is one clear error, before any model is loaded
    with pytest.raises(StageError, match="different examples.*--limit"):
        run_eval(registry, model=[str(tiny_model)], data=tiny_dataset.hash, limit=4, baseline=base.run_id,
                 gate="ppl<=+5%")


def test_bad_gate_and_config_errors(registry):
    from llmops_jupyter.stages.eval.stage import EvalConfig

    with pytest.raises(ConfigError, match=r"--gate rule 'rougeL>>0.1' is not understood.*METRIC>=DELTA"):
        EvalConfig(model=["tiny-llama"], gate="rougeL>>0.1", baseline="eval@latest")
    with pytest.raises(ConfigError, match="needs something to compare with"):
        EvalConfig(model=["tiny-llama"], gate="rougeL>=0")
    with pytest.raises(ConfigError, match="'bleu'.*not in --metrics"):
        EvalConfig(model=["tiny-llama"], metrics=["f1"], gate="bleu>=0", baseline="x")
    with pytest.raises(ConfigError, match="--judge is required"):
        EvalConfig(model=["tiny-llama"], metrics=["judge"])
    with pytest.raises(ConfigError, match="--model needs at least one model"):
        EvalConfig()


def test_lm_eval_task_needs_the_package(registry, tiny_dataset, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if [lmeval] were not installed ([dev] installs it)
    task = tmp_path / "task.yaml"
    task.write_text("task: tiny\n")
    with pytest.raises(MissingDependencyError, match=r"lm-eval.*pip install 'llmops-jupyter\[lmeval\]'"):
        run_eval(registry, model=[str(tiny_model)], data=tiny_dataset.hash, lm_eval_task=str(task))


# -- judge -----------------------------------------------------------------------------------------------------------
class _ChatHandler(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _ChatHandler.seen.append((self.headers.get("Authorization"), body))
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": "Score: 4 - close to the reference."}}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_judge_local_model_and_openai_compatible_endpoint(registry, tiny_dataset, tiny_model, monkeypatch):
    local = run_eval(registry, model=[str(tiny_model)], data=tiny_dataset.hash, limit=3, metrics=["f1"],
                     judge=str(tiny_model), judge_max_new_tokens=6)
    rows = evalstore.load_examples(registry, local.run_id)
    assert all("Reference answer:" in r["judge_prompt"] and r["reference"] in r["judge_prompt"] for r in rows)
    assert all(r["judge_raw"] is not None for r in rows) and "judge" in rows[0]["metrics"]

    server = HTTPServer(("127.0.0.1", 0), _ChatHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("JUDGE_KEY", "sekrit")
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        remote = run_eval(registry, model=[str(tiny_model)], data=tiny_dataset.hash, limit=3, metrics=["f1"],
                          judge=url, judge_model="grader", judge_api_key_env="JUDGE_KEY",
                          judge_rubric="Grade {output} against {reference} for {prompt}. Score: 1-5")
    finally:
        server.shutdown()
    assert remote.metrics["judge"] == 4.0
    auth, body = _ChatHandler.seen[-1]
    assert auth == "Bearer sekrit" and body["model"] == "grader" and body["messages"][0]["content"].startswith("Grade")
    rows = evalstore.load_examples(registry, remote.run_id)
    assert rows[0]["judge_raw"].startswith("Score: 4")
    assert "sekrit" not in json.dumps(registry.get_run(remote.run_id)["params"])


# -- widget, magic, notebook ----------------------------------------------------------------------------------------
def test_ratings_through_the_widget_land_in_registry(registry, tiny_dataset, tiny_model, damaged_model):
    from llmops_jupyter.stages.eval.rate import CompareView

    res = run_eval(registry, model=[str(tiny_model), str(damaged_model)], data=tiny_dataset.hash, limit=3,
                   metrics=["f1", "rougeL"])
    view = CompareView(registry, [res.run_id], user="rater1")
    assert len(view.versions) == 2 and len(view.ids) == 3 and view.index == 0
    assert "Example 1 / 3" in view.header.value and "f1" in view.metric_boxes[1].value
    first = view.example_id
    view.thumbs[0].value = 1
    view.stars[0].value = 5
    view.thumbs[1].value = -1
    view.stars[1].value = 2
    view.preferred.value = 0
    view.note.value = "first one is cleaner"
    view.save_button.click()
    assert view.index == 1  # saving advances
    view.prev_button.click()
    assert view.index == 0
    view.next_button.click()
    view.next_button.click()
    assert view.index == 2 and view.next_button.disabled
    if view.keynav is not None:  # keyboard strip (anywidget): a key press arrives as key + count
        view.keynav.key = "ArrowLeft"
        view.keynav.count += 1
        assert view.index == 1
        view.keynav.key = "2"
        view.keynav.count += 1
        assert view.preferred.value == 1
        view.keynav.key = "s"
        view.keynav.count += 1
    rows = evalstore.ratings(registry, res.run_id)
    r0 = [r for r in rows if r["example_id"] == first]
    assert [(r["thumbs"], r["stars"]) for r in r0] == [(1, 5), (-1, 2)]
    assert all(r["user"] == "rater1" and r["created_at"] > 0 and r["note"] == "first one is cleaner" for r in r0)
    assert r0[0]["preferred_model_ref"] == str(tiny_model) and r0[0]["preferred_run_id"] == res.run_id
    assert r0[0]["compared"] == [(res.run_id, str(tiny_model)), (res.run_id, str(damaged_model))]
    pairs = evalstore.preference_pairs(registry)
    tiny_rows = {r["id"]: r for r in evalstore.load_examples(registry, res.run_id, str(tiny_model))}
    assert pairs and pairs[0]["chosen"] == tiny_rows[first]["output"] and pairs[0]["prompt"] == tiny_rows[first]["prompt"]
    view.save_button.click()  # nothing rated on this example → nothing stored, a message instead
    assert "nothing to save" in view.status.value


def test_magic_eval_and_rate_through_shell(shell, registry, tiny_dataset, tiny_model):
    import plotly.io as pio
    from IPython.core.error import UsageError

    from llmops_jupyter.stages.eval.rate import CompareView

    pio.renderers.default = "plotly_mimetype"  # a terminal shell would otherwise try to open a browser

    result = shell.run_line_magic(
        "llmops", f"eval --model {tiny_model} --model tiny-llama --data {tiny_dataset.hash} --limit 3 "
                  "--metrics f1,ppl --max-new-tokens 6 --gate 'ppl<=+5%'")
    assert result.status == "finished"  # the provider's tiny-llama is the same model: the gate passes
    assert {"tiny-llama/f1", "tiny-llama#2/ppl", "tiny-llama#2/delta.ppl"} <= set(result.metrics)
    view = shell.run_line_magic("llmops", f"rate {result.run_id}")
    assert isinstance(view, CompareView) and len(view.versions) == 2
    with pytest.raises(UsageError, match="Unknown metric 'bleurt'"):
        shell.run_line_magic("llmops", "eval --model tiny-llama --metrics bleurt")
    with pytest.raises(UsageError, match="not understood"):
        shell.run_line_magic("llmops", "eval --model tiny-llama --gate 'ppl<5%' --baseline x")


@pytest.mark.slow
def test_notebook_through_a_real_kernel_shows_the_summary_figure(tmp_path, tiny_model):
    papermill = pytest.importorskip("papermill")
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext llmops_jupyter"),
        nbformat.v4.new_code_cell("from llmops_jupyter.registry import Registry\n"
                                  "from llmops_jupyter.testing import write_tiny_dataset\n"
                                  f"write_tiny_dataset(Registry.open(), {str(tiny_model)!r})"),
        nbformat.v4.new_code_cell(f"r = %llmops eval --model {tiny_model} --limit 4 --metrics f1,rougeL,ppl "
                                  "--max-new-tokens 6"),
        nbformat.v4.new_code_cell("r.metrics['rougeL'] >= 0"),
    ]
    src, out = tmp_path / "eval.ipynb", tmp_path / "eval.out.ipynb"
    nbformat.write(nb, src)
    papermill.execute_notebook(str(src), str(out), cwd=str(tmp_path), kernel_name="python3", progress_bar=False,
                               log_output=False, kernel_manager_class=sliced_kernel_manager())
    saved = nbformat.read(out, as_version=4)
    mimes = [m for c in saved.cells for o in c.get("outputs", []) for m in o.get("data", {})]
    assert "application/vnd.plotly.v1+json" in mimes
    text = json.dumps([c.get("outputs", []) for c in saved.cells])
    assert "Evaluation summary" in text and "Eval summary (4 examples)" in text


def test_stage_module_imports_stay_light():
    code = ("import sys, llmops_jupyter.stages.eval.stage, llmops_jupyter.stages.eval.metrics, llmops_jupyter.stages.eval.gates, "
            "llmops_jupyter.stages.eval.generate, llmops_jupyter.stages.eval.judge, llmops_jupyter.stages.eval.store\n"
            "heavy = [m for m in ('torch', 'transformers', 'plotly', 'sacrebleu', 'rouge_score', 'numpy', "
            "'sentence_transformers', 'openai', 'ipywidgets') if m in sys.modules]\nprint(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_gates_written_with_metric_aliases_compare_the_stored_values(registry, tiny_dataset, tiny_model):
    """`em>=…` / `rouge>=…` are the aliases eval accepts for --metrics; a gate on them must compare real values
    (it used to compare a missing key: delta NaN, a gate that could never pass)."""
    base = run_eval(registry, model=[str(tiny_model)], data=tiny_dataset.hash, metrics=["em", "rouge"])
    same = run_eval(registry, model=[str(tiny_model)], data=tiny_dataset.hash, metrics=["em", "rouge"],
                    baseline=base.run_id, gate="em>=0,rouge>=-0.01")
    assert same.status == "finished"
    (gate,) = same.summary["gate"]
    gates = gate["results"]
    assert [g["metric"] for g in gates] == ["exact_match", "rougeL"]
    assert all(g["passed"] and g["delta"] == 0 for g in gates), gates

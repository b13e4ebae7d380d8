"""lm-evaluation-harness scores the served model through its ``local-completions`` backend (``echo=True,
logprobs=1, max_tokens=1``, token-id prompts) exactly as its ``hf`` backend scores the same weights in-process:
same accuracy, per-item loglikelihoods within 1e-4 (fp32). The task is multiple choice by loglikelihood, from a
JSONL file this test writes."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
lm_eval = pytest.importorskip("lm_eval")

pytestmark = pytest.mark.slow  # two lm-eval runs (~85 s on 2 cores)

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "Berlin", "Rome"], 0),
    ("What is two plus two?", ["three", "four", "five"], 1),
    ("What color is the sky?", ["green", "red", "blue"], 2),
    ("Translate to French: cat ->", ["chien", "chat", "maison"], 1),
    ("The quick brown fox jumps over the lazy", ["cat", "dog", "house"], 1),
    ("LoRA trains low-rank", ["adapters", "models", "tokens"], 0),
]


def _task(folder) -> str:
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    return "tiny_mc"


def _scores(res) -> list[float]:
    samples = sorted(res["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    return [float(r[0]) for s in samples for r in s["filtered_resps"]]


def test_local_completions_matches_the_hf_backend(tiny_model, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.registry import Registry
    from llmops_jupyter.stages.serve import server

    monkeypatch.setenv("LLMOPS_HOME", str(tmp_path / ".llmops"))
    task = _task(tmp_path)
    reg = Registry(tmp_path / ".llmops")
    run = Runner(reg).run("serve", model=str(tiny_model), auth=False, foreground=False)
    url = run.outputs["deployment"].info["url"]
    try:
        served = lm_eval.simple_evaluate(
            model="local-completions", tasks=[task], task_manager=TaskManager(include_path=str(tmp_path)),
            model_args={"base_url": f"{url}/completions", "model": "tiny-llama", "tokenizer": str(tiny_model),
                        "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_retries": 1,
                        "num_concurrent": 1, "max_length": 512},
            log_samples=True)
    finally:
        server.stop(reg, run.run_id, timeout=30)
    local = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tiny_model},dtype=float32", tasks=[task],
                                    task_manager=TaskManager(include_path=str(tmp_path)), device="cpu",
                                    batch_size=8, log_samples=True)
    assert served["results"]["tiny_mc"]["acc,none"] == local["results"]["tiny_mc"]["acc,none"]
    a, b = _scores(served), _scores(local)
    assert len(a) == len(b) == sum(len(c) for _, c, _ in QUESTIONS)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    logged = [r for r in reg.requests(run.run_id) if r["status"] == 200]
    assert len(logged) >= len(a)  # every scoring request went through the server and its log

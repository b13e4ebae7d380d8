"""``distill`` on the tiny model: a trained 4-layer teacher (finetune → merge), its 1-layer depth-pruned student;
the chunked loss equals the unchunked one; distilling heals the pruning gap so the issue's gate against the teacher,
``perplexity<=+10%``, passes, while the unhealed student fails it; ``--mode sequence`` trains on the teacher's
answers (a dataset artifact in the lineage), ``--on-policy`` runs TRL's DistillationTrainer with checkpoints and
resume; bad input is one line before any model loads.

The teacher is fine-tuned for 60 steps and pruned to one layer so that the unhealed student is clearly outside
+10% (≈ +15% on the whole texts, ≈ +30% on the answers), not at its edge: a +10% gate that the unhealed student also
passed would test nothing.
"""

from __future__ import annotations

import json

import pytest

from llmops_jupyter.core.errors import ConfigError, GateError
from llmops_jupyter.core.runner import Runner
from llmops_jupyter.registry import Registry, RunStatus

TRAIN = {"batch_size": 4, "seq_len": 64, "log_every": 2, "checkpoint_every": 0, "generate_tokens": 4,
         "chunk_size": 16}


@pytest.fixture(scope="module")
def pair(model_cache, tmp_path_factory):
    from llmops_jupyter.models.tiny import build_tiny_model
    from llmops_jupyter.testing import tiny_records

    tiny4 = build_tiny_model(model_cache / "tiny-llama-4layers", layers=4)
    reg = Registry(tmp_path_factory.mktemp("distill") / ".llmops")
    runner = Runner(reg)
    data = runner.run("data", {"source": tiny_records(48), "tokenizer": str(tiny4), "eval_fraction": 0.25,
                               "name": "tiny"}).artifact
    ft = runner.run("finetune", {"model": str(tiny4), "data": data.hash, "rank": 8, "alpha": 16, "lr": 1e-2,
                                 "batch_size": 4, "seq_len": 64, "max_steps": 60, "checkpoint_every": 0})
    teacher = runner.run("merge", adapter=ft.run_id, probe_samples=4)
    student = runner.run("prune", model=teacher.run_id, layers=3, calibration_samples=8, eval_samples=8,
                         generate_tokens=0)
    return {"registry": reg, "runner": runner, "data": data, "teacher": teacher, "student": student}


def test_chunked_loss_equals_the_whole_sequence_at_once():
    import torch

    from llmops_jupyter.stages.distill.engine import chunked_loss, token_divergence

    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(8, 50, bias=False), torch.nn.Linear(8, 50, bias=False)
    h_s = torch.randn(2, 7, 8, requires_grad=True)
    h_t = torch.randn(2, 7, 8)
    y = torch.randint(0, 50, (2, 7))
    y[0, :3] = -100
    for loss in ("forward_kl", "reverse_kl", "jsd"):
        grads, values = [], []
        for chunk in (3, 1000):
            h_s.grad = None
            head_s.zero_grad()
            total, n = chunked_loss(h_s, h_t, head_s, head_t, y, loss=loss, temperature=2.0, chunk_size=chunk,
                                    ce_weight=0.5)
            total.backward()
            values.append(float(total))
            grads.append(head_s.weight.grad.clone())
            assert n == 11
        assert values[0] == pytest.approx(values[1], rel=1e-5)
        assert torch.allclose(grads[0], grads[1], atol=1e-5)
        same = torch.randn(4, 50)
        assert float(token_divergence(same, same, loss).abs().max()) < 1e-6


def test_distill_heals_the_pruned_student_and_the_gate_says_so(pair, shell, monkeypatch):
    from llmops_jupyter.models.inference import load_model
    from llmops_jupyter.models.refs import resolve_model

    reg, runner = pair["registry"], pair["runner"]
    teacher, student = pair["teacher"].run_id, pair["student"].run_id
    monkeypatch.setenv("LLMOPS_HOME", str(reg.home))
    # the unhealed student fails the gate against the teacher (the eval stage's gate, on the same examples)
    with pytest.raises(GateError, match="perplexity|ppl"):
        shell.run_line_magic("llmops", f"eval --model {teacher} --model {student} --data {pair['data'].hash} "
                                       "--metrics ppl --gate ppl<=+10%")
    res = runner.run("distill", teacher=teacher, student=student, data=pair["data"].hash, max_steps=30, lr=2e-3,
                     gate="perplexity<=+10%", **TRAIN)
    assert res.status == RunStatus.FINISHED
    m = res.metrics
    assert m["kl_to_teacher"] < m["kl_to_teacher_start"] and m["top1_agreement"] > m["top1_agreement_start"]
    assert m["perplexity"] < m["perplexity_start"] and m["perplexity"] <= 1.10 * m["teacher_perplexity"]
    assert m["size_ratio"] < 0.8 and m["tokens_per_s"] > 0
    assert res.summary["gate"][0]["passed"] is True
    art = res.artifact
    assert art.kind == "distilled"
    kinds = [a.kind for a in reg.lineage_chain(art)]
    assert kinds.index("merged") < kinds.index("pruned") < kinds.index("distilled")
    model, tok = load_model(resolve_model(res.run_id, reg), device="cpu", registry=reg)
    assert len(model.model.layers) == 1
    # the dashboard's series are in the registry: KD loss per logging step, KL to teacher at the end
    keys = {r["key"] for r in reg.metric_history(res.run_id)}
    assert {"loss", "kl_to_teacher", "top1_agreement"} <= keys
    # and the eval gate now passes for the healed student
    shell.run_line_magic("llmops", f"eval --model {teacher} --model {res.run_id} --data {pair['data'].hash} "
                                   "--metrics ppl --gate ppl<=+10%")


def test_unhealed_student_fails_the_distill_gate_after_storing(pair):
    reg, runner = pair["registry"], pair["runner"]
    with pytest.raises(GateError, match="violates 'perplexity<=\\+10%'"):
        runner.run("distill", teacher=pair["teacher"].run_id, student=pair["student"].run_id,
                   data=pair["data"].hash, max_steps=1, lr=1e-7, gate="perplexity<=+10%", completion_only_loss=True,
                   **TRAIN)
    run = reg.list_runs(stage="distill")[0]
    assert run["status"] == "failed" and "Regression gate failed" in run["error"]


@pytest.mark.slow  # one more distillation run (~15 s on 2 cores)
def test_lora_student_is_merged_into_a_full_checkpoint(pair):
    res = pair["runner"].run("distill", teacher=pair["teacher"].run_id, student=pair["student"].run_id,
                             data=pair["data"].hash, method="lora", rank=4, alpha=8, max_steps=2, lr=1e-3,
                             loss="jsd", temperature=2.0, **TRAIN)
    files = {p.name for p in res.artifact.path.iterdir()}
    assert "model.safetensors" in files and "adapter_config.json" not in files
    assert json.loads((res.artifact.path / "config.json").read_text())["num_hidden_layers"] == 1
    assert res.summary["student_method"] == "lora" and res.summary["loss"] == "jsd"


def test_bad_input_is_one_line_before_any_model_loads(pair, shell, tmp_path, monkeypatch):
    import transformers
    from IPython.core.error import UsageError

    from llmops_jupyter.models.tiny import build_tiny_model

    reg, runner = pair["registry"], pair["runner"]
    other = build_tiny_model(tmp_path / "other-vocab", vocab_size=300)

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_loading)
    with pytest.raises(ConfigError, match="does not share the teacher's vocabulary") as info:
        runner.run("distill", teacher=pair["teacher"].run_id, student=str(other), data=pair["data"].hash)
    assert info.value.field == "student"
    assert not reg.list_artifacts("distilled") or all(a.run_id != reg.list_runs(stage="distill")[0]["id"]
                                                      for a in reg.list_artifacts("distilled"))
    monkeypatch.setenv("LLMOPS_HOME", str(reg.home))
    with pytest.raises(UsageError, match="--on-policy cannot be combined with --mode sequence"):
        shell.run_line_magic("llmops", "distill --teacher a --student b --mode sequence --on-policy")
    with pytest.raises(UsageError, match="--ce-weight TRL's DistillationTrainer has no cross-entropy term"):
        shell.run_line_magic("llmops", "distill --teacher a --student b --on-policy --ce-weight 0.5")
    with pytest.raises(UsageError, match="--ce-weight --mode sequence is cross-entropy on the teacher's answers"):
        shell.run_line_magic("llmops", "distill --teacher a --student b --mode sequence --ce-weight 0.5")
    with pytest.raises(UsageError, match="--teacher is required"):
        shell.run_line_magic("llmops", "distill --student b")
    from llmops_jupyter.stages.data.format import load_dataset, write_dataset_dir

    texts = tmp_path / "plain-texts"
    rows = [{"text": r["text"]} for r in load_dataset(pair["data"].hash, reg).train]
    write_dataset_dir(texts, rows, rows[:2], {"name": "plain"})
    for flags in ({"mode": "sequence"}, {"on_policy": True}):
        with pytest.raises(ConfigError, match="needs prompts, and dataset .* has plain texts only") as info:
            runner.run("distill", teacher=pair["teacher"].run_id, student=pair["student"].run_id, data=str(texts),
                       **flags)
        assert info.value.field == "data"
    adapter = reg.list_artifacts("adapter")[0].hash
    with pytest.raises(ConfigError, match="is not a full-precision model \\(adapter\\)"):
        runner.run("distill", teacher=pair["teacher"].run_id, student=adapter, data=pair["data"].hash)


def test_sequence_mode_trains_on_the_teachers_answers_stored_in_lineage(pair):
    from llmops_jupyter.models.inference import generate, load_model
    from llmops_jupyter.models.refs import resolve_model
    from llmops_jupyter.stages.data.format import load_dataset

    reg, runner = pair["registry"], pair["runner"]
    res = runner.run("distill", teacher=pair["teacher"].run_id, student=pair["student"].run_id,
                     data=pair["data"].hash, mode="sequence", max_new_tokens=12, max_steps=6, lr=2e-3,
                     **{**TRAIN, "checkpoint_every": 3})
    assert res.status == RunStatus.FINISHED and res.summary["distill_mode"] == "sequence"
    answers = reg.get_artifact(res.summary["teacher_answers"])
    assert answers.kind == "dataset" and answers.run_id == res.run_id
    # lineage: teacher (merged) and source dataset → teacher answers → distilled student
    parents = {a.hash for a in reg.lineage_chain(answers)}
    assert pair["teacher"].artifact.hash in parents and pair["data"].hash in parents
    assert answers.hash in {a.hash for a in reg.lineage_chain(res.artifact)}
    # the answers are the teacher's greedy outputs (the batched generation), not the dataset's references
    ds, src = load_dataset(answers.hash, reg), load_dataset(pair["data"].hash, reg)
    assert len(ds.train) == len(src.train) and ds.eval == src.eval
    net, tok = load_model(resolve_model(pair["teacher"].run_id, reg), device="cpu", registry=reg)
    prompts = [r["prompt"] for r in src.train[:3]]
    expected = [g.text for g in generate(net, tok, prompts, max_new_tokens=12)]
    got = [r["messages"][-1]["content"] for r in ds.train[:3]]
    assert got == expected and got != [r["messages"][-1]["content"] for r in src.train[:3]]
    assert all(r["prompt"] == s["prompt"] for r, s in zip(ds.train, src.train, strict=True))
    from llmops_jupyter.governance.cards import build_model_card

    card = build_model_card(reg, res.artifact.hash).markdown
    assert "distill_mode" in card and answers.hash in card
    # a resumed run trains on the same stored answers (no second generation, no second dataset)
    more = runner.run("distill", resume=res.run_id, max_steps=8)
    assert more.status == RunStatus.FINISHED and more.summary["resumed_at_step"] == 6
    assert more.summary["teacher_answers"] == answers.hash
    assert [a.hash for a in reg.list_artifacts("dataset") if a.run_id == more.run_id] == []


def test_on_policy_runs_trl_distillation_trainer_with_dashboard_checkpoints_and_resume(pair, monkeypatch):
    import trl

    reg, runner = pair["registry"], pair["runner"]
    calls = []
    original = trl.DistillationTrainer._generate_and_score_completions

    def spy(self, inputs):
        out = original(self, inputs)
        calls.append(int(out["completion_mask"].sum()))  # the student generated these answer tokens
        return out

    monkeypatch.setattr(trl.DistillationTrainer, "_generate_and_score_completions", spy)
    res = runner.run("distill", teacher=pair["teacher"].run_id, student=pair["student"].run_id,
                     data=pair["data"].hash, on_policy=True, loss="jsd", max_new_tokens=8, max_steps=2, lr=2e-3,
                     **{**TRAIN, "log_every": 1, "checkpoint_every": 2})
    assert res.status == RunStatus.FINISHED and res.summary["distill_mode"] == "on-policy"
    assert len(calls) == 2 and all(n > 0 for n in calls)
    assert "TRL DistillationTrainer" in res.summary["batching"] and res.summary["tokens"] > 0
    assert {"kl_to_teacher", "top1_agreement", "perplexity"} <= set(res.metrics)
    assert "loss" in {r["key"] for r in reg.metric_history(res.run_id)}  # the dashboard's series
    assert res.artifact.kind == "distilled"
    more = runner.run("distill", resume=res.run_id, max_steps=3)
    assert more.status == RunStatus.FINISHED and more.summary["resumed_at_step"] == 2
    assert more.summary["steps"] == 3 and len(calls) == 3

"""Merge (LoRA → merged, verified) and quantize (GPTQ via GPTQModel, bitsandbytes) on the tiny model.

Adapters come from real ``finetune`` runs of a few steps (a high learning rate, so they change the outputs); the
"untrained" adapter is a real run stopped inside its learning-rate warm-up, where the rate is still 0 and LoRA's B
matrices keep their zero initialisation.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from llmops_jupyter.core.errors import ConfigError, MissingDependencyError, NotFoundError, StageError, VerificationError
from llmops_jupyter.core.runner import Runner
from llmops_jupyter.registry import Registry, RunStatus

PROBES = ["What is 2 plus 3?", "Repeat the colour red.", "Echo: blue green"]


def make_adapter(registry: Registry, base_path, dataset_art, *, seed: int = 0, zero: bool = False):
    """A LoRA adapter on every linear projection from a real finetune run: (run id, adapter artifact).

    ``zero``: one optimizer step inside a longer warm-up (learning rate 0), so the adapter does not change outputs.
    """
    steps = {"max_steps": 1, "warmup_steps": 10} if zero else {"max_steps": 4}
    res = Runner(registry).run("finetune", {"model": str(base_path), "data": dataset_art.hash, "rank": 4,
                                            "alpha": 8, "lr": 1e-2, "batch_size": 4, "seq_len": 64, "seed": seed,
                                            "log_every": 1, "checkpoint_every": 0, **steps})
    assert res.status == RunStatus.FINISHED and res.artifact.kind == "adapter"
    return res.run_id, res.artifact


def logits_of(model, tokenizer, texts=PROBES):
    import torch

    with torch.inference_mode():
        return [model(**tokenizer(t, return_tensors="pt")).logits[0].float() for t in texts]


@pytest.fixture(scope="module")
def chain(tiny_model, tmp_path_factory):
    """dataset → adapter → merged → GPTQ 4-bit, in one registry shared by the module's read-only tests."""
    from llmops_jupyter.testing import tiny_records

    reg = Registry(tmp_path_factory.mktemp("mq") / ".llmops")
    runner = Runner(reg)
    dataset = runner.run("data", {"source": tiny_records(48), "tokenizer": str(tiny_model), "eval_fraction": 0.25,
                                  "name": "tiny"}).artifact
    adapter_run, adapter = make_adapter(reg, tiny_model, dataset)
    merged = runner.run("merge", adapter=adapter_run)
    return {"registry": reg, "runner": runner, "dataset": dataset, "adapter_run": adapter_run, "adapter": adapter,
            "merged": merged}


@pytest.fixture(scope="module")
def gptq(chain, tmp_path_factory):
    """The merged model quantized with GPTQ 4-bit (first run on a machine compiles GPTQModel's C++ helper), from a
    notebook folder of its own (``cwd``) to see that nothing is written there."""
    cwd, before = tmp_path_factory.mktemp("notebook-folder"), os.getcwd()
    os.chdir(cwd)
    try:
        res = chain["runner"].run("quantize", model=chain["merged"].run_id, method="gptq", bits=4, group_size=32,
                                  calibration_samples=16, eval_samples=12, generate_tokens=8)
    finally:
        os.chdir(before)
    res.cwd = cwd
    return res


def test_merged_logits_match_base_plus_adapter(chain, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = chain["merged"]
    assert merged.status == RunStatus.FINISHED
    art = merged.artifact
    assert art.kind == "merged" and (art.path / "model.safetensors").exists()
    assert (art.path / "tokenizer.json").exists()
    card = json.loads((art.path / "llmops_model.json").read_text())
    assert card["adapter"]["hash"] == chain["adapter"].hash and card["verification"]["probes"] > 0
    assert "eval split" in card["verification"]["probe_source"]  # probes came from the adapter's dataset
    # independent check: peft base+adapter (unmerged) vs the stored merged checkpoint
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)), str(chain["adapter"].path))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    stored = AutoModelForCausalLM.from_pretrained(str(art.path))
    la, lb, lm = logits_of(adapted, tok), logits_of(base, tok), logits_of(stored, tok)
    assert max(float((a - m).abs().max()) for a, m in zip(la, lm, strict=True)) < 1e-3
    assert max(float((b - m).abs().max()) for b, m in zip(lb, lm, strict=True)) > 1e-2  # not the base model
    assert merged.metrics["merge_max_abs_diff"] < 1e-3 < merged.metrics["adapter_effect_max_abs_diff"]


def test_broken_merge_fails_verification_and_saves_nothing(registry, tiny_model, tiny_dataset, monkeypatch):
    from peft.tuners.lora import LoraModel

    run_id, _ = make_adapter(registry, tiny_model, tiny_dataset)
    # the classic bug: the adapter layers are dropped instead of folded in, so the "merged" model is the base
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())
    with pytest.raises(VerificationError, match="differ from base\\+adapter"):
        Runner(registry).run("merge", adapter=run_id)
    assert registry.list_artifacts("merged") == []
    assert registry.list_runs(stage="merge")[0]["status"] == "failed"


def test_untrained_adapter_is_refused(registry, tiny_model, tiny_dataset):
    run_id, _ = make_adapter(registry, tiny_model, tiny_dataset, zero=True)  # B = 0: no effect
    with pytest.raises(VerificationError, match="does not change"):
        Runner(registry).run("merge", adapter=run_id)
    res = Runner(registry).run("merge", adapter=run_id, allow_noop=True)
    assert res.status == RunStatus.FINISHED


def test_dequantize_nf4_merges_into_roundtripped_base(chain):
    from safetensors.torch import load_file

    res = chain["runner"].run("merge", adapter=chain["adapter_run"], dequantize_nf4=True, name="tiny-merged-nf4")
    card = json.loads((res.artifact.path / "llmops_model.json").read_text())
    assert card["nf4"]["modules"] == 14 and card["nf4"]["mean_abs_change"] > 0  # 7 projections × 2 layers
    assert res.metrics["merge_max_abs_diff"] < 1e-3
    plain = load_file(str(chain["merged"].artifact.path / "model.safetensors"))
    nf4 = load_file(str(res.artifact.path / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not (plain[key] == nf4[key]).all()
    head = "lm_head.weight"  # QLoRA keeps the output head unquantized
    assert (plain[head] == nf4[head]).all()


@pytest.mark.slow  # first GPTQ run compiles GPTQModel's C++ packing helper (~30 s on 2 cores), cached afterwards
def test_gptq_4bit_loads_and_generates_on_cpu(gptq, chain):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmops_jupyter.stages.quantize.stage import import_gptqmodel

    q = gptq
    assert q.status == RunStatus.FINISHED
    assert q.summary["backend"].startswith("gptqmodel ")
    path = q.artifact.path
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "gptq" and qcfg["bits"] == 4 and qcfg["group_size"] == 32
    assert 0 < q.metrics["size_ratio"] < 1
    assert math.isfinite(q.metrics["perplexity"]) and math.isfinite(q.metrics["source_perplexity"])
    assert q.metrics["tokens_per_s"] > 0
    assert not list(q.cwd.iterdir())  # GPTQModel's logs go to the run's folder, not the user's working directory
    assert list((chain["registry"].home / "runs" / q.run_id / "gptq-logs").glob("*.log"))
    from llmops_jupyter.core.stage import discover

    if "eval" in discover():  # the eval stage ran on source and quantized model as child runs
        assert any(k.startswith("eval_delta/") for k in q.metrics)
    import_gptqmodel()
    model = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu")
    assert any("gptqmodel" in type(m).__module__ for m in model.modules())
    tok = AutoTokenizer.from_pretrained(str(path))
    out = model.generate(**tok("What is 2 plus 3?", return_tensors="pt"), max_new_tokens=6, min_new_tokens=6,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > 6


def test_parity_report_compares_adapter_merged_and_gptq_without_llama_cpp(chain, gptq, shell, monkeypatch):
    """`parity` of two transformers versions needs no [gguf]: PEFT adapter vs its verified merge agree on every
    next token (--check passes); merged vs GPTQ 4-bit is reported with its own numbers."""
    from llmops_jupyter.core import extras
    from llmops_jupyter.stages.export import parity
    from llmops_jupyter.stages.export.stage import conversations, resolve_deployable

    real = extras._importable
    monkeypatch.setattr(extras, "_importable", lambda m: m != "llama_cpp" and real(m))  # as without the extra
    reg = chain["registry"]
    monkeypatch.setenv("LLMOPS_HOME", str(reg.home))
    table = shell.run_line_magic("llmops", f"parity --model {chain['adapter_run']} --model {chain['merged'].run_id} "
                                           "--samples 4 --tokens 8 --check")
    text = str(table)
    assert "rendered prompts identical" in text and "100% of 4" in text and "passed" in text

    a, b = (resolve_deployable(r, reg) for r in (chain["merged"].run_id, gptq.run_id))
    convs = conversations(reg, a, None, 4)
    assert len(convs) == 4 and convs[0][-1]["role"] == "user"  # the eval split of the adapter's dataset
    sa, sb = parity.open_side(a, reg), parity.open_side(b, reg)
    try:
        report = parity.compare(sa, sb, convs, n_tokens=8, min_agreement=0.0)
    finally:
        sa.close()
        sb.close()
    assert report.prompt_identity == 1.0 and 0.0 <= report.next_token_agreement <= 1.0
    assert report.max_logit_diff > 0  # 4-bit weights: not the same numbers


def test_bnb_4bit_export_loads(chain):
    from transformers import AutoModelForCausalLM

    res = chain["runner"].run("quantize", model=chain["merged"].run_id, method="bnb-4bit", eval_samples=4,
                              generate_tokens=4, compare_eval=False)
    assert res.summary["backend"].startswith("bitsandbytes ")
    path = res.artifact.path
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "bitsandbytes" and qcfg["bnb_4bit_quant_type"] == "nf4"
    model = AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu")
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert res.metrics["size_ratio"] < 1
    # quantizing an already-quantized model: one clear error naming --model
    with pytest.raises(ConfigError, match="already quantized") as info:
        chain["runner"].run("quantize", model=res.run_id, method="gptq")
    assert info.value.field == "model"


def test_lineage_chain_dataset_adapter_merged_quantized(chain, gptq):
    reg = chain["registry"]
    kinds = [a.kind for a in reg.lineage_chain(gptq.artifact)]
    for k in ("dataset", "base-model", "adapter", "merged", "quantized"):
        assert k in kinds
    assert kinds.index("dataset") < kinds.index("adapter") < kinds.index("merged") < kinds.index("quantized")
    merged_parents = {e["src"] for e in reg.lineage(chain["merged"].artifact, "up")["edges"]
                      if e["dst"] == chain["merged"].artifact.hash}
    base = reg.add_reference(reg.get_artifact(chain["adapter"].hash).meta["base_model_path"], "base-model")
    assert merged_parents == {base.hash, chain["adapter"].hash}


def test_bad_inputs_give_one_clear_error(shell, registry, tiny_model):
    from IPython.core.error import UsageError

    with pytest.raises(NotFoundError, match="not found"):
        Runner(registry).run("merge", adapter="finetune-doesnotexist")
    with pytest.raises(UsageError, match="--bits must be one of: 2, 3, 4, 8 \\(got 5\\)"):
        shell.run_line_magic("llmops", f"quantize --model {tiny_model} --method gptq --bits 5 --group-size 128")
    with pytest.raises(ConfigError, match="--bits must be 8 with --method bnb-8bit"):
        Runner(registry).run("quantize", model=str(tiny_model), method="bnb-8bit", bits=4)
    with pytest.raises(ConfigError, match="is a base-model, not an adapter"):
        Runner(registry).run("merge", adapter=str(tiny_model))
    with pytest.raises(ConfigError, match="GPTQ needs calibration data"):
        Runner(registry).run("quantize", model=str(tiny_model), method="gptq")


def test_auto_gptq_alone_is_a_clear_error(monkeypatch):
    import importlib.util

    from llmops_jupyter.stages.quantize import stage as quantize

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "auto_gptq" else None if name == "gptqmodel"
                        else real(name, *a))
    with pytest.raises(MissingDependencyError) as info:
        quantize.gptq_backend()
    msg = str(info.value)
    assert "auto-gptq" in msg and "end-of-life" in msg and "pip install 'llmops-jupyter[quantize]'" in msg


def test_merge_refuses_quantized_base(registry, tmp_path, tiny_model, tiny_dataset):
    """Never merge into a quantized base: a bnb-4bit base checkpoint is refused with the fix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    qbase = tmp_path / "tiny-4bit"
    AutoModelForCausalLM.from_pretrained(str(tiny_model), device_map="cpu",
                                         quantization_config=BitsAndBytesConfig(load_in_4bit=True)
                                         ).save_pretrained(str(qbase))
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(str(qbase))
    run_id, _ = make_adapter(registry, tiny_model, tiny_dataset)
    with pytest.raises(StageError, match="stored quantized \\(bitsandbytes 4-bit"):
        Runner(registry).run("merge", adapter=run_id, base=str(qbase))


def test_stage_modules_import_light():
    code = ("import sys; import llmops_jupyter.stages.merge.stage, llmops_jupyter.stages.quantize.stage; "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'gptqmodel', 'bitsandbytes') if m in sys.modules];"
            " print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_merge_through_the_magic(shell, registry, tiny_model, tiny_dataset):
    run_id, adapter = make_adapter(registry, tiny_model, tiny_dataset)
    shell.run_line_magic("llmops", f"merge --adapter {run_id} --probe-samples 4 --name via-magic")
    (merged,) = registry.list_artifacts("merged")
    assert merged.name == "via-magic"
    run = registry.get_run(merged.run_id)
    assert run["status"] == "finished" and run["summary"]["probes"] == 4
    assert {a.hash for a in registry.run_artifacts(merged.run_id, "input")} >= {adapter.hash, tiny_dataset.hash}

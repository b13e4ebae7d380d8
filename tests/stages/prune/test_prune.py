"""``prune`` on a 4-layer tiny Llama: depth (block influence, angular distance, --target-params), width, wanda and
sparsegpt (50 % unstructured, 2:4; SparseGPT's reconstruction on one random layer against magnitude pruning). The source is a real merged model (finetune → merge), so lineage reads merged → pruned;
pruned models go on through finetune → merge and bitsandbytes quantization; bad input is one line, nothing stored.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from llmops_jupyter.core.errors import ConfigError, VerificationError
from llmops_jupyter.core.runner import Runner
from llmops_jupyter.registry import Registry, RunStatus

FAST = {"calibration_samples": 8, "eval_samples": 4, "generate_tokens": 4}


@pytest.fixture(scope="module")
def chain(model_cache, tmp_path_factory):
    """4-layer tiny model → dataset → LoRA (4 steps) → merged, in one registry shared by the module."""
    from llmops_jupyter.models.tiny import build_tiny_model
    from llmops_jupyter.testing import tiny_records

    tiny4 = build_tiny_model(model_cache / "tiny-llama-4layers", layers=4)
    reg = Registry(tmp_path_factory.mktemp("prune") / ".llmops")
    runner = Runner(reg)
    dataset = runner.run("data", {"source": tiny_records(48), "tokenizer": str(tiny4), "eval_fraction": 0.25,
                                  "name": "tiny"}).artifact
    ft = runner.run("finetune", {"model": str(tiny4), "data": dataset.hash, "rank": 4, "alpha": 8, "lr": 1e-2,
                                 "batch_size": 4, "seq_len": 64, "max_steps": 4, "checkpoint_every": 0})
    merged = runner.run("merge", adapter=ft.run_id)
    return {"registry": reg, "runner": runner, "dataset": dataset, "merged": merged, "base": tiny4}


@pytest.fixture(scope="module")
def depth(chain):
    return chain["runner"].run("prune", model=chain["merged"].run_id, method="depth", layers=1, **FAST)


def greedy(model, tok, prompt, n, *, use_cache):
    import torch

    enc = tok(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=use_cache,
                             pad_token_id=tok.pad_token_id, eos_token_id=None)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def test_depth_prune_is_a_normal_checkpoint_in_the_registry(chain, depth):
    from llmops_jupyter.models.inference import load_model
    from llmops_jupyter.models.refs import resolve_model

    assert depth.status == RunStatus.FINISHED
    reg = chain["registry"]
    m = resolve_model(depth.run_id, reg)  # reload from the registry by run id
    assert m.kind == "pruned" and m.artifact.hash == depth.artifact.hash
    cfg = json.loads((m.path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    model, tok = load_model(m, device="cpu", registry=reg)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    prompt = "What is 2 plus 3?"
    assert greedy(model, tok, prompt, 12, use_cache=True) == greedy(model, tok, prompt, 12, use_cache=False)
    # what was removed and why: the layer with the lowest block influence, drawn red in the chart
    imp = depth.outputs["measurements"]["details"]["importance"]
    removed = depth.summary["removed_layers"]
    assert len(imp) == 4 and removed == [min(range(4), key=lambda i: imp[i])]
    bar = depth.outputs["importance_figure"].data[0]
    assert [c == "#d62728" for c in bar.marker.color] == [i in removed for i in range(4)]
    # sizes, perplexity and speed before/after, in the metrics
    mx = depth.metrics
    assert mx["layers"] == 3 and mx["source_layers"] == 4
    assert mx["params"] < mx["source_params"] and 0.7 < mx["size_ratio"] < 0.9
    assert math.isfinite(mx["perplexity"]) and math.isfinite(mx["source_perplexity"])
    assert mx["tokens_per_s"] > 0 and mx["source_tokens_per_s"] > 0 and mx["tokens_per_s_ratio"] > 0
    kinds = [a.kind for a in reg.lineage_chain(depth.artifact)]
    assert kinds.index("dataset") < kinds.index("merged") < kinds.index("pruned")
    from llmops_jupyter.governance.cards import build_model_card

    card = build_model_card(reg, depth.artifact.hash).markdown
    assert "## Compression" in card and "removed_layers" in card and "block influence" in card


def test_angular_distance_removes_a_contiguous_block_and_target_params_picks_the_count(chain):
    res = chain["runner"].run("prune", model=chain["merged"].run_id, layers=2, criterion="angular", **FAST)
    removed = res.summary["removed_layers"]
    dist = res.outputs["measurements"]["details"]["angular_distance"]
    assert removed == [removed[0], removed[0] + 1] and removed[0] == min(range(len(dist)), key=lambda s: dist[s])
    assert res.metrics["layers"] == 2
    # --target-params 0.8 of 0.214 M: one 37 k-parameter layer is not enough, two are
    res = chain["runner"].run("prune", model=chain["merged"].run_id, target_params=0.8, **FAST)
    assert res.metrics["layers"] == 2 and res.metrics["params_ratio"] <= 0.8


def test_saved_model_is_checked_against_the_one_in_memory(chain, monkeypatch):
    """A surgery that forgets ``num_hidden_layers`` saves a folder that reloads with a fresh random layer: refused."""
    from llmops_jupyter.stages.prune import engine

    real = engine.remove_layers

    def forgetful(model, removed):
        n = model.config.num_hidden_layers
        kept = real(model, removed)
        model.config.num_hidden_layers = n
        return kept

    monkeypatch.setattr(engine, "remove_layers", forgetful)
    reg = chain["registry"]
    before = len(reg.list_artifacts("pruned"))
    with pytest.raises(VerificationError, match="reloads as a different model"):
        chain["runner"].run("prune", model=chain["merged"].run_id, layers=1, **FAST)
    assert len(reg.list_artifacts("pruned")) == before
    assert reg.list_runs(stage="prune")[0]["status"] == "failed"


def test_pruned_model_fine_tunes_merges_and_quantizes(chain, depth):
    from transformers import AutoModelForCausalLM

    runner = chain["runner"]
    ft = runner.run("finetune", {"model": depth.run_id, "data": chain["dataset"].hash, "rank": 4, "alpha": 8,
                                 "lr": 1e-2, "batch_size": 4, "seq_len": 64, "max_steps": 3, "checkpoint_every": 0})
    merged = runner.run("merge", adapter=ft.run_id, probe_samples=4)
    assert merged.status == RunStatus.FINISHED and merged.metrics["merge_max_abs_diff"] < 1e-3
    assert json.loads((merged.artifact.path / "config.json").read_text())["num_hidden_layers"] == 3
    q = runner.run("quantize", model=depth.run_id, method="bnb-4bit", eval_samples=4, generate_tokens=4,
                   compare_eval=False)
    model = AutoModelForCausalLM.from_pretrained(str(q.artifact.path), device_map="cpu")
    assert len(model.model.layers) == 3 and q.metrics["size_ratio"] < 1
    kinds = [a.kind for a in chain["registry"].lineage_chain(q.artifact)]
    assert kinds.index("merged") < kinds.index("pruned") < kinds.index("quantized")
    # a quantized model is no prune input: one line naming --model, nothing stored
    before = len(chain["registry"].list_artifacts("pruned"))
    with pytest.raises(ConfigError, match="is quantized \\(bitsandbytes 4-bit") as info:
        runner.run("prune", model=q.run_id, layers=1, **FAST)
    assert info.value.field == "model" and len(chain["registry"].list_artifacts("pruned")) == before


def check_sparse(res, pattern):
    """50.0 % ± 0.1 measured zeros over the pruned projections, ±0.1 % in each one, 2:4 in every matrix; returns
    the saved pruned matrices."""
    import torch
    from safetensors.torch import load_file

    from llmops_jupyter.stages.prune.engine import LINEAR_NAMES, holds_2_4

    weights = load_file(str(res.artifact.path / "model.safetensors"))
    pruned = {k: w for k, w in weights.items() if k.split(".")[-2] in LINEAR_NAMES}
    assert len(pruned) == 4 * len(LINEAR_NAMES)
    zeros = sum(int((w == 0).sum()) for w in pruned.values())
    total = sum(w.numel() for w in pruned.values())
    assert abs(100 * zeros / total - 50.0) <= 0.1
    assert abs(res.metrics["sparsity"] - zeros / total) < 1e-9
    for name, w in pruned.items():
        assert abs(float((w == 0).float().mean()) - 0.5) <= 0.001, name
        if pattern == "2:4":
            assert holds_2_4(w), name
    # the embeddings and the output head are untouched
    assert not (weights["lm_head.weight"] == 0).any() and torch.isfinite(torch.tensor(res.metrics["perplexity"]))
    assert "no speed-up on CPU or in GGUF/GPTQ" in str(res.outputs["report"])
    assert res.metrics["size_ratio"] == pytest.approx(1.0, abs=0.01)
    return pruned


def test_wanda_50_percent_and_2_4(chain):
    for pattern in ("unstructured", "2:4"):
        res = chain["runner"].run("prune", model=chain["merged"].run_id, method="wanda", pattern=pattern, **FAST)
        check_sparse(res, pattern)


def test_sparsegpt_50_percent_and_2_4_updates_the_kept_weights(chain):
    from safetensors.torch import load_file

    source = load_file(str(chain["merged"].artifact.path / "model.safetensors"))
    for pattern in ("unstructured", "2:4"):
        res = chain["runner"].run("prune", model=chain["merged"].run_id, method="sparsegpt", pattern=pattern, **FAST)
        assert res.status == RunStatus.FINISHED
        pruned = check_sparse(res, pattern)
        # unlike wanda the surviving weights moved (the error of the pruned ones was spread over them)
        for name, w in pruned.items():
            kept = w != 0
            assert not (w[kept] == source[name].to(w.dtype)[kept]).all(), name
        # the pruned model's perplexity and the per-matrix reconstruction error are recorded in the run
        assert math.isfinite(res.metrics["perplexity"]) and math.isfinite(res.metrics["source_perplexity"])
        details = res.outputs["measurements"]["details"]
        assert set(details["reconstruction_error"]) == set(details["matrices"]) and len(details["matrices"]) == 28
        assert all(e > 0 for e in details["reconstruction_error"].values())
        assert res.summary["method"] == "sparsegpt" and "SparseGPT" in res.summary["why"]
    from llmops_jupyter.governance.cards import build_model_card

    card = build_model_card(chain["registry"], res.artifact.hash).markdown
    assert "## Compression" in card and "no speed-up on CPU or in GGUF/GPTQ files" in card


def test_sparsegpt_beats_magnitude_pruning_on_a_layer_with_correlated_inputs():
    """‖XWᵀ − XŴᵀ‖ on the calibration inputs: SparseGPT's updated weights against magnitude pruning at the same
    density (and against SparseGPT's own mask without the update), unstructured and 2:4, over two column blocks."""
    import torch

    from llmops_jupyter.stages.prune.engine import HessianAccumulator, holds_2_4, sparsegpt_prune, wanda_mask

    gen = torch.Generator().manual_seed(0)
    rows, cols, n = 48, 256, 2048
    x = torch.randn(n, 32, generator=gen) @ torch.randn(32, cols, generator=gen) \
        + 0.3 * torch.randn(n, cols, generator=gen)  # correlated features, as in a transformer's activations
    w = torch.randn(rows, cols, generator=gen)
    acc = HessianAccumulator(cols)
    acc.add(x[:700])
    acc.add(x[700:].reshape(2, -1, cols))  # the running mean over batches is H = 2/N · XᵀX
    torch.testing.assert_close(acc.H, 2 * x.t() @ x / n, rtol=1e-4, atol=1e-3)

    def err(w_hat):
        return float(torch.linalg.norm(x @ w.t() - x @ w_hat.t()))

    for pattern in ("unstructured", "2:4"):
        new, loss = sparsegpt_prune(w, acc.H, sparsity=0.5, pattern=pattern)
        mask = new == 0
        magnitude = wanda_mask(w, torch.ones(cols), sparsity=0.5, pattern=pattern)  # |W| alone
        assert float(mask.float().mean()) >= float(magnitude.float().mean()) == 0.5
        assert float(mask.float().mean()) <= 0.5 + 2 / (rows * 128)  # one threshold tie per 128-column block
        assert err(new) < 0.5 * err(w.masked_fill(magnitude, 0)), pattern
        assert err(new) < 0.9 * err(w.masked_fill(mask, 0)), pattern  # the update, not only the mask
        # the reported loss estimates ½ tr(ΔW H ΔWᵀ) = ‖XΔWᵀ‖² / N (up to the 1 % dampening)
        assert 0.7 < loss / (err(new) ** 2 / n) < 1.5
        if pattern == "2:4":
            assert holds_2_4(new)


def test_sparsegpt_calibrates_each_layer_on_the_pruned_previous_layers(tiny_model, monkeypatch):
    """The Hessian of layer 1's q_proj is computed from the outputs of the already-pruned layer 0."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmops_jupyter.stages.prune import engine

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    batches = engine.encode(tok, ["What is 2 plus 3? It is 5.", "The cat sat on the mat and looked around."], 32)

    def q_proj_hessian(m):
        acc = engine.HessianAccumulator(m.model.layers[1].self_attn.q_proj.in_features)
        hook = m.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda mod, args: acc.add(args[0]))
        with torch.no_grad():
            for ids in batches:
                m(input_ids=ids, use_cache=False)
        hook.remove()
        return acc.H

    dense = q_proj_hessian(model)
    seen = []
    real = engine.sparsegpt_prune

    def recording(weight, hessian, **kw):
        seen.append(hessian.clone())
        return real(weight, hessian, **kw)

    monkeypatch.setattr(engine, "sparsegpt_prune", recording)
    sp, _ = engine.apply_sparsegpt(model, batches, sparsity=0.5, pattern="unstructured")
    q1 = list(sp).index("layers.1.self_attn.q_proj")
    torch.testing.assert_close(seen[q1], q_proj_hessian(model), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(seen[q1], dense, rtol=1e-3, atol=1e-4)


def test_width_prunes_every_layer_to_the_same_mlp_size(chain):
    from transformers import AutoModelForCausalLM

    res = chain["runner"].run("prune", model=chain["merged"].run_id, method="width", intermediate_size=96, **FAST)
    assert json.loads((res.artifact.path / "config.json").read_text())["intermediate_size"] == 96
    model = AutoModelForCausalLM.from_pretrained(str(res.artifact.path))
    assert {layer.mlp.down_proj.in_features for layer in model.model.layers} == {96}
    assert res.metrics["params_ratio"] < 1 and math.isfinite(res.metrics["perplexity"])


def test_bad_inputs_one_line_nothing_stored(chain, shell, tmp_path, monkeypatch):
    from IPython.core.error import UsageError

    reg, runner = chain["registry"], chain["runner"]
    monkeypatch.setenv("LLMOPS_HOME", str(reg.home))
    before = len(reg.list_artifacts("pruned"))
    merged = chain["merged"].run_id
    with pytest.raises(ConfigError, match="--layers 4 would remove every layer") as info:
        runner.run("prune", model=merged, layers=4, **FAST)
    assert info.value.field == "layers"
    for bad in ("0", "1", "1.5"):
        with pytest.raises(UsageError, match=f"--sparsity must be strictly between 0 and 1 \\(got {bad}"):
            shell.run_line_magic("llmops", f"prune --model {merged} --method wanda --sparsity {bad}")
    with pytest.raises(UsageError, match="--sparsity must be strictly between 0 and 1 \\(got 1"):
        shell.run_line_magic("llmops", f"prune --model {merged} --method sparsegpt --sparsity 1")
    with pytest.raises(UsageError, match="--method must be one of"):
        shell.run_line_magic("llmops", f"prune --model {merged} --method obs")
    with pytest.raises(ConfigError, match="--pattern does not apply to --method width"):
        runner.run("prune", model=merged, method="width", intermediate_size=96, pattern="2:4")
    with pytest.raises(ConfigError, match="needs exactly one of --layers or --target-params"):
        runner.run("prune", model=merged)
    with pytest.raises(ConfigError, match="--sparsity does not apply to --method depth"):
        runner.run("prune", model=merged, layers=1, sparsity=0.5)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(28))
    with pytest.raises(ConfigError, match="is a GGUF file"):
        runner.run("prune", model=str(gguf), layers=1)
    with pytest.raises(ConfigError, match="is a LoRA adapter"):
        runner.run("prune", model=reg.list_artifacts("adapter")[0].hash, layers=1)
    assert len(reg.list_artifacts("pruned")) == before


def test_prune_module_imports_light():
    code = ("import sys; import llmops_jupyter.stages.prune.stage; "
            "heavy = [m for m in ('torch', 'transformers', 'plotly') if m in sys.modules]; print(heavy); "
            "sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow  # GPTQ (first run on a machine compiles GPTQModel's C++ helper, ~40 s on 2 cores)
def test_depth_pruned_model_quantizes_with_gptq_and_is_no_prune_input(chain, depth):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmops_jupyter.stages.quantize.stage import import_gptqmodel

    q = chain["runner"].run("quantize", model=depth.run_id, method="gptq", bits=4, group_size=32,
                            calibration_samples=8, eval_samples=4, generate_tokens=4, compare_eval=False)
    assert q.status == RunStatus.FINISHED
    import_gptqmodel()
    model = AutoModelForCausalLM.from_pretrained(str(q.artifact.path), device_map="cpu")
    assert len(model.model.layers) == 3
    tok = AutoTokenizer.from_pretrained(str(q.artifact.path))
    assert len(greedy(model, tok, "What is 2 plus 3?", 4, use_cache=True)) == 4
    before = len(chain["registry"].list_artifacts("pruned"))
    with pytest.raises(ConfigError, match="is quantized \\(gptq 4-bit\\)"):
        chain["runner"].run("prune", model=q.run_id, layers=1, **FAST)
    assert len(chain["registry"].list_artifacts("pruned")) == before

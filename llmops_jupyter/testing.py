"""Tiny offline models for tests, CI notebooks and quick tries: no hub access, built in seconds.

``build_tiny_model(path)`` writes a 2-layer Llama (hidden 64) with a byte-level BPE tokenizer trained on a few KB
of text and a chat template, as a normal transformers checkpoint. Requires the ``[finetune]`` extra.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ._io import atomic_dir

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = """
The quick brown fox jumps over the lazy dog. A language model predicts the next token from the previous ones.
Fine-tuning adapts a pretrained model to a task with a small dataset. LoRA trains low-rank adapters on frozen
weights. QLoRA quantizes the frozen base to four bits and trains adapters in higher precision. Evaluation compares
model versions on held-out examples with metrics such as exact match, token F1, ROUGE-L and perplexity.
Question: What is the capital of France? Answer: Paris. Question: What is two plus two? Answer: four.
Question: What color is the sky? Answer: blue. Translate to French: cat -> chat, dog -> chien, house -> maison.
Summarize: The meeting was moved to Tuesday because the room was booked. Summary: Meeting moved to Tuesday.
def add(a, b): return a + b. The server answers chat completions over HTTP with streaming responses.
Monitoring watches latency, errors, drift and prompt injection. Ignore previous instructions is a known attack.
Emails like alice@example.com and phone numbers like +1 555 123 4567 are personal data and must be scrubbed.
0123456789 !?.,;:'"()[]{}<>-_=+*/\\|@#$%^&~` abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ
"""

TINY_NAME = "tiny-llama"


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(path: str | os.PathLike, *, seed: int = 0, hidden: int = 64, layers: int = 2,
                     vocab_size: int = 512) -> Path:
    """Write a tiny Llama checkpoint + tokenizer to ``path`` (atomically) and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "llmops_model.json").write_text(json.dumps({"name": TINY_NAME, "licence": "Apache-2.0",
                                                           "source": "llmops_jupyter.testing"}))
    return path


def tiny_model_path(cache: str | os.PathLike | None = None) -> Path:
    """Build (once) and return the tiny model in the local model cache."""
    from .models import model_cache_dir

    target = Path(cache) if cache else model_cache_dir() / TINY_NAME
    if not (target / "config.json").exists():
        build_tiny_model(target)
    return target


def tiny_records(n: int = 48, seed: int = 0) -> list[dict[str, str]]:
    """Small, deterministic instruction/response pairs with variable lengths (arithmetic, colours, echo)."""
    import random

    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "black", "white"]
    rows = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            rows.append({"instruction": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."})
        elif kind == 1:
            c = rng.choice(colours)
            rows.append({"instruction": f"Repeat the colour {c}.", "response": f"The colour is {c}."})
        else:
            words = " ".join(rng.choice(colours) for _ in range(rng.randint(1, 12)))
            rows.append({"instruction": f"Echo: {words}", "response": words})
    return rows


def write_tiny_dataset(registry, tokenizer_path, n: int = 48, eval_fraction: float = 0.25, seed: int = 0):
    """Register a dataset artifact in the standard format without running the data stage (fixtures only)."""
    from transformers import AutoTokenizer

    from .dataformat import render, write_dataset_dir
    from .registry import RunStatus

    tok = AutoTokenizer.from_pretrained(str(tokenizer_path))
    examples = [render([{"role": "user", "content": r["instruction"]},
                        {"role": "assistant", "content": r["response"]}], tok) for r in tiny_records(n, seed)]
    n_eval = max(1, int(len(examples) * eval_fraction))
    run_id = registry.create_run("data", {"source": "tiny_records", "n": n})
    folder = registry.staging_dir("data")
    write_dataset_dir(folder, examples[n_eval:], examples[:n_eval],
                      {"tokenizer": str(tokenizer_path), "chat_template": tok.chat_template, "seed": seed})
    art = registry.add_artifact(folder, "dataset", name="tiny", run_id=run_id, move=True)
    registry.finish_run(run_id, RunStatus.FINISHED)
    return art


def read_bytes_elsewhere(paths: list[str | os.PathLike]) -> dict[str, bytes]:
    """Raw bytes of files read by a child process: the way to grep a *live* SQLite registry for leaked secrets.

    Opening and closing a database file in the process that holds SQLite connections to it drops every POSIX lock
    those connections hold (locks are per process, released by any ``close``). Another process then believes it is
    the last user, checkpoints and removes the WAL under the open connections, and the next query fails with
    "database disk image is malformed".
    """
    import pickle
    import subprocess
    import sys

    code = ("import pickle, sys\nfrom pathlib import Path\n"
            "sys.stdout.buffer.write(pickle.dumps({p: Path(p).read_bytes() for p in sys.argv[1:] if Path(p).is_file()}))")
    out = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, check=True)
    return pickle.loads(out.stdout)

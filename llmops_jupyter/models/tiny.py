"""The tiny offline model (the ``tiny-llama`` provider): no hub access, built in seconds.

``build_tiny_model(path)`` writes a 2-layer Llama (hidden 64) with a byte-level BPE tokenizer trained on a few KB
of text and a chat template, as a normal transformers checkpoint. Requires the ``[finetune]`` extra.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llmops_jupyter.core.files import atomic_dir

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
                     vocab_size: int = 512, initializer_range: float = 0.02, tie_word_embeddings: bool = False) -> Path:
    """Write a tiny Llama checkpoint + tokenizer to ``path`` (atomically) and return it. A larger
    ``initializer_range`` gives a less uniform random model whose output a LoRA adapter can move (the RL tests);
    ``tie_word_embeddings`` shares the input embedding with the output layer, as SmolLM2 does."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings, initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "llmops_model.json").write_text(json.dumps({"name": TINY_NAME, "licence": "Apache-2.0",
                                                           "source": "llmops_jupyter.models.tiny"}))
    return path

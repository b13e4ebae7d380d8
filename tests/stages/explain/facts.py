"""A tiny Llama trained (full weights, a few seconds) to answer "capital of X?" questions, so that the answer
depends on one part of the prompt: what attribution's deletion check needs (a random model's answer depends on
nothing in particular)."""

from __future__ import annotations

from pathlib import Path

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
            ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Greece", "Athens"),
            ("Cuba", "Havana")]


def question(country: str) -> str:
    return f"Question: what is the capital city of {country}? Answer:"


def build_facts_model(path: Path, steps: int = 60) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmops_jupyter.models.tiny import build_tiny_model

    if (path / "config.json").exists():
        return path
    build_tiny_model(path, seed=1)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    texts = [f"{question(c)} {cap}." for c, cap in CAPITALS]
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(path)
    return path

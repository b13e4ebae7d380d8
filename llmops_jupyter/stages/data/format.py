"""The versioned dataset format every stage reads (written by the data stage).

A ``dataset`` artifact is a folder::

    train.jsonl      one example per line
    eval.jsonl       held-out examples (deterministic split by seed)
    manifest.json    version hash, counts, tokenizer, chat template, cleaning/PII report, split settings

Each example::

    {"id": "<sha1 of messages>", "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
     "prompt": "<chat template applied to all but the last assistant turn, with the generation prompt>",
     "completion": "<last assistant turn as the template renders it, incl. end-of-turn text>",
     "text": prompt + completion, "n_tokens": int}

Training uses ``prompt``/``completion`` (completion-only loss) or ``text``; evaluation generates from ``prompt`` and
compares with the last assistant ``content`` (the reference).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.errors import DataError
from llmops_jupyter.core.files import atomic_write_json

if TYPE_CHECKING:
    from llmops_jupyter.registry import Artifact, Registry

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def example_id(messages: list[dict[str, str]]) -> str:
    blob = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def render(messages: list[dict[str, str]], tokenizer: Any | None) -> dict[str, Any]:
    """Apply the tokenizer's chat template (or :data:`DEFAULT_TEMPLATE`) and split prompt / completion."""
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError("An example must end with an assistant message (the response to learn).")
    context = messages[:-1]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    else:
        import jinja2

        tmpl = jinja2.Environment().from_string(DEFAULT_TEMPLATE)
        prompt = tmpl.render(messages=context, add_generation_prompt=True)
        full = tmpl.render(messages=messages, add_generation_prompt=False)
    if not full.startswith(prompt):  # templates that rewrite earlier turns: fall back to a plain split
        completion = messages[-1]["content"]
        full = prompt + completion
    completion = full[len(prompt):]
    n_tokens = len(tokenizer(full, add_special_tokens=False)["input_ids"]) if tokenizer is not None else None
    return {"id": example_id(messages), "messages": messages, "prompt": prompt, "completion": completion,
            "text": full, "n_tokens": n_tokens}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {i} is not valid JSON ({exc.msg}).", path=str(path), line=i,
                                fix="fix or delete that line") from None
    return rows


def write_dataset_dir(folder: Path, train: list[dict], eval: list[dict], manifest: dict[str, Any]) -> str:
    """Write the three files; returns the dataset version (hash of content + template + tokenizer)."""
    folder.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    for split, rows in (("train", train), ("eval", eval)):
        for r in rows:
            h.update(f"{split}\0{r['text']}\0".encode())
    h.update(json.dumps({k: manifest.get(k) for k in ("chat_template", "tokenizer_hash")}, sort_keys=True).encode())
    version = h.hexdigest()[:16]
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "eval.jsonl", eval)
    atomic_write_json(folder / "manifest.json", {**manifest, "version": version,
                                                 "counts": {**manifest.get("counts", {}), "train": len(train),
                                                            "eval": len(eval)}})
    return version


class Dataset:
    """A loaded dataset artifact: ``.train``, ``.eval`` (lists of examples), ``.manifest``, ``.artifact``."""

    def __init__(self, path: Path, artifact: Artifact | None = None):
        self.path = Path(path)
        self.artifact = artifact
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self.train = read_jsonl(self.path / "train.jsonl")
        self.eval = read_jsonl(self.path / "eval.jsonl")

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def split(self, name: str) -> list[dict[str, Any]]:
        if name not in ("train", "eval"):
            raise DataError(f"Unknown split '{name}'.", fix="use 'train' or 'eval'")
        return self.train if name == "train" else self.eval

    def __repr__(self) -> str:
        return f"Dataset({self.version}, train={len(self.train)}, eval={len(self.eval)})"


def load_dataset(ref: str | Path, registry: Registry) -> Dataset:
    """Load a dataset artifact by registry reference (hash, run id, ``data@latest``) or folder path."""
    p = Path(str(ref))
    if (p / "manifest.json").exists():
        return Dataset(p)
    art = registry.get_artifact(str(ref), kind="dataset")
    if art.kind != "dataset":
        raise DataError(f"Artifact '{ref}' is a {art.kind}, not a dataset.", fix="pass a data run or dataset hash")
    return Dataset(art.path, art)

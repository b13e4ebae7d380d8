"""The versioned dataset format every stage reads (written by the data stage).

A ``dataset`` artifact is a folder::

    train.jsonl      one example per line
    eval.jsonl       held-out examples (deterministic split by seed)
    manifest.json    version hash, counts, tokenizer, chat template, cleaning/PII report, split settings
    dropped.jsonl    every example cleaning removed: ``{"row", "where", "reason", "messages", "matched",
                     "similarity"}``; ``matched`` is the kept example a duplicate was matched to (``id``,
                     ``where``, ``messages``). PII is scrubbed as in the kept examples. Not part of the version.

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


DROPPED_FILE = "dropped.jsonl"


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


_UTF16_32_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
                  (b"\xfe\xff", "UTF-16"))


def read_text(path: Path) -> str:
    """A data file's text, strictly UTF-8 (a UTF-8 byte-order mark is dropped).

    Anything else fails with one line that names the file, the line and the byte offset, instead of a
    ``UnicodeDecodeError`` from deep inside a parser: silently guessing an encoding would corrupt the text.
    """
    path = Path(path)
    data = path.read_bytes()
    fix = (f"re-save it as UTF-8 (e.g. `iconv -f <encoding> -t utf-8 {path.name} > fixed{path.suffix}`), or read it "
           f"yourself with the right encoding (pandas: encoding='latin-1') and pass the DataFrame as $df")
    for bom, name in _UTF16_32_BOMS:
        if data.startswith(bom):
            raise DataError(f"{path}: the file is {name}-encoded (byte-order mark at byte 0), not UTF-8.",
                            path=str(path), line=1, fix=fix.replace("<encoding>", name.lower()))
    skip = 3 if data.startswith(b"\xef\xbb\xbf") else 0

    def where(offset: int) -> tuple[int, str]:
        line = data.count(b"\n", 0, offset) + 1
        col = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        return line, f"at byte offset {offset} (column {col})"

    try:
        text = data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        start = exc.start + skip
        line, at = where(start)
        hint = " (NUL bytes: UTF-16?)" if b"\x00" in data[:4096] else ""
        raise DataError(f"{path}: line {line} is not valid UTF-8: byte 0x{data[start]:02x} {at}{hint}.",
                        path=str(path), line=line,
                        fix=fix.replace("<encoding>", "utf-16" if hint else "latin1")) from None
    if "\x00" in text:  # valid UTF-8, but text files have no NULs: UTF-16 without a byte-order mark
        line, at = where(data.index(b"\x00"))
        raise DataError(f"{path}: line {line} has a NUL byte {at}; the file looks UTF-16-encoded, not UTF-8.",
                        path=str(path), line=line, fix=fix.replace("<encoding>", "utf-16le")) from None
    return text


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [row for _, row in read_jsonl_lines(path)]


def read_jsonl_lines(path: Path, text: str | None = None) -> list[tuple[int, Any]]:
    """``(line number, value)`` per non-blank line; undecodable bytes and bad JSON name the file and line."""
    rows = []
    text = read_text(path) if text is None else text
    lines = text.split("\n")  # not splitlines(): JSON strings may hold U+2028 and other line separators raw
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as exc:
            cut = " (the file may be truncated)" if i == len(lines) else ""
            raise DataError(f"{path}: line {i} is not valid JSON ({exc.msg}){cut}.", path=str(path), line=i,
                            fix="fix or delete that line") from None
    return rows


def write_dataset_dir(folder: Path, train: list[dict], eval: list[dict], manifest: dict[str, Any],
                      dropped: list[dict] | None = None) -> str:
    """Write the files; returns the dataset version (hash of content + template + tokenizer).

    ``dropped`` (what cleaning removed, and why) goes to ``dropped.jsonl`` and is not part of the version: the
    same kept examples are the same dataset."""
    folder.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    for split, rows in (("train", train), ("eval", eval)):
        for r in rows:
            h.update(f"{split}\0{r['text']}\0".encode())
    h.update(json.dumps({k: manifest.get(k) for k in ("chat_template", "tokenizer_hash")}, sort_keys=True).encode())
    version = h.hexdigest()[:16]
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "eval.jsonl", eval)
    if dropped is not None:
        write_jsonl(folder / DROPPED_FILE, dropped)
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

    @property
    def dropped(self) -> list[dict[str, Any]]:
        """What cleaning removed (reason, and for duplicates the kept example matched); [] for older datasets."""
        path = self.path / DROPPED_FILE
        return read_jsonl(path) if path.exists() else []

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


def _brief(messages: list[dict[str, str]] | None, width: int = 70) -> str:
    if not messages:
        return ""
    text = " | ".join(m["content"].replace("\n", " ") for m in messages if m["role"] != "system")
    return text if len(text) <= width else text[: width - 1] + "…"


def _as_msgs(record: dict[str, Any]) -> list[dict[str, str]] | None:
    """A dropped document (``--format text`` records ``text``, not ``messages``) shown like a message."""
    return [{"role": "user", "content": record["text"]}] if record.get("text") else None


def dropped_table(path: str | Path, *, reasons: tuple[str, ...] | None = None, limit: int | None = 50):
    """The dropped examples of a dataset folder beside what they matched, as a :class:`~core.display.Table`
    (``%llmops show data@…`` and the data report use it). ``reasons`` filters, ``limit`` caps the rows."""
    from llmops_jupyter.core.display import Table

    file = Path(path) / DROPPED_FILE
    rows = read_jsonl(file) if file.exists() else []
    if reasons is not None:
        rows = [r for r in rows if r.get("reason") in reasons]
    shown = rows if limit is None else rows[:limit]
    table_rows = []
    for r in shown:
        matched = r.get("matched") or {}
        sim = r.get("similarity")
        table_rows.append([r.get("where", ""), r.get("reason", ""), _brief(r.get("messages") or _as_msgs(r)),
                           _brief(matched.get("messages") or _as_msgs(matched)), matched.get("where", ""),
                           "" if sim is None else f"{sim:.2f}"])
    more = f"{len(rows) - len(shown)} more in {file}" if len(shown) < len(rows) else f"all in {file}"
    return Table(["dropped", "reason", "example", "matched", "matched at", "similarity"], table_rows,
                 title=f"Dropped examples ({len(rows)})", note=more if rows else "")

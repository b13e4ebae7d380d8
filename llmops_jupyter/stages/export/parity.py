"""The deploy-parity report: does the exported model behave like the model that was evaluated?

Two *sides* (any deployable version: PEFT adapter, merged, GPTQ — through transformers — or a GGUF file through
llama.cpp) get the same held-out conversations, each rendering them with the chat template *it* carries and
generating greedily. The report:

* **prompt identity** — the fraction of conversations whose rendered prompt (text and token ids) is identical on
  both sides: a lost or altered chat template, a wrong BOS/EOS, a different tokenizer show up here first;
* **next-token agreement** (the gated number) — side A's greedy answer, EOS included, is fed to both sides
  (teacher forcing) and at each of its first N positions the two sides' top-1 tokens are compared; at A's stop
  position B agrees only if its top-1 token is one B stops on (so a file that would not stop fails here). This is
  llama.cpp's own "same top p" measure of a quantized file: one near-tie flip costs one position, not the rest of
  the answer, so it separates a sound q8_0 (~0.95+) from a broken conversion (near 0);
* **free-running agreement** — position-wise agreement of the first N tokens each side generates on its own (one
  early flip loses every later position; reported, not gated);
* **exact match** — the fraction of answers that are identical (what a user sees);
* **max |Δlogit|** — over the prompt and A's answer, where both sides saw the same tokens.

The gate fails with one line: the chat template when prompts differ, else the next-token agreement below
``min_agreement``.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

#: --parity-min default per quant: the next-token agreement (teacher-forced, see above) a conversion must keep.
#: No benchmark in this repository measures these on a real model (the gguf tests check the tiny model against
#: them); measure yours with ``%llmops gguf`` (parity.json) and set ``--parity-min``. A lost template fails on prompt
#: identity first; a numerically broken file scores near 0.
DEFAULT_MIN = {"f32": 0.98, "f16": 0.98, "bf16": 0.95, "q8_0": 0.9, "q6_k": 0.85, "q5_k_m": 0.8, "q4_k_m": 0.7,
               "q4_0": 0.6, "q4_1": 0.6}


class HFSide:
    """A registry model version in transformers (fp32 on CPU by default: the reference numerics)."""

    kind = "transformers"

    def __init__(self, model: Any, *, registry: Any = None, device: str | None = "cpu", dtype: str = "float32"):
        from llmops_jupyter.models.inference import load_model

        self.ref = model
        self.net, self.tokenizer = load_model(model, registry=registry, device=device, dtype=dtype)
        self.label = f"{getattr(model, 'kind', 'model')} {getattr(model, 'name', model)} (transformers)"
        eos = self.net.generation_config.eos_token_id if self.net.generation_config is not None else None
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.eos = {int(e) for e in [*eos_ids, self.tokenizer.eos_token_id] if e is not None}

    def render(self, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        from llmops_jupyter.models.inference import apply_chat

        text = apply_chat(self.tokenizer, messages)
        return text, list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def greedy(self, ids: list[int], n: int) -> list[int]:
        import torch

        device = next(self.net.parameters()).device
        inp = torch.tensor([ids], device=device)
        with torch.inference_mode():
            out = self.net.generate(input_ids=inp, attention_mask=torch.ones_like(inp), max_new_tokens=n,
                                    do_sample=False, eos_token_id=sorted(self.eos) or None,
                                    pad_token_id=self.tokenizer.pad_token_id or 0)
        new = out[0, len(ids):].tolist()
        return _cut(new, self.eos)

    def logits(self, ids: list[int]) -> Any:
        import torch

        device = next(self.net.parameters()).device
        with torch.inference_mode():
            return self.net(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu().numpy()

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def close(self) -> None:
        del self.net


class GGUFSide:
    """A GGUF file in llama.cpp (``llama-cpp-python``), with the chat template stored in the file, rendered the
    way ``Llama.create_chat_completion`` renders it."""

    kind = "llama.cpp"

    def __init__(self, path: Path, *, n_ctx: int = 2048, label: str | None = None):
        from llmops_jupyter.stages.export.convert import read_metadata

        self.path = Path(path)
        self.meta = read_metadata(self.path)
        ctx_len = int(self.meta.get(f"{self.meta.get('general.architecture', 'llama')}.context_length", n_ctx))
        self.llm = load_llama(self.path, n_ctx=min(n_ctx, ctx_len), logits_all=True)
        self.label = label or f"gguf {self.path.name} (llama.cpp)"
        self.template = self.meta.get("tokenizer.chat_template")
        self.eos_id = self.llm.token_eos()
        self.bos_text = self._piece(self.llm.token_bos())
        self.eos_text = self._piece(self.eos_id)
        self.eos = {self.eos_id} | self._eog()

    def _piece(self, tok: int) -> str:
        if tok is None or tok < 0:
            return ""
        return self.llm.detokenize([tok], special=True).decode("utf-8", errors="replace")

    def _eog(self) -> set[int]:
        import llama_cpp

        fn = getattr(llama_cpp, "llama_vocab_is_eog", None)
        vocab = getattr(getattr(self.llm, "_model", None), "vocab", None)
        if fn is None or vocab is None:
            return set()
        eot = getattr(llama_cpp, "llama_vocab_eot", None)
        cands = {self.eos_id}
        if eot is not None:
            cands.add(int(eot(vocab)))
        return {t for t in cands if t >= 0 and fn(vocab, t)}

    def render(self, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        if self.template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            fmt = Jinja2ChatFormatter(template=self.template, eos_token=self.eos_text, bos_token=self.bos_text)
            res = fmt(messages=messages)
            text, added = res.prompt, bool(getattr(res, "added_special", False))
        else:
            from llmops_jupyter.stages.data.format import render

            text, added = render([*messages, {"role": "assistant", "content": ""}], None)["prompt"], False
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=not added, special=True)
        return text, list(ids)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        for _ in range(n):
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if tok in self.eos:
                break
            out.append(tok)
            self.llm.eval([tok])
        return out

    def logits(self, ids: list[int]) -> Any:
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def close(self) -> None:
        self.llm.close() if hasattr(self.llm, "close") else None


_LOAD_LOCK = threading.Lock()


def load_llama(path: Path, **kwargs: Any) -> Any:
    """``llama_cpp.Llama`` for a GGUF file, loaded without llama.cpp's CPU "extra buffer types" (weight repacking,
    AMX): with them, llama-cpp-python 0.3.36 segfaults on the first decode of q8_0/q4 files on AVX-512+AMX CPUs
    (checked here: f16 runs, q8_0 and q4_k_m crash; with ``use_extra_bufts=False`` all three run).
    ``LLMOPS_LLAMA_EXTRA_BUFTS=1`` keeps them. ``Llama`` has no argument for it, so its default-params factory is
    wrapped for the duration of the load."""
    import os

    import llama_cpp.llama as llama_mod

    from llmops_jupyter.stages.export.convert import llama_cpp_lib

    llama_cpp = llama_cpp_lib()
    kwargs.setdefault("verbose", False)
    kwargs.setdefault("n_threads", _threads())
    if os.environ.get("LLMOPS_LLAMA_EXTRA_BUFTS") == "1":
        return llama_mod.Llama(model_path=str(path), **kwargs)
    orig = llama_cpp.llama_model_default_params

    def defaults() -> Any:
        params = orig()
        params.use_extra_bufts = False
        return params

    with _LOAD_LOCK:
        llama_mod.llama_cpp.llama_model_default_params = defaults
        try:
            return llama_mod.Llama(model_path=str(path), **kwargs)
        finally:
            llama_mod.llama_cpp.llama_model_default_params = orig


def _threads() -> int:
    import os

    return max(1, min(8, os.cpu_count() or 2))


def _cut(ids: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


@dataclasses.dataclass
class ParityReport:
    a: str
    b: str
    prompts: int
    n_tokens: int
    prompt_identity: float
    next_token_agreement: float | None  # None: no prompt rendered identically, nothing to teacher-force
    free_running_agreement: float
    exact_match: float
    max_logit_diff: float | None
    min_agreement: float
    examples: list[dict[str, Any]]
    reason: str | None = None  # one line when the gate fails

    @property
    def passed(self) -> bool:
        return self.reason is None

    def metrics(self) -> dict[str, float]:
        out = {"parity_prompt_identity": self.prompt_identity, "parity_free_running_agreement": self.free_running_agreement,
               "parity_exact_match": self.exact_match, "parity_passed": float(self.passed)}
        if self.next_token_agreement is not None:
            out["parity_next_token_agreement"] = self.next_token_agreement
        if self.max_logit_diff is not None:
            out["parity_max_logit_diff"] = self.max_logit_diff
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "passed": self.passed}

    def table(self, title: str | None = None) -> Any:
        from llmops_jupyter.core.display import Table

        mark = "✓" if self.passed else "✗"
        nta = "n/a" if self.next_token_agreement is None else f"{self.next_token_agreement:.3f}"
        rows = [["A", self.a], ["B", self.b],
                ["rendered prompts identical", f"{self.prompt_identity:.0%} of {self.prompts}"],
                [f"next-token agreement (A's first {self.n_tokens}, teacher-forced)",
                 f"{nta} (min {self.min_agreement})"],
                [f"free-running agreement (first {self.n_tokens})", f"{self.free_running_agreement:.3f}"],
                ["exact-match answers", f"{self.exact_match:.0%}"],
                ["max |Δlogit| (same tokens)", "n/a" if self.max_logit_diff is None else f"{self.max_logit_diff:.3g}"],
                ["gate", f"{mark} {'passed' if self.passed else self.reason}"]]
        return Table(["parity", "value"], rows, title=title or "Deploy parity")


def _agreement(a: list[int], b: list[int], n: int) -> float:
    a, b = a[:n], b[:n]
    width = max(len(a), len(b))
    if width == 0:
        return 1.0
    return sum(1 for x, y in zip(a, b) if x == y) / width


def _first_diff(x: str, y: str) -> int:
    for i, (p, q) in enumerate(zip(x, y)):
        if p != q:
            return i
    return min(len(x), len(y))


def _teacher_forced(a: Any, b: Any, prompt: list[int], answer: list[int], n: int) -> tuple[int, int, float]:
    """Feed ``prompt + answer`` (A's greedy answer) to both sides; over the positions that predict the first ``n``
    answer tokens — and A's stop, when A stopped within ``n`` — count where B's top-1 token agrees with A's.
    Returns (agreeing positions, positions, max |Δlogit| over the whole sequence)."""
    import numpy as np

    seq = prompt + answer[:n]
    la, lb = a.logits(seq), b.logits(seq)
    width = min(la.shape[-1], lb.shape[-1])
    la, lb = la[:, :width], lb[:, :width]
    positions = range(len(prompt) - 1, len(seq) if len(answer) < n else len(seq) - 1)
    agree = 0
    for pos in positions:
        ta, tb = int(np.argmax(la[pos])), int(np.argmax(lb[pos]))
        if pos == len(prompt) - 1 + len(answer):  # A stopped here: B must pick a token it stops on
            agree += tb in b.eos
        else:
            agree += ta == tb
    return agree, len(positions), float(np.abs(la - lb).max())


def compare(a: Any, b: Any, conversations: list[list[dict[str, str]]], *, n_tokens: int = 16,
            min_agreement: float = 0.9, template_name: str = "chat template") -> ParityReport:
    """Run every conversation through both sides and build the report (see module docstring)."""
    same_prompt = agree = exact = 0.0
    forced_ok = forced_n = 0
    max_diff: float | None = None
    examples: list[dict[str, Any]] = []
    first_bad: tuple[str, str] | None = None
    for conv in conversations:
        ta, ia = a.render(conv)
        tb, ib = b.render(conv)
        same = ta == tb and ia == ib
        same_prompt += same
        if not same and first_bad is None:
            first_bad = (ta, tb)
        ga, gb = a.greedy(ia, n_tokens), b.greedy(ib, n_tokens)
        ag = _agreement(ga, gb, n_tokens)
        agree += ag
        da, db = a.decode(ga), b.decode(gb)
        exact += da == db
        example = {"prompt": conv[-1]["content"][:200], "prompt_identical": same, "a": da, "b": db,
                   "free_running_agreement": ag}
        if same:
            ok, total, d = _teacher_forced(a, b, ia, ga, n_tokens)
            forced_ok, forced_n = forced_ok + ok, forced_n + total
            max_diff = d if max_diff is None else max(max_diff, d)
            example["next_token_agreement"] = ok / max(total, 1)
        examples.append(example)
    n = max(len(conversations), 1)
    nta = forced_ok / forced_n if forced_n else None
    report = ParityReport(a.label, b.label, len(conversations), n_tokens, same_prompt / n, nta, agree / n,
                          exact / n, max_diff, min_agreement, examples)
    if first_bad is not None:
        ta, tb = first_bad
        i = _first_diff(ta, tb)
        report.reason = (f"{template_name} not carried: {len(conversations) - int(same_prompt)}/{len(conversations)} "
                         f"rendered prompts differ (first at char {i}: {ta[i:i + 24]!r} vs {tb[i:i + 24]!r})")
    elif nta is not None and nta < min_agreement:
        report.reason = (f"next-token agreement {nta:.3f} < --parity-min {min_agreement} over {forced_n} answer "
                         f"positions of {len(conversations)} prompts (teacher-forced on A's greedy answers)")
    return report


def open_side(model: Any, registry: Any) -> Any:
    """A side for a resolved model: a ``gguf`` artifact (or ``.gguf`` file) → llama.cpp, anything else → transformers."""
    path = Path(getattr(model, "path", model))
    if getattr(model, "kind", None) == "gguf" or path.suffix == ".gguf":
        from llmops_jupyter.core.extras import check

        check(["gguf"], feature="parity of a GGUF model")
        return GGUFSide(gguf_file(path), label=f"gguf {getattr(model, 'name', path.name)} (llama.cpp)")
    return HFSide(model, registry=registry)


def gguf_file(path: Path) -> Path:
    """The ``.gguf`` inside a gguf artifact folder (or the file itself)."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted(path.glob("*.gguf"))
    if not found:
        from llmops_jupyter.core.errors import NotFoundError

        raise NotFoundError(f"No .gguf file in {path}.")
    return found[0]

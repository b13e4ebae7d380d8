"""HF checkpoint → one ``.gguf`` file, with llama.cpp's own converter and quantizer (never hand-written format code).

Why the converter from the ``llama-cpp-python`` source distribution: llama.cpp's ``convert_hf_to_gguf.py`` is the
reference (tensor-name maps, tokenizer and chat-template metadata, special tokens, pre-tokenizer detection) and it
is versioned with the llama.cpp that will load the file. It is not in the built wheel, so it is taken from the sdist
of the *installed* ``llama-cpp-python`` version (fetched once with ``pip download``, ordinary package index, into
``~/.cache/llmops-jupyter/llama.cpp/<version>``) and run in a subprocess with the sdist's own ``gguf-py`` (the
converter and its writer move together). ``$LLMOPS_LLAMA_CPP_DIR`` points at a llama.cpp checkout instead.

f16/bf16/f32/q8_0 are written by the converter; q4_0 and the k-quants by llama.cpp's quantizer
(``llama_model_quantize`` through ``llama-cpp-python``) from an f16 file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from llmops_jupyter.core.errors import StageError

#: the llama-cpp-python release whose converter is used when llama_cpp itself is not importable (tests of the
#: converter alone); otherwise the installed version's.
DEFAULT_LLAMA_CPP_PYTHON = "0.3.36"
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
#: quant name → llama.cpp ``LLAMA_FTYPE_MOSTLY_*`` constant name
QUANTIZER_TYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
                   "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                   "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
QUANTS = ("f16", "q8_0", "q4_0", "q4_k_m", "bf16", "f32", "q4_1", "q5_k_m", "q6_k")


def llama_cpp_python_version() -> str:
    try:
        from importlib.metadata import version

        return version("llama-cpp-python")
    except Exception:  # noqa: BLE001 - not installed: the converter alone still works
        return DEFAULT_LLAMA_CPP_PYTHON


def _cache_root() -> Path:
    return Path(os.environ.get("LLMOPS_LLAMA_CPP_CACHE") or Path.home() / ".cache" / "llmops-jupyter" / "llama.cpp")


def find_converter() -> Path:
    """The llama.cpp folder holding ``convert_hf_to_gguf.py``, ``conversion/`` and ``gguf-py/`` (fetched once)."""
    env = os.environ.get("LLMOPS_LLAMA_CPP_DIR")
    if env:
        path = Path(env).expanduser()
        if not (path / "convert_hf_to_gguf.py").exists():
            raise StageError(f"gguf: $LLMOPS_LLAMA_CPP_DIR={env} has no convert_hf_to_gguf.py.",
                             fix="point it at a llama.cpp checkout, or unset it to use llama-cpp-python's sdist")
        return path
    version = llama_cpp_python_version()
    target = _cache_root() / version
    if (target / "convert_hf_to_gguf.py").exists():
        return target
    with tempfile.TemporaryDirectory(prefix="llmops-llama-sdist-") as tmp:
        sdist = _local_sdist(version) or _download_sdist(version, Path(tmp))
        _extract_converter(sdist, target)
    return target


def _local_sdist(version: str) -> Path | None:
    """A sdist already on this machine (``$LLMOPS_LLAMA_CPP_SDIST`` or ``build/sdist`` of a source checkout)."""
    name = f"llama_cpp_python-{version}.tar.gz"
    for cand in (os.environ.get("LLMOPS_LLAMA_CPP_SDIST"), Path.cwd() / "build" / "sdist" / name):
        if cand and Path(cand).is_file() and Path(cand).name == name:
            return Path(cand)
    return None


def _download_sdist(version: str, dest: Path) -> Path:
    spec = f"llama-cpp-python=={version}"
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           spec, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if not found:  # pip may fail at "preparing metadata" after saving the file; only the file matters
        raise StageError(f"gguf: could not fetch the {spec} source distribution (it ships llama.cpp's converter): "
                         f"{proc.stderr.strip().splitlines()[-1:] or proc.returncode}",
                         fix=f"pip download --no-deps --no-binary :all: {spec}, then set LLMOPS_LLAMA_CPP_SDIST to "
                             "the .tar.gz (or LLMOPS_LLAMA_CPP_DIR to a llama.cpp checkout)")
    return found[-1]


def _extract_converter(sdist: Path, target: Path) -> None:
    """Unpack only the converter, its ``conversion`` package and ``gguf-py`` (≈ 3 MB of the 77 MB sdist)."""
    keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tf:
        members = []
        for m in tf.getmembers():
            parts = m.name.split("/vendor/llama.cpp/", 1)
            if len(parts) == 2 and parts[1].startswith(keep) and (m.isfile() or m.isdir()):
                m.name = parts[1]
                members.append(m)
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python < 3.10.12 has no filters
        tf.extractall(tmp, members=members, **safe)
    if not (tmp / "convert_hf_to_gguf.py").exists():
        raise StageError(f"gguf: {sdist.name} does not contain vendor/llama.cpp/convert_hf_to_gguf.py.")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)


def convert(model_dir: Path, out_file: Path, *, outtype: str = "f16", log_file: Path | None = None) -> Path:
    """Run llama.cpp's converter on a transformers checkpoint; raise a one-line :class:`StageError` on failure."""
    if outtype not in CONVERTER_TYPES:
        raise StageError(f"gguf: the converter writes {', '.join(CONVERTER_TYPES)}, not {outtype}")
    conv = find_converter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(conv / "gguf-py"), str(conv)]), "NO_LOCAL_GGUF": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out_file),
           "--outtype", outtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if log_file is not None:
        with open(log_file, "a") as fh:
            fh.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0 or not out_file.exists():
        raise StageError(f"gguf: llama.cpp's converter failed: {_last_error(proc.stderr)}",
                         fix=_converter_fix(proc.stderr))
    return out_file


def _last_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln or ln.startswith(("raise", "NotImplementedError")):
            return ln[:300]
    return (lines[-1] if lines else "no output")[:300]


def _converter_fix(stderr: str) -> str:
    if "pre-tokenizer was not recognized" in stderr:
        return ("llama.cpp identifies BPE pre-tokenizers by hash and does not know this tokenizer; export a model "
                "whose tokenizer llama.cpp supports (e.g. a SmolLM2, Llama, Qwen or Mistral fine-tune)")
    if "sentencepiece" in stderr or "No module named" in stderr:
        return "pip install 'llmops-jupyter[gguf]'"
    return "see the run's log (run.log) for the converter's full output"


_LOG_CALLBACK: Any = None


def llama_cpp_lib() -> Any:
    """``llama_cpp``, with llama.cpp's own log lines routed into Python ``logging`` (logger ``llama_cpp.native``).

    llama-cpp-python's default callback prints them to stderr until a ``Llama`` is created quiet, so the quantizer's
    per-tensor fallback warnings (180 lines for SmolLM2 at q4_k_m) would fill the cell. As log records they go where
    every other library's output goes during a stage: the run's ``run.log`` (shown with ``--verbose``)."""
    global _LOG_CALLBACK
    import llama_cpp

    if _LOG_CALLBACK is None:
        import ctypes
        import logging

        log = logging.getLogger("llama_cpp.native")
        levels = {0: logging.CRITICAL, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR, 4: logging.DEBUG}
        state = {"level": logging.INFO, "buf": ""}

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: Any) -> None:
            if level != 5:  # 5: continues the previous record
                state["level"] = levels.get(level, logging.INFO)
            state["buf"] += (text or b"").decode("utf-8", errors="replace")
            while "\n" in state["buf"]:
                line, state["buf"] = state["buf"].split("\n", 1)
                if line.strip():
                    log.log(state["level"], line)

        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        _LOG_CALLBACK = callback  # ctypes keeps no reference: the callback must outlive every llama.cpp call
    return llama_cpp


def quantize(src: Path, dst: Path, quant: str) -> Path:
    """Quantize an f16 GGUF with llama.cpp's quantizer (k-quants pick per-tensor types, imatrix-free)."""
    import ctypes

    llama_cpp = llama_cpp_lib()
    ftype = getattr(llama_cpp, QUANTIZER_TYPES[quant])
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = max(1, (os.cpu_count() or 2))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.exists():
        raise StageError(f"gguf: llama.cpp's quantizer failed for {quant} (return code {rc}).")
    return dst


def read_metadata(path: Path) -> dict[str, Any]:
    """Key facts of a GGUF file, read with the ``gguf`` package: architecture, file type, tokenizer model,
    chat template, special-token ids, vocabulary size, tensor count."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out: dict[str, Any] = {"tensors": len(reader.tensors)}
    for key, fld in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "token_type", "scores")):
            if key.endswith(".tokens"):
                out["vocab_size"] = len(fld.data)
            continue
        try:
            value = fld.contents()
        except Exception:  # noqa: BLE001 - an odd field type: skip it
            continue
        if isinstance(value, (str, int, float, bool)):
            out[key] = value
    return out


def token_text(path: Path, ids: list[int]) -> list[str]:
    """The vocabulary strings of ``ids`` in a GGUF file (for naming special tokens in a report)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fld = reader.fields["tokenizer.ggml.tokens"]
    return [str(bytes(fld.parts[fld.data[i]]), "utf-8", errors="replace") for i in ids]

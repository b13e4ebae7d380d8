"""``%llmops gguf`` (also ``%llmops export --to gguf``) and ``%llmops parity``.

``gguf`` turns a merged (or base) model version into one ``.gguf`` file — weights, tokenizer, chat template and
special tokens — with llama.cpp's converter (and its quantizer for 4-bit/k-quants), writes an Ollama ``Modelfile``
beside it, and runs the **deploy-parity gate** before anything is stored: the same held-out conversations through
the registry model in transformers and through the file in llama.cpp (see :mod:`.parity`). Below ``--parity-min``
(or with a chat template that renders differently) the run fails with one line and no artifact is stored. A passing
file is stored as a ``gguf`` artifact (folder: the ``.gguf``, ``Modelfile``, ``parity.json``) with lineage
``merged → gguf``; ``%llmops serve --model <gguf run>`` serves it through llama.cpp behind the same API.

``parity --model A --model B`` prints the same report for any two deployable versions (adapter, merged, GPTQ, GGUF).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.display import Bundle, Table
from llmops_jupyter.core.errors import ConfigError, GateError, LlmopsError
from llmops_jupyter.core.stage import CommandEnv, Stage, command, register_stage
from llmops_jupyter.stages.export.convert import QUANTS

if TYPE_CHECKING:
    from llmops_jupyter.core.runner import RunContext
    from llmops_jupyter.models.refs import ModelRef


@dataclasses.dataclass
class GGUFConfig(StageConfig):
    model: str = option(help="model version to export: a merge run, merged/base artifact, checkpoint folder or "
                             "provider (adapters: merge them first)")
    quant: str = option("q8_0", "GGUF tensor type: f16/bf16/f32/q8_0 (llama.cpp's converter) or q4_0/q4_k_m/... "
                                "(llama.cpp's quantizer, from an f16 conversion)", choices=QUANTS)
    parity: bool = option(True, "deploy-parity gate: compare the GGUF in llama.cpp with the model in transformers "
                                "on held-out prompts before storing it")
    parity_min: float | None = option(None, "least next-token agreement (teacher-forced over the first "
                                            "--parity-tokens tokens of the model's greedy answers) the gate accepts "
                                            "(default by quant: 0.98 f16, 0.9 q8_0, 0.7 q4_k_m, 0.6 q4_0)",
                                      min=0, max=1)
    parity_tokens: int = option(16, "generated tokens compared per prompt", min=1, max=512)
    parity_samples: int = option(8, "held-out prompts the gate uses", min=1, max=1000)
    data: str | None = option(None, "dataset whose held-out (eval) split gives the parity prompts (default: the "
                                    "model's upstream dataset's eval split; without one, the built-in probes, "
                                    "said in the run log); a --data without an eval split is refused")
    chat_template: str | None = option(None, "chat template to write into the GGUF instead of the model's own: a "
                                             "value containing '{{' or '{%' is the Jinja text itself, anything "
                                             "else a path to a template file (which must exist); the gate checks "
                                             "it against the model's")
    name: str | None = option(None, "artifact name (default: <model name>-<quant>)")

    def validate(self) -> None:
        if self.quant not in QUANTS:  # pragma: no cover - choices already checked
            raise self.invalid("quant", f"must be one of {', '.join(QUANTS)}")
        if self.chat_template and not is_inline_template(self.chat_template):
            path = Path(self.chat_template).expanduser()
            if not path.is_file():
                raise self.invalid("chat_template", f"is neither Jinja text (no '{{{{' or '{{%') nor an existing "
                                   f"file: {path} not found",
                                   fix="give the path of a template file, or the template text itself")


def is_inline_template(value: str) -> bool:
    """``--chat-template`` is Jinja text when it contains a Jinja tag (every chat template does), else a path."""
    return "{{" in value or "{%" in value


@register_stage
class GGUFStage(Stage):
    """Export a model version to one GGUF file (llama.cpp / Ollama, with Modelfile) behind a deploy-parity gate."""

    name = "gguf"
    extras = ("gguf",)
    config_cls = GGUFConfig
    key_metrics = ("parity_next_token_agreement", "parity_exact_match", "parity_max_logit_diff")

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from llmops_jupyter.models.refs import FULL_WEIGHT_KINDS, use_model
        from llmops_jupyter.stages.export import convert, modelfile, parity

        cfg: GGUFConfig = ctx.config
        m = use_model(ctx, cfg.model)
        if m.kind not in FULL_WEIGHT_KINDS:
            fix = (f"%llmops merge --adapter {cfg.model}" if m.kind == "adapter"
                   else "export the merged model the quantized one was made from")
            raise ConfigError(f"gguf: '{cfg.model}' is a {m.kind} model; GGUF export needs a full-precision merged "
                              "or base checkpoint.", field="model", value=cfg.model, fix=fix)
        t0 = time.perf_counter()
        staging = ctx.staging_dir("gguf")
        work = ctx.staging_dir("gguf-work")
        source = _source_dir(m.path, work, cfg.chat_template)
        name = cfg.name or f"{m.name}-{cfg.quant}"
        fname = f"{_safe(name)}.gguf"
        out = staging / fname
        steps = 4 + cfg.parity
        ctx.progress(0, steps, "converting")
        log = work / "convert.log"
        if cfg.quant in convert.CONVERTER_TYPES:
            convert.convert(source, out, outtype=cfg.quant, log_file=log)
        else:
            f16 = convert.convert(source, work / "f16.gguf", outtype="f16", log_file=log)
            ctx.progress(1, steps, f"quantizing {cfg.quant}")
            convert.quantize(f16, out, cfg.quant)
            f16.unlink()
        ctx.log(f"converted with llama.cpp's convert_hf_to_gguf.py ({convert.find_converter()})")
        convert_seconds = time.perf_counter() - t0
        meta = convert.read_metadata(out)
        ctx.progress(2, steps, "Modelfile")
        mf = _modelfile(out, meta, m.path)
        modelfile.write_modelfile(staging, mf)
        for w in mf.warnings:
            ctx.log(f"warning: {w}")

        report = None
        if cfg.parity:
            ctx.progress(3, steps, "parity gate")
            convs = conversations(ctx.registry, m, cfg.data, cfg.parity_samples, ctx=ctx)
            min_agree = cfg.parity_min if cfg.parity_min is not None else parity.DEFAULT_MIN.get(cfg.quant, 0.9)
            hf = parity.HFSide(m, registry=ctx.registry)
            gg = parity.GGUFSide(out, label=f"gguf {name} (llama.cpp)")
            try:
                report = parity.compare(hf, gg, convs, n_tokens=cfg.parity_tokens, min_agreement=min_agree,
                                        template_name="chat template (tokenizer.chat_template)")
            finally:
                gg.close()
                hf.close()
            ctx.log_metrics(report.metrics())
            (staging / "parity.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
            if not report.passed:
                raise GateError(f"gguf: parity gate failed: {report.reason}; nothing was stored.",
                                failures=[report.reason],
                                fix="fix the model's chat template / special tokens (or --chat-template), pick a "
                                    "higher-precision --quant, or lower --parity-min")
        ctx.progress(steps - 1, steps, "storing")
        size = out.stat().st_size
        specials = _special_tokens(out, meta)  # read before the folder moves into the store
        art = ctx.save_artifact(staging, "gguf", name=name, inputs=[m.artifact] if m.artifact else None, meta={
            "quant": cfg.quant, "file": fname, "source": m.artifact.hash if m.artifact else str(m.path),
            "architecture": meta.get("general.architecture"), "size_bytes": size,
            "chat_template": bool(meta.get("tokenizer.chat_template")), "modelfile_family": mf.family,
            "parity": report.metrics() if report else None,
            "converter": f"llama.cpp convert_hf_to_gguf.py (llama-cpp-python {convert.llama_cpp_python_version()})"})
        ctx.progress(steps, steps, "done")
        ctx.set_summary(gguf=art.hash, quant=cfg.quant, size_bytes=size, convert_seconds=convert_seconds,
                        template_family=mf.family, parity=report.passed if report else None)
        rows = [["file", f"{fname} ({size / 1e6:.1f} MB, {cfg.quant})"],
                ["chat template", "carried" if meta.get("tokenizer.chat_template") else "none"],
                ["special tokens", specials],
                ["Modelfile", f"TEMPLATE {mf.family or '— (none)'}; stops {', '.join(mf.stops) or '—'}"],
                ["artifact", f"gguf {art.short}"],
                ["serve", f"%llmops serve --model {art.short}"],
                ["ollama", f"cd {art.path} && ollama create {_safe(name)} -f Modelfile"]]
        summary = Table(["export", "value"], rows, title=f"GGUF export of {m.name}")
        parts = [summary, report.table() if report else None]
        return {"report": Bundle(*parts), "artifact": art, "parity": report.to_dict() if report else None}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.") or "model"


def _source_dir(path: Path, work: Path, chat_template: str | None) -> Path:
    """The checkpoint to convert: the model folder, or a linked copy with ``--chat-template`` written into it."""
    if not chat_template:
        return path
    text = chat_template if is_inline_template(chat_template) else Path(chat_template).expanduser().read_text()
    src = work / "source"
    src.mkdir()
    for f in path.iterdir():
        if f.name in ("chat_template.jinja", "chat_template.json"):
            continue
        if f.name == "tokenizer_config.json":
            cfg = json.loads(f.read_text())
            cfg.pop("chat_template", None)
            (src / f.name).write_text(json.dumps(cfg))
        else:
            (src / f.name).symlink_to(f.resolve())
    (src / "chat_template.jinja").write_text(text)
    return src


def _modelfile(out: Path, meta: dict[str, Any], model_path: Path) -> Any:
    from llmops_jupyter.stages.export import convert, modelfile

    ids = [meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")]
    bos, eos = [convert.token_text(out, [i])[0] if isinstance(i, int) else "" for i in ids]
    gen_path = model_path / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    arch = meta.get("general.architecture", "llama")
    return modelfile.build_modelfile(out.name, chat_template=meta.get("tokenizer.chat_template"), bos=bos, eos=eos,
                                     generation_config=gen, context_length=meta.get(f"{arch}.context_length"))


def _special_tokens(out: Path, meta: dict[str, Any]) -> str:
    from llmops_jupyter.stages.export import convert

    parts = []
    for key in ("bos", "eos", "padding"):
        tid = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(tid, int):
            parts.append(f"{key.replace('padding', 'pad')} {convert.token_text(out, [tid])[0]} ({tid})")
    return ", ".join(parts) or "none"


def conversations(registry: Any, model: ModelRef, data: str | None, n: int, *, ctx: Any = None
                  ) -> list[list[dict[str, str]]]:
    """Held-out conversations for the gate: the eval split of ``--data`` or of the model's upstream dataset (every
    turn but the last assistant one), else the built-in probes as single user messages. Training rows are never
    used: a ``--data`` without an eval split is refused; an upstream dataset without one falls back to the probes,
    said in the run log (``ctx``) or as a warning."""
    from llmops_jupyter.models import tools as mt

    dataset = mt.load_data(data, registry, mt.upstream_dataset(registry, model.artifact))
    convs: list[list[dict[str, str]]] = []
    if dataset is not None:
        rows = list(dataset.split("eval"))
        if not rows and data:
            raise ConfigError(f"--data '{data}' has no held-out (eval) split for the parity prompts.", field="data",
                              value=data, fix="make the dataset with an eval split (`%llmops data ... --eval-size "
                                              "N`), or leave --data out to use the built-in probes")
        if not rows:
            msg = (f"parity: the model's upstream dataset {dataset.version} has no held-out (eval) split; using "
                   "the built-in probes")
            if ctx is not None:
                ctx.log(msg)
            else:
                import warnings

                from llmops_jupyter.core.capture import LlmopsWarning

                warnings.warn(msg, LlmopsWarning, stacklevel=2)
        elif ctx is not None and dataset.artifact is not None:
            ctx.use(dataset.artifact)
        for r in rows:
            msgs = r.get("messages") or []
            if msgs and msgs[-1].get("role") == "assistant":
                msgs = msgs[:-1]
            if msgs:
                convs.append([{"role": x["role"], "content": x["content"]} for x in msgs])
            if len(convs) >= n:
                break
    if not convs:
        convs = [[{"role": "user", "content": p}] for p in mt.FIXED_PROBES[:n]]
    return convs


def resolve_deployable(ref: str, registry: Any) -> ModelRef:
    """Any deployable version: a ``gguf`` artifact/run/``.gguf`` file, else what :func:`resolve_model` resolves."""
    from llmops_jupyter.models.refs import resolve_model

    found = resolve_gguf(ref, registry)
    return found if found is not None else resolve_model(ref, registry)


def resolve_gguf(ref: str, registry: Any) -> ModelRef | None:
    """A ``gguf`` model reference for ``ref`` (gguf run, artifact hash/prefix, ``<run>:gguf`` or a ``.gguf``
    file), or ``None`` when ``ref`` is something else."""
    from llmops_jupyter.models.refs import ModelRef

    p = Path(str(ref)).expanduser()
    if p.suffix == ".gguf" and p.is_file():
        return ModelRef(str(ref), p, "gguf", registry.add_reference(p, "gguf", name=p.stem))
    for cand in (str(ref), f"{ref}:gguf"):
        try:
            art = registry.get_artifact(cand)
        except LlmopsError:
            continue
        if art.kind == "gguf":
            return ModelRef(str(ref), art.path, "gguf", art)
    return None


@dataclasses.dataclass
class ParityConfig(StageConfig):
    model: list[str] = option([], "the two model versions to compare (give --model twice): adapter, merged, GPTQ "
                                  "or gguf runs, artifact hashes, folders or .gguf files")
    data: str | None = option(None, "dataset whose held-out (eval) split gives the prompts (default: A's upstream "
                                    "dataset's eval split, else built-in probes); a --data without one is refused")
    samples: int = option(8, "prompts compared", min=1, max=1000)
    tokens: int = option(16, "generated tokens compared per prompt", min=1, max=512)
    min_agreement: float = option(0.9, "next-token agreement below which the report says the gate fails", min=0,
                                  max=1)
    check: bool = option(False, "raise (fail the cell / pipeline) when the gate fails")

    def validate(self) -> None:
        if len(self.model) != 2:
            raise self.invalid("model", "needs exactly two model versions", fix="pass --model A --model B")


def _parity_extras(cfg: ParityConfig) -> tuple[str, ...]:
    """[gguf] when a side names a gguf run or .gguf file (said before anything is touched); a gguf artifact given
    by hash is checked when its side opens (``parity.open_side``). Two transformers versions need [finetune] only."""
    refs = [cfg.model] if isinstance(cfg.model, str) else list(cfg.model or [])
    return ("gguf",) if any("gguf" in str(ref).lower() for ref in refs) else ("finetune",)


#: where ``parity`` (a command, not a run) writes other libraries' output, under ``<registry home>/logs``
PARITY_LOG = "parity.log"


@command("parity", ParityConfig, extras=_parity_extras)
def parity_command(cfg: ParityConfig, env: CommandEnv) -> Any:
    """Deploy-parity report of two model versions: rendered prompts, next-token agreement, exact match, max |Δlogit|."""
    from llmops_jupyter.core.capture import capture_output
    from llmops_jupyter.stages.export import parity

    # not a run: other libraries' output (weight-loading bars, warnings) goes to the registry's parity log
    with capture_output(Path(env.registry.home) / "logs" / PARITY_LOG):
        a_ref, b_ref = (resolve_deployable(r, env.registry) for r in cfg.model)
        convs = conversations(env.registry, a_ref, cfg.data, cfg.samples)
        a = parity.open_side(a_ref, env.registry)
        try:
            b = parity.open_side(b_ref, env.registry)
            try:
                report = parity.compare(a, b, convs, n_tokens=cfg.tokens, min_agreement=cfg.min_agreement)
            finally:
                b.close()
        finally:
            a.close()
    if cfg.check and not report.passed:
        raise GateError(f"parity: {report.reason}", failures=[report.reason])
    return report.table(title=f"Deploy parity: {cfg.model[0]} vs {cfg.model[1]}")

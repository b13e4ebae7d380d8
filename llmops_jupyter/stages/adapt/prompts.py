"""Versioned prompt templates: ``name@version`` references usable by eval, serve and pipelines.

A template has an optional system part and a user part, in Jinja (``{{ var }}``) or format style (``{var}``).
Each distinct content is one registry artifact (kind ``prompt``); versions are numbered per name in order of
creation, and identical content never makes a new version.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import string
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.errors import ConfigError, NotFoundError

if TYPE_CHECKING:
    from llmops_jupyter.registry import Registry

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclasses.dataclass
class PromptTemplate:
    name: str
    user: str
    system: str | None = None
    syntax: str = "format"  # "format" | "jinja"
    version: int | None = None
    hash: str | None = None

    @classmethod
    def parse(cls, name: str, body: str, syntax: str = "auto") -> PromptTemplate:
        """Cell body → template. ``system:`` / ``user:`` section headers split the parts; else all is ``user``."""
        if not _NAME.match(name or ""):
            raise ConfigError(f"Prompt name {name!r} is not valid.", field="name",
                              fix="use letters, digits, '.', '_' or '-' (e.g. support-answer)")
        text = body.strip("\n")
        parts: dict[str, list[str]] = {}
        current = None
        for line in text.splitlines():
            header = re.match(r"^(system|user)\s*:\s*(.*)$", line.strip(), re.I)
            if header and (current is None or not line.startswith((" ", "\t"))):
                current = header.group(1).lower()
                rest = header.group(2).strip()
                parts[current] = [header.group(2)] if rest and rest not in ("|", ">") else []
            elif current is not None:
                parts[current].append(line)
        if not parts:
            parts = {"user": text.splitlines()}
        user = "\n".join(parts.get("user", [])).strip()
        system = "\n".join(parts["system"]).strip() if "system" in parts else None
        if not user:
            raise ConfigError(f"Prompt '{name}' has no user part.", field="user",
                              fix="write the template in the cell, or a 'user:' section")
        if syntax == "auto":
            syntax = "jinja" if re.search(r"{{|{%", (system or "") + user) else "format"
        tmpl = cls(name=name, user=user, system=system, syntax=syntax)
        _ = tmpl.variables  # validates the syntax now, not at first use
        return tmpl

    @property
    def variables(self) -> list[str]:
        names: set[str] = set()
        for text in filter(None, (self.system, self.user)):
            if self.syntax == "jinja":
                import jinja2
                from jinja2 import meta

                try:
                    names |= meta.find_undeclared_variables(jinja2.Environment().parse(text))
                except jinja2.TemplateSyntaxError as exc:
                    raise ConfigError(f"Prompt '{self.name}': Jinja syntax error on line {exc.lineno}: {exc.message}.",
                                      field="template", fix="fix the template") from None
            else:
                try:
                    names |= {f for _, f, _, _ in string.Formatter().parse(text) if f}
                except ValueError as exc:
                    raise ConfigError(f"Prompt '{self.name}': {exc}.", field="template",
                                      fix="escape literal braces as {{ and }}") from None
        return sorted(n.split(".")[0].split("[")[0] for n in names)

    def render(self, **values: Any) -> list[dict[str, str]]:
        """Chat messages for the given variables; a missing variable is an error naming it."""
        missing = [v for v in self.variables if v not in values]
        if missing:
            raise ConfigError(f"Prompt '{self.ref}' needs variable(s) {', '.join(missing)}.", field=missing[0],
                              fix=f"provide {', '.join(missing)} (e.g. as dataset columns)")
        msgs = []
        for role, text in (("system", self.system), ("user", self.user)):
            if text:
                msgs.append({"role": role, "content": self._render(text, values)})
        return msgs

    def _render(self, text: str, values: dict[str, Any]) -> str:
        if self.syntax == "jinja":
            import jinja2

            return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(text).render(**values)
        return text.format(**values)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "system": self.system, "user": self.user, "syntax": self.syntax}

    def text(self) -> str:
        out = []
        if self.system:
            out.append("system:\n" + self.system)
        out.append("user:\n" + self.user)
        return "\n".join(out)


def parse_ref(ref: str) -> tuple[str, int | None]:
    name, _, ver = str(ref).partition("@")
    if not ver or ver == "latest":
        return name, None
    if not ver.isdigit():
        raise ConfigError(f"Prompt reference {ref!r} has a bad version.", field="prompt",
                          fix="write name@N (N = 1, 2, ...) or name@latest")
    return name, int(ver)


def get_prompt(ref: str, registry: Registry) -> PromptTemplate:
    name, version = parse_ref(ref)
    row = registry.prompt_version(name, version)
    if row is None:
        known = registry.prompt_names()
        raise NotFoundError(f"No prompt '{ref}' in the registry.",
                            fix=f"create it with %%llmops prompt {name}" + (f"; known: {', '.join(known)}"
                                                                             if known else ""))
    art = registry.get_artifact(row["hash"])
    data = json.loads((art.path / "prompt.json").read_text())
    return PromptTemplate(name=data["name"], user=data["user"], system=data.get("system"), syntax=data["syntax"],
                          version=row["version"], hash=row["hash"])


def versions(name: str, registry: Registry) -> list[dict[str, Any]]:
    return registry.prompt_versions(name)


def diff(old: PromptTemplate | None, new: PromptTemplate) -> str:
    before = old.text().splitlines() if old else []
    label = old.ref if old else "(none)"
    return "\n".join(difflib.unified_diff(before, new.text().splitlines(), label, new.ref, lineterm=""))


def record_version(registry: Registry, tmpl: PromptTemplate, artifact_hash: str, run_id: str | None) -> int:
    """Give ``artifact_hash`` the next version number of ``tmpl.name`` unless that content already has one."""
    return registry.add_prompt_version(tmpl.name, artifact_hash, run_id)

"""``registry``: where the records are, schema migrations, and copying a registry to PostgreSQL (verified)."""

from __future__ import annotations

import dataclasses

from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.display import Table
from llmops_jupyter.core.errors import ConfigError
from llmops_jupyter.core.stage import CommandEnv, command


@dataclasses.dataclass
class RegistryConfig(StageConfig):
    action: str = option("info", "info: backend, location, schema version and row counts; migrate: upgrade the "
                                 "schema (needed once for an older PostgreSQL registry); copy: every record to --to",
                         positional=True, choices=["info", "migrate", "copy"])
    to: str | None = option(None, "copy destination: a postgresql://user@host/db URL (an empty database), or "
                                  "'sqlite' for a SQLite registry in --to-home")
    to_home: str | None = option(None, "folder of the destination registry (artifacts, logs); default: this "
                                       "registry's home, whose artifact files then serve both")

    def validate(self) -> None:
        if self.action == "copy" and not self.to:
            raise ConfigError("registry copy needs a destination.", field="to", value=None,
                              fix="pass --to postgresql://user@host/dbname")
        if self.to and self.to != "sqlite" and not self.to.lower().startswith(("postgresql:", "postgres:")):
            raise ConfigError(f"--to '{self.to}' is not a destination registry copy can use.", field="to",
                              value=self.to, fix="pass --to postgresql://user@host/dbname, or --to sqlite --to-home DIR")
        if self.to == "sqlite" and not self.to_home:
            raise ConfigError("--to sqlite needs --to-home (the registry itself is SQLite in its home).",
                              field="to_home", value=None, fix="pass --to-home FOLDER")


def _extras(cfg: RegistryConfig) -> tuple[str, ...]:
    import os

    urls = [cfg.to or "", os.environ.get("LLMOPS_REGISTRY") or ""]
    return ("team",) if any(u.lower().startswith(("postgresql:", "postgres:")) for u in urls) else ()


@command("registry", RegistryConfig, extras=_extras)
def registry_command(cfg: RegistryConfig, env: CommandEnv) -> Table:
    """The registry itself: `info`, `migrate` (schema upgrade), `copy --to postgresql://...` (verified copy)."""
    from llmops_jupyter.registry import Registry, schema
    from llmops_jupyter.registry.transfer import copy_registry, row_counts

    reg = env.registry
    if cfg.action == "migrate":
        note = reg.migrate()
        return Table(["registry", "schema"], [[reg.location, note or f"already at version {schema.VERSION}"]],
                     title="registry migrate")
    if cfg.action == "info":
        version = reg.schema_version()
        rows = [["backend", reg.backend.name], ["database", reg.location], ["home", str(reg.home)],
                ["artifacts", reg.artifact_root], ["schema version", str(version)]]
        rows += [[f"rows: {t}", str(n)] for t, n in row_counts(reg).items() if n]
        return Table(["", ""], rows, title="registry")
    dest = Registry(cfg.to_home or reg.home, database="" if cfg.to == "sqlite" else cfg.to)
    report = copy_registry(reg, dest)
    rows = [[t, str(n), str(report["dest_counts"].get(t))] for t, n in report["counts"].items()]
    title = (f"registry copy {report['from']} → {report['to']}: row counts "
             f"{'equal' if report['equal'] else 'DIFFER'}; artifacts "
             + ("all re-hash to their ids" if not report["artifact_problems"]
                else f"with problems: {'; '.join(report['artifact_problems'])}"))
    if not report["equal"] or report["artifact_problems"]:
        from llmops_jupyter.core.errors import RegistryError

        raise RegistryError(title + ".", fix="check the destination database and the artifact files")
    return Table(["table", "rows", "copied"], rows, title=title)

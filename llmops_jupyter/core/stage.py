"""Stage and command registration: the explicit command catalog every front end reads.

Two kinds of command share one table:

* a **stage** (subclass of :class:`Stage`) is executed through the :class:`~llmops_jupyter.core.runner.Runner` and
  becomes a registry run (data, finetune, eval, merge, quantize, serve, ...);
* a **view** (a function registered with :func:`command`) reads or manages state and returns something to display
  (runs, show, lineage, models, ...). It is not recorded as a run.

Both declare a :class:`~llmops_jupyter.core.config.StageConfig` subclass, so the magics, the CLI, widget forms and
papermill parameters are generated from the same fields.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from llmops_jupyter.core.config import StageConfig
from llmops_jupyter.core.errors import UsageError

if TYPE_CHECKING:
    from llmops_jupyter.core.runner import RunContext, Runner
    from llmops_jupyter.registry import Registry


class Stage:
    """A lifecycle stage. Subclasses set ``name``, ``config_cls`` and implement :meth:`run`.

    ``run`` gets a :class:`RunContext` (``ctx.config`` is the validated config) and returns a dict of outputs for
    the front end (reports, figures, Python objects). It never parses strings or draws widgets.
    """

    name: ClassVar[str] = ""
    config_cls: ClassVar[type[StageConfig]] = StageConfig
    help: ClassVar[str] = ""
    #: ``"module:callable"`` of an optional live view the notebook front end attaches while the stage runs.
    live_view: ClassVar[str | None] = None
    #: metrics that ``%llmops runs`` shows first for this stage (``label/metric`` names match on the metric part).
    key_metrics: ClassVar[tuple[str, ...]] = ()
    #: optional extras the stage needs (``pip install 'llmops-jupyter[extra]'``); checked by the front door first
    extras: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def extras_for(cls, config: Any) -> tuple[str, ...]:
        """The extras a run with ``config`` needs: :attr:`extras`, plus what its options pull in (override)."""
        return cls.extras

    def run(self, ctx: RunContext) -> dict[str, Any] | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def interrupt_hint(self, ctx: RunContext) -> str:
        return ""


@dataclasses.dataclass
class CommandEnv:
    """What a view command gets besides its config."""

    registry: Registry
    runner: Runner
    shell: Any = None  # IPython shell when called from a notebook
    display: Callable[[Any], None] = print
    front_end: str = "python"  # "magic" | "cli" | "python"


@dataclasses.dataclass
class Command:
    name: str
    config_cls: type[StageConfig]
    help: str
    stage_cls: type[Stage] | None = None
    func: Callable[[Any, CommandEnv], Any] | None = None
    cli: bool = True  # offered by the `llmops` CLI too
    extras: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()  # of a view command (a stage declares its own)

    def required_extras(self, config: Any) -> tuple[str, ...]:
        """The optional extras this command needs for ``config`` (checked before anything runs)."""
        if self.stage_cls is not None:
            return tuple(self.stage_cls.extras_for(config))
        return tuple(self.extras(config) if callable(self.extras) else self.extras)

    @property
    def is_stage(self) -> bool:
        return self.stage_cls is not None


_COMMANDS: dict[str, Command] = {}
_DISCOVERED = False


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: make a stage available to every front end under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a name")
    cls.config_cls.command = cls.name
    doc = (cls.help or (cls.__doc__ or "")).strip()
    _COMMANDS[cls.name] = Command(cls.name, cls.config_cls, doc, stage_cls=cls)
    return cls


def command(name: str, config_cls: type[StageConfig], *, cli: bool = True,
            extras: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()):
    """Function decorator: register a view command ``func(config, env) -> displayable`` needing ``extras``."""

    def deco(func: Callable[[Any, CommandEnv], Any]):
        config_cls.command = name
        _COMMANDS[name] = Command(name, config_cls, (func.__doc__ or "").strip(), func=func, cli=cli, extras=extras)
        return func

    return deco


#: The command catalog: every module that registers a stage or a view, in one explicit list (as papermill's
#: engine registry). Each imports only the standard library and ``core`` at top level, so ``%llmops?`` stays cheap.
CATALOG: tuple[str, ...] = (
    "llmops_jupyter.stages.data.stage",
    "llmops_jupyter.stages.finetune.stage",
    "llmops_jupyter.stages.rl.stage",
    "llmops_jupyter.stages.eval.stage",
    "llmops_jupyter.stages.merge.stage",
    "llmops_jupyter.stages.quantize.stage",
    "llmops_jupyter.stages.prune.stage",
    "llmops_jupyter.stages.distill.stage",
    "llmops_jupyter.stages.explain.stage",
    "llmops_jupyter.stages.serve.stage",
    "llmops_jupyter.stages.export.stage",
    "llmops_jupyter.stages.monitor.stage",
    "llmops_jupyter.stages.report.stage",
    "llmops_jupyter.stages.adapt.index",
    "llmops_jupyter.stages.adapt.pairs",
    "llmops_jupyter.stages.adapt.prompt_commands",
    "llmops_jupyter.views.runs",
    "llmops_jupyter.views.models",
    "llmops_jupyter.views.diff",
    "llmops_jupyter.views.select",
    "llmops_jupyter.governance.commands",
    "llmops_jupyter.governance.registry_admin",
    "llmops_jupyter.pipelines.commands",
)


def discover() -> dict[str, Command]:
    """Import the catalog's modules once (each registers its commands) and return the command table."""
    global _DISCOVERED
    if not _DISCOVERED:
        for module in CATALOG:
            importlib.import_module(module)
        _DISCOVERED = True
    return dict(sorted(_COMMANDS.items()))


def get_command(name: str) -> Command:
    cmds = discover()
    if name not in cmds:
        import difflib

        close = difflib.get_close_matches(name, list(cmds), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UsageError(f"Unknown subcommand '{name}'.", field="subcommand", value=name,
                         fix=f"{hint}available: {', '.join(cmds)}")
    return cmds[name]


def get_stage(ref: str | type[Stage]) -> type[Stage]:
    if isinstance(ref, type):
        return ref
    cmd = get_command(ref)
    if cmd.stage_cls is None:
        raise UsageError(f"'{ref}' is a view command, not a stage.", fix="call it through %llmops or the CLI")
    return cmd.stage_cls

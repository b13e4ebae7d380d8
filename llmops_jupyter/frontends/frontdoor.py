"""The single execution path behind the magics, the CLI, widget forms and papermill parameter cells."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from llmops_jupyter.core.capture import verbosity
from llmops_jupyter.core.config import StageConfig
from llmops_jupyter.core.display import print_text
from llmops_jupyter.core.extras import check as check_extras
from llmops_jupyter.core.runner import Runner
from llmops_jupyter.core.stage import Command, CommandEnv, get_command
from llmops_jupyter.registry import Registry


def load_object(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def is_displayable(obj: Any) -> bool:
    return any(hasattr(obj, a) for a in ("_repr_html_", "_repr_mimebundle_", "_ipython_display_", "to_plotly_json"))


def execute(
    cmd: Command | str,
    config: StageConfig | dict[str, Any] | None = None,
    *,
    front_end: str = "python",
    shell: Any = None,
    display: Callable[[Any], None] = print_text,
    registry: Registry | None = None,
    live: bool = True,
    verbose: bool | None = None,
) -> Any:
    """Run one command: a stage through the Runner (recorded), or a view function. Returns its result.

    ``verbose=True`` (the front ends' ``--verbose``) also shows other libraries' logging and warnings, which are
    otherwise only written to the run's log file (see :mod:`llmops_jupyter.core.capture`); None: ``$LLMOPS_VERBOSE``.
    """
    with verbosity(verbose):
        return _execute(cmd, config, front_end=front_end, shell=shell, display=display, registry=registry, live=live)


def _execute(cmd: Command | str, config: StageConfig | dict[str, Any] | None, *, front_end: str, shell: Any,
             display: Callable[[Any], None], registry: Registry | None, live: bool) -> Any:
    cmd = get_command(cmd) if isinstance(cmd, str) else cmd
    if config is None or isinstance(config, dict):
        config = cmd.config_cls.from_dict(config or {})
    # Before any work and before the registry is touched: a missing extra is one line with the install command.
    check_extras(cmd.required_extras(config), feature=("llmops " if front_end == "cli" else "%llmops ") + cmd.name)
    registry = registry or Registry.open()
    runner = Runner(registry)
    env = CommandEnv(registry=registry, runner=runner, shell=shell, display=display, front_end=front_end)
    if not cmd.is_stage:
        return cmd.func(config, env)
    views = []
    if live:
        from llmops_jupyter.frontends.progress import ProgressView

        views.append(ProgressView(front_end=front_end, display=display))
        if cmd.stage_cls.live_view:
            views.append(load_object(cmd.stage_cls.live_view)(config=config, front_end=front_end, display=display))
    for view in views:
        runner.subscribe(view)
    try:
        result = runner.run(cmd.stage_cls(), config)
    finally:
        for view in views:
            close = getattr(view, "close", None)
            if close:
                close()
    for out in result.outputs.values():
        if is_displayable(out):
            display(out)
    return result

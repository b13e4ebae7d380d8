"""Append-only audit log: who ran what, when, from which notebook cell, reading and writing which artifacts.

One row per runner event (``started``, ``input``, ``artifact``, ``finished``, ``failed``, ``interrupted``) plus
rows that view commands add themselves (``card``, ``export``). The table and its append-only triggers live in
:mod:`llmops_jupyter.registry.audit`; this module decides what goes in a row and reads rows back for ``%llmops audit``.

A row keeps the cell's source, and cells hold secrets (``OPENAI_API_KEY = "sk-..."``, ``--hf-token``, a database
URL with its password). Rows cannot be edited once written, so every text field is scrubbed *before* it is stored:
:func:`scrub_secrets` replaces each secret with ``[SECRET]``, keeping the name it was assigned to, so the row still
says what was set, never to what.

Every Runner notifies :func:`listener` (one of :data:`~llmops_jupyter.core.runner.DEFAULT_LISTENERS`)
(the front door imports it). Top level: standard library and light ``llmops_jupyter`` modules only.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmops_jupyter.core.env import current_notebook, os_user, who
from llmops_jupyter.core.pii import scrub_secrets
from llmops_jupyter.core.runner import END_EVENTS, Event, EventType
from llmops_jupyter.core.timeparse import parse_when

if TYPE_CHECKING:
    from llmops_jupyter.registry import Registry

AUDITED = {
    EventType.STARTED, EventType.INPUT, EventType.ARTIFACT, EventType.FINISHED, EventType.FAILED,
    EventType.INTERRUPTED,
    EventType.DETACHED,
}
_COMMANDS: dict[str, tuple[str, str, str]] = {}  # run_id -> (front_end, command, source) from STARTED


def _scrub_value(value: Any) -> Any:
    """Scrub every string in a JSON-like value (audit ``detail``), keys included."""
    if isinstance(value, str):
        return scrub_secrets(value)
    if isinstance(value, dict):
        return {(scrub_secrets(k) if isinstance(k, str) else k): _scrub_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub_value(v) for v in value]
    return value


# -- who / where ------------------------------------------------------------------------------------------------
def kernel_cell() -> tuple[int | None, str | None, str | None]:
    """(execution count, Jupyter cell id, raw cell text) of the cell running now, when inside IPython."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None:
        return None, None, None
    count: int | None = None
    text: str | None = None
    hist = getattr(getattr(shell, "history_manager", None), "input_hist_raw", None)
    # IPython stores the cell's input and bumps execution_count *before* running it.
    if hist and len(hist) >= 2 and len(hist) - 1 == getattr(shell, "execution_count", 0) - 1:
        count, text = len(hist) - 1, hist[-1]
    cell_id = None
    try:
        parent = shell.kernel.get_parent() if hasattr(shell, "kernel") else getattr(shell, "parent_header", {})
        cell_id = ((parent or {}).get("metadata") or {}).get("cellId")
    except Exception:  # noqa: BLE001 - best effort: not every kernel has a parent message
        pass
    return count, cell_id, text


def _source_line(cell_text: str | None) -> tuple[str, str | None]:
    """(front end, what was typed): the %llmops line(s) of the cell, the CLI argv, or the Python cell."""
    if cell_text is not None:
        stripped = cell_text.strip()
        if stripped.startswith("%%llmops"):
            return "magic", stripped[:4000]
        lines = [ln.strip() for ln in stripped.splitlines() if re.search(r"(?:^|[\s=(])(?:%llmops|!llmops)\b", ln)]
        if lines:
            return "magic", "\n".join(lines)[:4000]
        return "python", stripped[:4000] or None
    argv = list(sys.argv or [])
    if argv and (Path(argv[0]).name == "llmops" or Path(argv[0]).as_posix().endswith("llmops_jupyter/cli.py")):
        return "cli", shlex.join(["llmops", *argv[1:]])
    return "python", shlex.join(argv)[:4000] if argv else None


def canonical_command(stage: str, params: dict[str, Any]) -> str:
    """``llmops <stage> --flag value ...`` with the non-default parameters: reproducible from the audit row alone."""
    defaults: dict[str, Any] = {}
    positional: list[str] = []
    try:
        import dataclasses

        from llmops_jupyter.core.stage import get_command

        for f in dataclasses.fields(get_command(stage).config_cls):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            if f.metadata.get("positional"):
                positional.append(f.name)
    except Exception:  # noqa: BLE001 - an unknown stage still gets a command line with every parameter
        pass
    parts = ["llmops", stage]
    for key in positional:
        value = params.get(key)
        if value is not None and not (key in defaults and _same(defaults[key], value)):
            parts.append(value if isinstance(value, str) else json.dumps(value, default=str))
    for key, value in params.items():
        if key in positional or (key in defaults and _same(defaults[key], value)):
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif value is False:
            parts.append("--no-" + key.replace("_", "-"))
        elif value is None:
            continue
        elif isinstance(value, (list, tuple)):
            parts += [flag, *[v if isinstance(v, str) else json.dumps(v) for v in value]]
        else:
            parts += [flag, value if isinstance(value, str) else json.dumps(value, default=str)]
    return shlex.join(parts)


def _same(default: Any, value: Any) -> bool:
    default = getattr(default, "value", default)
    return default == value


# -- writing ----------------------------------------------------------------------------------------------------
def record(
    registry: Registry,
    event: str,
    *,
    run_id: str | None = None,
    stage: str | None = None,
    artifact: str | None = None,
    kind: str | None = None,
    command: str | None = None,
    source: str | None = None,
    front_end: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one audit row (view commands such as ``card`` and ``export`` call this for what they write)."""
    count, cell_id, text = kernel_cell()
    if source is None or front_end is None:
        fe, typed = _source_line(text)
        front_end = front_end or fe
        source = source if source is not None else typed
    registry.add_audit(
        event, user=who(), os_user=os_user(), host=socket.gethostname(), pid=os.getpid(),
        notebook=current_notebook(), cell=count, cell_id=cell_id, front_end=front_end,
        command=scrub_secrets(command) if command else command, source=scrub_secrets(source) if source else source,
        run_id=run_id, stage=stage, artifact=artifact, kind=kind, detail=_scrub_value(detail or {}),
    )


def listener(event: Event) -> None:
    """Default Runner listener: one audit row per lifecycle, input and output event of every run."""
    if event.type not in AUDITED:
        return
    registry = event.registry
    if registry is None:
        return
    if event.type is EventType.STARTED:
        _, _, text = kernel_cell()
        fe, typed = _source_line(text)
        _COMMANDS[event.run_id] = (fe, canonical_command(event.stage, event.data.get("params") or {}), typed or "")
    fe, cmd, typed = _COMMANDS.get(event.run_id, (None, None, None))
    data = dict(event.data)
    if event.type is EventType.STARTED:
        data = {}  # the params are in the runs table and the command line
    record(
        registry, str(event.type), run_id=event.run_id, stage=event.stage, artifact=data.pop("hash", None),
        kind=data.pop("kind", None), command=cmd, source=typed, front_end=fe, detail=data,
    )
    if event.type in END_EVENTS:
        _COMMANDS.pop(event.run_id, None)




# -- reading ----------------------------------------------------------------------------------------------------
def entries(
    registry: Registry,
    *,
    run: str | None = None,
    user: str | None = None,
    since: str | float | None = None,
    event: str | None = None,
    limit: int | None = 200,
) -> list[dict[str, Any]]:
    """Audit rows, oldest first within the newest ``limit`` (``run`` is any run reference, ``since`` a duration/time)."""
    start = parse_when(since, field="since", command="audit") or 0.0
    run_id = registry.resolve_run(run) if run else None
    return registry.audit_rows(run_id=run_id, user=user, since=start, event=event, limit=limit)

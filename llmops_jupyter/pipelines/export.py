"""``%llmops pipeline export``: turn a working notebook into a pipeline notebook.

Literal arguments of ``%llmops <stage>`` lines become entries of a ``parameters`` cell (typed by the stage config
field they fill) and the magic lines refer to them as ``$name``, so papermill / ``llmops run -p`` can change them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import typing
from pathlib import Path
from typing import Any

from llmops_jupyter.core.config import field_type, flag_name, unwrap_optional
from llmops_jupyter.core.errors import ConfigError
from llmops_jupyter.core.files import atomic_write_text
from llmops_jupyter.pipelines.params import (
    _MAGIC,
    _available_configs,
    coerce,
    notebook_parameters,
    parameters_cell_index,
    parse_text,
    read_notebook,
)
from llmops_jupyter.registry import Artifact, Registry

_SAFE = re.compile(r"^[\w@%+=:,./$-]+$")


def _quote(tok: str) -> str:
    return tok if _SAFE.match(tok) else shlex.quote(tok)


@dataclasses.dataclass
class Lifted:
    name: str
    value: Any
    stage: str
    flag: str
    cell: int


def _lift_line(line: str, configs: dict, taken: dict[str, Any], lifted: list[Lifted], cell: int) -> str:
    m = _MAGIC.match(line)
    if not m:
        return line
    try:
        tokens = shlex.split(m.group(1))
    except ValueError:
        return line
    if not tokens or tokens[0] not in configs:
        return line
    stage, cfg = tokens[0], configs[tokens[0]]
    fields = {flag_name(f): f for f in dataclasses.fields(cfg)}
    fields.update({"--" + a.replace("_", "-"): f for f in dataclasses.fields(cfg) for a in f.metadata.get("aliases", ())})
    positional = [f for f in dataclasses.fields(cfg) if f.metadata.get("positional")]
    out = [tokens[0]]
    i = 1
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("-") and not _is_number(tok):
            flag, eq, inline = tok.partition("=")
            f = fields.get(flag)
            values = [inline] if eq else []
            j = i + 1
            if f is not None and not eq:
                tp = unwrap_optional(field_type(cfg, f))[0]
                many = typing.get_origin(tp) in (list, tuple, dict)
                while j < len(tokens) and not (tokens[j].startswith("-") and not _is_number(tokens[j])):
                    values.append(tokens[j])
                    j += 1
                    if not many:
                        break
            new = _lift(stage, cfg, f, values, taken, lifted, cell)
            out.append(flag_name(f) if f is not None else flag)  # an alias (--lora-r) is written as the one name
            out += new if new is not None else values
            i = j
            continue
        f = positional.pop(0) if positional else None
        new = _lift(stage, cfg, f, [tok], taken, lifted, cell)
        out += new if new is not None else [tok]
        i += 1
    prefix = line[: m.start(1)]
    return prefix + " ".join(_quote(t) for t in out)


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def _lift(stage: str, cfg: type, f: Any, values: list[str], taken: dict[str, Any], lifted: list[Lifted],
          cell: int) -> list[str] | None:
    """Replace literal values by ``$name`` and remember the typed value; None when not liftable."""
    if f is None or not values or any(v.startswith("$") for v in values) or f.metadata.get("secret"):
        return None
    tp = unwrap_optional(field_type(cfg, f))[0]
    if tp is bool:
        return None
    origin = typing.get_origin(tp)
    try:
        if origin in (list, tuple):
            elem = (typing.get_args(tp) or (str,))[0]
            items = [x.strip() for v in values for x in v.split(",") if x.strip()]
            value = [coerce(f.name, parse_text(x, elem), elem) for x in items]
        elif origin is dict:
            return None
        else:
            value = coerce(f.name, parse_text(values[0], tp if isinstance(tp, type) else str), tp)
    except ConfigError:
        return None
    name = f.name
    if name in taken and taken[name] != value:
        name = f"{stage}_{f.name}"
        if name in taken and taken[name] != value:
            return None
    taken[name] = value
    lifted.append(Lifted(name, value, stage, flag_name(f), cell))
    return [f"${name}"]


def export_notebook(source: str | os.PathLike, out: str | os.PathLike | None = None, *,
                    registry: Registry | None = None) -> tuple[Path, list[Lifted], Artifact | None]:
    """Write the pipeline notebook; returns its path, the lifted parameters and the registered artifact."""
    import nbformat

    src = Path(source).expanduser().resolve()
    nb = read_notebook(src)
    configs = _available_configs()
    declared = notebook_parameters(nb, src.name)
    taken: dict[str, Any] = {k: p.default for k, p in declared.items()}
    lifted: list[Lifted] = []
    for idx, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "parameters" in cell.get("metadata", {}).get("tags", []):
            continue
        lines = cell.source.split("\n")
        cell.source = "\n".join(_lift_line(line, configs, taken, lifted, idx) for line in lines)
    new_names = [lf for lf in lifted if lf.name not in declared]
    seen: set[str] = set()
    assigns = []
    for lf in new_names:
        if lf.name not in seen:
            seen.add(lf.name)
            assigns.append(f"{lf.name} = {lf.value!r}  # {lf.stage} {lf.flag}")
    pidx = parameters_cell_index(nb)
    if pidx >= 0:
        if assigns:
            nb.cells[pidx].source = nb.cells[pidx].source.rstrip("\n") + "\n" + "\n".join(assigns)
    else:
        cell = nbformat.v4.new_code_cell("# Parameters (papermill / `llmops run -p name value` override these)\n"
                                         + "\n".join(assigns))
        cell.metadata["tags"] = ["parameters"]
        pos = 0
        while pos < len(nb.cells) and nb.cells[pos].cell_type == "markdown":
            pos += 1
        nb.cells.insert(pos, cell)
    target = Path(out).expanduser() if out else src.with_name(f"{src.stem}.pipeline.ipynb")
    nb.metadata["llmops"] = {"exported_from": src.name, "parameters": sorted(taken)}
    atomic_write_text(target, nbformat.writes(nb))
    art = None
    if registry is not None:
        art = registry.add_artifact(target, "notebook", name=target.name,
                                    meta={"role": "pipeline", "exported_from": str(src), "parameters": sorted(taken)})
    return target.resolve(), lifted, art

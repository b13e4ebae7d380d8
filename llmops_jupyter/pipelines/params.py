"""Typed pipeline parameters, validated before any kernel starts.

papermill's own typing is weak (``-p lr 1e-4`` arrives as whatever YAML makes of the text, unknown names are
injected silently). Here every parameter is checked against

1. the notebook's ``parameters`` cell: the name must exist there and the value must have the type of the default
   (an annotation such as ``lr: float = 1e-4`` wins over the default's type); and
2. where the parameter feeds a stage, that stage config's field: its type, choices and range — either because a
   magic line passes it explicitly (``%llmops finetune --max-steps $steps``) or because a stage used in the
   notebook has a field of the same name.

Secrets are passed by reference: ``-p api_key env:MY_KEY``. The value stays in the environment of the kernel; the
notebook, the injected cell and the registry only ever see the reference.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import enum
import os
import re
import shlex
import typing
from pathlib import Path
from typing import Any

from llmops_jupyter.core.config import StageConfig, field_type, flag_name, unwrap_optional
from llmops_jupyter.core.errors import ConfigError

SECRET_NAME = re.compile(r"(^|_)(api_?key|token|password|passwd|secret)$", re.IGNORECASE)
_MAGIC = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\s*=\s*)?%{1,2}llmops\s+(.*)$")
_RUNNER_CALL = re.compile(r"""\.run\(\s*["']([A-Za-z_][\w-]*)["']""")
_UNSET = object()


@dataclasses.dataclass(frozen=True)
class SecretRef:
    """A parameter whose value lives in an environment variable of the kernel (never in files)."""

    var: str

    def __str__(self) -> str:
        return f"env:{self.var}"

    def value(self, env: typing.Mapping[str, str] | None = None) -> str:
        return (env if env is not None else os.environ)[self.var]


@dataclasses.dataclass
class NotebookParam:
    name: str
    default: Any
    type: Any  # a python type, or None when the default says nothing (None / an expression)
    line: int


@dataclasses.dataclass
class FieldTarget:
    stage: str
    config_cls: type[StageConfig]
    field: dataclasses.Field


@dataclasses.dataclass
class ResolvedParams:
    """Validated parameters: ``values`` (typed; secrets as :class:`SecretRef`) and ``record`` (JSON-safe)."""

    values: dict[str, Any]
    declared: dict[str, NotebookParam]
    note: str | None = None  # the parameters cell lines no parameter was read from (one line), if any

    @property
    def secrets(self) -> dict[str, SecretRef]:
        return {k: v for k, v in self.values.items() if isinstance(v, SecretRef)}

    @property
    def plain(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if not isinstance(v, SecretRef)}

    @property
    def record(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, SecretRef) else v) for k, v in sorted(self.values.items())}


# -- reading the notebook ---------------------------------------------------------------------------------------
def read_notebook(path: str | os.PathLike):
    import nbformat

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"Notebook '{p}' does not exist.", field="notebook", value=str(p),
                          fix="pass the path of an .ipynb file")
    try:
        return nbformat.read(p, as_version=4)
    except Exception as exc:  # noqa: BLE001 - nbformat raises several types for bad JSON
        raise ConfigError(f"Notebook '{p}' cannot be read ({type(exc).__name__}: {exc}).", field="notebook",
                          fix="open it in Jupyter and save it again") from None


def parameters_cell_index(nb) -> int:
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            return i
    return -1


def _type_of(value: Any) -> Any:
    if value is None or value is _UNSET:
        return None
    if isinstance(value, tuple):
        return list
    return type(value) if type(value) in (bool, int, float, str, list, dict) else None


@dataclasses.dataclass(frozen=True)
class SkippedLine:
    """A line of the parameters cell no parameter is read from: IPython syntax (a magic, a shell command) that
    the kernel runs but Python's parser does not read. papermill's inspection skips such lines too."""

    line: int  # 1-based, within the cell
    text: str

    def __str__(self) -> str:
        return f"{self.line} `{self.text}`"


def skipped_note(path: str, cell: int, skipped: list[SkippedLine]) -> str:
    """One line saying which lines of the parameters cell were skipped, and why."""
    which = ", ".join(map(str, skipped))
    return (f"{path}: parameters cell (cell {cell}) line{'s' if len(skipped) > 1 else ''} {which} skipped: IPython "
            "syntax, not Python; the kernel runs it, but no parameter is read from it (as papermill does).")


def _ipython_source(source: str) -> str | None:
    """The cell as IPython runs it (magics and shell commands become calls), or None when IPython cannot run it
    either. The transform keeps one line per line (line magics, ``!cmd``, ``name?``)."""
    from IPython.core.inputtransformer2 import TransformerManager

    try:
        text = TransformerManager().transform_cell(source)
        ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    return text


def parameters_cell(nb, path: str = "notebook") -> tuple[dict[str, NotebookParam], list[SkippedLine]]:
    """Names, defaults and types declared in the ``parameters``-tagged cell (literal assignments), and the lines
    no parameter is read from (see :class:`SkippedLine`).

    papermill runs a parameters cell that holds IPython syntax (``%config ...``, ``!pip ...``): its inspection
    skips what it cannot read. So is it here: the cell is read as IPython runs it and such lines are reported.
    A cell that IPython cannot run either fails in the kernel, so it is refused before any kernel starts.
    """
    idx = parameters_cell_index(nb)
    if idx < 0:
        return {}, []
    source = nb.cells[idx].source
    skipped: list[SkippedLine] = []
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        transformed = _ipython_source(source)
        if transformed is None:
            lines = source.splitlines()
            text = lines[exc.lineno - 1].strip() if exc.lineno and exc.lineno <= len(lines) else ""
            shown = f" `{text}`" if text else ""
            raise ConfigError(f"{path}: the parameters cell (cell {idx}) is not valid Python (line {exc.lineno}"
                              f"{shown}: {exc.msg}); the kernel could not run it either.",
                              fix="write one `name = value` per line") from None
        tree = ast.parse(transformed)
        original, ran = source.splitlines(), transformed.splitlines()
        skipped = [SkippedLine(i + 1, a.strip()) for i, (a, b) in enumerate(zip(original, ran)) if a != b]
        if len(original) != len(ran) or not skipped:  # a cell magic (%%...): the whole cell is one call
            skipped = [SkippedLine(i + 1, a.strip()) for i, a in enumerate(original) if a.lstrip()[:1] in "%!"
                       and a.strip()]
    out: dict[str, NotebookParam] = {}
    for node in tree.body:
        target, value_node, annotation = None, None, None
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target, value_node = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            target, value_node, annotation = node.target.id, node.value, node.annotation
        if target is None:
            continue
        try:
            default = ast.literal_eval(value_node) if value_node is not None else _UNSET
        except ValueError:
            default = _UNSET
        tp = _type_of(default)
        if annotation is not None:
            tp = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}.get(
                ast.unparse(annotation).split("[")[0].split("|")[0].strip(), tp)
        out[target] = NotebookParam(target, None if default is _UNSET else default, tp, node.lineno)
    return out, skipped


def notebook_parameters(nb, path: str = "notebook") -> dict[str, NotebookParam]:
    """Names, defaults and types declared in the ``parameters``-tagged cell (see :func:`parameters_cell`)."""
    return parameters_cell(nb, path)[0]


def _available_configs() -> dict[str, type[StageConfig]]:
    from llmops_jupyter.core.stage import discover

    return {name: cmd.config_cls for name, cmd in discover().items() if cmd.is_stage}


def stage_targets(nb) -> tuple[dict[str, list[FieldTarget]], set[str]]:
    """Which stage config fields each notebook variable feeds, and the stages the notebook uses."""
    configs = _available_configs()
    explicit: dict[str, list[FieldTarget]] = {}
    used: set[str] = set()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for line in cell.source.splitlines():
            for m in _RUNNER_CALL.finditer(line):
                if m.group(1) in configs:
                    used.add(m.group(1))
            m = _MAGIC.match(line)
            if not m:
                continue
            try:
                tokens = shlex.split(m.group(1))
            except ValueError:
                continue
            if not tokens or tokens[0] not in configs:
                continue
            stage = tokens[0]
            used.add(stage)
            cfg = configs[stage]
            flags = {flag_name(f): f for f in dataclasses.fields(cfg)}
            positional = [f for f in dataclasses.fields(cfg) if f.metadata.get("positional")]
            current = None
            for tok in tokens[1:]:
                if tok.startswith("-"):
                    current = flags.get(tok.split("=", 1)[0])
                    continue
                var = tok[1:] if tok.startswith("$") and not tok.startswith("$$") else None
                f = current or (positional.pop(0) if positional else None)
                if var and f is not None:
                    explicit.setdefault(var.split(".")[0], []).append(FieldTarget(stage, cfg, f))
                if current is None or typing.get_origin(unwrap_optional(field_type(cfg, current))[0]) is None:
                    current = None
    targets = dict(explicit)
    for stage in sorted(used):
        cfg = configs[stage]
        for f in dataclasses.fields(cfg):
            targets.setdefault(f.name, [])
            if not any(t.field.name == f.name and t.stage == stage for t in targets[f.name]):
                if f.name not in explicit:
                    targets[f.name].append(FieldTarget(stage, cfg, f))
    return targets, used


# -- typing ------------------------------------------------------------------------------------------------------
def _bad(name: str, message: str, value: Any, fix: str | None = None) -> ConfigError:
    return ConfigError(f"Parameter '{name}' {message} (got {value!r}).", field=name, value=value,
                       fix=fix or f"pass -p {name} <value of the right type>")


def parse_text(text: str, tp: Any) -> Any:
    """A command-line value → Python, guided by the type it should have (``str`` stays text)."""
    if tp is str:
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        import yaml

        return yaml.safe_load(text)
    except Exception:  # noqa: BLE001 - leave unparseable text as text; the type check names it
        return text


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Check/convert ``value`` to ``tp`` (bool, int, float, str, list, dict, list[X], Optional, Enum, None=any)."""
    if tp is None or tp is Any:
        return value
    tp, optional = unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise _bad(name, f"must be a {getattr(tp, '__name__', tp)}, not None", value)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise _bad(name, f"must be one of {typing.get_args(tp)}", value)
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value).value
        except ValueError:
            allowed = ", ".join(str(m.value) for m in tp)
            raise _bad(name, f"must be one of: {allowed}", value) from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _bad(name, "must be true or false", value)
    if tp is int:
        if isinstance(value, str):
            value = parse_text(value, int)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _bad(name, "must be a whole number (int)", value)
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise _bad(name, "must be a number (float)", value) from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _bad(name, "must be a number (float)", value)
    if tp is str:
        if isinstance(value, str):
            return value
        if hasattr(value, "__fspath__"):
            return os.fspath(value)
        raise _bad(name, "must be a string", value, fix=f"quote it: -p {name} '\"{value}\"'")
    if tp is list or origin in (list, tuple):
        if isinstance(value, str):
            parsed = parse_text(value, list)
            value = parsed if isinstance(parsed, list) else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise _bad(name, "must be a list", value, fix=f"write -p {name} '[a, b]' or -p {name} a,b")
        elem = (typing.get_args(tp) or (None,))[0] if origin else None
        return [coerce(f"{name}[{i}]", v, elem) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if isinstance(value, str):
            value = parse_text(value, dict)
        if not isinstance(value, dict):
            raise _bad(name, "must be a mapping", value, fix=f"write -p {name} '{{key: value}}'")
        elem = typing.get_args(tp)[1] if origin and len(typing.get_args(tp)) == 2 else None
        return {str(k): coerce(f"{name}.{k}", v, elem) for k, v in value.items()}
    return value


def _list_elem_type(default: Any) -> Any:
    if isinstance(default, (list, tuple)) and default:
        types = {_type_of(v) for v in default}
        if len(types) == 1:
            t = types.pop()
            return list[t] if t in (int, float, str, bool) else list
    return list


def _check_config_field(name: str, value: Any, target: FieldTarget) -> Any:
    """Type, choices and range of the stage config field the parameter feeds."""
    f = target.field
    tp = field_type(target.config_cls, f)
    value = coerce(name, value, tp)
    probe = object.__new__(target.config_cls)
    object.__setattr__(probe, f.name, value)
    try:
        probe._check_field(f, value)
    except ConfigError as exc:
        raise ConfigError(f"Parameter '{name}' → {target.stage} {flag_name(f)}: {exc.message}",
                          field=name, value=value, fix=exc.fix) from None
    return getattr(probe, f.name)


def resolve_parameters(nb, given: dict[str, Any] | None, *, path: str = "notebook",
                       env: typing.Mapping[str, str] | None = None) -> ResolvedParams:
    """Validate ``given`` against the notebook and the stage configs; raise one clear error for the first bad one."""
    declared, skipped = parameters_cell(nb, path)
    note = skipped_note(path, parameters_cell_index(nb), skipped) if skipped else None
    targets, _used = stage_targets(nb)
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for raw_name, value in (given or {}).items():
        name = str(raw_name).replace("-", "_")
        if name not in declared:
            known = ", ".join(declared) or "(none: the notebook has no cell tagged 'parameters')"
            close = difflib.get_close_matches(name, list(declared), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"Unknown parameter '{raw_name}' for {path}.", field=name, value=value,
                              fix=f"{hint}the notebook's parameters are: {known}")
        field_targets = targets.get(name, [])
        secret_field = any(t.field.metadata.get("secret") for t in field_targets)
        if isinstance(value, SecretRef) or (isinstance(value, str) and value.startswith("env:")):
            var = value.var if isinstance(value, SecretRef) else value[4:]
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var or ""):
                raise _bad(name, "needs an environment variable name after 'env:'", value,
                           fix=f"write -p {name} env:MY_VAR")
            if var not in env:
                raise ConfigError(f"Parameter '{name}' refers to environment variable {var}, which is not set.",
                                  field=name, value=str(value), fix=f"export {var}=... before running")
            values[name] = SecretRef(var)
            continue
        if secret_field or SECRET_NAME.search(name):
            raise ConfigError(f"Parameter '{name}' is a secret and must be passed by environment reference, not "
                              "by value (values would be written into the output notebook and the registry).",
                              field=name, value="***", fix=f"export MY_VAR=... and pass -p {name} env:MY_VAR")
        decl = declared[name]
        tp = decl.type
        if tp is list:
            tp = _list_elem_type(decl.default)
        if tp is int and isinstance(value, float) and not value.is_integer() and any(
                unwrap_optional(field_type(t.config_cls, t.field))[0] is float for t in field_targets):
            tp = float  # `x = 1` in the notebook but the config field is a float
        if isinstance(value, str) and tp is not str:
            value = parse_text(value, tp)
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        value = coerce(name, value, tp)
        checked = value
        for target in field_targets:
            checked = _check_config_field(name, value, target)
        # The notebook's own type wins for the injected value: `model = "x"` feeding a list field (eval --model)
        # and a str field (plan --model) must stay a str; the stage fields only validate it.
        values[name] = value if decl.type is not None else checked
    return ResolvedParams(values=values, declared=declared, note=note)


def load_params_file(path: str | os.PathLike) -> dict[str, Any]:
    """``-f params.yaml``: a YAML mapping of parameter values."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"Parameter file '{p}' does not exist.", field="file", fix="pass a YAML file path")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"Parameter file '{p}'{where} is not valid YAML.", field="file",
                          fix="write one `name: value` per line") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Parameter file '{p}' must be a mapping of name: value.", field="file")
    return data


def pairs_to_dict(pairs: list[str] | None) -> dict[str, str]:
    """``-p a 1 -p b 2`` (flattened to ``[a, 1, b, 2]``) → ``{"a": "1", "b": "2"}``."""
    pairs = list(pairs or [])
    if len(pairs) % 2:
        raise ConfigError(f"-p needs NAME VALUE pairs; '{pairs[-1]}' has no value.", field="param",
                          fix="write -p name value for each parameter")
    return {str(pairs[i]): pairs[i + 1] for i in range(0, len(pairs), 2)}

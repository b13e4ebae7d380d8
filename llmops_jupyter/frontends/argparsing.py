"""Build argparse parsers from stage configs; shared by the magics and the ``llmops`` CLI.

Notebook variables: a token ``$name`` (or ``$name.attr``) is replaced by the *object* bound to that name in the
notebook namespace, so ``%llmops data --source $df`` passes the DataFrame itself, not its text. ``$$`` escapes a
literal dollar. Quoting follows the shell (``--system "You are terse."``).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import re
import typing
from typing import Any

from llmops_jupyter.core.config import StageConfig, field_type, flag_name, unwrap_optional
from llmops_jupyter.core.errors import UsageError

_VAR = re.compile(r"^\$([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)$")
_PLACEHOLDER = "\x00llmops-var-{}\x00"


VERBOSE_FLAG = "--verbose"
VERBOSE_HELP = ("show other libraries' logging and warnings in the output too (by default they go only to the "
                "run's log file, <home>/runs/<run id>/run.log)")


FORM_FLAG = "--form"
FORM_HELP = "notebook only: show this command as a form (ipywidgets) instead of running it; Run writes this line"


def strip_form(tokens: list[str]) -> tuple[list[str], bool]:
    """Take ``--form`` (the notebook's config form, see :mod:`llmops_jupyter.frontends.forms`) out of the tokens."""
    rest = [t for t in tokens if t != FORM_FLAG]
    return rest, len(rest) != len(tokens)


POSITIONAL_GROUP = "positional arguments"
OPTIONS_GROUP = "options"


def option_groups(cfg_cls: type[StageConfig]) -> list[tuple[str, list[dataclasses.Field]]]:
    """The fields of ``cfg_cls`` in the groups ``--help`` shows them in (positionals first, then the options, then
    any ``metadata["group"]`` a field names), in declaration order. ``cell`` fields (a %%llmops body) are left out.
    The config form lays its fields out with the same groups."""
    groups: dict[str, list[dataclasses.Field]] = {POSITIONAL_GROUP: [], OPTIONS_GROUP: []}
    for f in dataclasses.fields(cfg_cls):
        if f.metadata.get("cell"):
            continue
        title = POSITIONAL_GROUP if f.metadata.get("positional") else (f.metadata.get("group") or OPTIONS_GROUP)
        groups.setdefault(title, []).append(f)
    return [(title, fields) for title, fields in groups.items() if fields]


def strip_verbose(tokens: list[str]) -> tuple[list[str], bool | None]:
    """Take the global ``--verbose`` (accepted before or after the command name, on every command) out of the
    tokens before the command's own parser sees them. Returns (tokens, True if given else None)."""
    rest = [t for t in tokens if t != VERBOSE_FLAG]
    return rest, (True if len(rest) != len(tokens) else None)


class HelpRequested(Exception):
    """``--help`` was asked for; ``text`` is the help to print."""

    def __init__(self, text: str):
        self.text = text
        super().__init__(text)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line, never sys.exit
        raise UsageError(f"{self.prog}: {message}.", fix=f"see `{self.prog} --help`")

    def exit(self, status: int = 0, message: str | None = None):
        raise HelpRequested(self.format_help())

    def print_help(self, file=None):
        raise HelpRequested(self.format_help())


def resolve_variables(tokens: list[str], namespace: dict[str, Any] | None) -> tuple[list[str], dict[str, Any]]:
    """Swap ``$name`` tokens for placeholders mapped to the notebook objects."""
    values: dict[str, Any] = {}
    out = []
    for tok in tokens:
        if tok.startswith("$$"):
            out.append(tok[1:])
            continue
        m = _VAR.match(tok)
        if m and namespace is not None:
            head, *attrs = m.group(1).split(".")
            if head not in namespace:
                raise UsageError(f"Notebook variable '${head}' is not defined.",
                                 fix=f"define {head} in a cell above, or write $$ for a literal dollar")
            obj = namespace[head]
            for attr in attrs:
                try:
                    obj = getattr(obj, attr)
                except AttributeError:
                    raise UsageError(f"'{m.group(1)}' has no attribute '{attr}'.") from None
            key = _PLACEHOLDER.format(len(values))
            values[key] = obj
            out.append(key)
        else:
            out.append(tok)
    return out, values


def _converter(tp: Any, values: dict[str, Any], label: str):
    def conv(text: str) -> Any:
        if text in values:
            obj = values[text]
            if tp in (int, float) and isinstance(obj, (int, float)) and not isinstance(obj, bool):
                return tp(obj)
            if tp is str and not isinstance(obj, str):
                if hasattr(obj, "__fspath__"):
                    return str(obj)
                return obj  # objects (DataFrames, datasets) go through; the config validates them
            return obj
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            try:
                return tp(text)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"invalid {label} {text!r} (choose from {', '.join(m.value for m in tp)})") from None
        if tp in (int, float):
            try:
                return tp(float(text)) if tp is int and re.fullmatch(r"\d+(\.0+)?([eE]\d+)?", text) else tp(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{label} needs a {tp.__name__}, got {text!r}") from None
        return text

    conv.__name__ = getattr(tp, "__name__", "value")
    return conv


def _split_list(items: list[Any] | Any) -> list[Any]:
    if not isinstance(items, list):
        items = [items]
    out: list[Any] = []
    for item in items:
        if isinstance(item, str):
            out.extend(x.strip() for x in item.split(",") if x.strip())
        elif isinstance(item, (list, tuple)):
            out.extend(item)
        else:
            out.append(item)
    return out


def build_parser(cfg_cls: type[StageConfig], prog: str, description: str, values: dict[str, Any], *,
                 form_flag: bool = False) -> Parser:
    """``form_flag``: also declare the notebook's ``--form`` (the magic strips it before parsing; declared so its
    ``--help`` lists it)."""
    parser = Parser(prog=prog, description=description, add_help=True, allow_abbrev=False,
                    formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    # Taken out by strip_verbose before parsing; declared so `--help` lists it and a direct parse accepts it.
    if not any(flag_name(f) == VERBOSE_FLAG for f in dataclasses.fields(cfg_cls)):
        parser.add_argument(VERBOSE_FLAG, action="store_true", dest="_llmops_verbose", help=VERBOSE_HELP)
    if form_flag and not any(flag_name(f) == FORM_FLAG for f in dataclasses.fields(cfg_cls)):
        parser.add_argument(FORM_FLAG, action="store_true", dest="_llmops_form", help=FORM_HELP)
    target: dict[str, Any] = {POSITIONAL_GROUP: parser, OPTIONS_GROUP: parser}
    fields = [(title, f) for title, group in option_groups(cfg_cls) for f in group]
    for title, f in fields:
        meta = f.metadata
        if title not in target:
            target[title] = parser.add_argument_group(title)
        group = target[title]
        tp, _optional = unwrap_optional(field_type(cfg_cls, f))
        help_text = meta.get("help", "")
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if f.default is not dataclasses.MISSING and f.default not in (None, "", False):
            default = f.default.value if isinstance(f.default, enum.Enum) else f.default
            help_text += f" (default: {default})"
        if meta.get("choices"):
            help_text += f" [choices: {', '.join(map(str, meta['choices']))}]"
        if meta.get("min") is not None or meta.get("max") is not None:
            help_text += f" [range: {meta.get('min', '')}..{meta.get('max', '')}]"
        help_text = help_text.replace("%", "%%")
        origin = typing.get_origin(tp)
        kwargs: dict[str, Any] = {"help": help_text, "dest": f.name}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin in (list, tuple):
            (elem,) = typing.get_args(tp)[:1] or (str,)
            # numbers are converted after splitting on commas (parse_config): `--weights 1,0.5` → [1.0, 0.5]
            kwargs.update(nargs="+", type=_converter(str if elem in (int, float) else elem, values, f.name),
                          metavar=f.name.upper(), action="extend")  # `--model a --model b` → [a, b]
        elif origin is dict:
            kwargs.update(nargs="+", metavar="KEY=VALUE")
        else:
            kwargs.update(type=_converter(tp, values, f.name), metavar=f.name.upper())
            if isinstance(tp, type) and issubclass(tp, enum.Enum):
                kwargs["metavar"] = "{" + ",".join(m.value for m in tp) + "}"
        extra = dict(meta.get("argparse") or {})  # per-field argparse overrides (e.g. repeated `-p NAME VALUE`)
        aliases = (*extra.pop("aliases", ()), *("--" + n.replace("_", "-") for n in meta.get("aliases", ())))
        kwargs.update(extra)
        if meta.get("positional"):
            # Always optional for argparse: a %%llmops cell body may supply it; the config reports it missing.
            kwargs.pop("dest")
            kwargs.setdefault("nargs", "?")
            if not has_default:
                kwargs["help"] = "(required) " + kwargs["help"]
            group.add_argument(f.name, **kwargs)
        else:
            group.add_argument(flag_name(f), *aliases, **kwargs)
    return parser


def parse_config(
    cfg_cls: type[StageConfig],
    argv: list[str],
    *,
    prog: str,
    description: str = "",
    namespace: dict[str, Any] | None = None,
    cell: str | None = None,
    base: dict[str, Any] | None = None,
    form_flag: bool = False,
) -> StageConfig:
    """argv (already quote-split) → validated config. ``cell`` fills the config's ``cell`` field, or else is
    read as a YAML mapping of parameters (flags on the line win)."""
    argv, values = resolve_variables(argv, namespace)
    parser = build_parser(cfg_cls, prog, description, values, form_flag=form_flag)
    ns = parser.parse_args(argv)
    given = dict(base or {})
    if cell is not None and cell.strip():
        cell_fields = [f.name for f in dataclasses.fields(cfg_cls) if f.metadata.get("cell")]
        if cell_fields:
            given[cell_fields[0]] = cell
        else:
            given.update(_cell_params(cell, prog))
    for f in dataclasses.fields(cfg_cls):
        if not hasattr(ns, f.name):
            continue
        value = getattr(ns, f.name)
        tp, _ = unwrap_optional(field_type(cfg_cls, f))
        if typing.get_origin(tp) in (list, tuple):
            (elem,) = typing.get_args(tp)[:1] or (str,)
            conv = _converter(elem, values, f.name)
            try:
                value = [conv(v) if isinstance(v, str) else v for v in _split_list(value)]
            except argparse.ArgumentTypeError as exc:
                raise UsageError(f"{prog}: argument {flag_name(f)}: {exc}.", field=f.name,
                                 fix=f"see `{prog} --help`") from None
        elif typing.get_origin(tp) is dict:
            value = _parse_mapping(value, f.name, values)
        given[f.name] = value
    return cfg_cls.from_dict(given)


def _parse_mapping(items: Any, name: str, values: dict[str, Any]) -> dict[str, Any]:
    if len(items) == 1 and items[0] in values and isinstance(values[items[0]], dict):
        return dict(values[items[0]])
    out = {}
    for item in _split_list(items):
        if not isinstance(item, str) or "=" not in item:
            raise UsageError(f"--{name.replace('_', '-')} expects KEY=VALUE pairs, got {item!r}.",
                             fix=f"write --{name.replace('_', '-')} a=b c=d")
        k, v = item.split("=", 1)
        out[k.strip()] = values.get(v, v.strip())
    return out


def _cell_params(cell: str, prog: str) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:  # pragma: no cover - yaml is a core dependency
        raise UsageError(f"{prog}: a parameter cell needs PyYAML.") from None
    try:
        data = yaml.safe_load(cell)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UsageError(f"{prog}: the cell body is not valid YAML (cell{where}).",
                         fix="write one `name: value` per line") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{prog}: the cell body must be a mapping of parameters.", fix="write `name: value` lines")
    return {str(k).replace("-", "_"): v for k, v in data.items()}

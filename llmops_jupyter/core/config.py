"""Stage configs: one dataclass per stage, one source of truth for every front end.

Each field carries ``metadata`` (built with :func:`option`) that feeds argparse help for the magics and the CLI,
widget tooltips and papermill parameter docs. ``__post_init__`` validates ranges and choices from that metadata and
names the field, the bad value and the allowed range, so every front end reports the same one-line error.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import typing
from typing import Any, ClassVar

from llmops_jupyter.core.errors import ConfigError


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    choices: typing.Sequence[Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    positional: bool = False,
    cell: bool = False,
    secret: bool = False,
    flag: str | None = None,
    aliases: typing.Sequence[str] = (),
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with the metadata every front end reads.

    ``positional``: the magic/CLI takes it as the first bare argument. ``cell``: a ``%%llmops`` cell body fills it.
    ``secret``: never stored in the registry or output notebooks (only an env-var reference is).
    ``aliases``: other names users type for the same setting (peft's ``lora_r`` for ``rank``): accepted as
    ``--lora-r`` by the magic and CLI (shown in ``--help``) and as keys by :meth:`StageConfig.from_dict`; the field
    name stays the one name stored in the registry, templates, sweeps and cards.
    """
    meta = {
        "help": help,
        "choices": tuple(choices) if choices is not None else None,
        "min": min,
        "max": max,
        "min_exclusive": min_exclusive,
        "positional": positional,
        "cell": cell,
        "secret": secret,
        "flag": flag,
        "aliases": tuple(aliases),
    }
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_type(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    return hints.get(f.name, Any)


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``Optional[X]`` → ``(X, True)``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


@dataclasses.dataclass
class StageConfig:
    """Base for every stage/command config. Subclasses are plain dataclasses using :func:`option`."""

    #: Name of the command this config belongs to (set on subclasses).
    command: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            self._check_field(f, getattr(self, f.name))
        self.validate()

    # -- subclasses override for cross-field rules ---------------------------------------------------------------
    def validate(self) -> None:
        """Cross-field checks. Raise :func:`self.invalid` with the field name."""

    # -- helpers ------------------------------------------------------------------------------------------------
    def invalid(self, name: str, message: str, fix: str | None = None) -> ConfigError:
        value = getattr(self, name, None)
        flag = "--" + name.replace("_", "-")
        prefix = f"{self.command}: " if self.command else ""
        return ConfigError(f"{prefix}{flag} {message} (got {value!r}).", field=name, value=value, fix=fix)

    def _check_field(self, f: dataclasses.Field, value: Any) -> None:
        meta = f.metadata
        if value is None:
            return
        tp, _ = unwrap_optional(field_type(type(self), f))
        if isinstance(tp, type) and issubclass(tp, enum.Enum) and not isinstance(value, tp):
            try:
                value = tp(value)
                object.__setattr__(self, f.name, value)
            except ValueError:
                allowed = ", ".join(str(m.value) for m in tp)
                raise self.invalid(f.name, f"must be one of: {allowed}", fix=f"use one of {allowed}") from None
        if tp in (int, float) and not isinstance(value, bool):
            try:
                coerced = tp(value)
            except (TypeError, ValueError):
                raise self.invalid(f.name, f"must be a number ({tp.__name__})") from None
            if tp is int and isinstance(value, float) and value != int(value):
                raise self.invalid(f.name, "must be a whole number")
            object.__setattr__(self, f.name, coerced)
            value = coerced
        if tp is bool and not isinstance(value, bool):
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                object.__setattr__(self, f.name, value.lower() in ("true", "1", "yes"))
            else:
                raise self.invalid(f.name, "must be true or false")
        choices = meta.get("choices")
        if choices is not None:
            vals = value if isinstance(value, (list, tuple)) else [value]
            for v in vals:
                if v not in choices and str(v) not in [str(c) for c in choices]:
                    allowed = ", ".join(map(str, choices))
                    raise self.invalid(f.name, f"must be one of: {allowed}", fix=f"use one of {allowed}")
        lo, hi = meta.get("min"), meta.get("max")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            excl = meta.get("min_exclusive")
            too_low = lo is not None and (value < lo or (excl and value == lo))
            too_high = hi is not None and value > hi
            if too_low or too_high:
                parts = []
                if lo is not None:
                    parts.append(f"> {lo}" if excl else f">= {lo}")
                if hi is not None:
                    parts.append(f"<= {hi}")
                rng = " and ".join(parts)
                raise self.invalid(f.name, f"must be {rng}", fix=f"pass a value {rng}")

    # -- (de)serialisation ---------------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None = None, /, **overrides: Any):
        """Strict constructor: unknown keys are an error naming the key, close matches and the known keys."""
        data = {**(data or {}), **overrides}
        known = {f.name: f for f in dataclasses.fields(cls)}
        alias_of = {a: f.name for f in known.values() for a in f.metadata.get("aliases", ())}
        clean: dict[str, Any] = {}
        for key, value in data.items():
            name = key.replace("-", "_").lstrip("_") if isinstance(key, str) else key
            if name in alias_of:
                if alias_of[name] in clean or alias_of[name] in data:
                    raise ConfigError(f"'{key}' and '{alias_of[name]}' name the same setting.", field=str(key),
                                      value=value, fix=f"give only '{alias_of[name]}'")
                name = alias_of[name]
            if name not in known:
                close = difflib.get_close_matches(str(name), list(known), n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                where = f"{cls.command} " if cls.command else ""
                raise ConfigError(
                    f"Unknown {where}parameter '{key}'.",
                    field=str(key),
                    value=value,
                    fix=f"{hint}known parameters: {', '.join(known)}",
                )
            clean[name] = value
        missing = [
            f.name
            for f in known.values()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in clean
        ]
        if missing:
            flags = ", ".join("--" + m.replace("_", "-") for m in missing)
            raise ConfigError(
                f"{cls.command or cls.__name__}: missing required parameter(s) {flags}.",
                field=missing[0],
                fix=f"pass {flags}",
            )
        return cls(**clean)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_params(self) -> dict[str, Any]:
        """JSON-safe parameters for the registry: secrets dropped, objects described, enums as values."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret"):
                out[f.name] = "***" if value else None
                continue
            out[f.name] = jsonable(value)
        return out

    @classmethod
    def help_rows(cls) -> list[tuple[str, str, str]]:
        """(flag, default, help) rows for docs and templates."""
        rows = []
        for f in dataclasses.fields(cls):
            default = "" if f.default is dataclasses.MISSING else repr(f.default)
            rows.append((flag_name(f), default, f.metadata.get("help", "")))
        return rows


def jsonable(value: Any) -> Any:
    """Best-effort conversion to JSON-safe data; opaque objects become a short description."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "__fspath__"):
        return str(value)
    shape = getattr(value, "shape", None)
    desc = type(value).__name__
    if shape is not None:
        desc += f"{tuple(shape)}" if not callable(shape) else ""
    elif hasattr(value, "__len__"):
        try:
            desc += f"[len={len(value)}]"
        except Exception:  # noqa: BLE001 - describing only
            pass
    return {"__object__": desc}


def dumps(value: Any) -> str:
    return json.dumps(jsonable(value), sort_keys=True, default=str)

"""Config forms: ``%llmops <command> --form`` (or ``llmops_jupyter.form("finetune")``) as ipywidgets.

A form is generated from the command's config dataclass — no per-command form code. It never builds a config
itself: every change turns the widget values into the tokens the magic would get and parses them with the magic's
own :func:`~llmops_jupyter.frontends.argparsing.parse_config`, so a bad value shows the magic's one-line message
beside its field, and **Run** hands the very config the equivalent ``%llmops`` line would build to the same front
door (:func:`~llmops_jupyter.frontends.frontdoor.execute`). That line (non-default values only, quoted so the magic
parses it back to the same config) goes into a new cell below, so the notebook stays reproducible and exportable.

Text fields take what the magic takes after the flag: ``$name`` passes a notebook object, lists are
comma-separated, mappings are ``key=value`` pairs separated by commas.
"""

from __future__ import annotations

import dataclasses
import enum
import html
import re
import shlex
import time
import typing
import uuid
from collections.abc import Callable
from typing import Any

from llmops_jupyter.core.config import StageConfig, field_type, flag_name, unwrap_optional
from llmops_jupyter.core.errors import ConfigError, LlmopsError
from llmops_jupyter.core.stage import Command, discover, get_command
from llmops_jupyter.frontends.argparsing import (
    HelpRequested,
    build_parser,
    option_groups,
    parse_config,
)

#: field names that hold a model reference (providers and model-producing runs are offered)
MODEL_FIELDS = ("model", "base", "tokenizer", "judge", "adapter", "teacher", "student")
MODEL_STAGES = ("finetune", "merge", "quantize", "prune", "distill")
#: field names that hold a dataset reference
DATA_FIELDS = ("data", "reference")
RECENT_RUNS = 8


@dataclasses.dataclass
class FieldSpec:
    """What the form needs to know about one config field, read from its type and ``option()`` metadata."""

    name: str
    kind: str  # bool | tristate | choice | list | dict | text | cell
    type: Any
    optional: bool
    default: Any  # dataclasses.MISSING when required
    flag: str
    negative: str | None  # the flag that sets the "off" value (--no-x), if any
    positional: bool
    choices: tuple[Any, ...] | None
    help: str
    secret: bool
    group: str
    pairs: bool  # `-p NAME VALUE` fields: typed as NAME=VALUE, ...
    ref_stages: tuple[str, ...] = ()
    providers: bool = False

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    def hint(self) -> str:
        """Type, default, choices and range: shown beside the field."""
        meta_type = self.kind if self.kind in ("list", "dict") else getattr(self.type, "__name__", "value")
        if meta_type == "Any":
            meta_type = "value or $variable"
        parts = [meta_type + (" (optional)" if self.optional and not self.required else "")]
        if self.required:
            parts.append("required")
        elif self.default not in (None, "", [], {}):
            parts.append(f"default {_text(self, self.default) if self.kind not in ('bool', 'tristate') else self.default}")
        return " · ".join(parts)


def _enum_values(tp: Any) -> tuple[Any, ...] | None:
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tuple(m.value for m in tp)
    return None


def field_specs(cmd: Command) -> list[FieldSpec]:
    """One :class:`FieldSpec` per field of the command's config, in ``--help`` group order; the ``cell`` field
    (a ``%%llmops`` body such as a prompt template) last."""
    cls = cmd.config_cls
    stage_names = [n for n, c in discover().items() if c.is_stage] + ["pipeline", "sweep"]
    grouped = [(title, f) for title, fields in option_groups(cls) for f in fields]
    grouped += [("cell", f) for f in dataclasses.fields(cls) if f.metadata.get("cell")]
    specs = []
    for title, f in grouped:
        meta = f.metadata
        tp, optional = unwrap_optional(field_type(cls, f))
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        optional = optional or default is None
        extra = meta.get("argparse") or {}
        origin = typing.get_origin(tp)
        choices = tuple(meta["choices"]) if meta.get("choices") else _enum_values(tp)
        if meta.get("cell"):
            kind = "cell"
        elif tp is bool:
            kind = "tristate" if optional else "bool"
        elif choices and origin not in (list, tuple):
            kind = "choice"
        elif origin in (list, tuple):
            kind = "list"
        elif origin is dict:
            kind = "dict"
        else:
            kind = "text"
        flag = flag_name(f)
        negative = next((a for a in extra.get("aliases", ()) if a.startswith("--no-")), None)
        if tp is bool:
            negative = "--no-" + flag.lstrip("-")
        elem = (typing.get_args(tp)[:1] or (str,))[0] if kind == "list" else tp
        help_text = meta.get("help", "")
        spec = FieldSpec(
            name=f.name, kind=kind, type=tp, optional=optional, default=default, flag=flag, negative=negative,
            positional=bool(meta.get("positional")), choices=choices, help=help_text, secret=bool(meta.get("secret")),
            group=title, pairs=extra.get("nargs") == 2,
        )
        if kind in ("text", "list") and elem in (str, Any) and not choices:
            spec.ref_stages, spec.providers = _references(f.name, help_text, stage_names)
        specs.append(spec)
    return specs


def _references(name: str, help_text: str, stage_names: list[str]) -> tuple[tuple[str, ...], bool]:
    """Which stages' runs a field names, read from its name and help text (``finetune@latest``, "eval run(s)",
    "a merge run", ...); model fields also take provider names."""
    low = help_text.lower().replace("fine-tuning run", "finetune run").replace("fine-tune run", "finetune run")
    found = [s for s in stage_names
             if re.search(rf"(?<![\w-]){re.escape(s)}(@latest| runs?\b|\(s\) run| run\(s\))", low)
             or re.search(rf"\b{re.escape(s)}\b[^.;:]{{0,20}}\brun\b", low)]
    base = name.rstrip("s")
    if name == "name" or name.endswith("_name"):  # names given to new things, not references
        return (), False
    if name in DATA_FIELDS or base in DATA_FIELDS:
        found.insert(0, "data")
    providers = False
    if name in MODEL_FIELDS or base in MODEL_FIELDS:
        providers = name != "adapter"
        found += ["finetune"] if name == "adapter" else list(MODEL_STAGES)
    if not found and (base == "run" or name.startswith("run_")):
        found = ["*"]  # any run: `latest` and the newest runs of every stage
    ordered = tuple(dict.fromkeys(found))
    return ordered, providers


# -- values: widget text <-> the magic's tokens ------------------------------------------------------------------
def _text(spec: FieldSpec, value: Any) -> Any:
    """A config value as the widget holds it (the text the magic would take after the flag)."""
    if spec.kind == "bool":
        return bool(value)
    if spec.kind == "tristate":
        return value
    if isinstance(value, enum.Enum):
        value = value.value
    if spec.kind == "choice":
        return None if value is None else str(value)
    if value is None or value is dataclasses.MISSING:
        return ""
    if isinstance(value, str):
        return value
    if spec.kind == "list":
        items = list(value)
        if spec.pairs:
            return ", ".join(f"{k}={v}" for k, v in zip(items[::2], items[1::2], strict=False))
        return ", ".join(str(v.value if isinstance(v, enum.Enum) else v) for v in items)
    if spec.kind == "dict":
        return ", ".join(f"{k}={v}" for k, v in dict(value).items())
    if hasattr(value, "__fspath__"):
        return str(value)
    return str(value)


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def tokens_for(spec: FieldSpec, raw: Any) -> list[str]:
    """The magic's tokens for one field's widget value (empty when the value is the field's default/unset)."""
    if spec.kind == "cell":
        return []
    if spec.kind in ("bool", "tristate"):
        if raw is None or (spec.kind == "bool" and raw == spec.default):
            return []
        return [spec.flag] if raw else [spec.negative or "--no-" + spec.flag.lstrip("-")]
    if spec.kind == "choice":
        items = [] if raw in (None, "") else [str(raw)]
    else:
        text = str(raw or "").strip()
        items = (_split(text) if spec.kind in ("list", "dict") else [text]) if text else []
    if not items:
        if spec.optional and spec.default is not None and spec.default is not dataclasses.MISSING and spec.negative:
            return [spec.negative]
        return []
    if spec.pairs:
        out: list[str] = []
        for item in items:
            key, _, value = item.partition("=")
            out += [spec.flag, key.strip(), value.strip()]
        return out
    if spec.positional:
        return items
    if len(items) == 1 and items[0].startswith("-"):
        return [f"{spec.flag}={items[0]}"]  # `--since=-3600`: argparse would read `-3600` as a flag
    return [spec.flag, *items]


def quote(token: str) -> str:
    """Quote a token so IPython's ``arg_split(posix=True)`` (the magic's splitter) gives it back unchanged."""
    return shlex.quote(token)


def format_line(name: str, argv: list[str], cell: str | None = None) -> str:
    """``%llmops name argv…`` (or a ``%%llmops`` cell when there is a body)."""
    line = " ".join(quote(t) for t in [name, *argv])
    return f"%%llmops {line}\n{cell}" if cell else f"%llmops {line}"


# -- the form ----------------------------------------------------------------------------------------------------
class ConfigForm:
    """The widgets of one command's form, its validation and its Run action.

    ``fields`` maps field names to their input widgets (set ``.value`` to fill them programmatically);
    ``errors`` maps field names to the magic's message for their current value ("" for form-level ones);
    ``run_button.click()`` runs, as a user's click does.
    """

    def __init__(self, cmd: Command | str, *, values: dict[str, Any] | None = None, shell: Any = None,
                 registry: Any = None, display: Callable[[Any], None] | None = None):
        import ipywidgets as w

        self.cmd = get_command(cmd) if isinstance(cmd, str) else cmd
        self.shell = shell
        self._registry = registry
        self._display = display
        self.specs = field_specs(self.cmd)
        self.fields: dict[str, Any] = {}
        self.messages: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.result: Any = None
        self.error: str | None = None
        self.last_line: str | None = None
        refs = self._reference_options()
        rows: list[Any] = [w.HTML(f"<b>%llmops {html.escape(self.cmd.name)}</b> — "
                                  f"{html.escape((self.cmd.help.splitlines() or [''])[0])}")]
        group = None
        for spec in self.specs:
            if spec.group != group:
                group = spec.group
                title = {"cell": "cell body"}.get(group, group)
                rows.append(w.HTML(f"<div class='llmops-form-group' style='margin-top:6px;font-weight:600'>"
                                   f"{html.escape(title.capitalize())}</div>"))
            widget = self._widget(w, spec, refs.get(spec.name, []))
            self.fields[spec.name] = widget
            msg = w.HTML("", layout=w.Layout(margin="0 0 0 8px"))
            msg.add_class("llmops-form-error")
            self.messages[spec.name] = msg
            label = w.HTML(f"<code title='{html.escape(spec.help, quote=True)}'>"
                           f"{html.escape(spec.name if spec.positional or spec.kind == 'cell' else spec.flag)}</code>",
                           layout=w.Layout(width="190px"))
            hint = w.HTML(f"<span style='color:#777;font-size:90%' title='{html.escape(spec.help, quote=True)}'>"
                          f"{html.escape(spec.hint())}</span>", layout=w.Layout(margin="0 0 0 8px"))
            row = w.HBox([label, widget, hint, msg])
            row.add_class("llmops-form-field")
            row.add_class(f"llmops-field-{spec.name}")
            rows.append(row)
            widget.observe(self._changed, names="value")
        self.form_message = w.HTML("")
        self.form_message.add_class("llmops-form-error")
        self.run_button = w.Button(description="Run", button_style="primary", icon="play",
                                   tooltip=f"run %llmops {self.cmd.name} with these values")
        self.run_button.add_class("llmops-form-run")
        self.run_button.on_click(self.run)
        self.line_view = w.HTML("")
        self.line_view.add_class("llmops-form-line")
        self.output = w.Output()
        rows += [self.form_message, w.HBox([self.run_button, self.line_view]), self.output]
        self.widget = w.VBox(rows)
        self.widget.add_class("llmops-form")
        if values:
            self.set(**values)
        self.validate()

    # -- building ------------------------------------------------------------------------------------------------
    def _widget(self, w: Any, spec: FieldSpec, options: list[str]) -> Any:
        tip = spec.help
        if spec.choices and spec.kind != "choice":
            tip += f" [choices: {', '.join(map(str, spec.choices))}]"
        initial = _text(spec, spec.default)
        layout = w.Layout(width="340px")
        if spec.kind == "bool":
            return w.Checkbox(value=bool(initial), indent=False, tooltip=tip, layout=w.Layout(width="340px"))
        if spec.kind == "tristate":
            return w.Dropdown(options=[("(default)", None), ("yes", True), ("no", False)], value=initial,
                              tooltip=tip, layout=layout)
        if spec.kind == "choice":
            opts: list[Any] = [(str(c), str(c)) for c in spec.choices or ()]
            if spec.optional or spec.required:
                opts.insert(0, ("(none)" if spec.optional else "(choose)", None))
            return w.Dropdown(options=opts, value=initial if initial in [v for _, v in opts] else None, tooltip=tip,
                              layout=layout)
        if spec.kind == "cell":
            return w.Textarea(value=initial, tooltip=tip, placeholder="the %%llmops cell body",
                              layout=w.Layout(width="520px", height="90px"), continuous_update=True)
        placeholder = "required" if spec.required else ("(unset)" if spec.default is None else "")
        if spec.kind in ("list", "dict"):
            placeholder = "comma-separated" + (" NAME=VALUE" if spec.pairs or spec.kind == "dict" else "")
        if spec.secret:
            return w.Password(value=initial, tooltip=tip, placeholder=placeholder, layout=layout)
        if options:
            return w.Combobox(value=initial, options=options, ensure_option=False, tooltip=tip,
                              placeholder=placeholder or "pick or type", layout=layout, continuous_update=True)
        return w.Text(value=initial, tooltip=tip, placeholder=placeholder, layout=layout, continuous_update=True)

    def _reference_options(self) -> dict[str, list[str]]:
        """Per reference field: what exists in the registry (``data@latest``, recent runs of the stages it names)
        and, for model fields, the offline providers."""
        wanted = [s for s in self.specs if s.ref_stages or s.providers]
        if not wanted:
            return {}
        try:
            if self._registry is None:
                from llmops_jupyter.registry import Registry

                self._registry = Registry.open()
            reg = self._registry
        except LlmopsError:
            reg = None
        runs: dict[str, list[str]] = {}
        out: dict[str, list[str]] = {}
        for spec in wanted:
            opts: list[str] = []
            for stage in spec.ref_stages:
                if stage not in runs:
                    try:
                        found = (reg.list_runs(stage=None if stage == "*" else stage, limit=RECENT_RUNS)
                                 if reg is not None else [])
                    except LlmopsError:
                        found = []
                    latest = "latest" if stage == "*" else f"{stage}@latest"
                    runs[stage] = ([latest] if found else []) + [r["id"] for r in found]
                opts += runs[stage]
            if spec.providers:
                from llmops_jupyter.models.refs import PROVIDERS

                opts += sorted(PROVIDERS)
            default = _text(spec, spec.default)
            if isinstance(default, str) and default and default not in opts:
                opts.insert(0, default)
            out[spec.name] = list(dict.fromkeys(opts))
        return out

    # -- values --------------------------------------------------------------------------------------------------
    def set(self, **values: Any) -> ConfigForm:
        """Fill fields from config values (aliases accepted), as ``from_dict`` would take them."""
        alias_of = {a: s.name for s in self.specs
                    for f in dataclasses.fields(self.cmd.config_cls) if f.name == s.name
                    for a in f.metadata.get("aliases", ())}
        by_name = {s.name: s for s in self.specs}
        for key, value in values.items():
            name = alias_of.get(key.replace("-", "_"), key.replace("-", "_"))
            if name not in by_name:
                raise ConfigError(f"Unknown {self.cmd.name} parameter '{key}'.", field=key,
                                  fix=f"known parameters: {', '.join(by_name)}")
            self.fields[name].value = _text(by_name[name], value)
        return self

    def argv(self, skip: typing.Collection[str] = ()) -> tuple[list[str], str | None, dict[str, list[str]]]:
        """(tokens, cell body, tokens per field) for the current widget values; positionals first."""
        per: dict[str, list[str]] = {}
        body_fields: dict[str, str] = {}
        cell = None
        for spec in self.specs:
            raw = self.fields[spec.name].value
            if spec.kind == "cell":
                cell = raw if raw and raw.strip() else None
                continue
            if spec.name in skip:
                continue
            toks = tokens_for(spec, raw)
            if any("\n" in t for t in toks) and spec.kind == "text" and not spec.positional:
                body_fields[spec.name] = str(raw)  # a line magic cannot hold a newline: YAML body instead
                toks = []
            per[spec.name] = toks
        if body_fields and cell is None:
            import yaml

            cell = yaml.safe_dump(body_fields, sort_keys=False, allow_unicode=True).rstrip("\n")
        positional = [t for s in self.specs if s.positional for t in per.get(s.name, [])]
        options = [t for s in self.specs if not s.positional for t in per.get(s.name, [])]
        return positional + options, cell, per

    def _parse(self, argv: list[str], cell: str | None, base: dict[str, Any] | None = None) -> StageConfig:
        ns = self.shell.user_ns if self.shell is not None else None
        return parse_config(self.cmd.config_cls, argv, prog=f"%llmops {self.cmd.name}", description=self.cmd.help,
                            namespace=ns, cell=cell, base=base)

    def _field_of(self, exc: ConfigError, per: dict[str, list[str]]) -> str | None:
        names = {s.name for s in self.specs}
        alias_of = {a: f.name for f in dataclasses.fields(self.cmd.config_cls) for a in f.metadata.get("aliases", ())}
        field = getattr(exc, "field", None)
        if isinstance(field, str):
            field = alias_of.get(field.replace("-", "_"), field.replace("-", "_"))
            if field in names:
                return field
        text = str(exc)
        m = re.search(r"arguments are required: (\S+?)[.,]", text)
        for spec in self.specs if m else ():
            if m.group(1) in (spec.name, spec.name.upper()):
                return spec.name
        m = re.search(r"argument (\S+?)[:/ ]", text)
        if m:
            key = m.group(1)
            for spec in self.specs:
                flags = {spec.flag, spec.name, spec.negative} | {
                    "--" + a.replace("_", "-") for a in alias_of if alias_of[a] == spec.name}
                if key in flags:
                    return spec.name
        for name, toks in per.items():  # e.g. an undefined $variable: the field whose token the message quotes
            if any(len(t) > 1 and (f"'{t}'" in text or f"'{t.lstrip('$')}'" in text) for t in toks):
                return name
        return None

    def validate(self) -> dict[str, str]:
        """Parse the current values as the magic would; every field whose value the magic refuses gets the
        magic's one-line message beside it (a refused field is set aside, so later errors show too)."""
        errors: dict[str, str] = {}
        skip: set[str] = set()
        config = None
        for _ in range(len(self.specs) + 1):
            argv, cell, per = self.argv(skip)
            base = {s.name: _placeholder(s) for s in self.specs if s.name in skip and s.required}
            try:
                config = self._parse(argv, cell, base)
                break
            except HelpRequested:  # pragma: no cover - the form never sends --help
                break
            except ConfigError as exc:
                field = self._field_of(exc, per)
                if field is None:
                    errors[""] = str(exc)
                    break
                if field in skip:  # already marked: the rest can wait for that fix
                    break
                errors[field] = str(exc)
                skip.add(field)
        self.errors = errors
        for name, msg in self.messages.items():
            text = errors.get(name, "")
            msg.value = f"<span style='color:#c62828'>{html.escape(text)}</span>" if text else ""
        self.form_message.value = (f"<span style='color:#c62828'>{html.escape(errors[''])}</span>"
                                   if "" in errors else "")
        self._config = None if errors else config
        self.line_view.value = "" if errors else f"<code>{html.escape(self.line())}</code>"
        return errors

    def _changed(self, _change: Any = None) -> None:
        self.validate()

    def config(self) -> StageConfig:
        """The validated config (raises the magic's ConfigError when a value is refused)."""
        argv, cell, _ = self.argv()
        return self._parse(argv, cell)

    def line(self) -> str:
        """The equivalent magic line: positionals and required fields, and every field whose value differs from
        its default."""
        argv, cell, per = self.argv()
        try:
            config = self._parse(argv, cell)
        except ConfigError:
            config = None
        keep: list[str] = []
        for spec in self.specs:
            toks = per.get(spec.name, [])
            if not toks:
                continue
            if config is not None and not spec.required:
                value = getattr(config, spec.name)
                if value == spec.default or (isinstance(value, enum.Enum) and value.value == spec.default):
                    continue
            keep.append(spec.name)
        positionals = [s.name for s in self.specs if s.positional and per.get(s.name)]
        later = [n for n in positionals if n in keep]
        if later:  # an earlier positional must stay for a later one to land in its place
            keep += positionals[:positionals.index(later[-1])]
        positional = [t for s in self.specs if s.positional and s.name in keep for t in per[s.name]]
        options = [t for s in self.specs if not s.positional and s.name in keep for t in per[s.name]]
        return format_line(self.cmd.name, positional + options, cell)

    # -- running -------------------------------------------------------------------------------------------------
    def run(self, _button: Any = None) -> Any:
        """Run through the front door as the magic does; write the equivalent line into a new cell below."""
        from IPython.display import display as ipy_display

        from llmops_jupyter.frontends.frontdoor import execute

        self.error = None
        if self.validate():
            self.form_message.value = ("<span style='color:#c62828'>Fix the values marked in red first.</span>"
                                       + self.form_message.value)
            return None
        config = self.config()
        self.last_line = self.line()
        clicked = _from_widget_click(self.shell)
        if not clicked and self.shell is not None and hasattr(self.shell, "set_next_input"):
            self.shell.set_next_input(self.last_line, replace=False)  # inside a cell execution: Jupyter adds it
        self.output.clear_output()
        show = self._display or ipy_display
        with self.output:
            print(f"Equivalent cell: {self.last_line}")
            if clicked:  # a click in the browser: the Lab extension inserts the cell (labextension/src/nextcell.ts)
                ipy_display({NEXT_CELL_MIME: {"source": self.last_line, "id": uuid.uuid4().hex,
                                              "ts": time.time() * 1000}, "text/plain": ""}, raw=True)
            try:
                self.result = execute(self.cmd, config, front_end="magic", shell=self.shell, display=show)
                if not self.cmd.is_stage and self.result is not None:  # a view's result is the cell's Out
                    show(self.result)
            except LlmopsError as exc:
                self.error = str(exc)
                print(f"{type(exc).__name__}: {exc}")
        return self.result

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


def _placeholder(spec: FieldSpec) -> Any:
    """A value that passes a required field's own checks, so other fields' errors can be found."""
    if spec.choices:
        return spec.choices[0]
    if spec.kind == "list":
        return ["x"]
    return "x"


NEXT_CELL_MIME = "application/vnd.llmops.next-cell+json"


def _from_widget_click(shell: Any) -> bool:
    """Whether this code runs for a widget message (a click in the browser) rather than a cell execution: only
    an execution reply can carry IPython's ``set_next_input`` to the front end."""
    kernel = getattr(shell, "kernel", None)
    try:
        parent = kernel.get_parent("shell") if kernel is not None else None
    except Exception:  # noqa: BLE001 - an older ipykernel or no kernel (terminal IPython)
        return False
    return bool(parent) and parent.get("header", {}).get("msg_type") == "comm_msg"


def _current_shell() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with ipywidgets
        return None
    return get_ipython()


def build_form(command: str | Command, /, *, shell: Any = None, registry: Any = None, **values: Any) -> ConfigForm:
    """A form for ``command`` pre-filled with ``values`` (config field names or aliases)."""
    return ConfigForm(command, values=values, shell=shell if shell is not None else _current_shell(),
                      registry=registry)


def form_from_argv(cmd: Command, argv: list[str], *, shell: Any = None, cell: str | None = None) -> ConfigForm:
    """``%llmops <cmd> [flags] --form``: the form, pre-filled with the flags given on the line."""
    # Parsed without resolving $variables: a form field holds the text the magic takes ($name stays $name).
    parsed = build_parser(cmd.config_cls, f"%llmops {cmd.name}", cmd.help, {}).parse_args(argv)
    given = {k: (_flatten(v) if isinstance(v, list) else v) for k, v in vars(parsed).items()
             if not k.startswith("_llmops")}
    form = ConfigForm(cmd, values=given, shell=shell)
    if cell is not None:
        cell_field = next((s.name for s in form.specs if s.kind == "cell"), None)
        if cell_field:
            form.fields[cell_field].value = cell
            form.validate()
    return form


def _flatten(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        out.extend(_flatten(item) if isinstance(item, (list, tuple)) else [item])
    return out

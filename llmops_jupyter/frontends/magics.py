"""``%llmops`` / ``%%llmops``: the notebook front end. Parses, builds the stage config, hands it to the front door."""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class, no_var_expand
from IPython.display import display
from IPython.utils.process import arg_split

from llmops_jupyter.core.errors import ConfigError
from llmops_jupyter.core.stage import discover, get_command
from llmops_jupyter.frontends.argparsing import HelpRequested, parse_config, strip_form, strip_verbose

INTRO = """Drive the LLM lifecycle from notebook cells: %llmops <command> [options]   (%llmops <command> --help)

Pass notebook objects with $name (e.g. --source $df); quote values with spaces. A %%llmops cell body is read as
YAML parameters (or, for commands with a text body such as `prompt`, as that text).

A stage cell shows the stage's own progress, results and warnings; other libraries' logging and warnings go to the
run's log file (<home>/runs/<run id>/run.log, named by `%llmops show RUN`). --verbose (on any command, before or
after its name) shows them too. `%llmops <command> --form` shows the command as a form; its Run button writes the
equivalent %llmops line into a new cell.
"""


def overview() -> str:
    lines = [INTRO, "Commands:"]
    commands = discover()
    width = max(map(len, commands), default=0)
    for name, cmd in commands.items():
        first = (cmd.help.splitlines() or [""])[0]
        kind = "stage" if cmd.is_stage else "view"
        lines.append(f"  {name:<{width}}  {kind:<5}  {first}")
    return "\n".join(lines)


@magics_class
class LlmopsMagics(Magics):
    @no_var_expand
    @line_cell_magic
    def llmops(self, line: str, cell: str | None = None) -> Any:
        try:
            tokens = arg_split(line, posix=True)
        except ValueError as exc:  # unbalanced quotes
            raise IPythonUsageError(f"%llmops: cannot parse the line ({exc}); check the quotes.") from None
        tokens, verbose = strip_verbose(tokens)
        if not tokens or tokens[0] in ("-h", "--help", "help"):
            print(overview())
            return None
        name, argv = tokens[0], tokens[1:]
        argv, want_form = strip_form(argv)
        try:
            cmd = get_command(name)
            if want_form:
                from llmops_jupyter.frontends.forms import form_from_argv

                return form_from_argv(cmd, argv, shell=self.shell, cell=cell)
            config = parse_config(
                cmd.config_cls, argv, prog=f"%llmops {name}", description=cmd.help,
                namespace=self.shell.user_ns if self.shell else None, cell=cell, form_flag=True,
            )
        except HelpRequested as req:
            print(req.text)
            return None
        except ConfigError as exc:
            raise IPythonUsageError(str(exc)) from None
        from llmops_jupyter.frontends.frontdoor import execute

        return execute(cmd, config, front_end="magic", shell=self.shell, display=display, verbose=verbose)


def load(ipython) -> None:
    magics = LlmopsMagics(ipython)
    ipython.register_magics(magics)
    # `%llmops?` shows the generated overview.
    LlmopsMagics.llmops.__doc__ = overview()

"""``llmops`` console script: the same commands and configs as ``%llmops``, outside notebooks."""

from __future__ import annotations

import os
import sys

from llmops_jupyter.core.display import print_text
from llmops_jupyter.core.errors import ConfigError, LlmopsError
from llmops_jupyter.frontends.argparsing import HelpRequested, parse_config, strip_verbose

#: options before the command → the environment variable each sets (subprocesses inherit it) and what it takes
_GLOBAL = {"--home": ("LLMOPS_HOME", "a folder"),
           "--registry": ("LLMOPS_REGISTRY", "a database URL (postgresql://user@host/db)"),
           "--artifacts": ("LLMOPS_ARTIFACTS", "an artifact store: a shared folder or an fsspec URL (s3://bucket/x)")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, verbose = strip_verbose(argv)
    from llmops_jupyter.core.stage import get_command
    from llmops_jupyter.frontends.magics import overview  # noqa: PLC0415 - IPython is a core dependency

    while argv and argv[0] in _GLOBAL:  # --home DIR / --registry URL / --artifacts URL: set for this process and every child of it
        if len(argv) < 2:
            print(f"llmops: {argv[0]} needs {_GLOBAL[argv[0]][1]}", file=sys.stderr)
            return 2
        os.environ[_GLOBAL[argv[0]][0]] = argv[1]
        argv = argv[2:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(overview().replace("%llmops", "llmops").replace("%%llmops", "llmops"))
        return 0
    if argv[0] in ("-V", "--version"):
        from llmops_jupyter import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    try:
        cmd = get_command(name)
        config = parse_config(cmd.config_cls, rest, prog=f"llmops {name}", description=cmd.help)
        from llmops_jupyter.frontends.frontdoor import execute

        result = execute(cmd, config, front_end="cli", display=print_text, verbose=verbose)
        print_text(result)
    except HelpRequested as req:
        print(req.text)
        return 0
    except LlmopsError as exc:
        print(f"llmops: {type(exc).__name__}: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt as exc:
        print(f"llmops: {' '.join(str(exc or 'interrupted').splitlines())}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

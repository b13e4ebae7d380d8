"""One exception root for everything the toolkit raises on purpose.

Front ends (magics, CLI, papermill) catch :class:`LlmopsError` and show its message as one clear line; anything
else is a bug and keeps its traceback. Every message names *what* was wrong (field, file, line) and *the fix*.

::

    LlmopsError
    ├── ConfigError            a config field has a bad value / unknown key        (field, value, fix)
    │   └── UsageError         a front end got unparseable input (flag, subcommand)
    ├── DataError              an input file or dataset is malformed / empty       (path, line, fix)
    ├── MissingDependencyError an optional extra is not installed                   (extra, package)
    ├── RegistryError          the registry folder/db cannot be used               (path, fix)
    │   └── NotFoundError      a run / artifact reference does not resolve
    ├── StageError             a stage failed for a reason the user can act on
    │   ├── ResourceError      out of (GPU) memory etc., with `plan` advice
    │   └── VerificationError  a produced artifact failed its own check (e.g. merged logits)
    └── GateError              an evaluation / monitoring gate was violated
"""

from __future__ import annotations


class LlmopsError(Exception):
    """Root of all expected errors. ``str(err)`` is the one line shown to the user."""

    def __init__(self, message: str, *, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(self.__str__())

    def __str__(self) -> str:  # message + fix on one line
        if self.fix:
            return f"{self.message} Fix: {self.fix}"
        return self.message

    @property
    def _render_traceback_(self):
        """IPython shows this instead of a traceback: one clear line. ``LLMOPS_TRACEBACK=1`` shows the full one."""
        import os

        if os.environ.get("LLMOPS_TRACEBACK"):
            raise AttributeError("_render_traceback_")
        return lambda: [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}"]


class ConfigError(LlmopsError, ValueError):
    """A config field got a value outside its allowed range, or an unknown key was given."""

    def __init__(self, message: str, *, field: str | None = None, value: object = None, fix: str | None = None):
        self.field = field
        self.value = value
        super().__init__(message, fix=fix)


class UsageError(ConfigError):
    """Bad command-line / magic input (unknown subcommand or flag, unparseable value)."""


class DataError(LlmopsError, ValueError):
    """Input data is malformed: names the file (and line) and how to fix it."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, fix: str | None = None):
        self.path = path
        self.line = line
        super().__init__(message, fix=fix)


class MissingDependencyError(LlmopsError, ImportError):
    """An optional dependency is missing; the message carries the exact pip command."""

    def __init__(self, package: str, extra: str, *, feature: str | None = None):
        self.package = package
        self.extra = extra
        what = f" (needed for {feature})" if feature else ""
        plural = "s" if "," in package else ""
        super().__init__(
            f"The optional package{plural} '{package}' {'are' if plural else 'is'} not installed{what}.",
            fix=f"pip install 'llmops-jupyter[{extra}]'",
        )


class RegistryError(LlmopsError):
    """The registry cannot be opened or written."""


class NotFoundError(RegistryError, KeyError):
    """A run id, artifact hash or name does not resolve to anything in the registry."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return LlmopsError.__str__(self)


class StageError(LlmopsError):
    """A stage could not complete for a reason the user can act on."""


class ResourceError(StageError):
    """Out of memory or another resource; the fix carries `%llmops plan` advice."""


class VerificationError(StageError):
    """A produced artifact failed its own verification (never silently export a wrong model)."""


class GateError(LlmopsError, AssertionError):
    """A quality gate was violated. ``failures`` lists what failed and why."""

    def __init__(self, message: str, *, failures: list | None = None, fix: str | None = None):
        self.failures = failures or []
        super().__init__(message, fix=fix)


def require(module: str, extra: str, *, package: str | None = None, feature: str | None = None):
    """Import an optional dependency or raise :class:`MissingDependencyError` with the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - exercised with a patched import in tests
        raise MissingDependencyError(package or module.split(".")[0], extra, feature=feature) from exc

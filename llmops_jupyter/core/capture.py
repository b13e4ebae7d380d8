"""A stage cell shows the stage's own output; other libraries' logging and warnings go to the run's log file.

While :meth:`Runner.run <llmops_jupyter.core.runner.Runner.run>` executes a stage (its lazy imports included),
:func:`stage_output` routes

* ``logging`` records of every logger except the project's own (``llmops_jupyter``, ``llmops_jupyter.*``) and
* ``warnings`` raised outside the project's modules and notebook cells (category not an :class:`LlmopsWarning`)

into ``<registry home>/runs/<run id>/run.log`` instead of the console (the run's summary names the file as ``log``
once something was written, and ``%llmops show RUN`` prints it). Torch's ``_pytree`` lines, torchao's "Failed to
load …so", transformers' FutureWarnings, bitsandbytes' autograd warning: all land there. Verbose mode
(``--verbose`` on any ``%llmops``/``llmops`` command, or ``LLMOPS_VERBOSE=1``) shows them as well; they are
still written to the log.

Other libraries' tqdm bars (transformers' ``Loading weights``, datasets' ``Map``) are not drawn while a stage runs;
a line naming each goes to the log (verbose mode draws them).

Not captured, on purpose: plain ``print`` and the project's own tqdm bars (the stage's progress and results) and
output that C code writes to file descriptors 1/2 directly. Redirecting the descriptors would also swallow what
matters most when a native library dies (CUDA aborts, segfault reports) and would fight ipykernel's own fd capture;
such lines are rare once the Python-level noise is gone.

It also keeps ``runs/<run id>/progress.json`` (done, total, desc, ts) current from the stage's progress events, at
most twice a second, so another process (``llmops run``, ``make demo``, ``%llmops attach``) can report the
progress of a stage that runs in a kernel.

Standard library only: ``core`` imports nothing above it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from llmops_jupyter.core.runner import Event, RunContext

VERBOSE_ENV = "LLMOPS_VERBOSE"
LOG_FILE = "run.log"
PROGRESS_FILE = "progress.json"
PROJECT_LOGGER = "llmops_jupyter"
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])


class LlmopsWarning(UserWarning):
    """A warning of the toolkit itself: always shown, even while a stage's other warnings are captured."""


_verbose: contextvars.ContextVar[bool | None] = contextvars.ContextVar("llmops_verbose", default=None)


def is_verbose() -> bool:
    """Verbose mode: set by :func:`verbosity` (the front ends' ``--verbose``) or ``$LLMOPS_VERBOSE``."""
    value = _verbose.get()
    if value is not None:
        return value
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def verbosity(verbose: bool | None) -> Iterator[None]:
    """Show (True) or capture (False) other libraries' output for the runs made inside; None keeps the default."""
    if verbose is None:
        yield
        return
    token = _verbose.set(bool(verbose))
    try:
        yield
    finally:
        _verbose.reset(token)


def run_log_path(home: str | os.PathLike, run_id: str) -> Path:
    """Where a run's captured library output goes."""
    return Path(home) / "runs" / run_id / LOG_FILE


# -- what counts as the project's own -----------------------------------------------------------------------------
def _is_cell(filename: str) -> bool:
    """Code typed in a notebook cell (IPython's ``<ipython-input-…>``, ipykernel's ``/tmp/ipykernel_<pid>/…``)."""
    return filename.startswith("<ipython-input") or f"{os.sep}ipykernel_" in filename


def _is_own_file(filename: str) -> bool:
    return bool(filename) and (filename.startswith(_PACKAGE_DIR + os.sep) or _is_cell(filename))


def is_own_record(record: logging.LogRecord) -> bool:
    name = record.name or ""
    return name == PROJECT_LOGGER or name.startswith(PROJECT_LOGGER + ".") or _is_cell(record.pathname or "")


def is_own_warning(category: type[Warning], filename: str) -> bool:
    if isinstance(category, type) and issubclass(category, LlmopsWarning):
        return True
    if (getattr(category, "__module__", "") or "").startswith(PROJECT_LOGGER):
        return True
    return _is_own_file(filename or "")


# -- the capture --------------------------------------------------------------------------------------------------
class _Capture:
    _formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def __init__(self, path: Path, verbose: bool):
        self.path = path
        self.verbose = verbose
        self.thread = threading.get_ident()
        self.written = 0
        self._file: TextIO | None = None
        self._lock = threading.Lock()

    def write(self, text: str) -> None:
        if not text.endswith("\n"):
            text += "\n"
        with self._lock:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115
            self._file.write(text)
            self._file.flush()
            self.written += len(text)

    def record(self, record: logging.LogRecord) -> None:
        try:
            self.write(self._formatter.format(record))
        except Exception:  # noqa: BLE001 - a record that cannot be formatted must not break the stage
            self.write(f"{record.levelname} {record.name}: {record.msg!r}")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


_lock = threading.RLock()
_active: list[_Capture] = []
_saved: dict[str, Any] = {}


def _current() -> _Capture | None:
    active = list(_active)
    if not active:
        return None
    me = threading.get_ident()
    for cap in reversed(active):
        if cap.thread == me:
            return cap
    return active[-1]  # a helper thread of a running stage (data loaders, tokenizer threads, kernel clients)


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def _call_handlers(self: logging.Logger, record: logging.LogRecord) -> None:
    cap = _current()
    original = _saved["callHandlers"]
    if cap is None or is_own_record(record):
        return original(self, record)
    cap.record(record)
    if cap.verbose:
        return original(self, record)
    # Files the user configured still get the record; consoles (and logging's last-resort stderr) do not.
    logger: logging.Logger | None = self
    while logger is not None:
        for handler in logger.handlers:
            if record.levelno >= handler.level and not _is_console(handler):
                handler.handle(record)
        logger = logger.parent if logger.propagate else None
    return None


def _showwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
    cap = _current()
    original = _saved["showwarning"]
    if cap is None or file is not None or is_own_warning(category, filename):
        return original(message, category, filename, lineno, file, line)
    try:
        cap.write(warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n"))
    except Exception:  # noqa: BLE001 - linecache trouble: keep the message at least
        cap.write(f"{filename}:{lineno}: {category.__name__}: {message}")
    if cap.verbose:
        return original(message, category, filename, lineno, file, line)
    return None


def _bar_owner() -> str:
    """File of the code that made a tqdm bar: the first frame outside tqdm itself (its notebook/auto subclasses
    call the base class's ``__init__``)."""
    import sys

    frame = sys._getframe(2)
    while frame is not None and f"{os.sep}tqdm{os.sep}" in frame.f_code.co_filename:
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else ""


def _draws_in_the_cell(file: Any) -> bool:
    """A bar drawn to the default stream (tqdm's default is stderr) or to stdout lands in the cell; a bar given its
    own file (papermill's per-cell bar, which the pipeline runner turns into progress events) does not."""
    import sys

    return file is None or file in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)


def _tqdm_init(self: Any, *args: Any, **kwargs: Any) -> None:
    """Other libraries' progress bars (transformers' ``Loading weights``, datasets' ``Map``) while a stage runs:
    not drawn in the cell; one line naming the bar goes to the run's log (verbose mode draws them)."""
    cap = _current()
    if (cap is not None and not cap.verbose and not kwargs.get("disable") and _draws_in_the_cell(kwargs.get("file"))
            and not _is_own_file(_bar_owner())):
        desc = kwargs.get("desc") or (args[1] if len(args) > 1 and isinstance(args[1], str) else "")
        total = kwargs.get("total")
        if total is None and args and hasattr(args[0], "__len__"):
            total = len(args[0])
        cap.write(f"progress bar (not shown): {desc or 'unnamed'}" + (f", {total} steps" if total else ""))
        kwargs["disable"] = True
    _saved["tqdm_init"](self, *args, **kwargs)


def _install(cap: _Capture) -> None:
    with _lock:
        if not _active:
            _saved["callHandlers"] = logging.Logger.callHandlers
            _saved["showwarning"] = warnings.showwarning
            logging.Logger.callHandlers = _call_handlers  # type: ignore[method-assign]
            warnings.showwarning = _showwarning
            try:  # tqdm is a dependency of the libraries that draw bars; core does not import it otherwise
                import tqdm.std

                _saved["tqdm_init"] = tqdm.std.tqdm.__init__
                tqdm.std.tqdm.__init__ = _tqdm_init  # type: ignore[method-assign]
            except ImportError:
                pass
        _active.append(cap)


def _uninstall(cap: _Capture) -> None:
    with _lock:
        if cap in _active:
            _active.remove(cap)
        if not _active and _saved:
            if logging.Logger.callHandlers is _call_handlers:
                logging.Logger.callHandlers = _saved["callHandlers"]  # type: ignore[method-assign]
            if warnings.showwarning is _showwarning:  # else someone replaced it after us: leave theirs
                warnings.showwarning = _saved["showwarning"]
            if "tqdm_init" in _saved:
                import tqdm.std

                if tqdm.std.tqdm.__init__ is _tqdm_init:
                    tqdm.std.tqdm.__init__ = _saved["tqdm_init"]  # type: ignore[method-assign]
            _saved.clear()


@contextlib.contextmanager
def capture_output(log_path: str | os.PathLike, *, verbose: bool | None = None) -> Iterator[_Capture]:
    """Route other libraries' logging and warnings to ``log_path`` for the duration (shown too when verbose)."""
    cap = _Capture(Path(log_path), is_verbose() if verbose is None else verbose)
    _install(cap)
    try:
        yield cap
    finally:
        _uninstall(cap)
        cap.close()


# -- progress for other processes ---------------------------------------------------------------------------------
class _ProgressFile:
    """Runner listener writing the run's latest PROGRESS event to ``runs/<id>/progress.json`` (≤ 2 writes/s)."""

    def __init__(self, path: Path, run_id: str, every: float = 0.5):
        self.path = path
        self.run_id = run_id
        self.every = every
        self._last = 0.0

    def __call__(self, event: Event) -> None:
        if event.run_id != self.run_id or str(event.type) != "progress":
            return
        done, total = event.data.get("done"), event.data.get("total")
        now = time.time()
        if now - self._last < self.every and done != total:
            return
        self._last = now
        from llmops_jupyter.core.files import atomic_write_json

        try:
            atomic_write_json(self.path, {"done": done, "total": total, "desc": event.data.get("desc"),
                                          "ts": now, "pid": os.getpid()})
        except OSError:  # a read-only or full disk must not fail the stage over a progress hint
            pass


@contextlib.contextmanager
def stage_output(ctx: RunContext) -> Iterator[None]:
    """Wraps a stage's ``run`` in the Runner: capture other libraries' output into the run's log, keep the progress
    file, and name the log in the run's summary when anything was written to it."""
    home = Path(ctx.registry.home)
    log_path = run_log_path(home, ctx.run_id)
    writer = _ProgressFile(home / "runs" / ctx.run_id / PROGRESS_FILE, ctx.run_id)
    unsubscribe = ctx.runner.subscribe(writer)
    cap: _Capture | None = None
    try:
        with capture_output(log_path) as cap:
            yield
    finally:
        unsubscribe()
        if (cap is not None and cap.written) or (log_path.exists() and log_path.stat().st_size):
            ctx.summary.setdefault("log", str(log_path))

"""Keep CPU cores busy beside a test run, so races that only show on a loaded machine show here (`make test-stress`).

    python tools/cpu_burn.py --procs 2 --seconds 3600

Starts ``--procs`` busy-looping processes. Bounded three ways, so a burner never outlives the run it loads:

* each stops itself after ``--seconds`` (the cap, whatever happens to anything else);
* SIGTERM/SIGINT/SIGHUP to this process stops them all (the Makefile recipe's trap sends it when pytest ends,
  passes, fails or is interrupted);
* each stops when the process that started this one is gone (a recipe shell killed with SIGKILL cannot run its
  trap; the burners notice they were orphaned within a tenth of a second).

Standard library only.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import sys
import time


def burn(deadline: float, watch_pid: int) -> None:
    """Busy-loop until ``deadline`` (monotonic), or until ``watch_pid`` (what started the burner) or our parent is gone."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # not the starter's handlers (fork copies them)
        signal.signal(sig, signal.SIG_DFL)
    x = 0
    while time.monotonic() < deadline:
        end = time.monotonic() + 0.1
        while time.monotonic() < end:
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        if not _alive(watch_pid) or os.getppid() == 1:
            return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=2, help="busy processes to start (default 2)")
    ap.add_argument("--seconds", type=float, default=3600, help="each stops itself after this long (default 3600)")
    args = ap.parse_args(argv)
    if args.procs < 1 or args.seconds <= 0:
        ap.error("--procs must be >= 1 and --seconds > 0")
    deadline = time.monotonic() + args.seconds
    starter = os.getppid()  # the recipe shell: when it is gone, so are we
    ctx = mp.get_context("fork")
    workers = [ctx.Process(target=burn, args=(deadline, starter), daemon=True) for _ in range(args.procs)]

    def stop(signum: int, _frame: object) -> None:
        for w in workers:
            if w.is_alive():
                w.terminate()
        for w in workers:
            w.join(5)
        sys.exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    for w in workers:
        w.start()
    print(f"cpu_burn: {args.procs} busy processes (pids {', '.join(str(w.pid) for w in workers)}), "
          f"stopping by themselves after {args.seconds:g} s", file=sys.stderr, flush=True)
    while any(w.is_alive() for w in workers):
        for w in workers:
            w.join(0.5)
        if not _alive(starter) or os.getppid() != starter:
            stop(signal.SIGHUP, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())

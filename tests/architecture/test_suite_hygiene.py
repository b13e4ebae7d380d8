"""The suite waits on conditions, never on the clock: no test sleeps to synchronise, and no browser test counts
elements right after waiting for something else (the race that failed `make test` on a loaded machine).

Waiting goes through :func:`llmops_jupyter.testing.wait_until` (a deadline and a message naming what it waited
for; its backoff between polls is the suite's only sleep) or Playwright's auto-retrying ``expect``. A sleep that
is the *work* of a child process (a cell that must outlast a timeout, a stage whose steps take time) is not a
wait: it is listed below with its reason, and an entry that no longer matches a line fails, so the list stays true.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
SELF = Path(__file__).resolve()

#: a call that pauses on the clock: time.sleep / sleep / asyncio.sleep / Playwright's page.wait_for_timeout
SLEEP = re.compile(r"\b(?:time\.|asyncio\.)?sleep\(|\bwait_for_timeout\(|from\s+time\s+import\s+.*\bsleep\b")
#: an immediate Playwright count assertion (use expect(locator).to_have_count(...) or wait_for_function)
COUNT_ASSERT = re.compile(r"\bassert\b.*\.count\(\)")

#: (file, the line stripped) → why this sleep is the workload of another process, not a wait of the test
ALLOWED = {
    ("tests/pipelines/test_kernel_client.py", "await asyncio.sleep(0)"):
        "one event-loop turn inside a loop on the condition (the task's poll is registered), not a timed wait",
    ("tests/faults/test_concurrent_and_kernels.py",
     'f"import os, time\\nopen({str(pid_file)!r}, \'w\').write(str(os.getpid()))\\ntime.sleep(seconds)")'):
        "the kernel's cell: it runs until the test kills the kernel (the test waits for its pid file)",
    ("tests/pipelines/test_failure_line.py",
     '("import time\\ntime.sleep(120)", r"timed out in cell 2 \\(`import time`\\): it ran longer than --timeout 3s\\."),'):
        "the kernel's cell: it must outlast --timeout 3s (the test asserts the timeout line)",
    ("tests/pipelines/test_failure_line.py", "time.sleep(0.5)"):
        "a stage in the kernel whose 8 steps take wall time, so progress lines are throttled while it runs",
    ("tests/test_smoke_fixtures.py", '"g = subprocess.Popen([sys.executable, \'-c\', \'import time; time.sleep(600)\'])\\n"'):
        "a grandchild workload that must outlive run_logged's 3 s budget (the test asserts its group is stopped)",
    ("tests/test_smoke_fixtures.py", '"time.sleep(600)\\n")'):
        "the child's workload that must outlive run_logged's 3 s budget (the test asserts the timeout message)",
    ("tests/stages/rl/test_rewards_guards.py", "time.sleep(0.3)  # a slow reward, not synchronisation"):
        "a reward function that is slow on purpose: the contract check must name it (timeout 0.1 s)",
    ("tests/tools/test_gpu_check.py",
     'gpu_check.Step("demo", 2, "stand-in", ["demo finishes"], [py, "-c", "import time; time.sleep(600)"]),'):
        "a stand-in step that must outlast its 2 s budget (the test asserts it is stopped and marked unmeasured)",
}


def _py_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if p.resolve() != SELF)


def _matches(pattern: re.Pattern[str]) -> list[tuple[str, int, str]]:
    out = []
    for path in _py_files():
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                out.append((path.relative_to(ROOT).as_posix(), i, line.strip()))
    return out


def test_no_test_sleeps_to_synchronise():
    found = _matches(SLEEP)
    bad = [f"{f}:{i}: {line}" for f, i, line in found if (f, line) not in ALLOWED]
    assert not bad, ("a fixed sleep used as a wait; wait on the condition instead "
                     "(llmops_jupyter.testing.wait_until, Playwright expect), or, if it is another process's "
                     "workload, add it to ALLOWED with the reason:\n" + "\n".join(bad))
    stale = sorted(set(ALLOWED) - {(f, line) for f, _, line in found})
    assert not stale, f"ALLOWED entries that match no line any more (remove them): {stale}"


def test_no_immediate_playwright_count_assertion():
    bad = [f"{f}:{i}: {line}" for f, i, line in _matches(COUNT_ASSERT)]
    assert not bad, "count right after another wait races; use expect(locator).to_have_count(n):\n" + "\n".join(bad)


def test_wait_until_is_the_only_sleeper_in_the_helpers():
    """The shared helper module sleeps only inside wait_until (its documented backoff between polls)."""
    path = ROOT / "llmops_jupyter" / "testing.py"
    tree = ast.parse(path.read_text())
    sleepers = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef):
            for node in ast.walk(fn):
                if isinstance(node, ast.Call) and "sleep" in ast.unparse(node.func):
                    sleepers.append(fn.name)
    assert sleepers == ["wait_until"], sleepers


def test_the_patterns_catch_what_they_are_for():
    """The grep is not vacuous: each pattern matches the shapes it forbids and not the allowed spellings."""
    for line in ["time.sleep(1.0)", "await asyncio.sleep(0.1)", "sleep(2)", "page.wait_for_timeout(3000)",
                 "from time import monotonic, sleep"]:
        assert SLEEP.search(line), line
    for line in ["wait_until(lambda: done(), 60, what='done')", 'name = "sleepy"']:
        assert not SLEEP.search(line), line
    assert COUNT_ASSERT.search("assert out.count() >= 2  # the line, then the plan itself")
    assert not COUNT_ASSERT.search('assert editors.count("x") == 1')


def test_wait_until_returns_the_value_and_names_what_it_waited_for():
    import pytest

    from llmops_jupyter.testing import wait_until

    polls = iter([None, 0, "ready"])
    assert wait_until(lambda: next(polls), 60, what="the third poll", interval=0.001) == "ready"
    with pytest.raises(AssertionError, match=r"timed out after 0.05 s waiting for the moon\nlog tail"):
        wait_until(lambda: False, 0.05, what="the moon", details=lambda: "log tail")
    with pytest.raises(AssertionError, match=r"gave up waiting for a file: the writer exited \(1\)"):
        wait_until(lambda: False, 600, what="a file", abort=lambda: "the writer exited (1)")

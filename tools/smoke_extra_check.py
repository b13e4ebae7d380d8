"""Runs inside a fresh venv that has one README install line (``tools/smoke_extras.py`` makes it).

Checks, as a user of that install would see it: every command the README lists for an installed extra passes its
extras check, every other one answers with exactly one line naming the extra to install (before writing anything),
and a real command per install line works end to end. Exit 0 when all hold; prints one line per check.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

LINE, README = sys.argv[1], Path(sys.argv[2])
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{LINE}] {'ok ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        failures.append(what)


def readme_rows() -> list[tuple[str, list[str]]]:
    section = README.read_text().split("## Install", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        m = re.match(r"\| `pip install (?:'llmops-jupyter\[(\w+)\]'|llmops-jupyter)` \| (.*) \|$", line)
        if m:
            rows.append((m.group(1) or "", re.findall(r"`([^`]+)`", m.group(2))))
    return rows


def cli(*args: str, home: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"LLMOPS_HOME": home} if home else {})}
    return subprocess.run(["llmops", *args], capture_output=True, text=True, env=env)


def main() -> int:
    from llmops_jupyter.core import extras
    from llmops_jupyter.core.errors import MissingDependencyError
    from llmops_jupyter.core.stage import discover

    installed = set(extras.closure([] if LINE == "core" else [LINE]))
    cmds = discover()
    # 1. the README table, command by command, through the same check the front door runs
    for extra, items in readme_rows():
        for item in items:
            name = item.split()[0]
            if name not in cmds or len(item.split()) > 1:
                continue
            cmd = cmds[name]
            declared = tuple(cmd.stage_cls.extras if cmd.is_stage else cmd.extras)
            try:
                extras.check(declared, feature=f"%llmops {name}")
                ok = not extra or extra in installed
                check(ok, f"{name}: available ({'core' if not extra else '[' + extra + ']'})")
            except MissingDependencyError as exc:
                text = str(exc)
                ok = bool(extra) and extra not in installed and "\n" not in text and (
                    f"pip install 'llmops-jupyter[{extra}]'" in text)
                check(ok, f"{name}: one-line hint for [{extra}]" + ("" if ok else f" — got: {text}"))
    # 2. real commands, as a user runs them
    records = [{"instruction": f"What is {i} plus {i + 1}?", "response": str(2 * i + 1)} for i in range(30)]
    Path("d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if LINE == "core":
        import plotly.io as pio
        from IPython.core.interactiveshell import InteractiveShell
        from IPython.display import display

        shell = InteractiveShell.instance()
        shell.run_line_magic("load_ext", "llmops_jupyter")
        pio.renderers.default = "plotly_mimetype"  # what a notebook kernel renders
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            res = shell.run_line_magic("llmops", "data d.jsonl --eval-size 5")
            for out in res.outputs.values():
                if hasattr(out, "to_plotly_json"):
                    display(out)  # plotly's notebook rendering needs nbformat (a core dependency)
        check(res.status == "finished" and "Traceback" not in err.getvalue(),
              "%llmops data d.jsonl builds the dataset and its report renders")
        for args, extra in ((["finetune", "--max-steps", "1"], "finetune"), (["run", "x.ipynb"], "batch"),
                            (["eval", "--model", "tiny-llama"], "eval"), (["serve", "--model", "tiny-llama"], "serve")):
            out = cli(*args, home="refused-home")
            lines = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
            check(out.returncode != 0 and len(lines) == 1 and f"pip install 'llmops-jupyter[{extra}]'" in lines[0],
                  f"llmops {args[0]} without [{extra}]: one line with the install command" +
                  ("" if len(lines) == 1 else f" — got {len(lines)} lines: {lines[:4]}"))
        check(not Path("refused-home").exists(), "refused commands wrote nothing (no registry folder made)")
    elif LINE == "finetune":
        out = cli("data", "d.jsonl", "--tokenizer", "tiny-llama", "--eval-size", "5")
        check(out.returncode == 0, "llmops data --tokenizer tiny-llama" + ("" if out.returncode == 0 else out.stderr))
        out = cli("finetune", "--model", "tiny-llama", "--max-steps", "2", "--batch-size", "4")
        check(out.returncode == 0, "llmops finetune (2 steps on the tiny model)" +
              ("" if out.returncode == 0 else out.stderr[-500:]))
        out = cli("eval", "--model", "tiny-llama")
        check(out.returncode != 0 and "pip install 'llmops-jupyter[eval]'" in out.stderr, "llmops eval → [eval] hint")
    elif LINE == "batch":
        import nbformat

        nb = nbformat.v4.new_notebook()
        cell = nbformat.v4.new_code_cell("x = 1")
        cell.metadata["tags"] = ["parameters"]
        nb.cells = [cell, nbformat.v4.new_code_cell("print(x * 2)")]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, "p.ipynb")
        out = cli("run", "p.ipynb", "-p", "x", "21")
        check(out.returncode == 0, "llmops run p.ipynb -p x 21" + ("" if out.returncode == 0 else out.stderr[-500:]))
        out = cli("finetune", "--max-steps", "1")
        check(out.returncode != 0 and "pip install 'llmops-jupyter[finetune]'" in out.stderr,
              "llmops finetune → [finetune] hint")
    elif LINE == "serve":
        import httpx

        proc = subprocess.Popen(["llmops", "serve", "--model", "tiny-llama", "--port", "0", "--detach"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        text, _ = proc.communicate(timeout=300)
        url = re.search(r"(http://127\.0\.0\.1:\d+/v1)", text)
        key = re.search(r"api key\s+in (\S+)", text)
        ok = proc.returncode == 0 and url is not None and key is not None
        if ok:
            r = httpx.get(url.group(1) + "/models",
                          headers={"Authorization": f"Bearer {Path(key.group(1)).read_text()}"}, timeout=60)
            ok = r.status_code == 200 and r.json()["data"][0]["id"]
        check(bool(ok), "llmops serve --detach answers /v1/models" + ("" if ok else f" — {text[-800:]}"))
        dep = re.search(r"(serve-[0-9a-f]+)", text)
        if dep:
            cli("serve", "--stop", "--deployment", dep.group(1))
    elif LINE == "lab":
        ansi = re.compile(r"\x1b\[[0-9;]*m")  # jupyter colours its status words
        out = subprocess.run(["jupyter", "labextension", "list"], capture_output=True, text=True)
        text = ansi.sub("", out.stdout + out.stderr)
        check(bool(re.search(r"llmops-jupyter\S* .*enabled.*OK", text)), "jupyter labextension list: enabled OK")
        out = subprocess.run(["jupyter", "server", "extension", "list"], capture_output=True, text=True)
        text = ansi.sub("", out.stdout + out.stderr)
        check("llmops_jupyter enabled" in text and re.search(r"llmops_jupyter.*OK", text) is not None,
              "jupyter server extension list: llmops_jupyter enabled, loads OK")
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

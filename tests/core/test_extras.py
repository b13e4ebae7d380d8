"""The extras each command needs are declared once, agree with pyproject.toml, and are checked before any work."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

from llmops_jupyter.core import extras

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())


def _dist(req: str) -> str:
    name = re.split(r"[<>=!~; ]", req, maxsplit=1)[0]
    return name.lower().replace("_", "-")


def test_extras_table_matches_pyproject():
    declared = PYPROJECT["project"]["optional-dependencies"]
    for extra, reqs in declared.items():
        if extra in ("dev", "all"):
            continue
        own = {_dist(r) for r in reqs if not r.startswith("llmops-jupyter")}
        included = {inc for r in reqs if r.startswith("llmops-jupyter[")
                    for inc in r.split("[", 1)[1].rstrip("]").split(",")}
        assert own == {d.lower() for d in extras.EXTRAS[extra].values()}, extra
        assert included == set(extras.INCLUDES.get(extra, ())), extra
    assert set(extras.EXTRAS) == set(declared) - {"dev", "all"}


def test_all_installs_every_extra():
    (spec,) = PYPROJECT["project"]["optional-dependencies"]["all"]
    assert set(spec.split("[", 1)[1].rstrip("]").split(",")) == set(extras.EXTRAS)


def test_core_dependencies_cover_plot_rendering():
    core = {_dist(r) for r in PYPROJECT["project"]["dependencies"]}
    assert {"plotly", "nbformat", "ipywidgets", "pandas"} <= core  # plotly's notebook renderer needs nbformat


def test_every_command_declares_known_extras():
    from llmops_jupyter.core.stage import discover

    for name, cmd in discover().items():
        declared = cmd.stage_cls.extras if cmd.is_stage else cmd.extras
        if not callable(declared):
            assert set(declared) <= set(extras.EXTRAS), (name, declared)
    needs = {n: c.stage_cls.extras for n, c in discover().items() if c.is_stage}
    assert needs["finetune"] == ("finetune",) and needs["eval"] == ("eval",) and "serve" in needs["serve"]
    assert discover()["run"].extras == ("batch",) and discover()["sweep"].extras == ("batch",)


def test_missing_extra_is_one_line_before_anything_is_written(shell, home, monkeypatch):
    """What a core-only install sees (the clean-venv smoke step checks the real thing): the front door refuses
    before the registry folder is even created."""
    from llmops_jupyter.core.errors import MissingDependencyError

    real = extras._importable
    monkeypatch.setattr(extras, "_importable", lambda m: m != "transformers" and real(m))
    with pytest.raises(MissingDependencyError) as info:
        shell.run_line_magic("llmops", "finetune --max-steps 1")
    text = str(info.value)
    assert "\n" not in text and "'transformers'" in text and "%llmops finetune" in text
    assert "pip install 'llmops-jupyter[finetune]'" in text
    assert not home.exists()


def readme_install_rows() -> list[tuple[str, list[str]]]:
    """(extra or "" for the core, [command items]) from README's Install table."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## Install", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        m = re.match(r"\| `pip install (?:'llmops-jupyter\[(\w+)\]'|llmops-jupyter)` \| (.*) \|$", line)
        if m:
            rows.append((m.group(1) or "", re.findall(r"`([^`]+)`", m.group(2))))
    return rows


def test_readme_install_table_is_what_the_commands_declare():
    import dataclasses
    from types import SimpleNamespace

    from llmops_jupyter.core.stage import CATALOG, discover

    def module(c):
        return (c.stage_cls or c.func).__module__

    cmds = {n: c for n, c in discover().items() if module(c) in CATALOG}  # not stages tests register
    rows = readme_install_rows()
    assert {e for e, _ in rows} == {"", *extras.EXTRAS}
    listed: set[str] = set()
    for extra, items in rows:
        for item in items:
            name, *flag = item.split(maxsplit=1)
            if name not in cmds:
                continue  # e.g. a provider name
            listed.add(name)
            cmd = cmds[name]
            if not flag:
                declared = cmd.stage_cls.extras if cmd.is_stage else cmd.extras
                assert not callable(declared) and tuple(declared) == ((extra,) if extra else ()), (item, declared)
                continue
            key, _, value = flag[0].partition(" ")
            field = key.lstrip("-").replace("-", "_")
            values = {f.name: (f.default if f.default is not dataclasses.MISSING else None)
                      for f in dataclasses.fields(cmd.config_cls)}
            assert field in values, item
            values[field] = value or "x"
            cfg = SimpleNamespace(**values)
            needs = cmd.required_extras(cfg)
            assert tuple(needs) == ((extra,) if extra else ()), (item, needs)
    assert listed == set(cmds) - {"help"}, set(cmds) - listed

"""A stage cell shows the stage's own output; other libraries' logging and warnings go to the run's log file.

The stage runs through the real magic (IPython shell) and the real CLI; its lazy import and its work emit what
torchao, torch, transformers and friends emit (warnings and records of their loggers) from a module outside the
package. ``--verbose`` shows them; the project's own logger and ``LlmopsWarning`` always show.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from llmops_jupyter.core.capture import LlmopsWarning
from llmops_jupyter.core.config import StageConfig, option
from llmops_jupyter.core.stage import Stage
from llmops_jupyter.frontends.cli import main as cli
from llmops_jupyter.registry import Registry

NOISY_LIB = '''
import logging, warnings
# at import time, like torchao / torch._pytree when a stage imports transformers lazily
logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so: Could not load this library")
warnings.warn("noisylib: imported the slow way", UserWarning)

def work():
    warnings.warn("noisylib: `old_arg` is deprecated and will be removed in v6", FutureWarning)
    logging.getLogger("transformers").warning("transformers: some weights were not initialized")
'''
NOISE = ("Failed to load /x/_C_mxfp8.so", "noisylib: imported the slow way", "noisylib: `old_arg` is deprecated",
         "transformers: some weights were not initialized")
OWN = ("own: the adapter is small", "own: rank 1 is unusually low", "noisy result: 42")


@dataclasses.dataclass
class NoisyConfig(StageConfig):
    steps: int = option(3, "steps to report", min=1)


class NoisyStage(Stage):
    """A stage whose libraries are noisy."""

    name = "noisy"
    config_cls = NoisyConfig

    def run(self, ctx):
        import noisylib  # a lazy import inside the stage, like torch / transformers

        noisylib.work()
        logging.getLogger("llmops_jupyter.stages.noisy").warning("own: the adapter is small")
        warnings.warn("own: rank 1 is unusually low", LlmopsWarning, stacklevel=1)
        for i in range(ctx.config.steps):
            ctx.progress(i + 1, ctx.config.steps, "noisy")
        print("noisy result: 42")
        return {}


@pytest.fixture()
def noisy(tmp_path, monkeypatch, capfd):
    """The stage registered, its library importable afresh, and a console like a notebook's: a root logging
    handler on stderr (logging.basicConfig) and warnings printed to stderr (pytest otherwise records them)."""
    from llmops_jupyter.core import stage as stage_mod

    lib = tmp_path / "site"
    lib.mkdir()
    (lib / "noisylib.py").write_text(NOISY_LIB)
    monkeypatch.syspath_prepend(str(lib))
    monkeypatch.delitem(sys.modules, "noisylib", raising=False)
    stage_mod.discover()
    monkeypatch.setitem(stage_mod._COMMANDS, "noisy", stage_mod.Command("noisy", NoisyConfig, "noisy",
                                                                        stage_cls=NoisyStage))
    NoisyConfig.command = "noisy"
    console = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    root.addHandler(console)
    tf = logging.getLogger("transformers")  # transformers, once imported, keeps its own stderr handler
    monkeypatch.setattr(tf, "handlers", [])
    monkeypatch.setattr(tf, "propagate", True)
    monkeypatch.setattr(warnings, "_showwarnmsg_impl", lambda msg: sys.stderr.write(warnings._formatwarnmsg(msg)))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        yield
    root.removeHandler(console)
    sys.modules.pop("noisylib", None)


def _fresh_import():
    sys.modules.pop("noisylib", None)


def test_cell_shows_own_output_and_logs_library_noise(shell, home, noisy, capfd):
    res = shell.run_line_magic("llmops", "noisy --steps 2")
    out, err = capfd.readouterr()
    shown = out + err
    assert res.status == "finished"
    for text in OWN:
        assert text in shown, text
    for text in NOISE:
        assert text not in shown, text
    log = home / "runs" / res.run_id / "run.log"
    logged = log.read_text()
    for text in NOISE:
        assert text in logged, text
    assert "own: the adapter is small" not in logged
    assert Registry(home).get_run(res.run_id)["summary"]["log"] == str(log)
    assert str(log) in str(shell.run_line_magic("llmops", f"show {res.run_id}"))


@pytest.mark.parametrize("line", ["--verbose noisy", "noisy --verbose"])
def test_verbose_magic_shows_everything(shell, home, noisy, capfd, line):
    _fresh_import()
    res = shell.run_line_magic("llmops", line)
    out, err = capfd.readouterr()
    for text in (*OWN, *NOISE):
        assert text in out + err, text
    assert "transformers: some weights" in (home / "runs" / res.run_id / "run.log").read_text()  # logged as well


def test_cli_captures_by_default_and_verbose_shows(home, noisy, capfd):
    assert cli(["noisy"]) == 0
    out, err = capfd.readouterr()
    assert "noisy result: 42" in out and "own: rank 1 is unusually low" in err
    assert not [t for t in NOISE if t in out + err]
    _fresh_import()
    assert cli(["--verbose", "noisy", "--steps", "1"]) == 0
    out, err = capfd.readouterr()
    assert all(t in out + err for t in NOISE)
    assert cli(["noisy", "--help"]) == 0
    assert "--verbose" in capfd.readouterr().out


def test_capture_ends_with_the_stage(shell, home, noisy, capfd):
    """After the run, the same libraries print again as they normally would (nothing stays patched)."""
    shell.run_line_magic("llmops", "noisy")
    capfd.readouterr()
    logging.getLogger("transformers").warning("after the run")
    warnings.warn("after the run too", FutureWarning, stacklevel=1)
    err = capfd.readouterr().err
    assert "after the run" in err and "after the run too" in err


def test_eval_of_an_adapter_stays_quiet_and_never_loads_gptqmodel(shell, home, tiny_model, tiny_dataset):
    """The real stages: a fine-tuned adapter evaluated from the command line prints the stage's own output only;
    peft's GPTQ probe no longer imports GPTQModel (its banner) outside the quantize stage."""
    shell.run_line_magic("llmops", f"finetune --model {tiny_model} --data {tiny_dataset.hash[:12]} --max-steps 2 "
                                   "--batch-size 4 --rank 4")
    script = ("import sys\nfrom llmops_jupyter.frontends.cli import main\n"
              "rc = main(['eval', '--model', 'finetune@latest', '--limit', '2', '--metrics', 'f1'])\n"
              "print('GPTQMODEL', 'gptqmodel' in sys.modules, rc)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=Path(home).parent)
    assert "GPTQMODEL False 0" in proc.stdout, proc.stdout + proc.stderr
    shown = proc.stdout + proc.stderr
    for noise in ("GPT-QModel", "FutureWarning", "Failed to load", "_pytree", "register_constant"):
        assert noise not in shown, noise
    run = Registry(home).get_run("eval@latest")
    assert run["summary"].get("log") and Path(run["summary"]["log"]).exists()

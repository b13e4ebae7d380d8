"""llmops-jupyter: the LLM lifecycle from notebook cells.

``%load_ext llmops_jupyter`` registers ``%llmops`` / ``%%llmops``. This module imports only the standard library:
loading the extension must stay cheap (a test asserts torch, transformers, peft, plotly, papermill and datasets
are not imported by it).
"""

from __future__ import annotations

__version__ = "0.1.0"


def load_ipython_extension(ipython) -> None:
    from llmops_jupyter.frontends.magics import load

    load(ipython)


def unload_ipython_extension(ipython) -> None:  # pragma: no cover - nothing to tear down
    pass


def _jupyter_labextension_paths():  # the prebuilt Lab extension shipped in the wheel
    return [{"src": "labextension", "dest": "llmops-jupyter"}]


def _jupyter_server_extension_points():
    return [{"module": "llmops_jupyter.server"}]


def form(command: str, /, **values):
    """An ipywidgets form for ``command`` (``"finetune"``, ``"data"``, ...), optionally pre-filled with ``values``;
    the same as ``%llmops <command> --form``. Its Run button runs the command as the magic does and writes the
    equivalent ``%llmops`` line into a new cell. ipywidgets is imported here, never when the extension loads."""
    from llmops_jupyter.frontends.forms import build_form

    return build_form(command, **values)


def rl(rewards=None, **options):
    """Run ``%llmops rl`` from Python with reward functions passed as objects:
    ``llmops_jupyter.rl(rewards=[correct, fmt], model="tiny-llama", data="data@latest", max_steps=20)``. ``rewards`` may
    mix callables and names (notebook functions or built-ins); other keywords are the stage's options. Returns the
    run result (its ``outputs`` hold the adapter, the reward figure and the completions table)."""
    from llmops_jupyter.frontends.frontdoor import execute

    if rewards is not None:
        options["reward"] = list(rewards) if isinstance(rewards, (list, tuple)) else [rewards]
    return execute("rl", options)

"""The "explain" button the eval widgets share (``%llmops rate`` and the examples under an ``%llmops eval`` cell).

One button explains one example: the first version's answer to the prompt it was given (the rendered prompt, so
``--no-chat``), contrasted with the second version's view of the same answer when there is one — the same stage,
config and record as ``%llmops explain --model A [--model B] --prompt ... --target ...``. The pictures go into the
button's own ``Output`` widget, so a notebook saved with its widget state keeps them.
"""

from __future__ import annotations

import html
import re
from typing import Any

import ipywidgets as widgets


def explain_models(registry: Any, versions: list[dict[str, Any]]) -> list[str]:
    """The model versions ``explain`` gets for these eval versions (``{run_id, model_ref}``): the first two, as the
    model references eval was given. Eval tells versions apart in their refs: model A under prompt P is ``A|P``,
    a model given twice ``A#2``, and the prompt versions of a single model are the prompt refs alone (``qa@1``,
    ``qa@2``) — those are one model on different prompts, explained alone (the first version's rendered prompt)."""
    out: list[str] = []
    for v in versions[:2]:
        params = registry.get_run(v["run_id"])["params"]
        models = [str(m) for m in params.get("model") or []]
        ref = v["model_ref"]
        if len(models) == 1 and params.get("prompt") and "|" not in ref:
            if models[0] in out:
                continue  # another prompt of the same model: nothing to contrast
            ref = models[0]
        out.append(re.sub(r"#\d+$", "", ref.split("|", 1)[0]))
    return out


class ExplainButton:
    """A button, its status line and its output area; :meth:`run` is what a click does (tests call it too)."""

    def __init__(self, registry: Any, *, tooltip: str, status: Any = None, description: str = "explain"):
        self.registry = registry
        self.button = widgets.Button(description=description, icon="search", tooltip=tooltip)
        self.button.add_class("llmops-explain-button")
        self.out = widgets.Output()
        self.out.add_class("llmops-explain-output")
        self.status = status if status is not None else widgets.HTML()
        self.last: Any = None

    def run(self, versions: list[dict[str, Any]], prompt: str, answer: str | None, what: str) -> Any:
        """Explain ``answer`` to ``prompt`` by the first of the eval ``versions`` (contrasted with the second); a
        recorded explain run. A refused config or a failed run is one red line in the status, the pictures are
        cleared."""
        from IPython.display import display

        from llmops_jupyter.core.errors import LlmopsError
        from llmops_jupyter.frontends.frontdoor import execute

        config = {"model": explain_models(self.registry, versions), "prompt": prompt, "target": answer or None, "chat": False}
        self.out.clear_output()
        self.button.disabled = True
        try:
            with self.out:
                result = execute("explain", config, registry=self.registry, display=display, live=False)
        except LlmopsError as exc:
            self.status.value = f"<span style='color:#c33'>explain: {html.escape(exc.message)}</span>"
            return None
        finally:
            self.button.disabled = False
        self.last = result
        self.status.value = (f"<span style='color:#2a7'>explained {html.escape(what)} "
                             f"(run {html.escape(result.run_id)})</span>")
        return result

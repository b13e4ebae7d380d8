"""The examples under an ``%llmops eval`` cell, a page at a time, each with an "explain" button.

Every example shows its prompt, reference and each version's output with its per-example metrics; its button
explains it (:mod:`~llmops_jupyter.stages.eval.explain_button`, shared with ``%llmops rate``): the first version's
answer, and when the run compares versions (``--model A --model B``, or ``--baseline RUN``) the contrast of the two
— the candidate's answer read by the baseline for a ``--baseline`` run. ``%llmops diff`` of two eval runs shows the
same view over their shared examples (A's answer read by B's version). The rows come from the registry (what the
run stored), so the view is built only when a notebook displays it; terminals skip it (``notebook_only``).
"""

from __future__ import annotations

import functools
import html
import math
from typing import Any

from llmops_jupyter.stages.eval import store as evalstore

HIDDEN_METRICS = {"nll", "n_tokens", "latency_s", "tokens_per_s", "ppl_example"}


def _pre(text: str, colour: str) -> str:
    return (f"<pre style='white-space:pre-wrap;background:{colour};padding:4px;margin:1px 0;max-height:10em;"
            f"overflow:auto'>{html.escape(text or '')}</pre>")


def _metrics(metrics: dict[str, Any]) -> str:
    parts = [f"{k} {v:.3g}" for k, v in metrics.items() if k not in HIDDEN_METRICS and isinstance(v, (int, float))
             and not isinstance(v, bool) and not math.isnan(v)]
    return "<small>" + html.escape(" · ".join(parts)) + "</small>"


class EvalExamples:
    """``result.outputs['examples']`` of an eval run: ``.widget`` (built on first use) pages through the examples;
    ``.explain(i)`` explains example ``i`` (0-based over the run) as its button does."""

    notebook_only = True

    def __init__(self, registry: Any, run_id: str, *, baseline: str | None = None,
                 versions: list[dict[str, Any]] | None = None, page_size: int = 5):
        self.registry = registry
        self.run_id = run_id
        self.page_size = page_size
        if versions is None:
            versions = evalstore.versions(registry, run_id)
            if baseline:  # the candidate(s) were compared with the baseline run's first version: explain against it
                base = evalstore.versions(registry, baseline)[0]
                versions = versions[:1] + [base] + versions[1:]
        self.versions = versions
        self.page = 0
        self.buttons: dict[int, Any] = {}  # example index -> its ExplainButton (the page on screen)
        self._widget: Any = None

    # Read from the registry on first use (a notebook displaying the view), not when the eval run builds this object:
    # a run from a terminal or a pipeline never shows it, and the run's summary labels are complete only once it ends.
    @functools.cached_property
    def _labels(self) -> list[str]:
        labels: dict[tuple[str, str], str] = {}
        for run in dict.fromkeys(v["run_id"] for v in self.versions):
            summary = self.registry.get_run(run)["summary"]
            labels.update({(run, ref): label for ref, label in zip(summary.get("models") or [],
                                                                   summary.get("labels") or [])})
        return [labels.get((v["run_id"], v["model_ref"]), v["model_ref"]) for v in self.versions]

    @functools.cached_property
    def _tables(self) -> list[dict[str, dict[str, Any]]]:
        return [{r["id"]: r for r in evalstore.load_examples(self.registry, v["run_id"], v["model_ref"])}
                for v in self.versions]

    @functools.cached_property
    def ids(self) -> list[str]:
        return [i for i in self._tables[0] if all(i in t for t in self._tables[1:])]

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"EvalExamples(run {self.run_id}: {len(self.ids)} examples, {len(self.versions)} version(s))"

    @property
    def widget(self) -> Any:
        if self._widget is None:
            import ipywidgets as widgets

            self._rows = widgets.VBox()
            self._pager = widgets.HTML()
            self.prev_button = widgets.Button(description="◀ prev", tooltip="previous examples")
            self.next_button = widgets.Button(description="next ▶", tooltip="next examples")
            self.prev_button.on_click(lambda _b: self.go(self.page - 1))
            self.next_button.on_click(lambda _b: self.go(self.page + 1))
            runs = ", ".join(dict.fromkeys(v["run_id"] for v in self.versions))
            title = widgets.HTML(f"<b>Examples</b> <small>(run {html.escape(runs)}; "
                                 "explain: why the first version answered this"
                                 + (", and how the second reads the same answer" if len(self.versions) > 1 else "")
                                 + ")</small>")
            self._widget = widgets.VBox([title, self._rows,
                                         widgets.HBox([self.prev_button, self.next_button, self._pager])])
            self._widget.add_class("llmops-eval-examples")
            self.go(self.page)
        return self._widget

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        bundle = self.widget._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict) and "text/plain" in bundle:  # not the repr of every nested widget (prompts...)
            bundle["text/plain"] = repr(self)  # what a notebook saved without widget state (papermill) shows
        return bundle

    def go(self, page: int) -> None:
        """Show page ``page`` (clamped); the previous page's buttons and pictures are closed."""
        import ipywidgets as widgets

        from llmops_jupyter.stages.eval.explain_button import ExplainButton

        pages = max(1, math.ceil(len(self.ids) / self.page_size))
        self.page = max(0, min(pages - 1, page))
        for old in self._rows.children:
            old.close()
        self.buttons = {}
        rows = []
        for i in range(self.page * self.page_size, min(len(self.ids), (self.page + 1) * self.page_size)):
            rows.append(self._row(i, widgets, ExplainButton))
        self._rows.children = rows
        self._pager.value = (f"<small>examples {self.page * self.page_size + 1}–"
                             f"{min(len(self.ids), (self.page + 1) * self.page_size)} of {len(self.ids)}</small>")
        self.prev_button.disabled = self.page == 0
        self.next_button.disabled = self.page >= pages - 1

    def _row(self, i: int, widgets: Any, ExplainButton: Any) -> Any:
        ex = self.ids[i]
        first = self._tables[0][ex]
        cells = [f"<b>#{i + 1}</b> <code>{html.escape(ex)}</code>", "<b>Prompt</b>" + _pre(first["prompt"], "#f7f7f7"),
                 "<b>Reference</b>" + _pre(first["reference"], "#eef6ee")]
        for v, label, table in zip(self.versions, self._labels, self._tables):
            row = table[ex]
            several_runs = any(w["run_id"] != self.run_id for w in self.versions)
            cells.append(f"<b>{html.escape(label)}</b>"
                         + (f" <small>(run {html.escape(v['run_id'])})</small>" if several_runs else "")
                         + _pre(row["output"], "#eef2f8") + _metrics(row["metrics"]))
        button = ExplainButton(self.registry, tooltip=f"explain example {i + 1} (%llmops explain)")
        button.button.on_click(lambda _b, i=i: self.explain(i))
        self.buttons[i] = button
        box = widgets.VBox([widgets.HTML("".join(cells)), widgets.HBox([button.button, button.status]), button.out],
                           layout=widgets.Layout(border="1px solid #ddd", padding="4px", margin="2px 0"))
        box.add_class("llmops-eval-example")
        return box

    def explain(self, i: int) -> Any:
        """Explain example ``i`` (shown on its page first, so the pictures land under its button)."""
        if i not in self.buttons:
            self.widget  # noqa: B018 - builds the view
            self.go(i // self.page_size)
        row = self._tables[0][self.ids[i]]
        return self.buttons[i].run(self.versions, row["prompt"], row["output"],
                                   f"example {i + 1}")

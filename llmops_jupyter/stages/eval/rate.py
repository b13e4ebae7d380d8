"""Side-by-side comparison of eval outputs with human ratings (``%llmops rate <eval run> [<eval run 2>]``).

Every model version in the given eval runs is shown next to the others, one example at a time: prompt,
reference, each version's output and per-example metrics with the delta against the first version. A rater
navigates with buttons or the keyboard (← / → or j / k, digits 1-9 pick the preferred version, s saves) and
gives thumbs up/down and/or 1-5 stars per version, a preferred version and a note. Each save writes one row per
rated version to ``eval_ratings`` (who, when, runs, versions, example) — the input for DPO preference pairs
(:func:`llmops_jupyter.stages.eval.store.preference_pairs`).

Everything is plain ipywidgets (so tests drive it by setting values and calling ``.click()``); the keyboard
listener is a tiny anywidget when anywidget is installed, otherwise only the buttons are offered.
"""

from __future__ import annotations

import html
import math
import uuid
from typing import Any

import ipywidgets as widgets

from llmops_jupyter.core.errors import StageError
from llmops_jupyter.stages.eval import store as evalstore
from llmops_jupyter.stages.eval.explain_button import ExplainButton

HIDDEN_METRICS = {"nll", "n_tokens", "latency_s", "tokens_per_s"}


def _key_widget() -> Any:
    try:
        import anywidget
        import traitlets
    except ImportError:
        return None

    class KeyNav(anywidget.AnyWidget):
        """A focusable strip that forwards key presses to Python (``key`` + an incrementing ``count``)."""

        _esm = """
        function render({ model, el }) {
          const box = document.createElement("div");
          box.tabIndex = 0;
          box.textContent = "⌨ click here, then ← / → (or j / k) to move, 1-9 to prefer a version, s to save";
          box.style.cssText = "padding:4px 8px;border:1px dashed #999;border-radius:4px;cursor:pointer;" +
                              "font-size:12px;color:#555;outline-offset:2px";
          box.addEventListener("keydown", (e) => {
            if (e.ctrlKey || e.metaKey || e.altKey) return;
            model.set("key", e.key);
            model.set("count", model.get("count") + 1);
            model.save_changes();
            e.preventDefault();
            e.stopPropagation();
          });
          el.appendChild(box);
        }
        export default { render };
        """
        key = traitlets.Unicode("").tag(sync=True)
        count = traitlets.Int(0).tag(sync=True)

    return KeyNav()


def _pre(text: str, colour: str = "#f7f7f7") -> str:
    return (f"<pre style='white-space:pre-wrap;background:{colour};padding:6px;margin:2px 0;max-height:16em;"
            f"overflow:auto'>{html.escape(text or '')}</pre>")


class CompareView:
    """The side-by-side rating widget (``.widget`` is the ipywidgets box; displaying the view displays it).

    ``versions``: ``[{run_id, model_ref, label}]``; ``ids``: the example ids all versions share.
    """

    def __init__(self, registry: Any, runs: list[str], *, start: int = 0, user: str | None = None):
        self.registry = registry
        self.user = user
        versions = [v for run in runs for v in evalstore.versions(registry, run)]
        refs = [v["model_ref"] for v in versions]
        for v in versions:
            v["label"] = v["model_ref"] if refs.count(v["model_ref"]) == 1 else f"{v['model_ref']} @ {v['run_id']}"
        self.versions = versions
        self.rows: list[dict[str, dict[str, Any]]] = []
        tables = [{r["id"]: r for r in evalstore.load_examples(registry, v["run_id"], v["model_ref"])}
                  for v in versions]
        self.ids = [i for i in tables[0] if all(i in t for t in tables[1:])]
        if not self.ids:
            raise StageError(f"The eval runs {', '.join(runs)} have no examples in common.",
                             fix="compare runs made on the same dataset split")
        self._tables = tables
        self.index = 0
        self.saved: list[int] = []

        self.header = widgets.HTML()
        self.prompt = widgets.HTML()
        self.reference = widgets.HTML()
        self.outputs = [widgets.HTML() for _ in versions]
        self.metric_boxes = [widgets.HTML() for _ in versions]
        self.thumbs = [widgets.ToggleButtons(options=[("–", 0), ("👍", 1), ("👎", -1)], value=0,
                                             style={"button_width": "42px"}, description="thumbs")
                       for _ in versions]
        self.stars = [widgets.ToggleButtons(options=[("–", 0)] + [(str(i), i) for i in range(1, 6)], value=0,
                                            style={"button_width": "32px"}, description="stars")
                      for _ in versions]
        self.preferred = widgets.Dropdown(options=[("no preference", None)] +
                                          [(v["label"], i) for i, v in enumerate(versions)], value=None,
                                          description="preferred")
        self.note = widgets.Textarea(placeholder="note (optional)", layout=widgets.Layout(width="98%"))
        self.prev_button = widgets.Button(description="◀ prev", tooltip="previous example (← or k)")
        self.next_button = widgets.Button(description="next ▶", tooltip="next example (→ or j)")
        self.save_button = widgets.Button(description="save rating", button_style="primary",
                                          tooltip="store the ratings of this example (s)")
        self.status = widgets.HTML()
        self.explainer = ExplainButton(registry, status=self.status,
                                       tooltip="why the first version answered this (token logprobs, logit lens); "
                                               "with two or more versions, how the second differs on the same "
                                               "answer (%llmops explain)")
        self.explain_button, self.explain_out = self.explainer.button, self.explainer.out
        self.explain_button.on_click(lambda _b: self.explain())
        self.prev_button.on_click(lambda _b: self.go(self.index - 1))
        self.next_button.on_click(lambda _b: self.go(self.index + 1))
        self.save_button.on_click(lambda _b: self.save())
        self.keynav = _key_widget()
        if self.keynav is not None:
            self.keynav.observe(self._on_key, names="count")

        panels = []
        for i, v in enumerate(versions):
            title = widgets.HTML(f"<b>{html.escape(v['label'])}</b><br><small>run {html.escape(v['run_id'])}</small>")
            panels.append(widgets.VBox([title, self.outputs[i], self.metric_boxes[i], self.thumbs[i], self.stars[i]],
                                       layout=widgets.Layout(flex="1 1 0", min_width="240px",
                                                             border="1px solid #ddd", padding="4px")))
        nav = widgets.HBox([self.prev_button, self.next_button, self.save_button, self.explain_button, self.status])
        parts: list[Any] = [self.header, self.prompt, self.reference, widgets.HBox(panels),
                            widgets.HBox([self.preferred]), self.note, nav, self.explain_out]
        if self.keynav is not None:
            parts.append(self.keynav)
        self.widget = widgets.VBox(parts)
        self.go(start)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return f"CompareView({len(self.versions)} versions, {len(self.ids)} examples, at {self.index + 1})"

    # -- navigation ---------------------------------------------------------------------------------------------
    @property
    def example_id(self) -> str:
        return self.ids[self.index]

    def go(self, index: int) -> None:
        self.index = max(0, min(len(self.ids) - 1, index))
        ex = self.example_id
        rows = [t[ex] for t in self._tables]
        self.header.value = (f"<b>Example {self.index + 1} / {len(self.ids)}</b> <code>{html.escape(ex)}</code>")
        self.prompt.value = "<b>Prompt</b>" + _pre(rows[0]["prompt"])
        self.reference.value = "<b>Reference</b>" + _pre(rows[0]["reference"], "#eef6ee")
        base = rows[0]["metrics"]
        for i, row in enumerate(rows):
            self.outputs[i].value = _pre(row["output"], "#eef2f8")
            parts = []
            for k, val in row["metrics"].items():
                if k in HIDDEN_METRICS or val is None or (isinstance(val, float) and math.isnan(val)):
                    continue
                text = f"{k} {val:.3g}"
                b = base.get(k)
                if i > 0 and isinstance(b, (int, float)) and not math.isnan(b):
                    d = val - b
                    colour = "#2a7" if d > 0 else "#c33" if d < 0 else "#777"
                    text += f" <span style='color:{colour}'>({d:+.3g})</span>"
                parts.append(text)
            if row.get("judge_raw"):
                parts.append(f"judge: <i>{html.escape(row['judge_raw'][:200])}</i>")
            self.metric_boxes[i].value = "<small>" + " · ".join(parts) + "</small>"
        for w in (*self.thumbs, *self.stars):
            w.value = 0
        self.preferred.value = None
        self.note.value = ""
        self.prev_button.disabled = self.index == 0
        self.next_button.disabled = self.index == len(self.ids) - 1

    def press(self, key: str) -> None:
        """Handle one key as the keyboard strip would (also used by tests)."""
        if key in ("ArrowRight", "j", "n"):
            self.go(self.index + 1)
        elif key in ("ArrowLeft", "k", "p"):
            self.go(self.index - 1)
        elif key == "s":
            self.save()
        elif key.isdigit() and 1 <= int(key) <= len(self.versions):
            self.preferred.value = int(key) - 1

    def _on_key(self, change: dict[str, Any]) -> None:
        self.press(self.keynav.key)

    # -- explain ----------------------------------------------------------------------------------------------------
    def explain(self) -> Any:
        """Run ``explain`` on this example: the first version's answer to the prompt it was given (the rendered
        prompt, so ``--no-chat``), contrasted with the second version's view of the same answer when there is one.
        Recorded as an explain run like the magic; the pictures go under the buttons."""
        row = self._tables[0][self.example_id]
        return self.explainer.run(self.versions, row["prompt"], row["output"],
                                  f"example {self.index + 1}")

    @property
    def last_explanation(self) -> Any:
        return self.explainer.last

    # -- ratings ------------------------------------------------------------------------------------------------
    def save(self, advance: bool = True) -> list[int]:
        """Store the current ratings (one row per version that got a rating, a preference or a note)."""
        pref_i = self.preferred.value
        preferred = None
        if pref_i is not None:
            v = self.versions[pref_i]
            preferred = (v["run_id"], v["model_ref"])
        note = self.note.value.strip() or None
        compared = [(v["run_id"], v["model_ref"]) for v in self.versions]
        session = uuid.uuid4().hex[:12]
        ids = []
        for i, v in enumerate(self.versions):
            thumbs, stars = self.thumbs[i].value or None, self.stars[i].value or None
            if thumbs is None and stars is None and preferred is None and note is None:
                continue
            ids.append(evalstore.save_rating(
                self.registry, session=session, example_id=self.example_id, run_id=v["run_id"],
                model_ref=v["model_ref"], thumbs=thumbs, stars=stars, preferred=preferred, note=note,
                compared=compared, user=self.user))
        self.saved.extend(ids)
        if ids:
            self.status.value = f"<span style='color:#2a7'>saved {len(ids)} rating(s) for example {self.index + 1}</span>"
            if advance and self.index < len(self.ids) - 1:
                self.go(self.index + 1)
        else:
            self.status.value = "<span style='color:#c33'>nothing to save: rate a version, pick one or add a note</span>"
        return ids

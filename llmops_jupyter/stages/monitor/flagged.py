"""Flagged-records widget: review what the monitor flagged, label each record good/bad (with a corrected
response), and turn the labels into a new dataset version — the feedback loop into the data stage.

Labels are written to the registry's ``request_labels`` table as soon as they are set (nothing is lost if the
kernel dies); **Create dataset** runs the recorded ``feedback`` stage, which writes a standard dataset artifact
with lineage deployment → dataset. Everything shown was PII-scrubbed before it was stored.
"""

from __future__ import annotations

import html
import json
from typing import Any

from llmops_jupyter.registry import Registry

LABELS = ("unlabelled", "good", "bad")


def save_label(registry: Registry, request: int, label: str, corrected: str | None = None) -> None:
    """Persist one label (``unlabelled`` removes it). Already-exported labels are re-opened for the next version."""
    registry.label_request(request, None if label == "unlabelled" else label, corrected)


class _Row:
    def __init__(self, owner: FlaggedRecords, rec: dict[str, Any], existing: dict[str, Any] | None):
        import ipywidgets as W

        self.owner = owner
        self.record = rec
        flags = ", ".join(rec.get("flags") or []) or "-"
        prompt = html.escape((rec.get("prompt") or "")[:600])
        response = html.escape((rec.get("response") or "")[:600])
        self.info = W.HTML(f"<div style='font-size:12px'><b>#{rec['id']}</b> · {html.escape(flags)} · status "
                           f"{rec['status']}<br><b>prompt</b>: <code>{prompt}</code><br><b>response</b>: "
                           f"<code>{response}</code></div>")
        self.label = W.ToggleButtons(options=list(LABELS), value=(existing or {}).get("label") or "unlabelled",
                                     style={"button_width": "90px"})
        self.corrected = W.Textarea(value=(existing or {}).get("corrected") or "",
                                    placeholder="corrected response (for 'bad')", continuous_update=False,
                                    layout=W.Layout(width="98%", height="60px"))
        self.label.observe(self._changed, names="value")
        self.corrected.observe(self._changed, names="value")
        self.box = W.VBox([self.info, W.HBox([self.label]), self.corrected],
                          layout=W.Layout(border="1px solid #ddd", padding="4px", margin="2px 0"))

    def _changed(self, _change: Any = None) -> None:
        save_label(self.owner.registry, self.record["id"], self.label.value, self.corrected.value.strip() or None)
        self.owner._update_status()


class FlaggedRecords:
    """``FlaggedRecords(registry, deployment, records)``; ``.rows[i].label`` / ``.corrected`` /
    ``.save_button`` are the widgets (tests and notebooks can drive them); ``.dataset`` is the last result."""

    def __init__(self, registry: Registry, deployment: str, records: list[dict[str, Any]], *, limit: int = 50):
        import ipywidgets as W

        self.registry = registry
        self.deployment = deployment
        existing = registry.request_labels([r["id"] for r in records[:limit]])
        self.rows = [_Row(self, r, existing.get(r["id"])) for r in records[:limit]]
        self.save_button = W.Button(description="Create dataset", button_style="primary", icon="database")
        self.save_button.on_click(lambda _b: self.save())
        self.status = W.HTML()
        self.result: Any = None
        self.widget = W.VBox([W.HTML(f"<b>Flagged records of {html.escape(deployment)}</b> "
                                     f"({len(records)} flagged, showing {len(self.rows)})"),
                              *[r.box for r in self.rows], W.HBox([self.save_button, self.status])])
        self._update_status()

    def label(self, request: int, label: str, corrected: str | None = None) -> None:
        """Set a label the way a click would (drives the widgets, so the UI and the registry agree)."""
        for row in self.rows:
            if row.record["id"] == request:
                row.corrected.value = corrected or ""
                row.label.value = label
                return
        raise KeyError(f"record {request} is not in this list")

    def _update_status(self, extra: str = "") -> None:
        n = sum(1 for r in self.rows if r.label.value != "unlabelled")
        self.status.value = f"{n} labelled{(' · ' + extra) if extra else ''}"

    def save(self):
        """Run the ``feedback`` stage: labelled records → a new dataset version (lineage deployment → dataset)."""
        from llmops_jupyter.core.runner import Runner

        try:
            self.result = Runner(self.registry).run("feedback", deployment=self.deployment)
        except Exception as exc:  # noqa: BLE001 - shown in the widget, re-raised for programmatic callers
            self._update_status(f"<span style='color:#b00'>{html.escape(str(exc))}</span>")
            raise
        art = self.result.artifact
        self._update_status(f"dataset <code>{art.short}</code> ({json.loads((art.path / 'manifest.json').read_text())['counts']})")
        return self.result

    @property
    def dataset(self):
        return self.result.artifact if self.result else None

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

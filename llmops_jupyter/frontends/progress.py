"""Generic progress bar for any stage: tqdm (widget in a notebook, text elsewhere) driven by PROGRESS events."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmops_jupyter.core.runner import END_EVENTS, Event, EventType


class ProgressView:
    def __init__(self, *, front_end: str = "python", display: Callable[[Any], None] | None = None, **_: Any):
        self.front_end = front_end
        self._bars: dict[str, Any] = {}

    def __call__(self, event: Event) -> None:
        if event.type is EventType.PROGRESS:
            self._progress(event)
        elif event.type in END_EVENTS:
            self.close()

    def _progress(self, event: Event) -> None:
        desc = event.data.get("desc") or event.stage
        total = event.data.get("total")
        bar = self._bars.get(desc)
        if bar is None:
            # A stage's phases are sequential: finish the previous phase's bar first. Two bars open at once make
            # tqdm stack them with cursor moves, which a terminal IPython (no widgets) overwrites into garbage.
            self.close()
            if self.front_end == "magic":
                from tqdm.auto import tqdm
            else:
                from tqdm import tqdm
            bar = self._bars[desc] = tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True)
        if total is not None and bar.total != total:
            bar.total = total
        bar.n = event.data.get("done", bar.n)
        postfix = {k: v for k, v in event.data.items() if k not in ("done", "total", "desc")}
        if postfix:
            bar.set_postfix(postfix, refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

"""Plain display objects: an HTML table in notebooks (kept in saved outputs), aligned text in terminals."""

from __future__ import annotations

import datetime as _dt
import html
from collections.abc import Sequence
from typing import Any


def fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def fmt_num(value: float | None) -> str:
    """A report figure: 4 significant digits, blank when missing or NaN."""
    return "" if value is None or value != value else f"{value:.4g}"


def fmt_delta(before: float | None, after: float | None) -> str:
    """The change from ``before`` to ``after``, absolute and relative ("+0.12 (+3.4%)"); blank when either is missing."""
    if before is None or after is None or before != before or after != after:
        return ""
    return f"{after - before:+.4g} ({(after / before - 1) * 100:+.1f}%)"


def fmt_tps(value: float | None) -> str:
    """Throughput in tokens per second; blank when missing or NaN."""
    return "" if value is None or value != value else f"{value:.1f} tok/s"


def fmt_time(ts: float | None) -> str:
    if not ts:
        return ""
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    return f"{seconds // 3600:.0f}h{(seconds % 3600) // 60:02.0f}m"


def print_text(obj: Any) -> None:
    """Display for terminals: text of tables and reports; figures and widgets are skipped (they are for
    notebooks: plotly figures, and objects that say ``notebook_only``)."""
    if obj is None or hasattr(obj, "to_plotly_json") or getattr(obj, "notebook_only", False):
        return
    print(obj.__str__() if type(obj).__str__ is not object.__str__ else repr(obj))


class Table:
    """A titled table; ``rows`` are sequences aligned with ``columns``."""

    def __init__(self, columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "", note: str = ""):
        self.columns = list(columns)
        self.rows = [[fmt(v) for v in r] for r in rows]
        self.title = title
        self.note = note

    def __len__(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        widths = [len(c) for c in self.columns]
        for r in self.rows:
            widths = [max(w, len(v)) for w, v in zip(widths, r)]
        line = "  ".join(c.ljust(w) for c, w in zip(self.columns, widths))
        out = [self.title] if self.title else []
        out += [line, "  ".join("-" * w for w in widths)]
        out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in self.rows]
        if not self.rows:
            out.append("(none)")
        if self.note:
            out.append(self.note)
        return "\n".join(out)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        head = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td style='text-align:left'>{html.escape(v)}</td>" for v in r) + "</tr>"
            for r in self.rows
        ) or f"<tr><td colspan={len(self.columns)}><i>(none)</i></td></tr>"
        title = f"<b>{html.escape(self.title)}</b>" if self.title else ""
        note = f"<div><small>{html.escape(self.note)}</small></div>" if self.note else ""
        return f"<div class='llmops-table'>{title}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}</div>"


class Bundle:
    """Several displayables shown together (text joins their text; HTML joins their HTML)."""

    def __init__(self, *parts: Any):
        self.parts = [p for p in parts if p is not None]

    def __str__(self) -> str:
        return "\n\n".join(str(p) for p in self.parts)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        out = []
        for p in self.parts:
            if hasattr(p, "_repr_html_"):
                out.append(p._repr_html_())
            else:
                out.append(f"<pre>{html.escape(str(p))}</pre>")
        return "".join(out)

"""One way to say "when" on every front end: ``--since``/``--until`` of ``monitor`` and ``audit`` (and the CLI).

Accepted: a duration back from now (``90s``, ``30m``, ``2h``, ``7d``, ``1w``; a leading ``-`` means the same), a
number of seconds (negative = that long ago, positive = a POSIX timestamp), a date (``2026-11-01``) or an ISO
datetime (``2026-11-01T09:30``, local time unless it carries an offset).
"""

from __future__ import annotations

import datetime as _dt
import re
import time

from llmops_jupyter.core.errors import ConfigError

_DURATION = re.compile(r"^-?\s*(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
FORMS = "30m, 2h, 7d, -3600 (seconds ago), a POSIX timestamp, 2026-11-01 or 2026-11-01T09:30"


def parse_when(value: str | float | int | None, *, field: str = "since", command: str = "",
               now: float | None = None) -> float | None:
    """``value`` → a POSIX timestamp, or None for nothing given. Bad text raises one ConfigError naming ``field``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    now = time.time() if now is None else now
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return now + float(value) if value < 0 else float(value)
    text = str(value).strip()
    m = _DURATION.match(text.lower())
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return parse_when(float(text), now=now)
    except ValueError:
        pass
    try:
        return _dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        where = f"{command}: " if command else ""
        raise ConfigError(f"{where}--{field.replace('_', '-')} '{text}' is not a duration, a time or a date.",
                          field=field, value=text, fix=f"use e.g. {FORMS}") from None

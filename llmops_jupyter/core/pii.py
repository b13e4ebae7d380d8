"""PII detection and scrubbing shared by the data stage, the server's request log and monitoring.

Regex detectors with validation where a checksum exists (Luhn for card numbers, octet ranges for IPv4), so that
ordinary numbers are not scrubbed. Replacement tokens keep the text readable: ``[EMAIL]``, ``[PHONE]``, ...
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
IPV4 = re.compile(r"(?<!\d)(?<!\d\.)(?:\d{1,3}\.){3}\d{1,3}(?!\d)(?!\.\d)")
IPV6 = re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{1,4}:){2,7}(?::|[0-9A-Fa-f]{1,4})(?![0-9A-Fa-f:])|"
                  r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:?){1,6}(?![0-9A-Fa-f:])")
PHONE = re.compile(r"(?<![\w+])(?<!\d[\s.-])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])\d{2,4}[\s.-]?\d{3,4}"
                   r"(?!\w)(?![\s.-]\d)")
SSN = re.compile(r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)")


def _luhn(text: str) -> bool:
    digits = [int(c) for c in text if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _valid_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# Order matters: cards before phones (a card number also looks like a long phone number).
DETECTORS: list[tuple[str, re.Pattern[str], Callable[[str], bool] | None]] = [
    ("EMAIL", EMAIL, None),
    ("CARD", CARD, _luhn),
    ("SSN", SSN, None),
    ("IP", IPV4, _valid_ip),
    ("IP", IPV6, _valid_ip),
    ("PHONE", PHONE, lambda s: sum(c.isdigit() for c in s) >= 7),
]


def find_pii(text: str) -> list[tuple[str, int, int]]:
    """(type, start, end) spans, non-overlapping, first detector wins."""
    spans: list[tuple[str, int, int]] = []
    taken: list[tuple[int, int]] = []
    for kind, pattern, check in DETECTORS:
        for m in pattern.finditer(text):
            s, e = m.span()
            if check is not None and not check(m.group()):
                continue
            if any(s < te and e > ts for ts, te in taken):
                continue
            spans.append((kind, s, e))
            taken.append((s, e))
    return sorted(spans, key=lambda x: x[1])


def scrub(text: str) -> tuple[str, Counter]:
    """Replace PII with ``[TYPE]`` tokens; returns the scrubbed text and counts per type."""
    if not text:
        return text, Counter()
    counts: Counter = Counter()
    out = []
    pos = 0
    for kind, s, e in find_pii(text):
        out.append(text[pos:s])
        out.append(f"[{kind}]")
        counts[kind] += 1
        pos = e
    out.append(text[pos:])
    return "".join(out), counts


def contains_pii(text: str) -> bool:
    return bool(find_pii(text or ""))


# -- secrets (audit log, request log, run errors) ----------------------------------------------------------------------------------------------------
_SECRET_NAME = r"[A-Za-z0-9_]*?(?:api_?key|access_?key|secret_?key|private_?key|token|secret|password|passwd|pwd|credentials?)"
#: (pattern, replacement): each replaces the secret with ``[SECRET]``, keeping what names it (a flag, a variable).
SECRET_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # PEM private keys, whole blocks
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.S), "[SECRET]"),
    # password in a URL: scheme://user:password@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/?#@'\"]*:)[^\s/?#@'\"]+(@)"), r"\1[SECRET]\2"),
    # Authorization headers and bearer tokens
    (re.compile(r"(?i)\b((?:bearer|token|basic)\s+)(?=[A-Za-z0-9._~+/=-]*\d)[A-Za-z0-9._~+/=-]{12,}"),
     r"\1[SECRET]"),
    # vendor key formats: OpenAI/Anthropic (sk-...), Hugging Face, GitHub, GitLab, Slack, AWS, Google, Stripe, JWTs
    (re.compile(r"(?<![A-Za-z0-9_-])(?:sk|rk|pk)-[A-Za-z0-9_-]{8,}"), "[SECRET]"),
    (re.compile(r"(?<![A-Za-z0-9_])(?:hf_|api_org_)[A-Za-z0-9]{10,}"), "[SECRET]"),
    (re.compile(r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|glpat-[A-Za-z0-9_-]{20,})"),
     "[SECRET]"),
    (re.compile(r"(?<![A-Za-z0-9-])xox[abposr]-[A-Za-z0-9-]{10,}"), "[SECRET]"),
    (re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"), "[SECRET]"),
    (re.compile(r"(?<![A-Za-z0-9_-])AIza[A-Za-z0-9_-]{30,}"), "[SECRET]"),
    (re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"), "[SECRET]"),
    # quoted values assigned to a secret-looking name: API_KEY = "...", api_key='...', "token": "...", password="..."
    (re.compile(r"(?i)(\b" + _SECRET_NAME + r"\b[\"']?\]?\s*[:=]\s*[rbuf]{0,2}([\"']))(?!\[SECRET\])[^\"'\n]+?(\2)"),
     r"\1[SECRET]\3"),
    # unquoted shell/env assignments: export HF_TOKEN=abc, PASSWORD=abc (no spaces around =)
    (re.compile(r"(?i)((?:^|(?<=[\s;&|]))(?:export\s+)?" + _SECRET_NAME + r"=)(?![\"'$\[])[^\s;&|]+", re.M),
     r"\1[SECRET]"),
    # command-line flags: --hf-token abc, --api-key=abc, --password abc (not --api-key-env VAR, not --max-tokens)
    (re.compile(r"(?i)(--[A-Za-z0-9-]*?(?:api-?key|access-?key|secret-?key|token|secret|password|passwd)(?:=|\s+))"
                r"(?![\"']?\[SECRET\])(?!-)(?:\"[^\"]*\"|'[^']*'|\S+)"),
     r"\1[SECRET]"),
]


def scrub_secrets(text: str) -> str:
    """``text`` with API keys, tokens, passwords (assigned, in flags, in URLs) replaced by ``[SECRET]``."""
    if not text:
        return text
    for pattern, repl in SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text

"""Per-record checks. The cheap ones run synchronously when a request is logged (before PII scrubbing, so
PII in a *response* is detected even though only the scrubbed text is stored); expensive ones (toxicity,
hallucination) run batched in ``%llmops monitor``.

Injection/jailbreak detection is a rule set of known patterns (instruction override, role-play jailbreaks,
system-prompt exfiltration, encoded payloads). A classifier can be plugged in with
:func:`set_injection_classifier` (e.g. a fine-tuned DeBERTa prompt-injection model); its score is recorded next
to the rule hits.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any

from llmops_jupyter.core.pii import find_pii

_F = re.IGNORECASE | re.DOTALL

#: (rule name, category, pattern). Kept readable: each rule is one well-known attack family.
INJECTION_RULES: list[tuple[str, str, re.Pattern[str]]] = [
    ("ignore-instructions", "override", re.compile(
        r"\b(ignore|disregard|forget|skip|override)\b.{0,40}\b(previous|prior|above|earlier|all|any|your|the)\b"
        r".{0,40}\b(instructions?|prompts?|rules?|directions?|guidelines?|context|messages?)\b", _F)),
    ("new-instructions", "override", re.compile(
        r"\b(new|updated|real|actual)\s+(instructions?|rules?|system prompt)\s*(:|are|is)\b", _F)),
    ("system-prompt-exfiltration", "exfiltration", re.compile(
        r"\b(reveal|show|print|repeat|output|tell me|display|leak|what (is|are|was))\b.{0,40}"
        r"\b(system|initial|hidden|secret|original)\s+(prompt|instructions?|message|rules?)\b", _F)),
    ("repeat-above", "exfiltration", re.compile(
        r"\brepeat\b.{0,30}\b(everything|all|the text|words)\b.{0,20}\b(above|before|so far)\b", _F)),
    ("dan-jailbreak", "jailbreak", re.compile(
        r"\b(DAN|do anything now|developer mode|jailbreak(en|ed)?|god mode|unfiltered mode)\b", _F)),
    ("roleplay-no-rules", "jailbreak", re.compile(
        r"\b(pretend|act as|you are now|roleplay as|imagine you are|from now on you are)\b.{0,80}"
        r"\b(no (rules|restrictions|limits|filters|guidelines)|unrestricted|uncensored|without (any )?"
        r"(rules|restrictions|limits|filters|ethics))\b", _F)),
    ("bypass-safety", "jailbreak", re.compile(
        r"\b(bypass|disable|turn off|ignore)\b.{0,30}\b(safety|filters?|guardrails?|content policy|moderation)\b",
        _F)),
    ("fake-role-tag", "override", re.compile(
        r"(<\|im_start\|>\s*system|\[/?INST\]|<<SYS>>|^\s*system\s*:|###\s*(system|instruction)\s*:?)", _F | re.M)),
]

_B64 = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{24,}={0,2}(?![A-Za-z0-9+/=])")
_HEX = re.compile(r"(?<![0-9a-fA-F])(?:[0-9a-fA-F]{2}){16,}(?![0-9a-fA-F])")

REFUSAL = re.compile(
    r"\b(I('m| am) (sorry|unable|not able)|I can(no|')t (help|assist|comply|do that|provide)|as an AI\b|"
    r"I (won't|will not) (help|assist|provide)|I must decline|cannot comply)", re.IGNORECASE)

_classifier: Callable[[str], float] | None = None


def set_injection_classifier(fn: Callable[[str], float] | None) -> None:
    """Plug in a classifier ``fn(prompt) -> probability of injection``; ``None`` removes it."""
    global _classifier
    _classifier = fn


def _decoded_payloads(text: str) -> list[str]:
    out = []
    for m in _B64.finditer(text):
        raw = m.group()
        try:
            dec = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        if sum(c.isprintable() for c in dec) >= 0.9 * len(dec):
            out.append(dec)
    for m in _HEX.finditer(text):
        try:
            dec = bytes.fromhex(m.group()).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            continue
        if sum(c.isprintable() for c in dec) >= 0.9 * len(dec):
            out.append(dec)
    return out


def detect_injection(prompt: str, *, threshold: float = 0.5) -> dict[str, Any]:
    """Rule hits (also inside base64/hex payloads) and the optional classifier score."""
    hits = [name for name, _, pat in INJECTION_RULES if pat.search(prompt or "")]
    for payload in _decoded_payloads(prompt or ""):
        inner = [name for name, _, pat in INJECTION_RULES if pat.search(payload)]
        hits += [f"encoded:{n}" for n in inner] or []
        if not inner and len(payload) >= 16:
            hits.append("encoded-payload")
    result: dict[str, Any] = {"flagged": bool(hits), "rules": sorted(set(hits))}
    if _classifier is not None:
        try:
            score = float(_classifier(prompt or ""))
        except Exception as exc:  # noqa: BLE001 - a broken hook must not drop the log record
            result["classifier_error"] = f"{type(exc).__name__}: {exc}"
        else:
            result["classifier"] = score
            result["flagged"] = result["flagged"] or score >= threshold
    return result


def sync_checks(prompt: str, response: str | None, *, finish_reason: str | None = None,
                status: int = 200) -> dict[str, Any]:
    """The cheap checks run on every logged record, on the *unscrubbed* text (nothing here is stored raw)."""
    inj = detect_injection(prompt)
    checks: dict[str, Any] = {"injection": inj["flagged"], "injection_rules": inj["rules"]}
    if "classifier" in inj:
        checks["injection_score"] = inj["classifier"]
    checks["pii_prompt"] = sorted({k for k, _, _ in find_pii(prompt or "")})
    if status == 200 and response is not None:
        checks["pii_response"] = sorted({k for k, _, _ in find_pii(response)})
        checks["refusal"] = bool(REFUSAL.search(response))
        checks["empty"] = not response.strip()
        checks["truncated"] = finish_reason == "length"
    return checks


def flagged(checks: dict[str, Any]) -> list[str]:
    """Names of the checks a record fails (used for the flagged-records widget and hit rates)."""
    out = []
    if checks.get("injection"):
        out.append("injection")
    if checks.get("pii_response"):
        out.append("pii_response")
    for key in ("refusal", "empty", "toxic", "unsupported", "inconsistent"):
        if checks.get(key):
            out.append(key)
    structured = checks.get("structured") or {}
    if structured.get("checked") and not structured.get("valid"):
        out.append("schema_violation")
    if (checks.get("tools") or {}).get("problems"):
        out.append("tool_parse")
    return out

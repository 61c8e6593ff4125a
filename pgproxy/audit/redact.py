"""Secret detectors: replace obvious secrets in recorded SQL and parameters with ``[redacted:kind]``.

Applied by the audit emitter (``events.AuditEmitter``) to every string of every event, in every sink,
before it is stored. One combined pre-check keeps the common case (no secret) to a few substring tests
(ASCII text) or a single regex search (any other text); the emitter runs it once over the encoded event
(``may_hold_secret_encoded``), or over the strings its producer lists (``may_need_redaction``: the
session's statement records), and redacts string by string only when it finds a keyword.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from cachetools import LRUCache

# Every detector's match holds one of these, in any case: text without any of them holds no secret.
_KEYWORDS = ("password", "private key", "eyj", "akia", "asia", "bearer", "secret")
# The lookahead lets the engine skip positions that cannot start a keyword (about 5x faster on 1 KB).
_PRECHECK = re.compile(f"(?=[{''.join(sorted({k[0] for k in _KEYWORDS}))}])(?:{'|'.join(_KEYWORDS)})", re.IGNORECASE)

_DETECTORS: tuple[tuple[str, re.Pattern[str], int], ...] = (
    # ALTER/CREATE ROLE|USER ... [ENCRYPTED] PASSWORD '...': keep the keyword, replace the literal.
    ("password", re.compile(r"(\bpassword\s+)(?:E?'(?:[^']|'')*'|\$\$.*?\$\$)", re.IGNORECASE | re.DOTALL), 1),
    ("private_key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)",
                               re.DOTALL), 0),
    ("jwt", re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"), 0),
    ("bearer_token", re.compile(r"(\bbearer\s+)[A-Za-z0-9._~+/=-]{16,}", re.IGNORECASE), 1),
    ("aws_access_key", re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), 0),
    ("aws_secret_key", re.compile(r"(aws_secret_access_key[\"']?\s*[:=]\s*[\"']?)[A-Za-z0-9/+=]{40}",
                                  re.IGNORECASE), 1),
)


# No detector matches fewer characters (``password ''``): shorter strings, most result cells, are skipped.
_MIN_SECRET_CHARS = 11


def may_hold_secret(text: str) -> bool:
    """Whether ``text`` holds a detector's keyword (in any case). For ASCII text, substring tests of its
    lowercase form (several times faster than the regex, and the same answer); the regex otherwise, whose
    case-insensitive matching also knows the non-ASCII letters that match an ASCII one."""
    if text.isascii():
        return any(map(text.lower().__contains__, _KEYWORDS))  # all in C: no generator
    return _PRECHECK.search(text) is not None


def may_hold_secret_encoded(encoded: bytes) -> bool:
    """Whether a JSON-encoded event (UTF-8) holds a detector's keyword anywhere: False means no string in it
    holds a secret, so redacting it would change nothing. JSON escapes only quotes, backslashes and control
    characters, none of them in a keyword, so a keyword in any string of the event is in its encoding too.
    (Decoded first: substring tests of ``str`` are faster than of ``bytes``.)"""
    return may_hold_secret(encoded.decode("utf-8", "surrogateescape"))


def may_need_redaction(texts: Iterable[str | None]) -> bool:
    """Whether ``redact_text`` could change one of ``texts`` (None entries skipped): one keyword check
    over them all, joined by a newline, which no keyword holds (a check per string costs more)."""
    return may_hold_secret("\n".join(filter(None, texts)))


def redact_text(text: str) -> str:
    """``text`` with every detected secret replaced; the same object when nothing was found."""
    if len(text) < _MIN_SECRET_CHARS or not may_hold_secret(text):
        return text
    for kind, pattern, keep in _DETECTORS:
        replacement = f"[redacted:{kind}]"
        # A group-1 prefix (e.g. the PASSWORD keyword) stays; \g<1> in a template keeps it.
        text = pattern.sub("\\g<1>" + replacement if keep else replacement, text)
    return text


# Statement text -> redacted text, for recurring statements the regex pre-check reads (not ASCII); ASCII
# text is checked faster than a cache is kept.
_SQL_CACHE: LRUCache[str, str] = LRUCache(maxsize=1024)
_SQL_CACHE_MAX_CHARS = 4096


def _redact_sql(sql: str) -> str:
    if sql.isascii():
        return redact_text(sql)
    redacted = _SQL_CACHE.get(sql)
    if redacted is None:
        redacted = redact_text(sql)
        if len(sql) <= _SQL_CACHE_MAX_CHARS:
            _SQL_CACHE[sql] = redacted
    return redacted


# Top-level event fields that only ever hold what the proxy or the server generates (kind, id, tags).
_GENERATED = frozenset({"event", "session", "protocol", "tags"})


def redact_value(value: Any) -> Any:
    """``value`` with every string in it (recursively through lists and dicts) redacted."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, list):
        return [redact_value(v) for v in value]
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    return value


def redact_event(event: dict[str, Any]) -> dict[str, Any]:
    """Redact every string value of ``event`` in place; ``sql`` (recurring statement text) is cached."""
    for key, value in event.items():
        if key == "sql" and isinstance(value, str):
            event[key] = _redact_sql(value)
        elif key not in _GENERATED and isinstance(value, (str, list, dict)):
            event[key] = redact_value(value)
    return event

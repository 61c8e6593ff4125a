"""What an HTTP exchange looks like in the audit log: masked headers, masked body excerpts, digests.

Sans-I/O: ``BodyTap`` is fed the body chunks as they stream past (it keeps a SHA-256 of all of them
and only the first ``cap`` bytes), ``body_record`` turns that into the stored form. Never stores the
injected credential, the caller's token or an unmasked field: JSON that cannot be parsed (truncated at
the cap, or invalid) is left out whenever a mask would have applied to it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from ..audit.redact import redact_text, redact_value
from .jsonmask import JsonPath, mask_json

# Header values never recorded (replaced by "[redacted]"), whatever they hold.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key",
                            "x-auth-token"})
REDACTED = "[redacted]"


class BodyTap:
    """Digest and size of a whole body, plus its first ``cap`` bytes."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.size = 0
        self._digest = hashlib.sha256()
        self._head = bytearray()

    def feed(self, chunk: bytes | memoryview) -> None:
        self.size += len(chunk)
        self._digest.update(chunk)
        room = self.cap - len(self._head)
        if room > 0:
            self._head += chunk[:room]

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    @property
    def head(self) -> bytes:
        return bytes(self._head)

    @property
    def truncated(self) -> bool:
        return self.size > len(self._head)


redact_json = redact_value  # the secret detectors applied to every string of a JSON value


def _looks_like_json(content_type: str, head: bytes) -> bool:
    return "json" in content_type.lower() or head.lstrip()[:1] in (b"{", b"[")


def body_record(tap: BodyTap, content_type: str, paths: tuple[JsonPath, ...],
                scrub: Iterable[str] = ()) -> dict[str, Any]:
    """The stored form of a body: size, digest, and a masked, redacted excerpt when it is safe to keep."""
    record: dict[str, Any] = {"bytes": tap.size, "sha256": tap.sha256}
    if content_type:
        record["content_type"] = content_type
    if tap.size == 0:
        return record
    head = tap.head
    if _looks_like_json(content_type, head):
        if not tap.truncated:
            try:
                document = orjson.loads(head)
            except orjson.JSONDecodeError:
                document = _INVALID
            if document is not _INVALID:
                masked, hits = mask_json(document, paths)
                record["json"] = redact_json(masked)
                if hits:
                    record["masked"] = hits
                return scrubbed(record, scrub)
        if paths:
            record["omitted"] = ("JSON over the audit cap cannot be masked" if tap.truncated
                                 else "invalid JSON cannot be masked")
            return record
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3 or not tap.truncated:  # not just a character cut at the cap
            record["omitted"] = "binary body"
            return record
        text = head[:exc.start].decode("utf-8")
    record["text"] = redact_text(text)
    if tap.truncated:
        record["truncated"] = True
    return scrubbed(record, scrub)


_INVALID = object()


def scrubbed(record: dict[str, Any], scrub: Iterable[str]) -> dict[str, Any]:
    """Fail closed: a record still holding an injected credential loses its excerpt."""
    secrets = [s for s in scrub if s]
    if not secrets:
        return record
    text = orjson.dumps(record).decode()
    if any(s in text for s in secrets):
        for key in ("json", "text"):
            record.pop(key, None)
        record["omitted"] = "holds a credential"
    return record


def headers_record(headers: Mapping[str, str] | Iterable[tuple[str, str]],
                   secret_headers: Iterable[str] = ()) -> dict[str, str]:
    """Header name (lower case) -> value, secret headers replaced and secret detectors applied."""
    hidden = SECRET_HEADERS | {h.lower() for h in secret_headers}
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, str] = {}
    for name, value in items:
        key = name.lower()
        shown = REDACTED if key in hidden else redact_text(value)
        out[key] = f"{out[key]}, {shown}" if key in out else shown
    return out

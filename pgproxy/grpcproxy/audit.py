"""What a gRPC call looks like in the audit log: metadata, the messages of each direction, digests.

Sans-I/O. ``StreamTap`` is fed each message of one direction as it passes: it keeps the count, the
size and one SHA-256 over all of them as framed on the wire (uncompressed: a zero byte, the 4-byte
big-endian length, the message), and the records of the first ``keep`` messages. ``message_record``
is the stored form of one message: its size and digest, and its fields as JSON, masked and redacted,
when it could be decoded and is small enough. Never stores the injected credential, the caller's
token or an unmasked field.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from google.protobuf.message import Message

from ..http.audit import headers_record, redact_json, scrubbed
from ..http.jsonmask import JsonPath, mask_json
from .descriptors import to_json

_UNCOMPRESSED = b"\x00"  # the gRPC message prefix's compressed-flag byte


def length_prefix(data: bytes) -> bytes:
    """The gRPC length prefix of an uncompressed message (gRPC framing, not the PostgreSQL protocol's)."""
    return _UNCOMPRESSED + len(data).to_bytes(4, "big")


class StreamTap:
    """The messages of one direction of a call."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.count = 0
        self.size = 0
        self._digest = hashlib.sha256()
        self.messages: list[dict[str, Any]] = []

    def feed(self, data: bytes) -> None:
        self.count += 1
        self.size += len(data)
        self._digest.update(length_prefix(data))
        self._digest.update(data)

    def copy(self) -> StreamTap:
        """The same count, size and digest so far, keeping no message records."""
        clone = StreamTap(0)
        clone.count, clone.size, clone._digest = self.count, self.size, self._digest.copy()
        return clone

    @property
    def wants_record(self) -> bool:
        """True while the next message's record is kept (call before ``feed``)."""
        return self.count < self.keep

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.count, "bytes": self.size, "sha256": self.sha256,
                               "messages": self.messages}
        if self.count > len(self.messages):
            out["messages_omitted"] = self.count - len(self.messages)
        return out


def stream_digest(messages: Iterable[bytes]) -> str:
    """The digest ``StreamTap`` records for these messages (approvals and replay use it too)."""
    tap = StreamTap(0)
    for data in messages:
        tap.feed(data)
    return tap.sha256


def message_record(data: bytes, message: Message | None, paths: tuple[JsonPath, ...], cap: int,
                   scrub: Iterable[str] = ()) -> dict[str, Any]:
    """One message as stored: size, digest and, when it was decoded and is at most ``cap`` bytes, its
    fields as JSON, masked by ``paths`` and redacted; else why not (``omitted``)."""
    record: dict[str, Any] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if message is None:
        record["omitted"] = "undecodable message"
        return record
    if len(data) > cap:
        record["omitted"] = "message over the audit cap"
        return record
    masked, hits = mask_json(to_json(message), paths)
    record["json"] = redact_json(masked)
    if hits:
        record["masked"] = hits
    return scrubbed(record, scrub)


def metadata_record(metadata: Iterable[tuple[str, str | bytes]], secret_keys: Iterable[str] = ()) -> dict[str, str]:
    """Metadata key -> value, secret keys replaced, binary values by size, secret detectors applied."""
    text = [(k, v if isinstance(v, str) else f"[{len(v)} bytes]") for k, v in metadata]
    return headers_record(text, secret_keys)

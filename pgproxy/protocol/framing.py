"""Split a byte stream into PostgreSQL messages and forward it, rewriting only what must change.

``MessageRelay`` is fed raw bytes from one direction of a connection and returns the bytes to send on.
It reads only each message's 5-byte header unless a handler is registered for the message type;
untouched messages are forwarded by slicing the original buffer, never re-encoded — this is what keeps
the per-row cost of the proxy near that of a byte pump. Lengths are checked against a maximum before
anything is buffered, so a peer cannot make us hold more than ``max_size`` bytes of one message.

Sans-I/O: no sockets, no event loop.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable

from .codec import ProtocolViolation

HEADER_SIZE = 5  # type byte + int32 length
_HEADER_UNPACK_FROM = struct.Struct(">Bi").unpack_from

# Called with the body of each message of its type; returns replacement bytes (the whole encoded
# message, or b"" to drop it), None to forward the message unchanged, or HOLD to stop the stream
# before this message until ``MessageRelay.resume``.
MessageHandler = Callable[[memoryview], bytes | None]
HOLD = b"\x00hold"  # compared by identity


def length_violation(type_byte: int, length: int, max_size: int) -> ProtocolViolation:
    """The error for a message whose declared length is impossible or over the limit."""
    if length < 4:
        return ProtocolViolation(f"invalid message length {length} for message type {chr(type_byte)!r}")
    return ProtocolViolation(
        f"message of type {chr(type_byte)!r} is {length} bytes, over the limit of {max_size} bytes",
        sqlstate="54000",
    )


class MessageRelay:
    """Frames one direction of a session; ``handlers`` (type byte -> handler) inspect or rewrite messages.

    The map is read on every message, so handlers can be added or removed while the relay runs.
    """

    __slots__ = ("_need", "_pending", "handlers", "held", "max_size")

    def __init__(self, max_size: int, handlers: dict[int, MessageHandler]) -> None:
        self.max_size = max_size
        self.handlers = handlers
        self._pending = bytearray()
        self._need = 0
        self.held = False

    @classmethod
    def for_types(cls, max_size: int, types: frozenset[int] | bytes,
                  handler: Callable[[int, memoryview], bytes | None]) -> MessageRelay:
        """A relay calling one ``handler(type, body)`` for all of ``types``."""
        return cls(max_size, {t: functools.partial(handler, t) for t in types})

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held back."""
        return len(self._pending)

    def resume(self) -> bytes:
        """Leave the held state and process what was held, starting with the held message again."""
        self.held = False
        data = bytes(self._pending)
        self._pending = bytearray()
        return self.feed(data) if data else b""

    def feed(self, data: bytes) -> bytes:
        """Consume ``data``; return the complete messages (possibly rewritten) to forward now."""
        if self.held:
            self._pending += data
            return b""
        if self._pending:
            self._pending += data
            if len(self._pending) < self._need:
                return b""
            buf = bytes(self._pending)
            self._pending = bytearray()
        else:
            buf = data
        n = len(buf)
        pos = last = 0
        out: list[bytes] | None = None
        view: memoryview | None = None
        handlers, max_size = self.handlers, self.max_size
        need = HEADER_SIZE
        header = _HEADER_UNPACK_FROM
        while n - pos >= HEADER_SIZE:
            msg_type, length = header(buf, pos)
            if length < 4 or length > max_size:
                raise length_violation(msg_type, length, max_size)
            end = pos + 1 + length
            if end > n:
                need = 1 + length
                break
            handler = handlers.get(msg_type)
            if handler is not None:
                if view is None:
                    view = memoryview(buf)
                replacement = handler(view[pos + 5:end])
                if replacement is HOLD:
                    self.held = True
                    self._need = 0
                    self._pending = bytearray(buf[pos:])
                    return buf[:pos] if out is None else b"".join((*out, buf[last:pos]))
                if replacement is not None:
                    if out is None:
                        out = []
                    out.append(buf[last:pos])
                    out.append(replacement)
                    last = end
            pos = end
        if pos < n:
            self._pending = bytearray(buf[pos:])
            self._need = need
        if out is None:
            return buf if pos == n else buf[:pos]
        out.append(buf[last:pos])
        return b"".join(out)


def startup_packet_length(header: bytes | bytearray, max_size: int) -> int:
    """Validated total length of an untyped startup-phase packet from its first 4 bytes."""
    length = int.from_bytes(header[:4], "big")
    if length < 8 or length > max_size:
        raise ProtocolViolation(f"invalid length of startup packet: {length}")
    return length

"""Low-level helpers for encoding and decoding PostgreSQL v3 wire-protocol message bodies.

Pure code (no I/O): :class:`ProtocolViolation` is the one error every decoder raises; :class:`Reader`
is a bounds-checked cursor over a message body; :func:`cstr` and friends build bodies, :func:`frame` adds the header.
All integers on the wire are big-endian (network byte order).
"""

from __future__ import annotations

import struct
from typing import Any, Final

__all__ = [
    "INT8",
    "INT16",
    "INT32",
    "SQLSTATE_CHARACTER_NOT_IN_REPERTOIRE",
    "SQLSTATE_PROTOCOL_VIOLATION",
    "UINT8",
    "UINT16",
    "UINT32",
    "Buffer",
    "ProtocolViolation",
    "Reader",
    "as_bytes",
    "cstr",
    "frame",
    "header",
    "invalid_utf8",
    "nullable",
    "type_name",
]

SQLSTATE_PROTOCOL_VIOLATION: Final = "08P01"
SQLSTATE_CHARACTER_NOT_IN_REPERTOIRE: Final = "22021"

#: Anything a decoder accepts as a message body.
Buffer = bytes | bytearray | memoryview

INT8: Final = struct.Struct(">b")
UINT8: Final = struct.Struct(">B")
INT16: Final = struct.Struct(">h")
UINT16: Final = struct.Struct(">H")
INT32: Final = struct.Struct(">i")
UINT32: Final = struct.Struct(">I")
_HEADER_PACK: Final = struct.Struct(">BI").pack
_NULL: Final = b"\xff\xff\xff\xff"
_INT32_UNPACK_FROM: Final = INT32.unpack_from
# Compiled array formats by (code, count): formatting and looking up a struct string per call is slow.
_ARRAY_STRUCTS: dict[tuple[str, int], struct.Struct] = {}


class ProtocolViolation(Exception):
    """A peer sent bytes that do not follow the protocol.

    ``sqlstate`` is the SQLSTATE to report to the client (default ``08P01`` protocol_violation);
    ``message`` (also ``str(exc)``) is human readable and safe to send back.
    """

    def __init__(self, message: str, sqlstate: str = SQLSTATE_PROTOCOL_VIOLATION) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


def type_name(type_byte: int | bytes) -> str:
    """Printable form of a message type byte for error messages: ``'Q'`` or ``'\\x00'``."""
    code = type_byte[0] if isinstance(type_byte, bytes) else type_byte
    ch = chr(code)
    return f"'{ch}'" if 0x20 < code < 0x7F else f"'\\x{code:02x}'"


def invalid_utf8(exc: UnicodeDecodeError) -> ProtocolViolation:
    """PostgreSQL-style 22021 error for bytes that are not valid UTF-8."""
    bad = bytes(exc.object[exc.start:exc.end])
    shown = " ".join(f"0x{b:02x}" for b in bad[:8])
    return ProtocolViolation(
        f'invalid byte sequence for encoding "UTF8": {shown}', SQLSTATE_CHARACTER_NOT_IN_REPERTOIRE
    )


def as_bytes(data: Buffer) -> bytes:
    """``data`` as ``bytes`` (no copy when it already is)."""
    return data if isinstance(data, bytes) else bytes(data)


class Reader:
    """Bounds-checked big-endian cursor over one message body.

    ``what`` names the message in error texts (e.g. ``"Bind"``). Every read past the end, missing
    string terminator or invalid length raises :class:`ProtocolViolation`.
    """

    __slots__ = ("_buf", "_end", "_pos", "what")

    def __init__(self, data: Buffer, what: str = "message") -> None:
        self._buf = as_bytes(data)
        self._pos = 0
        self._end = len(self._buf)
        self.what = what

    @property
    def pos(self) -> int:
        """Offset of the next unread byte."""
        return self._pos

    def remaining(self) -> int:
        """Number of unread bytes."""
        return self._end - self._pos

    def done(self) -> None:
        """Raise unless every byte has been consumed."""
        extra = self._end - self._pos
        if extra:
            raise ProtocolViolation(f"{self.what} message has {extra} trailing byte(s) at offset {self._pos}")

    def truncated(self, need: int) -> ProtocolViolation:
        """The error for wanting ``need`` bytes at the current offset when fewer remain."""
        return ProtocolViolation(
            f"truncated {self.what} message: needed {need} byte(s) at offset {self._pos}, "
            f"{self._end - self._pos} remaining"
        )

    def _fixed(self, st: struct.Struct) -> int:
        pos = self._pos
        if pos + st.size > self._end:
            raise self.truncated(st.size)
        self._pos = pos + st.size
        value: int = st.unpack_from(self._buf, pos)[0]
        return value

    def int8(self) -> int:
        """Signed 8-bit integer."""
        return self._fixed(INT8)

    def uint8(self) -> int:
        """Unsigned 8-bit integer (a ``Byte1``)."""
        return self._fixed(UINT8)

    def int16(self) -> int:
        """Signed 16-bit integer."""
        return self._fixed(INT16)

    def uint16(self) -> int:
        """Unsigned 16-bit integer (element counts)."""
        return self._fixed(UINT16)

    def int32(self) -> int:
        """Signed 32-bit integer."""
        return self._fixed(INT32)

    def uint32(self) -> int:
        """Unsigned 32-bit integer (OIDs)."""
        return self._fixed(UINT32)

    def char(self) -> str:
        """One byte as a one-character string (``Byte1`` codes such as 'S' or 'P')."""
        return chr(self._fixed(UINT8))

    def int16_array(self, count: int) -> tuple[int, ...]:
        """``count`` signed 16-bit integers."""
        return self._array("h", 2, count)

    def uint32_array(self, count: int) -> tuple[int, ...]:
        """``count`` unsigned 32-bit integers."""
        return self._array("I", 4, count)

    def _array(self, code: str, size: int, count: int) -> tuple[int, ...]:
        if count == 0:
            return ()
        pos = self._pos
        need = size * count
        if pos + need > self._end:
            raise self.truncated(need)
        self._pos = pos + need
        key = (code, count)
        st = _ARRAY_STRUCTS.get(key)
        if st is None:
            st = _ARRAY_STRUCTS[key] = struct.Struct(f">{count}{code}")
        return st.unpack_from(self._buf, pos)

    def cstring(self, encoding: str = "utf-8") -> str:
        """NUL-terminated string, decoded as UTF-8 or ``encoding`` (invalid bytes raise with SQLSTATE 22021)."""
        buf = self._buf
        pos = self._pos
        end = buf.find(b"\x00", pos, self._end)
        if end < 0:
            raise ProtocolViolation(f"unterminated string in {self.what} message at offset {pos}")
        self._pos = end + 1
        try:
            return buf[pos:end].decode(encoding)
        except UnicodeDecodeError as exc:
            if encoding != "utf-8":
                raise ProtocolViolation(f"invalid byte sequence for the client encoding ({encoding})",
                                        SQLSTATE_CHARACTER_NOT_IN_REPERTOIRE) from None
            raise invalid_utf8(exc) from None

    def raw(self, n: int) -> bytes:
        """Exactly ``n`` raw bytes (``n`` must not be negative)."""
        if n < 0:
            raise ProtocolViolation(f"invalid length {n} in {self.what} message")
        pos = self._pos
        if pos + n > self._end:
            raise self.truncated(n)
        self._pos = pos + n
        return self._buf[pos:pos + n]

    def nullable_bytes(self) -> bytes | None:
        """Int32 length followed by that many bytes; length -1 means SQL NULL (``None``)."""
        n = self._fixed(INT32)
        if n < 0:
            if n == -1:
                return None
            raise ProtocolViolation(f"invalid value length {n} in {self.what} message")
        pos = self._pos
        if pos + n > self._end:
            raise ProtocolViolation(
                f"value length {n} at offset {pos - 4} runs past the end of the {self.what} message "
                f"({self._end - pos} byte(s) remaining)"
            )
        self._pos = pos + n
        return self._buf[pos:pos + n]

    def nullable_array(self, count: int) -> tuple[bytes | None, ...]:
        """``count`` length-prefixed values (DataRow columns, Bind parameters); -1 means NULL.

        This is the hot path of result-set decoding: one ``unpack_from`` per value, no per-byte work.
        """
        buf = self._buf
        end = self._end
        pos = self._pos
        out: list[bytes | None] = []
        append = out.append
        unpack = _INT32_UNPACK_FROM
        try:
            for _ in range(count):
                n = unpack(buf, pos)[0]
                pos += 4
                if n >= 0:
                    stop = pos + n
                    if stop > end:
                        self._pos = pos - 4
                        raise ProtocolViolation(
                            f"value length {n} at offset {pos - 4} runs past the end of the {self.what} "
                            f"message ({end - pos} byte(s) remaining)"
                        )
                    append(buf[pos:stop])
                    pos = stop
                elif n == -1:
                    append(None)
                else:
                    self._pos = pos - 4
                    raise ProtocolViolation(f"invalid value length {n} in {self.what} message")
        except struct.error:
            self._pos = pos
            raise self.truncated(4) from None
        self._pos = pos
        return tuple(out)

    def unpack(self, st: struct.Struct) -> tuple[Any, ...]:
        """Read one fixed-size record described by ``st``."""
        pos = self._pos
        if pos + st.size > self._end:
            raise self.truncated(st.size)
        self._pos = pos + st.size
        return st.unpack_from(self._buf, pos)

    def rest(self) -> bytes:
        """All unread bytes (possibly empty)."""
        pos = self._pos
        self._pos = self._end
        return self._buf[pos:]


def cstr(s: str) -> bytes:
    """``s`` encoded as a NUL-terminated UTF-8 string; an embedded NUL raises ValueError."""
    if "\x00" in s:
        raise ValueError("string contains a NUL character and cannot be sent as a protocol string")
    return s.encode("utf-8") + b"\x00"


def nullable(value: bytes | None) -> bytes:
    """Int32 length prefix plus ``value``; ``None`` becomes length -1 (SQL NULL)."""
    if value is None:
        return _NULL
    return INT32.pack(len(value)) + value


def header(msg_type: int, body_length: int) -> bytes:
    """The 5-byte header of a message whose body is ``body_length`` bytes (digests hash it apart)."""
    return _HEADER_PACK(msg_type, body_length + 4)


def frame(msg_type: int, body: Buffer) -> bytes:
    """Full wire message: the type byte, the Int32 length (body + 4), then ``body``.

    The one place a message header is built; ``msg_type`` is a :mod:`~pgproxy.protocol.types` member.
    """
    return _HEADER_PACK(msg_type, len(body) + 4) + body

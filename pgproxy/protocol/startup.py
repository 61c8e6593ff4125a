"""Untyped startup-phase packets: StartupMessage, SSLRequest, GSSENCRequest and CancelRequest.

These packets have no type byte: an Int32 length (including itself) is followed by an Int32 code
or protocol version. :func:`decode_startup` takes the bytes after the length and returns the typed
packet, raising :class:`~pgproxy.protocol.codec.ProtocolViolation` (with PostgreSQL's SQLSTATE and
wording where PostgreSQL has one) for anything the server would reject.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Final, Self

from .codec import INT32, UINT32, Buffer, ProtocolViolation, as_bytes, cstr, invalid_utf8

__all__ = [
    "CANCEL_REQUEST_CODE",
    "GSSENC_REQUEST_CODE",
    "MAX_STARTUP_PACKET_LENGTH",
    "PROTOCOL_3_0",
    "PROTOCOL_OPTION_PREFIX",
    "SSL_REQUEST_CODE",
    "CancelRequest",
    "GSSENCRequest",
    "SSLRequest",
    "StartupMessage",
    "StartupPacket",
    "decode_startup",
]

#: Protocol version 3.0 as sent in a StartupMessage (major << 16 | minor).
PROTOCOL_3_0: Final = 196608
#: Codes of the special request packets (1234.5678, 1234.5679, 1234.5680 as "versions").
CANCEL_REQUEST_CODE: Final = 80877102
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
#: PostgreSQL's limit for a startup packet, length word included.
MAX_STARTUP_PACKET_LENGTH: Final = 10000
#: Startup parameters with this prefix are protocol extension options, not session settings.
PROTOCOL_OPTION_PREFIX: Final = "_pq_."

_SQLSTATE_FEATURE_NOT_SUPPORTED: Final = "0A000"
_SQLSTATE_INVALID_AUTHORIZATION: Final = "28000"


def _packet(body: bytes) -> bytes:
    return INT32.pack(len(body) + 4) + body


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """The client's StartupMessage.

    ``params`` holds the session parameters (``user``, ``database``, ``options``, GUCs...);
    ``protocol_options`` the names of ``_pq_.*`` protocol extensions the client asked for, which are
    not in ``params``. ``encode()`` sends only ``params``: the proxy never forwards extensions.
    """

    protocol_version: int
    params: dict[str, str] = field(hash=False)
    protocol_options: tuple[str, ...] = ()

    @property
    def major(self) -> int:
        """Major protocol version (3)."""
        return self.protocol_version >> 16

    @property
    def minor(self) -> int:
        """Minor protocol version requested by the client (0 for 3.0)."""
        return self.protocol_version & 0xFFFF

    @property
    def user(self) -> str:
        """The ``user`` parameter (empty string when absent, which decode() never returns)."""
        return self.params.get("user", "")

    @property
    def database(self) -> str:
        """The ``database`` parameter, defaulting to the user name as PostgreSQL does."""
        return self.params.get("database") or self.user

    def encode(self) -> bytes:
        parts = [INT32.pack(self.protocol_version)]
        for key, value in self.params.items():
            parts.append(cstr(key))
            parts.append(cstr(value))
        parts.append(b"\x00")
        return _packet(b"".join(parts))

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        """Decode the bytes after the length word (starting with the protocol version)."""
        buf = as_bytes(body)
        if len(buf) < 4:
            raise ProtocolViolation(f"invalid length of startup packet: {len(buf) + 4}")
        version: int = INT32.unpack_from(buf, 0)[0]
        major, minor = version >> 16, version & 0xFFFF
        if major != 3:
            raise ProtocolViolation(
                f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0",
                _SQLSTATE_FEATURE_NOT_SUPPORTED,
            )
        rest = buf[4:]
        if not rest or rest[-1] != 0:
            raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
        # Every key and value ends with a NUL and the list ends with one more: dropping the final
        # terminator leaves "k\0v\0...", which splits into key, value, ..., "" (the empty tail).
        items = rest[:-1].split(b"\x00")
        tail = items.pop()
        if tail:
            raise ProtocolViolation("invalid startup packet layout: expected terminator as last byte")
        try:
            words = [item.decode("utf-8") for item in items]
        except UnicodeDecodeError as exc:
            raise invalid_utf8(exc) from None
        if any(not key for key in words[0::2]):
            raise ProtocolViolation("invalid startup packet layout: empty parameter name")
        if len(words) % 2:
            raise ProtocolViolation(f"invalid startup packet layout: parameter {words[-1]!r} has no value")
        params: dict[str, str] = {}
        options: list[str] = []
        seen: set[str] = set()
        for i in range(0, len(words), 2):
            key, value = words[i], words[i + 1]
            if key in seen:
                raise ProtocolViolation(f"duplicate startup parameter {key!r}")
            seen.add(key)
            if key.startswith(PROTOCOL_OPTION_PREFIX):
                options.append(key)
            else:
                params[key] = value
        if not params.get("user"):
            raise ProtocolViolation(
                "no PostgreSQL user name specified in startup packet", _SQLSTATE_INVALID_AUTHORIZATION
            )
        return cls(version, params, tuple(options))


@dataclass(frozen=True, slots=True)
class SSLRequest:
    """SSLRequest: the client asks to switch to TLS before the StartupMessage."""

    CODE: ClassVar[int] = SSL_REQUEST_CODE

    def encode(self) -> bytes:
        return _packet(INT32.pack(SSL_REQUEST_CODE))


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    """GSSENCRequest: the client asks for GSSAPI encryption before the StartupMessage."""

    CODE: ClassVar[int] = GSSENC_REQUEST_CODE

    def encode(self) -> bytes:
        return _packet(INT32.pack(GSSENC_REQUEST_CODE))


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """CancelRequest sent on a new connection; ``secret_key`` is unsigned 32-bit."""

    process_id: int
    secret_key: int
    CODE: ClassVar[int] = CANCEL_REQUEST_CODE

    def encode(self) -> bytes:
        return _packet(
            INT32.pack(CANCEL_REQUEST_CODE) + INT32.pack(self.process_id) + UINT32.pack(self.secret_key)
        )


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def decode_startup(body: Buffer) -> StartupPacket:
    """Decode a startup-phase packet from the bytes after its Int32 length."""
    buf = as_bytes(body)
    n = len(buf) + 4
    if n < 8 or n > MAX_STARTUP_PACKET_LENGTH:
        raise ProtocolViolation(f"invalid length of startup packet: {n}")
    code: int = INT32.unpack_from(buf, 0)[0]
    if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
        if n != 8:
            raise ProtocolViolation(f"invalid length of startup packet: {n}")
        return SSLRequest() if code == SSL_REQUEST_CODE else GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if n != 16:
            raise ProtocolViolation(f"invalid length of cancel request packet: {n}")
        pid: int = INT32.unpack_from(buf, 4)[0]
        key: int = UINT32.unpack_from(buf, 8)[0]
        return CancelRequest(pid, key)
    return StartupMessage.decode(buf)

"""Typed PostgreSQL v3 protocol messages (sans-I/O).

One class per message the proxy builds or reads; every other message is relayed by type byte and length
only (:mod:`~pgproxy.protocol.types`, :func:`~pgproxy.protocol.codec.frame`). The requests the session
reads per statement (Query, Parse, Bind, Execute, Describe, Close) are lazy views: ``view(body, codec)``
decodes a field, in the client's encoding, when it is first read (the session, its tracker, the policy,
the audit log and the tests all read them so); the others are frozen dataclasses.
``encode()`` returns the full wire message (type byte, Int32 length, body); ``decode(body)`` parses the
body that follows the 5-byte header and raises :class:`~pgproxy.protocol.codec.ProtocolViolation` on
anything malformed (truncation, trailing bytes, bad lengths, invalid UTF-8, invalid enum values).
:func:`decode_backend` dispatches a server message on its type byte. Message formats follow the
PostgreSQL "Message Formats" documentation.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, NamedTuple, Self

from .codec import (
    INT16,
    INT32,
    SQLSTATE_CHARACTER_NOT_IN_REPERTOIRE,
    UINT16,
    UINT32,
    Buffer,
    ProtocolViolation,
    Reader,
    as_bytes,
    cstr,
    frame,
    invalid_utf8,
    nullable,
    type_name,
)
from .types import Backend, Frontend

__all__ = [
    "AuthenticationCleartextPassword",
    "AuthenticationMD5Password",
    "AuthenticationMessage",
    "AuthenticationOk",
    "AuthenticationOther",
    "AuthenticationResponse",
    "AuthenticationSASL",
    "AuthenticationSASLContinue",
    "AuthenticationSASLFinal",
    "BackendKeyData",
    "BackendMessage",
    "Bind",
    "Close",
    "CommandComplete",
    "DataRow",
    "Describe",
    "ErrorResponse",
    "Execute",
    "FieldDescription",
    "FunctionCall",
    "NegotiateProtocolVersion",
    "NoticeResponse",
    "NotificationResponse",
    "Parse",
    "PasswordMessage",
    "Query",
    "RowDescription",
    "SASLInitialResponse",
    "SASLResponse",
    "Sync",
    "Terminate",
    "decode_backend",
    "param_formats",
    "parameter_status",
    "parameter_status_fields",
    "row_values",
    "values_body",
]

# RowDescription per-field record after the name: table oid, column number, type oid, type size,
# type modifier, format code.
_FIELD: Final = struct.Struct(">IhIhih")
_FIELD_SIZE: Final = _FIELD.size
_NULL_BYTE: Final = b"\x00"
_U16_UNPACK_FROM: Final = UINT16.unpack_from
_I32_UNPACK_FROM: Final = INT32.unpack_from
_INT16_ARRAYS: dict[int, struct.Struct] = {}  # by count (bounded: counts are uint16)


def _int16s(values: tuple[int, ...]) -> bytes:
    """Uint16 count followed by that many Int16 values."""
    n = len(values)
    return UINT16.pack(n) + struct.pack(f">{n}h", *values)


def values_body(values: Sequence[bytes | None]) -> bytes:
    """Uint16 count followed by length-prefixed values (-1 for NULL): a DataRow body, the values of a
    Bind or FunctionCall."""
    parts = [UINT16.pack(len(values))]
    append = parts.append
    pack = INT32.pack
    for v in values:
        if v is None:
            append(b"\xff\xff\xff\xff")
        else:
            append(pack(len(v)))
            append(v)
    return b"".join(parts)


def _check_format_count(what: str, formats: int, values: int, noun: str) -> None:
    if formats not in (0, 1) and formats != values:
        raise ProtocolViolation(f"{what} message has {formats} {noun} formats but {values} {noun}s")


class _Empty:
    """Base for messages without a body."""

    __slots__ = ()
    TYPE: ClassVar[int]

    def encode(self) -> bytes:
        return frame(self.TYPE, b"")

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        if len(body):
            raise ProtocolViolation(f"invalid message length {len(body) + 4} for {type_name(cls.TYPE)}")
        return cls()


# --------------------------------------------------------------------------------------------------
# Frontend messages
# --------------------------------------------------------------------------------------------------


def _string_end(raw: bytes, start: int, what: str) -> int:
    """Offset of the NUL ending the string at ``start``."""
    end = raw.find(0, start)
    if end < 0:
        raise ProtocolViolation(f"unterminated string in {what} message at offset {start}")
    return end


def _text(raw: bytes, start: int, end: int, codec: str | None) -> str:
    """``raw[start:end]`` read in the client's encoding (``codec``: its Python codec, None when pgproxy has
    none): the server reads the client's strings in its client_encoding, so the proxy must too."""
    if start == end and codec is not None:  # unnamed statements and portals: most of them
        return ""
    if codec is None:
        raise ProtocolViolation("the session's client_encoding is not supported by pgproxy", "0A000")
    try:
        return raw[start:end].decode(codec)
    except UnicodeDecodeError as exc:
        if codec == "utf-8":
            raise invalid_utf8(exc) from None
        raise ProtocolViolation(f"invalid byte sequence for the client encoding ({codec})",
                                SQLSTATE_CHARACTER_NOT_IN_REPERTOIRE) from None


def _two_strings(raw: bytes, codec: str | None, what: str) -> tuple[str, str, int]:
    """The two strings a Parse or Bind body starts with, and the offset after them."""
    first = raw.find(0)
    second = raw.find(0, first + 1) if first >= 0 else -1
    if second < 0:
        _string_end(raw, first + 1 if first >= 0 else 0, what)  # raises
    if codec is not None:  # the straight path; _text below gives the precise error
        try:
            return (raw[:first].decode(codec) if first else "",
                    raw[first + 1:second].decode(codec) if second > first + 1 else "", second + 1)
        except UnicodeDecodeError:
            pass
    return _text(raw, 0, first, codec), _text(raw, first + 1, second, codec), second + 1


def bind_names(raw: bytes, codec: str | None) -> tuple[str, str]:
    """(portal, statement) a Bind body names, read and checked as ``Bind.view(raw, codec)`` reads them, without
    building the view (the tracker reads them from every Bind)."""
    if raw.startswith(b"\0\0") and codec is not None:  # the unnamed portal of the unnamed statement: most Binds
        return "", ""
    portal, statement, _ = _two_strings(raw, codec, "Bind")
    return portal, statement


def _trailing(what: str, raw: bytes, pos: int) -> ProtocolViolation:
    return ProtocolViolation(f"{what} message has {len(raw) - pos} trailing byte(s) at offset {pos}")


class _View:
    """A frontend message the proxy reads per request: built from its fields (``Bind("p", "s")``) or a view
    over a body as received (``Bind.view(body, codec)``) whose fields are decoded, in the client's
    encoding, when first read and then kept. Reading a field checks the bytes it needs (a malformed part
    raises ProtocolViolation); ``decode`` reads and checks every byte. A view keeps ``body``: pass bytes
    when it outlives the buffer. Equal when the fields are; ``encode`` of a view gives its bytes as sent.

    The views are instances of a subclass whose ``__init__`` takes the body: CPython builds an object
    fastest through a plain call, and the session makes one per request.
    """

    __slots__ = ("_codec", "_raw")
    TYPE: ClassVar[int]
    _NAME: ClassVar[str]
    _FIELDS: ClassVar[tuple[str, ...]]
    #: ``view(body, codec="utf-8")``: ``body`` as this message, nothing decoded yet.
    view: ClassVar[Callable[..., Any]]

    _raw: Buffer | None  # the body of a view (None: built from fields)
    _codec: str | None

    @classmethod
    def decode(cls, body: Buffer, codec: str | None = "utf-8") -> Self:
        """``body`` as this message, every field decoded and every byte checked now."""
        message: Self = cls.view(body, codec)
        message._check()
        return message

    def _check(self) -> None:
        self.fields()

    def fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def _body(self) -> bytes:
        raise NotImplementedError

    def encode(self) -> bytes:
        raw = self._raw
        return frame(self.TYPE, raw if raw is not None else self._body())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _View) or other.TYPE != self.TYPE:
            return NotImplemented
        return self.fields() == other.fields()

    def __hash__(self) -> int:
        return hash((self.TYPE, self.fields()))

    def __repr__(self) -> str:
        return f"{self._NAME}({', '.join(map(repr, self.fields()))})"


class Query(_View):
    """Simple query ('Q')."""

    __slots__ = ("_sql",)
    TYPE: ClassVar[int] = Frontend.QUERY
    _NAME: ClassVar[str] = "Query"
    _FIELDS: ClassVar[tuple[str, ...]] = ("sql",)
    view: ClassVar[Callable[..., Query]]
    _sql: str | None

    def __init__(self, sql: str) -> None:
        self._raw, self._codec, self._sql = None, "utf-8", sql

    @property
    def sql(self) -> str:
        sql = self._sql
        if sql is None:
            raw: bytes = self._raw  # type: ignore[assignment]
            end = _string_end(raw, 0, "Query")
            if end + 1 != len(raw):
                raise _trailing("Query", raw, end + 1)
            sql = self._sql = _text(raw, 0, end, self._codec)
        return sql

    def _body(self) -> bytes:
        return cstr(self.sql)


class _QueryView(Query):
    __slots__ = ()

    def __init__(self, body: Buffer, codec: str | None = "utf-8") -> None:  # a view: see _View
        self._raw = body if type(body) is bytes else bytes(body)
        self._codec = codec
        self._sql = None


Query.view = _QueryView


class Parse(_View):
    """Extended-protocol Parse ('P'); ``param_types`` are type OIDs (0 = unspecified)."""

    __slots__ = ("_param_types", "_strings")
    TYPE: ClassVar[int] = Frontend.PARSE
    _NAME: ClassVar[str] = "Parse"
    _FIELDS: ClassVar[tuple[str, ...]] = ("name", "query", "param_types")
    view: ClassVar[Callable[..., Parse]]
    _strings: tuple[str, str, int] | None  # name, query, offset of the parameter types
    _param_types: tuple[int, ...] | None

    def __init__(self, name: str, query: str, param_types: tuple[int, ...] = ()) -> None:
        self._raw, self._codec, self._strings, self._param_types = None, "utf-8", (name, query, -1), param_types

    def _read_strings(self) -> tuple[str, str, int]:
        strings = self._strings
        if strings is None:
            strings = self._strings = _two_strings(self._raw, self._codec, "Parse")  # type: ignore[arg-type]
        return strings

    @property
    def name(self) -> str:
        strings = self._strings
        return (strings if strings is not None else self._read_strings())[0]

    @property
    def query(self) -> str:
        strings = self._strings
        return (strings if strings is not None else self._read_strings())[1]

    @property
    def query_bytes(self) -> bytes:
        """The query text of a view as sent, not decoded."""
        raw: bytes = self._raw  # type: ignore[assignment]
        start = _string_end(raw, 0, "Parse") + 1
        return raw[start:_string_end(raw, start, "Parse")]

    @property
    def param_types(self) -> tuple[int, ...]:
        types = self._param_types
        if types is None:
            r = Reader(self._raw, "Parse")  # type: ignore[arg-type]
            r.raw(self._read_strings()[2])
            types = self._param_types = r.uint32_array(r.uint16())
            r.done()
        return types

    def with_query(self, text: bytes) -> bytes:
        """This Parse (a view) as sent with ``text`` (encoded, no NUL) for its query: the wire message."""
        raw: bytes = self._raw  # type: ignore[assignment]
        start = _string_end(raw, 0, "Parse") + 1
        return frame(Frontend.PARSE, raw[:start] + text + raw[_string_end(raw, start, "Parse"):])

    def _body(self) -> bytes:
        n = len(self.param_types)
        return cstr(self.name) + cstr(self.query) + UINT16.pack(n) + struct.pack(f">{n}I", *self.param_types)


class _ParseView(Parse):
    __slots__ = ()

    def __init__(self, body: Buffer, codec: str | None = "utf-8") -> None:  # a view: see _View
        self._raw = body if type(body) is bytes else bytes(body)
        self._codec = codec
        self._strings = self._param_types = None


Parse.view = _ParseView

_BindValues = tuple[tuple[int, ...], tuple[bytes | None, ...], tuple[int, ...]]


class Bind(_View):
    """Extended-protocol Bind ('B'); ``params`` entries are raw values, ``None`` for NULL.

    The names and the values are decoded apart, each on first access: the session reads the names of
    every Bind and leaves the values to the server, the policy and the audit log.
    """

    __slots__ = ("_names", "_values")
    TYPE: ClassVar[int] = Frontend.BIND
    _NAME: ClassVar[str] = "Bind"
    _FIELDS: ClassVar[tuple[str, ...]] = ("portal", "statement", "param_formats", "params", "result_formats")
    view: ClassVar[Callable[..., Bind]]
    _names: tuple[str, str, int] | None  # portal, statement, offset of the values
    _values: _BindValues | None  # parameter formats, parameters, result formats

    def __init__(self, portal: str, statement: str, param_formats: tuple[int, ...] = (),
                 params: tuple[bytes | None, ...] = (), result_formats: tuple[int, ...] = ()) -> None:
        self._raw, self._codec = None, "utf-8"
        self._names, self._values = (portal, statement, -1), (param_formats, params, result_formats)

    @classmethod
    def lenient(cls, body: bytes | None) -> Bind | None:
        """A recorded Bind body as a view whose values decode (its names are read as UTF-8); None when
        absent or malformed (the server refused it too: nothing was bound)."""
        if body is None:
            return None
        bind = _BindView(body)
        try:
            bind._read_values()
        except ProtocolViolation:
            return None
        return bind

    def _read_names(self) -> tuple[str, str, int]:
        names = self._names
        if names is None:
            names = self._names = _two_strings(self._raw, self._codec, "Bind")  # type: ignore[arg-type]
        return names

    @property
    def portal(self) -> str:
        names = self._names
        return (names if names is not None else self._read_names())[0]

    @property
    def statement(self) -> str:
        names = self._names
        return (names if names is not None else self._read_names())[1]

    @property
    def param_formats(self) -> tuple[int, ...]:
        values = self._values
        return (values if values is not None else self._read_values())[0]

    @property
    def params(self) -> tuple[bytes | None, ...]:
        values = self._values
        return (values if values is not None else self._read_values())[1]

    @property
    def result_formats(self) -> tuple[int, ...]:
        values = self._values
        return (values if values is not None else self._read_values())[2]

    @property
    def values(self) -> tuple[tuple[int, ...], tuple[bytes | None, ...], tuple[int, ...]]:
        """(param_formats, params, result_formats) at once: the audit reads all three per statement."""
        values = self._values
        return values if values is not None else self._read_values()

    def _read_values(self) -> _BindValues:
        """Parameter formats, parameters and result formats: a straight path over well-formed bodies (the
        names need not decode); anything unusual is re-read by the bounds-checked ``Reader`` for the
        precise error."""
        values = self._values
        if values is not None:
            return values
        raw: bytes = self._raw  # type: ignore[assignment]
        first = raw.find(0)
        start = raw.find(0, first + 1) + 1 if first >= 0 else 0
        if not start:
            _string_end(raw, first + 1 if first >= 0 else 0, "Bind")  # raises
        try:
            values = _bind_values(raw, start)
        except struct.error:
            values = None
        if values is None:
            r = Reader(raw, "Bind")
            r.raw(start)
            formats = r.int16_array(r.uint16())
            params = r.nullable_array(r.uint16())
            results = r.int16_array(r.uint16())
            r.done()
            _check_format_count("bind", len(formats), len(params), "parameter")
            values = (formats, params, results)
        self._values = values
        return values

    def param_format(self, index: int) -> int:
        """Format code (0 text, 1 binary) of parameter ``index`` per the 0/1/N format-code rule."""
        formats = self.param_formats
        if not formats:
            return 0
        return formats[0] if len(formats) == 1 else formats[index]

    def _body(self) -> bytes:
        return b"".join((cstr(self.portal), cstr(self.statement), _int16s(self.param_formats),
                         values_body(self.params), _int16s(self.result_formats)))


class _BindView(Bind):
    __slots__ = ()

    def __init__(self, body: Buffer, codec: str | None = "utf-8") -> None:  # a view: see _View
        self._raw = body if type(body) is bytes else bytes(body)
        self._codec = codec
        self._names = self._values = None


Bind.view = _BindView


def _bind_values(raw: bytes, pos: int) -> _BindValues | None:
    """The common case of ``Bind._read_values``; None (or struct.error) when the body needs the careful path."""
    n = _U16_UNPACK_FROM(raw, pos)[0]
    pos += 2
    formats: tuple[int, ...] = _int16_array(n).unpack_from(raw, pos) if n else ()
    pos += 2 * n
    count = _U16_UNPACK_FROM(raw, pos)[0]
    pos += 2
    if n > 1 and n != count:
        return None
    params: list[bytes | None] = []
    append = params.append
    for _ in range(count):
        length = _I32_UNPACK_FROM(raw, pos)[0]
        pos += 4
        if length >= 0:
            append(raw[pos:pos + length])
            pos += length
        elif length == -1:
            append(None)
        else:
            return None
    n = _U16_UNPACK_FROM(raw, pos)[0]
    pos += 2
    results: tuple[int, ...] = _int16_array(n).unpack_from(raw, pos) if n else ()
    if pos + 2 * n != len(raw):
        return None
    return formats, tuple(params), results


def _int16_array(count: int) -> struct.Struct:
    st = _INT16_ARRAYS.get(count)
    if st is None:
        st = _INT16_ARRAYS[count] = struct.Struct(f">{count}h")
    return st


def param_formats(formats: tuple[int, ...], count: int) -> tuple[int, ...]:
    """The format code of each of ``count`` parameters, from a Bind's 0, 1 or N format codes."""
    if len(formats) == count:
        return formats
    return (formats[0] if formats else 0,) * count


class Execute(_View):
    """Execute ('E') a portal; ``max_rows`` 0 means no limit."""

    __slots__ = ("_max_rows", "_portal")
    TYPE: ClassVar[int] = Frontend.EXECUTE
    _NAME: ClassVar[str] = "Execute"
    _FIELDS: ClassVar[tuple[str, ...]] = ("portal", "max_rows")
    view: ClassVar[Callable[..., Execute]]
    _portal: str | None
    _max_rows: int | None

    def __init__(self, portal: str, max_rows: int = 0) -> None:
        self._raw, self._codec, self._portal, self._max_rows = None, "utf-8", portal, max_rows

    @property
    def portal(self) -> str:
        portal = self._portal
        if portal is None:
            body = self._raw
            if body and body[0] == 0 and self._codec is not None:  # the unnamed portal: most of them
                portal = self._portal = ""
            else:
                raw = as_bytes(body)  # type: ignore[arg-type]
                portal = self._portal = _text(raw, 0, _string_end(raw, 0, "Execute"), self._codec)
        return portal

    @property
    def max_rows(self) -> int:
        max_rows = self._max_rows
        if max_rows is None:
            raw = as_bytes(self._raw)  # type: ignore[arg-type]
            r = Reader(raw, "Execute")
            r.raw(_string_end(raw, 0, "Execute") + 1)
            max_rows = self._max_rows = r.int32()
            r.done()
        return max_rows

    def _body(self) -> bytes:
        return cstr(self.portal) + INT32.pack(self.max_rows)


class _ExecuteView(Execute):
    __slots__ = ()

    def __init__(self, body: Buffer, codec: str | None = "utf-8") -> None:  # a view: see _View
        self._raw = body  # as given: an Execute view is read at once
        self._codec = codec
        self._portal = self._max_rows = None


Execute.view = _ExecuteView


class _Target(_View):
    """Describe and Close: a statement ('S') or a portal ('P') by name."""

    __slots__ = ("_kind", "_name")
    _FIELDS: ClassVar[tuple[str, ...]] = ("kind", "name")
    _STRICT: ClassVar[bool]  # reading ``kind`` refuses one other than 'S' or 'P'
    _kind: str | None
    _name: str | None

    def __init__(self, kind: str, name: str) -> None:
        self._raw, self._codec, self._kind, self._name = None, "utf-8", kind, name

    @property
    def kind(self) -> str:
        """'S' (a prepared statement) or 'P' (a portal); for a Describe, whatever byte was sent ("" for none)."""
        kind = self._kind
        if kind is None:
            raw: bytes = self._raw  # type: ignore[assignment]
            kind = self._kind = chr(raw[0]) if len(raw) else ""
        if self._STRICT and kind not in ("S", "P"):
            raise ProtocolViolation(f"invalid {self._NAME} message")
        return kind

    @property
    def name(self) -> str:
        name = self._name
        if name is None:
            body: Buffer = self._raw  # type: ignore[assignment]
            if len(body) > 1 and body[1] == 0 and self._codec is not None:  # unnamed: most of them
                name = self._name = ""
            else:
                raw = as_bytes(body)
                name = self._name = _text(raw, 1, _string_end(raw, 1, self._NAME), self._codec)
        return name

    def _check(self) -> None:
        if self.kind not in ("S", "P"):
            raise ProtocolViolation(f"invalid {self._NAME} message")
        raw = as_bytes(self._raw)  # type: ignore[arg-type]
        end = _string_end(raw, 1, self._NAME) + 1
        if end != len(raw):
            raise _trailing(self._NAME, raw, end)
        self.name  # noqa: B018 -- decodes (and checks) the name

    def _body(self) -> bytes:
        return self.kind.encode("ascii") + cstr(self.name)


class Describe(_Target):
    """Describe ('D') a prepared statement or portal. A view's ``kind`` is not checked when read: the
    server answers an unknown one with an error of its own."""

    __slots__ = ()
    TYPE: ClassVar[int] = Frontend.DESCRIBE
    _NAME: ClassVar[str] = "Describe"
    _STRICT: ClassVar[bool] = False
    view: ClassVar[Callable[..., Describe]]


class Close(_Target):
    """Close ('C') a prepared statement or portal; a view's ``kind`` other than 'S' or 'P' is refused."""

    __slots__ = ()
    TYPE: ClassVar[int] = Frontend.CLOSE
    _NAME: ClassVar[str] = "Close"
    _STRICT: ClassVar[bool] = True
    view: ClassVar[Callable[..., Close]]


class _DescribeView(Describe):
    __slots__ = ()

    def __init__(self, body: Buffer, codec: str | None = "utf-8") -> None:  # a view: see _View
        self._raw = body  # as given: a Describe view is read at once
        self._codec = codec
        self._kind = self._name = None


class _CloseView(Close):
    __slots__ = ()

    def __init__(self, body: Buffer, codec: str | None = "utf-8") -> None:  # a view: see _View
        self._raw = body  # as given: a Close view is read at once
        self._codec = codec
        self._kind = self._name = None


Describe.view = _DescribeView
Close.view = _CloseView


@dataclass(frozen=True, slots=True)
class Sync(_Empty):
    """Sync ('S'): end of an extended-query batch."""

    TYPE: ClassVar[int] = Frontend.SYNC


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """Fast-path FunctionCall ('F'); ``args`` entries are raw values, ``None`` for NULL."""

    function_oid: int
    arg_formats: tuple[int, ...] = ()
    args: tuple[bytes | None, ...] = ()
    result_format: int = 0
    TYPE: ClassVar[int] = Frontend.FUNCTION_CALL

    def encode(self) -> bytes:
        return frame(Frontend.FUNCTION_CALL,
            b"".join((
                UINT32.pack(self.function_oid),
                _int16s(self.arg_formats),
                values_body(self.args),
                INT16.pack(self.result_format),
            )),
        )

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        r = Reader(body, "FunctionCall")
        oid = r.uint32()
        formats = r.int16_array(r.uint16())
        args = r.nullable_array(r.uint16())
        result_format = r.int16()
        r.done()
        _check_format_count("function call", len(formats), len(args), "argument")
        return cls(oid, formats, args, result_format)


@dataclass(frozen=True, slots=True)
class PasswordMessage:
    """PasswordMessage ('p'): a cleartext or md5-hashed password."""

    password: str
    TYPE: ClassVar[int] = Frontend.PASSWORD

    def encode(self) -> bytes:
        return frame(Frontend.PASSWORD, cstr(self.password))

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        r = Reader(body, "PasswordMessage")
        password = r.cstring()
        r.done()
        return cls(password)


@dataclass(frozen=True, slots=True)
class SASLInitialResponse:
    """SASLInitialResponse ('p'): chosen mechanism plus optional initial client data."""

    mechanism: str
    data: bytes | None
    TYPE: ClassVar[int] = Frontend.PASSWORD

    def encode(self) -> bytes:
        return frame(Frontend.PASSWORD, cstr(self.mechanism) + nullable(self.data))

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        r = Reader(body, "SASLInitialResponse")
        mechanism = r.cstring()
        data = r.nullable_bytes()
        r.done()
        return cls(mechanism, data)


@dataclass(frozen=True, slots=True)
class SASLResponse:
    """SASLResponse ('p'): mechanism-specific client data."""

    data: bytes
    TYPE: ClassVar[int] = Frontend.PASSWORD

    def encode(self) -> bytes:
        return frame(Frontend.PASSWORD, self.data)

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        return cls(as_bytes(body))


@dataclass(frozen=True, slots=True)
class AuthenticationResponse:
    """A raw 'p' message; which kind it is depends on the authentication exchange in progress.

    Interpret it with :meth:`password`, :meth:`sasl_initial` or :meth:`sasl_response`.
    """

    data: bytes
    TYPE: ClassVar[int] = Frontend.PASSWORD

    def encode(self) -> bytes:
        return frame(Frontend.PASSWORD, self.data)

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        return cls(as_bytes(body))

    def password(self) -> str:
        """The body as a PasswordMessage: exactly one NUL-terminated UTF-8 string."""
        return PasswordMessage.decode(self.data).password

    def sasl_initial(self) -> SASLInitialResponse:
        """The body as a SASLInitialResponse."""
        return SASLInitialResponse.decode(self.data)

    def sasl_response(self) -> SASLResponse:
        """The body as a SASLResponse."""
        return SASLResponse(self.data)


@dataclass(frozen=True, slots=True)
class Terminate(_Empty):
    """Terminate ('X'): the frontend is closing the connection."""

    TYPE: ClassVar[int] = Frontend.TERMINATE


# --------------------------------------------------------------------------------------------------
# Backend messages: authentication requests ('R')
# --------------------------------------------------------------------------------------------------


def _auth_reader(body: Buffer, code: int, what: str) -> Reader:
    r = Reader(body, what)
    got = r.int32()
    if got != code:
        raise ProtocolViolation(f"{what} message has authentication code {got}, expected {code}")
    return r


@dataclass(frozen=True, slots=True)
class AuthenticationOk:
    """AuthenticationOk ('R', 0)."""

    TYPE: ClassVar[int] = Backend.AUTHENTICATION
    CODE: ClassVar[int] = 0

    def encode(self) -> bytes:
        return frame(Backend.AUTHENTICATION, INT32.pack(0))

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        _auth_reader(body, 0, "AuthenticationOk").done()
        return cls()


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword:
    """AuthenticationCleartextPassword ('R', 3)."""

    TYPE: ClassVar[int] = Backend.AUTHENTICATION
    CODE: ClassVar[int] = 3

    def encode(self) -> bytes:
        return frame(Backend.AUTHENTICATION, INT32.pack(3))

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        _auth_reader(body, 3, "AuthenticationCleartextPassword").done()
        return cls()


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password:
    """AuthenticationMD5Password ('R', 5) with its 4-byte salt."""

    salt: bytes
    TYPE: ClassVar[int] = Backend.AUTHENTICATION
    CODE: ClassVar[int] = 5

    def encode(self) -> bytes:
        if len(self.salt) != 4:
            raise ValueError("MD5 salt must be exactly 4 bytes")
        return frame(Backend.AUTHENTICATION, INT32.pack(5) + self.salt)

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        r = _auth_reader(body, 5, "AuthenticationMD5Password")
        salt = r.raw(4)
        r.done()
        return cls(salt)


@dataclass(frozen=True, slots=True)
class AuthenticationSASL:
    """AuthenticationSASL ('R', 10): mechanisms in the server's order of preference."""

    mechanisms: tuple[str, ...]
    TYPE: ClassVar[int] = Backend.AUTHENTICATION
    CODE: ClassVar[int] = 10

    def encode(self) -> bytes:
        if "" in self.mechanisms:
            raise ValueError("SASL mechanism names must not be empty")
        return frame(Backend.AUTHENTICATION, INT32.pack(10) + b"".join(cstr(m) for m in self.mechanisms) + _NULL_BYTE)

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        r = _auth_reader(body, 10, "AuthenticationSASL")
        mechanisms: list[str] = []
        while True:
            name = r.cstring()
            if not name:
                break
            mechanisms.append(name)
        r.done()
        return cls(tuple(mechanisms))


@dataclass(frozen=True, slots=True)
class AuthenticationSASLContinue:
    """AuthenticationSASLContinue ('R', 11): server challenge data."""

    data: bytes
    TYPE: ClassVar[int] = Backend.AUTHENTICATION
    CODE: ClassVar[int] = 11

    def encode(self) -> bytes:
        return frame(Backend.AUTHENTICATION, INT32.pack(11) + self.data)

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        return cls(_auth_reader(body, 11, "AuthenticationSASLContinue").rest())


@dataclass(frozen=True, slots=True)
class AuthenticationSASLFinal:
    """AuthenticationSASLFinal ('R', 12): server's final SASL data (e.g. the SCRAM signature)."""

    data: bytes
    TYPE: ClassVar[int] = Backend.AUTHENTICATION
    CODE: ClassVar[int] = 12

    def encode(self) -> bytes:
        return frame(Backend.AUTHENTICATION, INT32.pack(12) + self.data)

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        return cls(_auth_reader(body, 12, "AuthenticationSASLFinal").rest())


#: Authentication request codes carried by :class:`AuthenticationOther`:
#: KerberosV5 (2), GSS (7), GSSContinue (8), SSPI (9).
_OTHER_AUTH_CODES: Final = frozenset({2, 7, 8, 9})


@dataclass(frozen=True, slots=True)
class AuthenticationOther:
    """An authentication request the proxy does not implement (KerberosV5, GSS, GSSContinue, SSPI)."""

    code: int
    data: bytes = b""
    TYPE: ClassVar[int] = Backend.AUTHENTICATION

    def encode(self) -> bytes:
        return frame(Backend.AUTHENTICATION, INT32.pack(self.code) + self.data)

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        r = Reader(body, "Authentication")
        code = r.int32()
        if code not in _OTHER_AUTH_CODES:
            raise ProtocolViolation(f"unsupported authentication request code {code}")
        return cls(code, r.rest())


AuthenticationMessage = (
    AuthenticationOk
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationSASL
    | AuthenticationSASLContinue
    | AuthenticationSASLFinal
    | AuthenticationOther
)

_AUTH_DECODERS: Final[dict[int, Callable[[Buffer], AuthenticationMessage]]] = {
    0: AuthenticationOk.decode,
    3: AuthenticationCleartextPassword.decode,
    5: AuthenticationMD5Password.decode,
    10: AuthenticationSASL.decode,
    11: AuthenticationSASLContinue.decode,
    12: AuthenticationSASLFinal.decode,
}


def _decode_authentication(body: Buffer) -> AuthenticationMessage:
    if len(body) < 4:
        raise ProtocolViolation(f"invalid message length {len(body) + 4} for 'R'")
    code: int = INT32.unpack_from(body, 0)[0]
    decoder = _AUTH_DECODERS.get(code, AuthenticationOther.decode)
    return decoder(body)


# --------------------------------------------------------------------------------------------------
# Backend messages: everything else
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    """BackendKeyData ('K'): cancellation key; ``secret_key`` is unsigned 32-bit."""

    process_id: int
    secret_key: int
    TYPE: ClassVar[int] = Backend.BACKEND_KEY_DATA

    def encode(self) -> bytes:
        return frame(Backend.BACKEND_KEY_DATA, INT32.pack(self.process_id) + UINT32.pack(self.secret_key))

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        r = Reader(body, "BackendKeyData")
        pid = r.int32()
        key = r.uint32()
        r.done()
        return cls(pid, key)


class FieldDescription(NamedTuple):
    """One column of a RowDescription; ``table_oid`` and ``type_oid`` are unsigned 32-bit.

    A NamedTuple rather than a dataclass because RowDescription decoding builds one per column and
    tuple construction is several times cheaper; it is immutable, use ``_replace()`` to derive one.
    """

    name: str
    table_oid: int
    column_number: int
    type_oid: int
    type_size: int
    type_modifier: int
    format_code: int


@dataclass(frozen=True, slots=True)
class RowDescription:
    """RowDescription ('T'): the columns of the rows that follow."""

    fields: tuple[FieldDescription, ...]
    TYPE: ClassVar[int] = Backend.ROW_DESCRIPTION

    def encode(self) -> bytes:
        parts = [UINT16.pack(len(self.fields))]
        pack = _FIELD.pack
        for f in self.fields:
            parts.append(cstr(f.name))
            parts.append(
                pack(f.table_oid, f.column_number, f.type_oid, f.type_size, f.type_modifier, f.format_code)
            )
        return frame(Backend.ROW_DESCRIPTION, b"".join(parts))

    @classmethod
    def decode(cls, body: Buffer, encoding: str = "utf-8") -> Self:
        # Hot path: a flat loop with one find() and one unpack_from() per column.
        buf = as_bytes(body)
        end = len(buf)
        if end < 2:
            raise Reader(buf, "RowDescription").truncated(2)
        count: int = UINT16.unpack_from(buf, 0)[0]
        pos = 2
        fields: list[FieldDescription] = []
        append = fields.append
        find = buf.find
        unpack = _FIELD.unpack_from
        new = FieldDescription
        try:
            for _ in range(count):
                nul = find(b"\x00", pos)
                if nul < 0:
                    raise ProtocolViolation(f"unterminated string in RowDescription message at offset {pos}")
                name = buf[pos:nul].decode(encoding)
                pos = nul + 1
                append(new(name, *unpack(buf, pos)))
                pos += _FIELD_SIZE
        except UnicodeDecodeError as exc:
            if encoding != "utf-8":
                raise ProtocolViolation(f"invalid byte sequence for the client encoding ({encoding})",
                                        "22021") from None
            raise invalid_utf8(exc) from None
        except struct.error:
            raise ProtocolViolation(
                f"truncated RowDescription message: needed {_FIELD_SIZE} byte(s) at offset {pos}, "
                f"{end - pos} remaining"
            ) from None
        if pos != end:
            raise ProtocolViolation(
                f"RowDescription message has {end - pos} trailing byte(s) at offset {pos}"
            )
        return cls(tuple(fields))


@dataclass(frozen=True, slots=True)
class DataRow:
    """DataRow ('D'): one row of raw column values, ``None`` for NULL."""

    values: tuple[bytes | None, ...]
    TYPE: ClassVar[int] = Backend.DATA_ROW

    def encode(self) -> bytes:
        return frame(Backend.DATA_ROW, values_body(self.values))

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        return cls(tuple(row_values(body)))


def row_values(body: Buffer) -> list[bytes | None]:
    """The column values of a DataRow body, ``None`` for NULL: the one DataRow decoder (a list, which
    the masking of a row edits in place).

    A straight loop over well-formed bodies (what servers send); anything else is re-read by the
    bounds-checked ``Reader``, which raises the precise ``ProtocolViolation``.
    """
    raw = as_bytes(body)
    end = len(raw)
    values: list[bytes | None] = []
    append = values.append
    unpack = _I32_UNPACK_FROM
    try:
        pos = 2
        for _ in range(_U16_UNPACK_FROM(raw, 0)[0]):
            n = unpack(raw, pos)[0]
            pos += 4
            if n >= 0:
                append(raw[pos:pos + n])
                pos += n
            elif n == -1:
                append(None)
            else:
                pos = -1
                break
    except struct.error:
        pos = -1
    if pos == end:
        return values
    r = Reader(raw, "DataRow")
    checked = r.nullable_array(r.uint16())
    r.done()
    return list(checked)


@dataclass(frozen=True, slots=True)
class CommandComplete:
    """CommandComplete ('C') with its command tag, e.g. ``"SELECT 5"`` or ``"INSERT 0 3"``."""

    tag: str
    TYPE: ClassVar[int] = Backend.COMMAND_COMPLETE

    def encode(self) -> bytes:
        return frame(Backend.COMMAND_COMPLETE, cstr(self.tag))

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        r = Reader(body, "CommandComplete")
        tag = r.cstring()
        r.done()
        return cls(tag)

    @property
    def rows(self) -> int | None:
        """Row count: the last word of the tag when it is an integer, else ``None``."""
        return tag_rows(self.tag)


def tag_rows(tag: str) -> int | None:
    """Row count of a command tag ("SELECT 5", "INSERT 0 3"): its last word if an integer, else None."""
    last = tag.rpartition(" ")[2]
    if last.isascii() and last.isdigit():
        return int(last)
    return None


def parameter_status_fields(body: Buffer) -> tuple[bytes, bytes]:
    """(name, value) of a ParameterStatus body, as sent: undecoded, without their terminators."""
    name, _, value = bytes(body).partition(b"\0")
    return name, value[:-1]


def parameter_status(name: bytes, value: bytes) -> bytes:
    """A ParameterStatus message (header included) reporting ``name`` = ``value``, both as sent."""
    return frame(Backend.PARAMETER_STATUS, name + b"\0" + value + b"\0")


@dataclass(frozen=True, slots=True)
class _FieldsResponse:
    """Shared body of ErrorResponse and NoticeResponse: ordered (code, value) fields."""

    fields: tuple[tuple[str, str], ...]
    TYPE: ClassVar[int]
    _NAME: ClassVar[str]

    def encode(self) -> bytes:
        parts = []
        for code, value in self.fields:
            if len(code) != 1 or code == "\x00":
                raise ValueError(f"invalid {self._NAME} field code {code!r}")
            parts.append(code.encode("latin-1"))
            parts.append(cstr(value))
        parts.append(_NULL_BYTE)
        return frame(self.TYPE, b"".join(parts))

    @classmethod
    def decode(cls, body: Buffer, encoding: str = "utf-8") -> Self:
        """``encoding``: the session's client_encoding (the server writes its texts in it)."""
        r = Reader(body, cls._NAME)
        fields: list[tuple[str, str]] = []
        while True:
            code = r.uint8()
            if code == 0:
                break
            fields.append((chr(code), r.cstring(encoding)))
        r.done()
        return cls(tuple(fields))

    @classmethod
    def build(
        cls,
        severity: str,
        sqlstate: str,
        message: str,
        detail: str | None = None,
        hint: str | None = None,
    ) -> Self:
        """Build a message with S and V (severity), C (SQLSTATE), M and optional D and H fields."""
        fields = [("S", severity), ("V", severity), ("C", sqlstate), ("M", message)]
        if detail is not None:
            fields.append(("D", detail))
        if hint is not None:
            fields.append(("H", hint))
        return cls(tuple(fields))

    def get(self, code: str) -> str | None:
        """Value of the first field with ``code``, or ``None``."""
        for key, value in self.fields:
            if key == code:
                return value
        return None

    @property
    def severity(self) -> str | None:
        """Non-localized severity ('V') when present, else the localized one ('S')."""
        value = self.get("V")
        return value if value is not None else self.get("S")

    @property
    def sqlstate(self) -> str | None:
        """The SQLSTATE code ('C')."""
        return self.get("C")

    @property
    def message(self) -> str | None:
        """The primary message ('M')."""
        return self.get("M")

    @property
    def detail(self) -> str | None:
        """The detail message ('D')."""
        return self.get("D")

    @property
    def hint(self) -> str | None:
        """The hint ('H')."""
        return self.get("H")


@dataclass(frozen=True, slots=True)
class ErrorResponse(_FieldsResponse):
    """ErrorResponse ('E')."""

    TYPE: ClassVar[int] = Backend.ERROR_RESPONSE
    _NAME: ClassVar[str] = "ErrorResponse"


@dataclass(frozen=True, slots=True)
class NoticeResponse(_FieldsResponse):
    """NoticeResponse ('N')."""

    TYPE: ClassVar[int] = Backend.NOTICE_RESPONSE
    _NAME: ClassVar[str] = "NoticeResponse"


@dataclass(frozen=True, slots=True)
class NotificationResponse:
    """NotificationResponse ('A'): a NOTIFY delivered to this session."""

    process_id: int
    channel: str
    payload: str
    TYPE: ClassVar[int] = Backend.NOTIFICATION_RESPONSE

    def encode(self) -> bytes:
        body = INT32.pack(self.process_id) + cstr(self.channel) + cstr(self.payload)
        return frame(Backend.NOTIFICATION_RESPONSE, body)

    @classmethod
    def decode(cls, body: Buffer, encoding: str = "utf-8") -> Self:
        r = Reader(body, "NotificationResponse")
        pid = r.int32()
        channel = r.cstring(encoding)
        payload = r.cstring(encoding)
        r.done()
        return cls(pid, channel, payload)


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    """NegotiateProtocolVersion ('v'): the newest protocol version the server supports and the
    unrecognized ``_pq_`` options. The version is the full number (``3 << 16 | minor``): that is what
    PostgreSQL sends and what libpq 18 checks, although the documentation speaks of the minor version."""

    newest_version: int
    unrecognized: tuple[str, ...] = ()
    TYPE: ClassVar[int] = Backend.NEGOTIATE_PROTOCOL_VERSION

    def encode(self) -> bytes:
        return frame(Backend.NEGOTIATE_PROTOCOL_VERSION,
            INT32.pack(self.newest_version)
            + INT32.pack(len(self.unrecognized))
            + b"".join(cstr(name) for name in self.unrecognized),
        )

    @classmethod
    def decode(cls, body: Buffer) -> Self:
        r = Reader(body, "NegotiateProtocolVersion")
        minor = r.int32()
        count = r.int32()
        if count < 0:
            raise ProtocolViolation(f"invalid option count {count} in NegotiateProtocolVersion message")
        names = tuple(r.cstring() for _ in range(count))
        r.done()
        return cls(minor, names)


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------

BackendMessage = (
    AuthenticationMessage
    | BackendKeyData
    | RowDescription
    | DataRow
    | CommandComplete
    | ErrorResponse
    | NoticeResponse
    | NotificationResponse
    | NegotiateProtocolVersion
)

_BACKEND: Final[dict[int, Callable[[Buffer], BackendMessage]]] = {
    Backend.AUTHENTICATION: _decode_authentication,
    Backend.BACKEND_KEY_DATA: BackendKeyData.decode,
    Backend.ROW_DESCRIPTION: RowDescription.decode,
    Backend.DATA_ROW: DataRow.decode,
    Backend.COMMAND_COMPLETE: CommandComplete.decode,
    Backend.ERROR_RESPONSE: ErrorResponse.decode,
    Backend.NOTICE_RESPONSE: NoticeResponse.decode,
    Backend.NOTIFICATION_RESPONSE: NotificationResponse.decode,
    Backend.NEGOTIATE_PROTOCOL_VERSION: NegotiateProtocolVersion.decode,
}


def decode_backend(type_byte: int, body: Buffer) -> BackendMessage:
    """Decode a message sent by a server."""
    decoder = _BACKEND.get(type_byte)
    if decoder is None:
        raise ProtocolViolation(f"invalid backend message type {type_byte} ({type_name(type_byte)})")
    return decoder(body)

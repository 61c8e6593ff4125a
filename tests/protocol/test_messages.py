"""Tests for the sans-I/O message codec: pgproxy.protocol.codec and pgproxy.protocol.messages."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgproxy.protocol import codec
from pgproxy.protocol import messages as m
from pgproxy.protocol.codec import ProtocolViolation, Reader, cstr, nullable, type_name
from pgproxy.protocol.types import Backend, Frontend

# --------------------------------------------------------------------------------------------------
# helpers (deliberately independent of the code under test)
# --------------------------------------------------------------------------------------------------


def frame(type_byte: bytes, body: bytes) -> bytes:
    """A full wire message built with int.to_bytes rather than the codec."""
    return type_byte + (len(body) + 4).to_bytes(4, "big") + body


def i16(v: int) -> bytes:
    return v.to_bytes(2, "big", signed=True)


def u16(v: int) -> bytes:
    return v.to_bytes(2, "big")


def i32(v: int) -> bytes:
    return v.to_bytes(4, "big", signed=True)


def u32(v: int) -> bytes:
    return v.to_bytes(4, "big")


def split(wire: bytes) -> tuple[int, bytes]:
    """Check the header of an encoded message and return (type byte, body)."""
    assert len(wire) >= 5
    length = int.from_bytes(wire[1:5], "big")
    assert length == len(wire) - 1, "length word must count itself and the body, not the type byte"
    return wire[0], wire[5:]


# The frontend messages the proxy decodes, by type byte ('p' is read raw and interpreted by the exchange).
FRONTEND_DECODERS: dict[int, Any] = {
    Frontend.QUERY: m.Query.decode, Frontend.PARSE: m.Parse.decode, Frontend.BIND: m.Bind.decode,
    Frontend.EXECUTE: m.Execute.decode, Frontend.SYNC: m.Sync.decode, Frontend.FUNCTION_CALL: m.FunctionCall.decode,
    Frontend.DESCRIBE: m.Describe.decode, Frontend.CLOSE: m.Close.decode,
    Frontend.PASSWORD: m.AuthenticationResponse.decode, Frontend.TERMINATE: m.Terminate.decode,
}


def decode_frontend(type_byte: int, body: Any) -> Any:
    return FRONTEND_DECODERS[type_byte](body)


def violation(fn: Any, *args: Any) -> ProtocolViolation:
    with pytest.raises(ProtocolViolation) as info:
        fn(*args)
    return info.value


# --------------------------------------------------------------------------------------------------
# codec helpers
# --------------------------------------------------------------------------------------------------


class TestCodec:
    def test_protocol_violation_defaults(self) -> None:
        exc = ProtocolViolation("invalid message length 3 for 'Q'")
        assert exc.sqlstate == "08P01"
        assert str(exc) == "invalid message length 3 for 'Q'"
        assert exc.message == str(exc)
        assert ProtocolViolation("x", "22021").sqlstate == "22021"
        assert ProtocolViolation("x", sqlstate="0A000").sqlstate == "0A000"

    def test_cstr(self) -> None:
        assert cstr("") == b"\x00"
        assert cstr("abc") == b"abc\x00"
        assert cstr("é") == b"\xc3\xa9\x00"
        with pytest.raises(ValueError):
            cstr("a\x00b")

    def test_frame(self) -> None:
        assert codec.frame(Frontend.QUERY, b"SELECT 1\x00") == b"Q\x00\x00\x00\rSELECT 1\x00"
        assert codec.frame(Frontend.SYNC, memoryview(b"")) == b"S\x00\x00\x00\x04"
        assert codec.header(Backend.DATA_ROW, 2) == b"D\x00\x00\x00\x06"

    def test_nullable(self) -> None:
        assert nullable(None) == b"\xff\xff\xff\xff"
        assert nullable(b"") == b"\x00\x00\x00\x00"
        assert nullable(b"ab") == b"\x00\x00\x00\x02ab"

    def test_type_name(self) -> None:
        assert type_name(ord("Q")) == "'Q'"
        assert type_name(b"Z") == "'Z'"
        assert type_name(0) == "'\\x00'"
        assert type_name(0xFF) == "'\\xff'"

    def test_reader_integers(self) -> None:
        data = b"\xff" + b"\xff" + b"\xff\xfe" + b"\xff\xfe" + b"\xff\xff\xff\xfd" + b"\xff\xff\xff\xfd"
        r = Reader(data)
        assert r.int8() == -1
        assert r.uint8() == 255
        assert r.int16() == -2
        assert r.uint16() == 65534
        assert r.int32() == -3
        assert r.uint32() == 2**32 - 3
        assert r.remaining() == 0
        r.done()

    def test_reader_strings_and_bytes(self) -> None:
        r = Reader(memoryview(b"abc\x00h\xc3\xa9\x00\x01\x02\x03rest"), "Test")
        assert r.cstring() == "abc"
        assert r.cstring() == "hé"
        assert r.raw(3) == b"\x01\x02\x03"
        assert r.pos == 11
        assert r.remaining() == 4
        exc = violation(r.done)
        assert exc.sqlstate == "08P01"
        assert "trailing" in str(exc) and "Test" in str(exc)
        assert r.rest() == b"rest"
        r.done()
        assert r.rest() == b""

    def test_reader_arrays(self) -> None:
        r = Reader(i16(-1) + i16(7) + u32(2**32 - 1) + u32(23))
        assert r.int16_array(2) == (-1, 7)
        assert r.uint32_array(2) == (2**32 - 1, 23)
        assert r.int16_array(0) == ()
        r.done()
        assert violation(Reader(b"\x00\x01\x00").int16_array, 2).sqlstate == "08P01"

    def test_reader_nullable(self) -> None:
        r = Reader(i32(-1) + i32(0) + i32(2) + b"hi")
        assert r.nullable_bytes() is None
        assert r.nullable_bytes() == b""
        assert r.nullable_bytes() == b"hi"
        r.done()
        assert violation(Reader(i32(-2)).nullable_bytes).sqlstate == "08P01"
        assert violation(Reader(i32(5) + b"abc").nullable_bytes).sqlstate == "08P01"
        assert Reader(i32(-1) + i32(1) + b"x").nullable_array(2) == (None, b"x")

    def test_reader_truncation(self) -> None:
        for method in ("int8", "uint8", "int16", "uint16", "int32", "uint32", "char"):
            exc = violation(getattr(Reader(b"", "Probe"), method))
            assert exc.sqlstate == "08P01"
            assert "truncated Probe message" in str(exc)
        assert violation(Reader(b"\x00\x00\x00").int32).sqlstate == "08P01"
        assert violation(Reader(b"ab").raw, 3).sqlstate == "08P01"
        assert violation(Reader(b"ab").raw, -1).sqlstate == "08P01"
        assert "unterminated" in str(violation(Reader(b"abc").cstring))

    def test_reader_invalid_utf8(self) -> None:
        exc = violation(Reader(b"a\xff\x00").cstring)
        assert exc.sqlstate == "22021"
        assert "0xff" in str(exc)
        # an encoded surrogate is not valid UTF-8 either (PostgreSQL rejects it too)
        assert violation(Reader(b"\xed\xa0\x80\x00").cstring).sqlstate == "22021"
        # overlong encoding of '/'
        assert violation(Reader(b"\xc0\xaf\x00").cstring).sqlstate == "22021"


# --------------------------------------------------------------------------------------------------
# round trips of every message
# --------------------------------------------------------------------------------------------------

FRONTEND_SAMPLES: list[Any] = [
    m.Query("SELECT 1"),
    m.Query(""),
    m.Query("SELECT 'grüße', '世界', '🐘'"),
    m.Parse("", "SELECT $1::int, $2", (23, 0)),
    m.Parse("stmt_1", "SELECT 1", ()),
    m.Parse("s", "SELECT $1", (2**32 - 1,)),
    m.Bind("", "", (), (), ()),
    m.Bind("p1", "s1", (1,), (b"\x00\x00\x00\x2a", None, b""), (0, 1)),
    m.Bind("", "s", (0, 1, 0), (b"text", b"\x00\xff\x00", None), (1,)),
    m.Bind("портал", "s", (), ("ünïcode".encode(),), ()),
    m.Execute("", 0),
    m.Execute("portal", 100),
    m.Execute("p", -1),
    m.Describe("S", "stmt"),
    m.Describe("P", ""),
    m.Close("S", "s1"),
    m.Close("P", "портал"),
    m.Sync(),
    m.FunctionCall(1598, (), (), 0),
    m.FunctionCall(2**32 - 2, (1,), (b"\x00\x01", None), 1),
    m.FunctionCall(42, (0, 1), (b"a", b"\x02"), 0),
    m.Terminate(),
]

PASSWORD_SAMPLES: list[Any] = [
    m.PasswordMessage("secret"),
    m.PasswordMessage("md5" + "0" * 32),
    m.PasswordMessage("pässwörd"),
    m.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abc"),
    m.SASLInitialResponse("SCRAM-SHA-256", None),
    m.SASLInitialResponse("SCRAM-SHA-256", b""),
    m.SASLResponse(b"c=biws,r=abc,p=xyz"),
    m.SASLResponse(b""),
    m.AuthenticationResponse(b"secret\x00"),
]

BACKEND_SAMPLES: list[Any] = [
    m.AuthenticationOk(),
    m.AuthenticationCleartextPassword(),
    m.AuthenticationMD5Password(b"\x01\x02\x03\xff"),
    m.AuthenticationSASL(("SCRAM-SHA-256",)),
    m.AuthenticationSASL(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")),
    m.AuthenticationSASL(()),
    m.AuthenticationSASLContinue(b"r=abc,s=c2FsdA==,i=4096"),
    m.AuthenticationSASLFinal(b"v=c2lnbmF0dXJl"),
    m.AuthenticationOther(2),
    m.AuthenticationOther(7),
    m.AuthenticationOther(8, b"\x01\x02gss-token"),
    m.AuthenticationOther(9),
    m.BackendKeyData(12345, 0xDEADBEEF),
    m.BackendKeyData(-1, 0),
    m.BackendKeyData(2**31 - 1, 2**32 - 1),
    m.RowDescription(()),
    m.RowDescription((
        m.FieldDescription("id", 16384, 1, 23, 4, -1, 0),
        m.FieldDescription("имя", 2**32 - 1, -1, 2**32 - 1, -1, 2**31 - 1, 1),
        m.FieldDescription("", 0, 0, 25, -2, -1, 0),
    )),
    m.DataRow(()),
    m.DataRow((b"1", None, b"", b"\x00\xff\x00", "ünïcode".encode())),
    m.DataRow((None,)),
    m.CommandComplete("SELECT 5"),
    m.CommandComplete("INSERT 0 3"),
    m.CommandComplete("CREATE TABLE"),
    m.ErrorResponse((("S", "ERROR"), ("V", "ERROR"), ("C", "42P01"), ("M", "relation \"x\" does not exist"))),
    m.ErrorResponse(()),
    m.NoticeResponse((("S", "NOTICE"), ("V", "NOTICE"), ("C", "00000"), ("M", "héllo"), ("W", "ctx"))),
    m.NotificationResponse(4242, "chan", "payload ✉"),
    m.NotificationResponse(1, "", ""),
    m.NegotiateProtocolVersion(0, ()),
    m.NegotiateProtocolVersion(0, ("_pq_.compression", "_pq_.other")),
]


def _ids(samples: list[Any]) -> list[str]:
    return [f"{type(s).__name__}-{i}" for i, s in enumerate(samples)]


@pytest.mark.parametrize("message", FRONTEND_SAMPLES + PASSWORD_SAMPLES + BACKEND_SAMPLES,
                         ids=_ids(FRONTEND_SAMPLES + PASSWORD_SAMPLES + BACKEND_SAMPLES))
def test_round_trip_class_decode(message: Any) -> None:
    wire = message.encode()
    type_byte, body = split(wire)
    assert type_byte == type(message).TYPE
    assert type(message).decode(body) == message
    assert type(message).decode(memoryview(body)) == message
    assert type(message).decode(bytearray(body)) == message


@pytest.mark.parametrize("message", FRONTEND_SAMPLES, ids=_ids(FRONTEND_SAMPLES))
def test_round_trip_decode_frontend(message: Any) -> None:
    type_byte, body = split(message.encode())
    decoded = decode_frontend(type_byte, memoryview(body))
    assert isinstance(decoded, type(message))  # a view is an instance of its message's class
    assert decoded == message


@pytest.mark.parametrize("message", BACKEND_SAMPLES, ids=_ids(BACKEND_SAMPLES))
def test_round_trip_decode_backend(message: Any) -> None:
    type_byte, body = split(message.encode())
    decoded = m.decode_backend(type_byte, memoryview(body))
    assert type(decoded) is type(message)
    assert decoded == message


@pytest.mark.parametrize("message", PASSWORD_SAMPLES, ids=_ids(PASSWORD_SAMPLES))
def test_password_family_decodes_to_raw_response(message: Any) -> None:
    type_byte, body = split(message.encode())
    assert type_byte == ord("p")
    decoded = decode_frontend(type_byte, body)
    assert decoded == m.AuthenticationResponse(body)
    assert decoded.encode() == message.encode()


def test_messages_are_immutable_slotted_and_hashable() -> None:
    for message in FRONTEND_SAMPLES + PASSWORD_SAMPLES + BACKEND_SAMPLES:
        assert not hasattr(message, "__dict__"), type(message).__name__
        assert hash(message) == hash(type(message).decode(message.encode()[5:]))
        if isinstance(message, m._View):  # the requests read per statement: read-only views
            with pytest.raises(AttributeError):
                setattr(message, type(message)._FIELDS[0], None)
            continue
        assert dataclasses.is_dataclass(type(message))
        fields = dataclasses.fields(message)
        if fields:
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(message, fields[0].name, None)


def test_different_message_types_are_not_equal() -> None:
    pairs: list[tuple[object, object]] = [
        (m.ErrorResponse((("M", "x"),)), m.NoticeResponse((("M", "x"),))),
        (m.Sync(), m.Terminate()),
        (m.AuthenticationResponse(b""), m.SASLResponse(b"")),
    ]
    for a, b in pairs:
        assert a != b
    assert m.Sync() == m.Sync()


# --------------------------------------------------------------------------------------------------
# hand-built wire captures (from the protocol documentation)
# --------------------------------------------------------------------------------------------------


def test_query_capture() -> None:
    wire = b"Q\x00\x00\x00\rSELECT 1\x00"
    assert m.Query("SELECT 1").encode() == wire
    assert decode_frontend(wire[0], wire[5:]) == m.Query("SELECT 1")


def test_query_unicode_capture() -> None:
    sql = "SELECT '日本'"
    body = sql.encode("utf-8") + b"\x00"
    wire = b"Q" + struct.pack(">i", len(body) + 4) + body
    assert m.Query(sql).encode() == wire
    assert m.Query.decode(body).sql == sql


def test_parse_capture() -> None:
    body = b"s1\x00SELECT $1\x00" + b"\x00\x01" + b"\x00\x00\x00\x17"
    wire = b"P\x00\x00\x00\x17" + body
    assert len(wire) - 1 == 0x17
    assert decode_frontend(ord("P"), body) == m.Parse("s1", "SELECT $1", (23,))
    assert m.Parse("s1", "SELECT $1", (23,)).encode() == wire


def test_bind_capture_with_null_and_binary() -> None:
    body = (
        b"\x00"  # unnamed portal
        + b"s1\x00"  # statement
        + b"\x00\x02" + b"\x00\x01" + b"\x00\x00"  # 2 parameter formats: binary, text
        + b"\x00\x02"  # 2 parameters
        + b"\x00\x00\x00\x04\x00\x00\x00\x2a"  # int4 42 in binary
        + b"\xff\xff\xff\xff"  # NULL
        + b"\x00\x01" + b"\x00\x01"  # 1 result format: binary
    )
    bind = decode_frontend(ord("B"), body)
    assert bind == m.Bind("", "s1", (1, 0), (b"\x00\x00\x00\x2a", None), (1,))
    assert bind.encode() == frame(b"B", body)
    assert isinstance(bind, m.Bind)
    assert bind.param_format(0) == 1 and bind.param_format(1) == 0


def test_bind_param_format_rule() -> None:
    assert m.Bind("", "", (), (b"a", b"b"), ()).param_format(1) == 0
    assert m.Bind("", "", (1,), (b"a", b"b"), ()).param_format(1) == 1
    assert m.Bind("", "", (0, 1), (b"a", b"b"), ()).param_format(1) == 1


# --------------------------------------------------------------------------------------------------
# lazy views: what the session reads per request
# --------------------------------------------------------------------------------------------------


def test_a_bind_view_reads_its_names_without_its_values() -> None:
    # Names fine, parameter section truncated: the session reads the names and leaves the rest to the server.
    body = b"p1\x00s1\x00" + u16(0) + u16(1) + i32(10) + b"abc"
    bind = m.Bind.view(memoryview(body))
    assert (bind.portal, bind.statement) == ("p1", "s1")
    assert violation(lambda: bind.params).sqlstate == "08P01"
    assert violation(m.Bind.decode, body).sqlstate == "08P01"
    assert m.Bind.lenient(body) is None
    assert m.Bind.lenient(None) is None


def test_a_bind_view_decodes_each_section_once() -> None:
    wire = m.Bind("p", "s", (0, 1), (b"x", None), (1,)).encode()
    bind = m.Bind.view(wire[5:])
    assert bind.params is bind.params
    assert bind.portal is bind.portal
    assert (bind.param_formats, bind.result_formats, bind.param_format(1)) == ((0, 1), (1,), 1)
    assert bind.values == ((0, 1), (b"x", None), (1,))
    lenient = m.Bind.lenient(wire[5:])
    assert lenient is not None and lenient == m.Bind("p", "s", (0, 1), (b"x", None), (1,))
    assert bind.encode() == wire  # a view encodes to its bytes as sent


def test_views_read_text_in_the_client_encoding() -> None:
    assert m.Query.view(b"SELECT '\xe9'\x00", "iso8859-1").sql == "SELECT 'é'"
    assert violation(lambda: m.Query.view(b"SELECT '\xe9'\x00").sql).sqlstate == "22021"
    parse = m.Parse.decode(b"n\xe9\x00SELECT '\xe9'\x00" + u16(1) + u32(23), "iso8859-1")
    assert (parse.name, parse.query, parse.param_types) == ("né", "SELECT 'é'", (23,))
    bind = m.Bind.view(b"\xe9\x00\x00" + u16(0) + u16(0) + u16(0), "iso8859-1")
    assert (bind.portal, bind.statement, bind.params) == ("é", "", ())
    assert m.Execute.view(b"\xe9\x00" + i32(0), "iso8859-1").portal == "é"
    assert m.Describe.view(b"S\xe9\x00", "iso8859-1").name == "é"
    assert m.Close.view(b"P\xe9\x00", "iso8859-1").name == "é"
    exc = violation(lambda: m.Bind.view(b"\xff\x00\x00" + u16(0) * 3, "euc_jp").portal)
    assert (exc.sqlstate, str(exc)) == ("22021", "invalid byte sequence for the client encoding (euc_jp)")


def test_views_refuse_text_in_an_unsupported_client_encoding() -> None:
    exc = violation(lambda: m.Execute.view(b"\x00" + i32(0), None).portal)
    assert exc.sqlstate == "0A000"
    assert violation(lambda: m.Query.view(b"SELECT 1\x00", None).sql).sqlstate == "0A000"


def test_a_view_reads_only_the_bytes_a_field_needs() -> None:
    execute = m.Execute.view(b"p\x00" + b"\x00")  # max_rows truncated
    assert execute.portal == "p"
    assert violation(lambda: execute.max_rows).sqlstate == "08P01"
    describe = m.Describe.view(b"X\x00")  # the server answers an unknown kind with its own error
    assert (describe.kind, describe.name) == ("X", "")
    assert str(violation(lambda: m.Close.view(b"X\x00").kind)) == "invalid Close message"
    assert str(violation(lambda: m.Close.view(b"").kind)) == "invalid Close message"


def test_parse_view_rewrites_its_text_and_keeps_the_rest() -> None:
    body = m.Parse("s1", "SELECT 1", (23,)).encode()[5:]
    parse = m.Parse.view(body)
    assert parse.query_bytes == b"SELECT 1"
    rewritten = parse.with_query(b"SELECT 2")
    assert rewritten == m.Parse("s1", "SELECT 2", (23,)).encode()


def test_execute_sync_terminate_captures() -> None:
    assert m.Execute("", 0).encode() == b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"
    assert decode_frontend(ord("E"), b"\x00\x00\x00\x00\x0a") == m.Execute("", 10)
    assert m.Sync().encode() == b"S\x00\x00\x00\x04"
    assert m.Terminate().encode() == b"X\x00\x00\x00\x04"
    assert decode_frontend(ord("X"), b"") == m.Terminate()


def test_function_call_capture() -> None:
    body = u32(1598) + u16(1) + i16(1) + u16(2) + i32(2) + b"\x00\x07" + i32(-1) + i16(1)
    call = decode_frontend(ord("F"), body)
    assert call == m.FunctionCall(1598, (1,), (b"\x00\x07", None), 1)
    assert call.encode() == frame(b"F", body)


def test_password_message_capture() -> None:
    wire = b"p\x00\x00\x00\x0bsecret\x00"
    assert m.PasswordMessage("secret").encode() == wire
    raw = decode_frontend(ord("p"), wire[5:])
    assert isinstance(raw, m.AuthenticationResponse)
    assert raw.password() == "secret"


def test_authentication_response_interpretations() -> None:
    initial = m.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=nonce")
    raw = m.AuthenticationResponse(initial.encode()[5:])
    assert raw.sasl_initial() == initial
    assert raw.sasl_response() == m.SASLResponse(initial.encode()[5:])
    wire = m.SASLInitialResponse("SCRAM-SHA-256", None).encode()
    assert wire == b"p\x00\x00\x00\x16SCRAM-SHA-256\x00\xff\xff\xff\xff"
    assert m.AuthenticationResponse(b"").sasl_response() == m.SASLResponse(b"")


@pytest.mark.parametrize(
    ("data", "sqlstate"),
    [
        (b"", "08P01"),  # nothing at all
        (b"secret", "08P01"),  # no terminator
        (b"secret\x00x", "08P01"),  # trailing bytes after the string
        (b"a\x00b\x00", "08P01"),  # two strings
        (b"\xff\xfe\x00", "22021"),  # invalid UTF-8
    ],
)
def test_authentication_response_bad_password(data: bytes, sqlstate: str) -> None:
    assert violation(m.AuthenticationResponse(data).password).sqlstate == sqlstate


def test_authentication_captures() -> None:
    assert m.decode_backend(ord("R"), b"\x00\x00\x00\x00") == m.AuthenticationOk()
    assert m.AuthenticationOk().encode() == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert m.AuthenticationCleartextPassword().encode() == b"R\x00\x00\x00\x08\x00\x00\x00\x03"
    md5 = b"R\x00\x00\x00\x0c\x00\x00\x00\x05\xaa\xbb\xcc\xdd"
    assert m.decode_backend(md5[0], md5[5:]) == m.AuthenticationMD5Password(b"\xaa\xbb\xcc\xdd")
    assert m.AuthenticationMD5Password(b"\xaa\xbb\xcc\xdd").encode() == md5
    sasl = b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"
    assert m.decode_backend(sasl[0], sasl[5:]) == m.AuthenticationSASL(("SCRAM-SHA-256",))
    assert m.AuthenticationSASL(("SCRAM-SHA-256",)).encode() == sasl
    cont = m.decode_backend(ord("R"), i32(11) + b"r=abc")
    assert cont == m.AuthenticationSASLContinue(b"r=abc")
    final = m.decode_backend(ord("R"), i32(12) + b"v=xyz")
    assert final == m.AuthenticationSASLFinal(b"v=xyz")
    gss = m.decode_backend(ord("R"), i32(7))
    assert gss == m.AuthenticationOther(7, b"")
    assert isinstance(gss, m.AuthenticationOther) and gss.code == 7
    assert m.decode_backend(ord("R"), i32(8) + b"tok") == m.AuthenticationOther(8, b"tok")
    assert m.decode_backend(ord("R"), i32(9)) == m.AuthenticationOther(9)
    assert m.decode_backend(ord("R"), i32(2)) == m.AuthenticationOther(2)


def test_backend_key_data_capture_unsigned_secret() -> None:
    wire = b"K\x00\x00\x00\x0c\x00\x00\x30\x39\xde\xad\xbe\xef"
    key = m.decode_backend(wire[0], wire[5:])
    assert key == m.BackendKeyData(12345, 0xDEADBEEF)
    assert isinstance(key, m.BackendKeyData) and key.secret_key > 0
    assert key.encode() == wire
    negative_pid = m.BackendKeyData.decode(b"\xff\xff\xff\xff\x00\x00\x00\x01")
    assert negative_pid.process_id == -1


def test_row_description_capture() -> None:
    # SELECT 1 AS a: one int4 column not from a table
    body = b"\x00\x01" + b"a\x00" + u32(0) + i16(0) + u32(23) + i16(4) + i32(-1) + i16(0)
    wire = b"T\x00\x00\x00\x1a" + body  # 4 + 2 + 2 + 18 = 26
    desc = m.decode_backend(wire[0], wire[5:])
    assert isinstance(desc, m.RowDescription)
    assert desc.fields == (m.FieldDescription("a", 0, 0, 23, 4, -1, 0),)
    field = desc.fields[0]
    assert (field.name, field.type_oid, field.type_size, field.type_modifier) == ("a", 23, 4, -1)
    assert desc.encode() == wire


def test_row_description_unsigned_oids_and_unicode_names() -> None:
    body = b"\x00\x02" + "名前".encode() + b"\x00" + u32(0xFFFFFFF0) + i16(2) + u32(0x80000000) + i16(-1)
    body += i32(68) + i16(1)
    body += b"x\x00" + u32(16385) + i16(1) + u32(25) + i16(-1) + i32(-1) + i16(0)
    desc = m.RowDescription.decode(body)
    assert desc.fields[0] == m.FieldDescription("名前", 0xFFFFFFF0, 2, 0x80000000, -1, 68, 1)
    assert desc.fields[1].table_oid == 16385
    assert desc.encode()[5:] == body


def test_data_row_capture() -> None:
    wire = b"D\x00\x00\x00\x0b\x00\x01\x00\x00\x00\x011"
    assert m.decode_backend(wire[0], wire[5:]) == m.DataRow((b"1",))
    assert m.DataRow((b"1",)).encode() == wire
    with_null = b"\x00\x03" + i32(-1) + i32(0) + i32(3) + b"\xe2\x9c\x93"
    row = m.DataRow.decode(with_null)
    assert row.values == (None, b"", "✓".encode())
    assert all(v is None or type(v) is bytes for v in m.DataRow.decode(memoryview(with_null)).values)


def test_command_complete_capture() -> None:
    wire = b"C\x00\x00\x00\rSELECT 1\x00"
    cc = m.decode_backend(wire[0], wire[5:])
    assert cc == m.CommandComplete("SELECT 1")
    assert isinstance(cc, m.CommandComplete) and cc.rows == 1
    assert cc.encode() == wire


@pytest.mark.parametrize(
    ("tag", "rows"),
    [
        ("SELECT 5", 5),
        ("SELECT 0", 0),
        ("INSERT 0 3", 3),
        ("INSERT 0 1", 1),
        ("UPDATE 2", 2),
        ("DELETE 0", 0),
        ("COPY 10", 10),
        ("MERGE 1", 1),
        ("FETCH 3", 3),
        ("MOVE 1", 1),
        ("SELECT 12345678901", 12345678901),
        ("CREATE TABLE", None),
        ("BEGIN", None),
        ("", None),
        ("SET", None),
        ("SELECT ²", None),  # non-ASCII digits are not a count
    ],
)
def test_command_complete_rows(tag: str, rows: int | None) -> None:
    assert m.CommandComplete(tag).rows == rows


def test_error_response_capture() -> None:
    body = (
        b"SERROR\x00VERROR\x00C42P01\x00"
        b'Mrelation "nope" does not exist\x00P15\x00Fparse_relation.c\x00L1392\x00RparserOpenTable\x00\x00'
    )
    err = m.decode_backend(ord("E"), body)
    assert isinstance(err, m.ErrorResponse)
    assert err.fields == (
        ("S", "ERROR"),
        ("V", "ERROR"),
        ("C", "42P01"),
        ("M", 'relation "nope" does not exist'),
        ("P", "15"),
        ("F", "parse_relation.c"),
        ("L", "1392"),
        ("R", "parserOpenTable"),
    )
    assert err.severity == "ERROR"
    assert err.sqlstate == "42P01"
    assert err.message == 'relation "nope" does not exist'
    assert err.detail is None and err.hint is None
    assert err.get("R") == "parserOpenTable"
    assert err.encode() == frame(b"E", body)


def test_error_response_keeps_order_and_duplicates() -> None:
    fields = (("M", "first"), ("C", "XX000"), ("M", "second"), ("S", "FATAL"))
    err = m.ErrorResponse.decode(m.ErrorResponse(fields).encode()[5:])
    assert err.fields == fields
    assert err.message == "first"


def test_severity_prefers_v_over_s() -> None:
    localized = m.NoticeResponse((("S", "AVERTISSEMENT"), ("V", "WARNING")))
    assert localized.severity == "WARNING"
    assert m.NoticeResponse((("S", "NOTICE"),)).severity == "NOTICE"
    assert m.NoticeResponse(()).severity is None
    assert m.NoticeResponse(()).sqlstate is None
    assert m.NoticeResponse(()).message is None


def test_error_response_build() -> None:
    err = m.ErrorResponse.build("FATAL", "28P01", "password authentication failed", detail="d", hint="h")
    assert err.fields == (
        ("S", "FATAL"),
        ("V", "FATAL"),
        ("C", "28P01"),
        ("M", "password authentication failed"),
        ("D", "d"),
        ("H", "h"),
    )
    assert (err.severity, err.sqlstate, err.message, err.detail, err.hint) == (
        "FATAL", "28P01", "password authentication failed", "d", "h"
    )
    assert err.encode() == frame(
        b"E", b"SFATAL\x00VFATAL\x00C28P01\x00Mpassword authentication failed\x00Dd\x00Hh\x00\x00"
    )
    short = m.ErrorResponse.build("ERROR", "42501", "permission denied")
    assert [k for k, _ in short.fields] == ["S", "V", "C", "M"]
    notice = m.NoticeResponse.build("NOTICE", "00000", "hi")
    assert isinstance(notice, m.NoticeResponse) and notice.encode()[:1] == b"N"


def test_error_response_encode_rejects_bad_codes() -> None:
    with pytest.raises(ValueError):
        m.ErrorResponse((("", "x"),)).encode()
    with pytest.raises(ValueError):
        m.ErrorResponse((("MM", "x"),)).encode()
    with pytest.raises(ValueError):
        m.ErrorResponse((("\x00", "x"),)).encode()


def test_notification_and_negotiate_captures() -> None:
    body = i32(77) + b"jobs\x00{\"id\": 1}\x00"
    assert m.decode_backend(ord("A"), body) == m.NotificationResponse(77, "jobs", '{"id": 1}')
    npv = i32(0) + i32(1) + b"_pq_.x\x00"
    assert m.decode_backend(ord("v"), npv) == m.NegotiateProtocolVersion(0, ("_pq_.x",))


# --------------------------------------------------------------------------------------------------
# malformed input
# --------------------------------------------------------------------------------------------------

FRONT = "front"
BACK = "back"

MALFORMED: list[tuple[str, str, str, bytes, str]] = [
    # (id, direction, type byte, body, sqlstate)
    # truncated bodies
    ("query-no-nul", FRONT, "Q", b"SELECT 1", "08P01"),
    ("query-empty-body", FRONT, "Q", b"", "08P01"),
    ("parse-missing-query", FRONT, "P", b"s1\x00", "08P01"),
    ("parse-short-oids", FRONT, "P", b"\x00SELECT $1\x00\x00\x02\x00\x00\x00\x17", "08P01"),
    ("parse-no-count", FRONT, "P", b"\x00SELECT 1\x00", "08P01"),
    ("bind-no-counts", FRONT, "B", b"\x00\x00", "08P01"),
    ("bind-short-formats", FRONT, "B", b"\x00\x00\x00\x02\x00\x01", "08P01"),
    ("bind-missing-param", FRONT, "B", b"\x00\x00\x00\x00\x00\x02" + i32(1) + b"x", "08P01"),
    ("bind-short-length-word", FRONT, "B", b"\x00\x00\x00\x00\x00\x01\x00\x00", "08P01"),
    ("bind-no-result-count", FRONT, "B", b"\x00\x00\x00\x00\x00\x00", "08P01"),
    ("execute-no-maxrows", FRONT, "E", b"\x00\x00\x00", "08P01"),
    ("describe-empty", FRONT, "D", b"", "08P01"),
    ("describe-unterminated", FRONT, "D", b"Sname", "08P01"),
    ("close-empty", FRONT, "C", b"", "08P01"),
    ("function-short", FRONT, "F", u32(1) + u16(0) + u16(0), "08P01"),
    ("row-desc-empty", BACK, "T", b"", "08P01"),
    ("row-desc-one-byte", BACK, "T", b"\x00", "08P01"),
    ("row-desc-missing-field", BACK, "T", b"\x00\x01", "08P01"),
    ("row-desc-name-unterminated", BACK, "T", b"\x00\x01abc", "08P01"),
    ("row-desc-short-fixed", BACK, "T", b"\x00\x01a\x00" + u32(0) + i16(0) + u32(23), "08P01"),
    ("data-row-empty", BACK, "D", b"", "08P01"),
    ("data-row-missing-column", BACK, "D", b"\x00\x02" + i32(1) + b"1", "08P01"),
    ("data-row-short-length", BACK, "D", b"\x00\x01\x00\x00", "08P01"),
    ("key-data-short", BACK, "K", b"\x00\x00\x00\x01\x00\x00", "08P01"),
    ("command-complete-no-nul", BACK, "C", b"SELECT 1", "08P01"),
    ("error-no-terminator", BACK, "E", b"SERROR\x00", "08P01"),
    ("error-unterminated-value", BACK, "E", b"SERR", "08P01"),
    ("notify-short", BACK, "A", b"\x00\x00", "08P01"),
    ("npv-short", BACK, "v", i32(0) + i32(2) + b"_pq_.a\x00", "08P01"),
    ("auth-short", BACK, "R", b"\x00\x00", "08P01"),
    ("auth-md5-short-salt", BACK, "R", i32(5) + b"\x01\x02", "08P01"),
    ("auth-sasl-no-list-terminator", BACK, "R", i32(10) + b"SCRAM-SHA-256\x00", "08P01"),
    # trailing garbage
    ("query-trailing", FRONT, "Q", b"SELECT 1\x00x", "08P01"),
    ("parse-trailing", FRONT, "P", b"\x00q\x00\x00\x00\x00", "08P01"),
    ("bind-trailing", FRONT, "B", b"\x00\x00" + u16(0) + u16(0) + u16(0) + b"\x00", "08P01"),
    ("execute-trailing", FRONT, "E", b"\x00" + i32(0) + b"\x00", "08P01"),
    ("describe-trailing", FRONT, "D", b"Sa\x00b", "08P01"),
    ("close-trailing", FRONT, "C", b"P\x00\x00", "08P01"),
    ("describe-bad-kind", FRONT, "D", b"X\x00", "08P01"),
    ("close-bad-kind", FRONT, "C", b"X\x00", "08P01"),
    ("sync-body", FRONT, "S", b"\x00", "08P01"),
    ("terminate-body", FRONT, "X", b"xx", "08P01"),
    ("row-desc-trailing", BACK, "T", b"\x00\x00\x00", "08P01"),
    ("data-row-trailing", BACK, "D", b"\x00\x01" + i32(1) + b"12", "08P01"),
    ("data-row-zero-trailing", BACK, "D", b"\x00\x00x", "08P01"),
    ("error-trailing", BACK, "E", b"SERROR\x00\x00x", "08P01"),
    ("auth-ok-trailing", BACK, "R", i32(0) + b"\x00", "08P01"),
    ("auth-cleartext-trailing", BACK, "R", i32(3) + b"x", "08P01"),
    ("auth-md5-long-salt", BACK, "R", i32(5) + b"\x01\x02\x03\x04\x05", "08P01"),
    ("auth-sasl-trailing", BACK, "R", i32(10) + b"A\x00\x00x", "08P01"),
    ("key-data-trailing", BACK, "K", i32(1) + u32(2) + b"\x00", "08P01"),
    ("npv-trailing", BACK, "v", i32(0) + i32(0) + b"x", "08P01"),
    # bad enum values
    ("auth-unknown-code", BACK, "R", i32(42), "08P01"),
    ("auth-scm-code", BACK, "R", i32(6), "08P01"),
    ("auth-negative-code", BACK, "R", i32(-1), "08P01"),
    ("bind-format-count-mismatch", FRONT, "B",
     b"\x00\x00" + u16(2) + i16(0) + i16(1) + u16(3) + i32(-1) * 3 + u16(0), "08P01"),
    ("function-format-count-mismatch", FRONT, "F",
     u32(1) + u16(2) + i16(0) + i16(1) + u16(1) + i32(-1) + i16(0), "08P01"),
    ("npv-negative-count", BACK, "v", i32(0) + i32(-1), "08P01"),
    # negative lengths other than -1
    ("data-row-minus-two", BACK, "D", b"\x00\x01" + i32(-2), "08P01"),
    ("data-row-min-int", BACK, "D", b"\x00\x01" + i32(-(2**31)), "08P01"),
    ("bind-minus-five", FRONT, "B", b"\x00\x00" + u16(0) + u16(1) + i32(-5) + u16(0), "08P01"),
    ("function-minus-two", FRONT, "F", u32(1) + u16(0) + u16(1) + i32(-2) + i16(0), "08P01"),
    # lengths past the end of the body
    ("data-row-past-end", BACK, "D", b"\x00\x01" + i32(100) + b"abc", "08P01"),
    ("data-row-huge", BACK, "D", b"\x00\x01" + i32(2**31 - 1), "08P01"),
    ("bind-past-end", FRONT, "B", b"\x00\x00" + u16(0) + u16(1) + i32(10) + b"abc" + u16(0), "08P01"),
    ("data-row-count-too-big", BACK, "D", b"\xff\xff" + i32(-1), "08P01"),
    ("row-desc-count-too-big", BACK, "T", b"\xff\xff", "08P01"),
    # invalid UTF-8 in strings
    ("query-bad-utf8", FRONT, "Q", b"SELECT '\xff'\x00", "22021"),
    ("query-truncated-utf8", FRONT, "Q", b"\xe4\xb8\x00", "22021"),
    ("parse-bad-name", FRONT, "P", b"\xc3\x28\x00q\x00\x00\x00", "22021"),
    ("bind-bad-portal", FRONT, "B", b"\x80\x00\x00" + u16(0) + u16(0) + u16(0), "22021"),
    ("row-desc-bad-name", BACK, "T",
     b"\x00\x01\xff\x00" + u32(0) + i16(0) + u32(23) + i16(4) + i32(-1) + i16(0), "22021"),
    ("error-bad-value", BACK, "E", b"M\xc0\xaf\x00\x00", "22021"),
    ("notify-bad-channel", BACK, "A", i32(1) + b"\xff\x00\x00", "22021"),
    ("command-complete-bad", BACK, "C", b"\xed\xa0\x80\x00", "22021"),
]


@pytest.mark.parametrize(
    ("direction", "type_char", "body", "sqlstate"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed(direction: str, type_char: str, body: bytes, sqlstate: str) -> None:
    decode = decode_frontend if direction == FRONT else m.decode_backend
    exc = violation(decode, ord(type_char), body)
    assert exc.sqlstate == sqlstate
    assert str(exc)  # always a human-readable message
    # the same failure with a memoryview body
    assert violation(decode, ord(type_char), memoryview(body)).sqlstate == sqlstate


def test_error_messages_are_informative() -> None:
    exc = violation(decode_frontend, ord("S"), b"x")
    assert str(exc) == "invalid message length 5 for 'S'"
    assert "trailing" in str(violation(m.Query.decode, b"SELECT 1\x00x"))
    assert "truncated" in str(violation(m.Execute.decode, b"\x00"))
    assert "runs past the end" in str(violation(m.DataRow.decode, b"\x00\x01" + i32(9)))
    assert "-2" in str(violation(m.DataRow.decode, b"\x00\x01" + i32(-2)))
    assert "parameter formats" in str(violation(m.Bind.decode, b"\x00\x00" + u16(2) + i16(0) + i16(0) + u16(0)
                                                + u16(0)))


@pytest.mark.parametrize("type_byte", [ord("Q"), ord("P"), ord("B"), ord("X"), ord("p"), 0, ord("?")])
def test_unknown_backend_type(type_byte: int) -> None:
    exc = violation(m.decode_backend, type_byte, b"")
    assert exc.sqlstate == "08P01"
    assert "invalid backend message type" in str(exc)


def test_auth_class_rejects_other_code() -> None:
    assert violation(m.AuthenticationOk.decode, i32(3)).sqlstate == "08P01"
    assert violation(m.AuthenticationMD5Password.decode, i32(0)).sqlstate == "08P01"
    assert violation(m.AuthenticationOther.decode, i32(0)).sqlstate == "08P01"


def test_encode_rejects_unencodable_values() -> None:
    with pytest.raises(ValueError):
        m.Query("SELECT '\x00'").encode()
    with pytest.raises(ValueError):
        m.AuthenticationMD5Password(b"abc").encode()
    with pytest.raises(ValueError):
        m.AuthenticationSASL(("",)).encode()
    with pytest.raises(struct.error):
        m.BackendKeyData(1, -1).encode()  # secret keys are unsigned


# --------------------------------------------------------------------------------------------------
# property-based round trips
# --------------------------------------------------------------------------------------------------

# Protocol strings: valid UTF-8 (no lone surrogates) without NUL.
text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=40)
int16 = st.integers(-(2**15), 2**15 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
uint32 = st.integers(0, 2**32 - 1)
value = st.none() | st.binary(max_size=64)


@st.composite
def binds(draw: st.DrawFn) -> m.Bind:
    params = tuple(draw(st.lists(value, max_size=20)))
    n_formats = draw(st.sampled_from(sorted({0, 1, len(params)})))
    formats = tuple(draw(st.lists(st.sampled_from([0, 1]) | int16, min_size=n_formats, max_size=n_formats)))
    results = tuple(draw(st.lists(int16, max_size=20)))
    return m.Bind(draw(text), draw(text), formats, params, results)


@given(binds())
def test_bind_round_trip(bind: m.Bind) -> None:
    type_byte, body = split(bind.encode())
    assert type_byte == ord("B")
    assert m.Bind.decode(body) == bind
    assert decode_frontend(type_byte, memoryview(body)) == bind


@given(st.lists(value, max_size=200).map(tuple))
def test_data_row_round_trip(values: tuple[bytes | None, ...]) -> None:
    row = m.DataRow(values)
    type_byte, body = split(row.encode())
    assert type_byte == ord("D")
    decoded = m.DataRow.decode(body)
    assert decoded == row
    assert m.decode_backend(type_byte, memoryview(body)) == row


field_descriptions = st.builds(m.FieldDescription, text, uint32, int16, uint32, int16, int32, int16)


@given(st.lists(field_descriptions, max_size=30).map(tuple))
def test_row_description_round_trip(fields: tuple[m.FieldDescription, ...]) -> None:
    desc = m.RowDescription(fields)
    type_byte, body = split(desc.encode())
    assert type_byte == ord("T")
    assert m.RowDescription.decode(body) == desc
    assert m.decode_backend(type_byte, memoryview(body)) == desc


field_code = st.characters(min_codepoint=1, max_codepoint=255)


@given(st.lists(st.tuples(field_code, text), max_size=20).map(tuple), st.booleans())
def test_error_and_notice_round_trip(fields: tuple[tuple[str, str], ...], notice: bool) -> None:
    message = m.NoticeResponse(fields) if notice else m.ErrorResponse(fields)
    type_byte, body = split(message.encode())
    assert type_byte == (ord("N") if notice else ord("E"))
    decoded = m.decode_backend(type_byte, body)
    assert type(decoded) is type(message)
    assert decoded == message


@given(text, text, text, st.none() | text, st.none() | text)
def test_error_build_round_trip(severity: str, sqlstate: str, message: str, detail: str | None,
                                hint: str | None) -> None:
    err = m.ErrorResponse.build(severity, sqlstate, message, detail, hint)
    decoded = m.ErrorResponse.decode(err.encode()[5:])
    assert decoded == err
    assert (decoded.severity, decoded.sqlstate, decoded.message, decoded.detail, decoded.hint) == (
        severity, sqlstate, message, detail, hint
    )


FRONTEND_TYPES = sorted(FRONTEND_DECODERS)
BACKEND_TYPES = sorted(b for b in b"RKTDCENAv")


@settings(max_examples=300)
@given(st.sampled_from(FRONTEND_TYPES), st.binary(max_size=64))
def test_arbitrary_frontend_bytes_never_crash(type_byte: int, body: bytes) -> None:
    """Random bodies either decode to a message that re-encodes to the same bytes, or raise
    ProtocolViolation -- never another exception."""
    try:
        decoded = decode_frontend(type_byte, body)
    except ProtocolViolation as exc:
        assert exc.sqlstate in ("08P01", "22021")
        return
    assert decoded.encode() == frame(bytes([type_byte]), body)


@settings(max_examples=300)
@given(st.sampled_from(BACKEND_TYPES), st.binary(max_size=64))
def test_arbitrary_backend_bytes_never_crash(type_byte: int, body: bytes) -> None:
    try:
        decoded = m.decode_backend(type_byte, body)
    except ProtocolViolation as exc:
        assert exc.sqlstate in ("08P01", "22021")
        return
    assert decoded.encode() == frame(bytes([type_byte]), body)


@settings(max_examples=200)
@given(st.sampled_from(BACKEND_SAMPLES + FRONTEND_SAMPLES), st.data())
def test_truncated_valid_messages_raise(message: Any, data: st.DataObject) -> None:
    """Every proper prefix of a valid body either fails to decode or (for raw-payload messages)
    decodes to something different -- it never silently yields the original message."""
    body = message.encode()[5:]
    if not body:
        return
    cut = data.draw(st.integers(0, len(body) - 1))
    try:
        decoded = type(message).decode(body[:cut])
    except ProtocolViolation:
        return
    assert decoded != message

"""Tests for the untyped startup-phase packets in pgproxy.protocol.startup."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgproxy.protocol.codec import ProtocolViolation
from pgproxy.protocol.startup import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    MAX_STARTUP_PACKET_LENGTH,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    decode_startup,
)


def i32(v: int) -> bytes:
    return v.to_bytes(4, "big", signed=True)


def u32(v: int) -> bytes:
    return v.to_bytes(4, "big")


def packet(body: bytes) -> bytes:
    return (len(body) + 4).to_bytes(4, "big") + body


def strip(wire: bytes) -> bytes:
    """Check the length word of an encoded packet and return what follows it."""
    assert int.from_bytes(wire[:4], "big") == len(wire)
    return wire[4:]


def startup_body(*words: str, version: int = PROTOCOL_3_0, terminator: bool = True) -> bytes:
    out = i32(version) + b"".join(w.encode() + b"\x00" for w in words)
    return out + b"\x00" if terminator else out


def violation(body: bytes) -> ProtocolViolation:
    with pytest.raises(ProtocolViolation) as info:
        decode_startup(body)
    return info.value


def test_constants() -> None:
    assert PROTOCOL_3_0 == 3 << 16 == 196608
    assert CANCEL_REQUEST_CODE == (1234 << 16) | 5678
    assert SSL_REQUEST_CODE == (1234 << 16) | 5679
    assert GSSENC_REQUEST_CODE == (1234 << 16) | 5680


def test_psql_startup_capture() -> None:
    body = (
        b"\x00\x03\x00\x00"
        b"user\x00alice\x00database\x00shop\x00application_name\x00psql\x00client_encoding\x00UTF8\x00\x00"
    )
    wire = packet(body)
    msg = decode_startup(strip(wire))
    assert isinstance(msg, StartupMessage)
    assert msg.protocol_version == 196608
    assert (msg.major, msg.minor) == (3, 0)
    assert msg.params == {
        "user": "alice", "database": "shop", "application_name": "psql", "client_encoding": "UTF8"
    }
    assert list(msg.params) == ["user", "database", "application_name", "client_encoding"]  # order kept
    assert msg.protocol_options == ()
    assert msg.user == "alice" and msg.database == "shop"
    assert msg.encode() == wire
    assert decode_startup(memoryview(body)) == msg
    assert decode_startup(bytearray(body)) == msg


def test_database_defaults_to_user() -> None:
    msg = decode_startup(startup_body("user", "bob"))
    assert isinstance(msg, StartupMessage)
    assert msg.database == "bob"


def test_empty_values_and_unicode() -> None:
    msg = decode_startup(startup_body("user", "jürgen", "options", "", "application_name", "工具"))
    assert isinstance(msg, StartupMessage)
    assert msg.params == {"user": "jürgen", "options": "", "application_name": "工具"}
    assert decode_startup(strip(msg.encode())) == msg


def test_minor_version_is_accepted_and_exposed() -> None:
    msg = decode_startup(startup_body("user", "u", version=(3 << 16) | 2))
    assert isinstance(msg, StartupMessage)
    assert msg.protocol_version == 196610
    assert msg.minor == 2
    assert decode_startup(strip(msg.encode())) == msg


def test_protocol_options_are_separated() -> None:
    body = startup_body("user", "u", "_pq_.compression", "zstd", "database", "d", "_pq_.x", "1")
    msg = decode_startup(body)
    assert isinstance(msg, StartupMessage)
    assert msg.params == {"user": "u", "database": "d"}
    assert msg.protocol_options == ("_pq_.compression", "_pq_.x")
    # encode() never forwards protocol extensions
    assert decode_startup(strip(msg.encode())) == StartupMessage(PROTOCOL_3_0, {"user": "u", "database": "d"})


def test_startup_message_is_hashable_and_frozen() -> None:
    a = StartupMessage(PROTOCOL_3_0, {"user": "u"})
    b = StartupMessage(PROTOCOL_3_0, {"user": "u"})
    assert a == b and hash(a) == hash(b)
    assert a != StartupMessage(PROTOCOL_3_0, {"user": "v"})
    with pytest.raises(AttributeError):
        a.protocol_version = 1  # type: ignore[misc]


def test_ssl_request_capture() -> None:
    wire = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert SSLRequest().encode() == wire
    assert decode_startup(strip(wire)) == SSLRequest()
    assert isinstance(decode_startup(wire[4:]), SSLRequest)


def test_gssenc_request_capture() -> None:
    wire = b"\x00\x00\x00\x08\x04\xd2\x16\x30"
    assert GSSENCRequest().encode() == wire
    assert decode_startup(strip(wire)) == GSSENCRequest()
    ssl: object = SSLRequest()
    assert ssl != GSSENCRequest()


def test_cancel_request_capture_unsigned_secret() -> None:
    wire = b"\x00\x00\x00\x10\x04\xd2\x16\x2e" + b"\x00\x00\x30\x39" + b"\xfe\xdc\xba\x98"
    req = decode_startup(strip(wire))
    assert req == CancelRequest(12345, 0xFEDCBA98)
    assert isinstance(req, CancelRequest) and req.secret_key == 4275878552
    assert req.encode() == wire
    assert decode_startup(strip(CancelRequest(-5, 0).encode())) == CancelRequest(-5, 0)


@pytest.mark.parametrize(
    ("body", "sqlstate", "needle"),
    [
        # lengths
        (b"", "08P01", "invalid length of startup packet"),
        (b"\x00\x03\x00", "08P01", "invalid length of startup packet"),
        (i32(PROTOCOL_3_0) + b"user\x00u\x00" + b"x" * MAX_STARTUP_PACKET_LENGTH + b"\x00\x00", "08P01",
         "invalid length of startup packet"),
        (i32(SSL_REQUEST_CODE) + b"\x00", "08P01", "invalid length"),
        (i32(GSSENC_REQUEST_CODE) + b"\x00\x00\x00\x00", "08P01", "invalid length"),
        (i32(CANCEL_REQUEST_CODE) + i32(1), "08P01", "cancel request"),
        (i32(CANCEL_REQUEST_CODE) + i32(1) + u32(2) + b"\x00", "08P01", "cancel request"),
        # layout
        (i32(PROTOCOL_3_0), "08P01", "expected terminator"),
        (startup_body("user", "u", terminator=False), "08P01", "expected terminator"),
        (i32(PROTOCOL_3_0) + b"user\x00u", "08P01", "expected terminator"),
        (startup_body("user", "u", "database"), "08P01", "has no value"),
        (i32(PROTOCOL_3_0) + b"user\x00u\x00\x00database\x00d\x00\x00", "08P01", "empty parameter name"),
        (startup_body("user", "u", "", "x"), "08P01", "empty parameter name"),
        (startup_body("user", "u", "user", "v"), "08P01", "duplicate startup parameter 'user'"),
        (startup_body("user", "u", "_pq_.a", "1", "_pq_.a", "2"), "08P01", "duplicate"),
        # user
        (startup_body("database", "d"), "28000", "no PostgreSQL user name specified in startup packet"),
        (startup_body(), "28000", "no PostgreSQL user name specified in startup packet"),
        (startup_body("user", ""), "28000", "no PostgreSQL user name specified in startup packet"),
        (startup_body("_pq_.user", "u"), "28000", "no PostgreSQL user name"),
        # versions
        (startup_body("user", "u", version=2 << 16), "0A000",
         "unsupported frontend protocol 2.0: server supports 3.0 to 3.0"),
        (startup_body("user", "u", version=(4 << 16) | 1), "0A000", "unsupported frontend protocol 4.1"),
        (startup_body("user", "u", version=0), "0A000", "unsupported frontend protocol 0.0"),
        (startup_body("user", "u", version=(1234 << 16) | 5681), "0A000",
         "unsupported frontend protocol 1234.5681"),
        # encoding
        (i32(PROTOCOL_3_0) + b"user\x00\xff\xfe\x00\x00", "22021",
         'invalid byte sequence for encoding "UTF8"'),
        (i32(PROTOCOL_3_0) + b"us\xc3\x28er\x00u\x00\x00", "22021", "0xc3"),
    ],
    ids=[
        "empty", "short", "too-long", "ssl-long", "gssenc-long", "cancel-short", "cancel-long",
        "no-params-no-terminator", "missing-terminator", "value-without-terminator", "odd-count",
        "terminator-in-middle", "empty-key", "duplicate-key", "duplicate-option", "no-user", "no-params",
        "empty-user", "user-only-as-option", "protocol-2", "protocol-4", "protocol-0", "unknown-code",
        "bad-utf8-value", "bad-utf8-key",
    ],
)
def test_malformed_startup(body: bytes, sqlstate: str, needle: str) -> None:
    exc = violation(body)
    assert exc.sqlstate == sqlstate
    assert needle in str(exc)


def test_exact_pg_messages() -> None:
    assert str(violation(startup_body("user", "u", version=2 << 16))) == (
        "unsupported frontend protocol 2.0: server supports 3.0 to 3.0"
    )
    no_user = violation(startup_body("database", "d"))
    assert str(no_user) == "no PostgreSQL user name specified in startup packet"


def test_startup_message_decode_directly() -> None:
    body = startup_body("user", "u")
    assert StartupMessage.decode(body) == StartupMessage(PROTOCOL_3_0, {"user": "u"})
    with pytest.raises(ProtocolViolation):
        StartupMessage.decode(b"\x00\x03")


def test_max_length_boundary() -> None:
    filler = "x" * (MAX_STARTUP_PACKET_LENGTH - 4 - 4 - len(b"user\x00u\x00options\x00\x00") - 1)
    body = startup_body("user", "u", "options", filler)
    assert len(body) + 4 == MAX_STARTUP_PACKET_LENGTH
    msg = decode_startup(body)
    assert isinstance(msg, StartupMessage) and msg.params["options"] == filler
    assert violation(startup_body("user", "u", "options", filler + "x")).sqlstate == "08P01"


def test_encode_rejects_nul() -> None:
    with pytest.raises(ValueError):
        StartupMessage(PROTOCOL_3_0, {"user": "a\x00b"}).encode()


# Parameter names: non-empty, no NUL, not a protocol extension; values: any NUL-free text.
_chars = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
keys = st.text(_chars, min_size=1, max_size=20).filter(lambda k: not k.startswith("_pq_.") and k != "user")
values = st.text(_chars, max_size=30)


@given(
    st.text(_chars, min_size=1, max_size=20),
    st.dictionaries(keys, values, max_size=10),
    st.integers(0, 0xFFFF),
)
def test_startup_round_trip(user: str, extra: dict[str, str], minor: int) -> None:
    params = {"user": user, **extra}
    msg = StartupMessage((3 << 16) | minor, params)
    wire = msg.encode()
    decoded = decode_startup(strip(wire))
    assert decoded == msg
    assert isinstance(decoded, StartupMessage)
    assert list(decoded.params.items()) == list(params.items())
    assert decoded.minor == minor


@given(
    st.text(_chars, min_size=1, max_size=20),
    st.dictionaries(keys, values, max_size=5),
    st.dictionaries(st.text(_chars, min_size=1, max_size=10).map(lambda s: "_pq_." + s), values, max_size=5),
)
def test_startup_options_property(user: str, extra: dict[str, str], options: dict[str, str]) -> None:
    words: list[str] = ["user", user]
    for k, v in {**extra, **options}.items():
        words += [k, v]
    decoded = decode_startup(startup_body(*words))
    assert isinstance(decoded, StartupMessage)
    assert decoded.params == {"user": user, **extra}
    assert decoded.protocol_options == tuple(options)


@given(st.integers(0, 2**32 - 1).map(lambda v: v - 2**31), st.integers(0, 2**32 - 1))
def test_cancel_round_trip(pid: int, key: int) -> None:
    req = CancelRequest(pid, key)
    assert decode_startup(strip(req.encode())) == req


@given(st.binary(max_size=80))
def test_arbitrary_startup_bytes_only_raise_protocol_violation(tail: bytes) -> None:
    for body in (i32(PROTOCOL_3_0) + tail, tail):
        try:
            decoded = decode_startup(body)
        except ProtocolViolation as exc:
            assert exc.sqlstate in ("08P01", "28000", "0A000", "22021")
        else:
            assert isinstance(decoded, StartupMessage | SSLRequest | GSSENCRequest | CancelRequest)

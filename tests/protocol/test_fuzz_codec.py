"""Property-based fuzzing of everything that parses bytes a peer controls (issue 9, hostile input).

Whatever the bytes, the codec (the frontend message classes, ``decode_backend``, ``decode_startup``, the 'p'
interpretations), the framer (``MessageRelay``), the request tracker (``ExchangeTracker``) and a live
``Session`` pump wired to in-memory transports may only ever raise ``ProtocolViolation`` -- never
IndexError, struct.error, UnicodeDecodeError, RecursionError, ValueError... -- and the framer never
holds more than one message (``max_size + 5`` bytes), however large the length a peer declares.

Inputs are random bytes and, more usefully, valid messages that were then mutated (bytes flipped,
bodies truncated or extended, length words lied about), so the decoders get past their first check.
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sessionfakes import fake_server, login, new_core, sent_to_client

from pgproxy.config import parse_config
from pgproxy.protocol import messages as m
from pgproxy.protocol.codec import ProtocolViolation, cstr, frame, nullable
from pgproxy.protocol.framing import MessageRelay, startup_packet_length
from pgproxy.protocol.startup import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
    StartupMessage,
    decode_startup,
)
from pgproxy.protocol.tracker import ExchangeTracker
from pgproxy.protocol.types import Backend as B
from pgproxy.protocol.types import Frontend as F

# SQLSTATEs a decoder may attach to a ProtocolViolation.
DECODER_SQLSTATES = {"08P01", "22021", "54000", "0A000", "28000"}
# PGPROXY_FUZZ_EXAMPLES raises the count for a longer local fuzzing run.
FUZZ = settings(max_examples=int(os.environ.get("PGPROXY_FUZZ_EXAMPLES", "200")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def only_protocol_violations(fn: Any, *args: Any) -> Any:
    """Call ``fn``; a ProtocolViolation is fine (returns None), anything else fails the test."""
    try:
        return fn(*args)
    except ProtocolViolation as exc:
        assert exc.sqlstate in DECODER_SQLSTATES, exc.sqlstate
        assert isinstance(exc.message, str) and exc.message
        return None


# --------------------------------------------------------------------------------------------------
# Strategies: valid messages, then mutations of them

text = st.text(max_size=20)
names = st.text(st.characters(blacklist_characters="\x00", codec="utf-8"), max_size=12)
values = st.none() | st.binary(max_size=16)
int16s = st.integers(-(1 << 15), (1 << 15) - 1)
oids = st.integers(0, (1 << 32) - 1)

frontend_messages = st.one_of(
    st.builds(m.Query, names),
    st.builds(m.Parse, names, names, st.tuples(oids, oids) | st.just(())),
    st.builds(m.Bind, names, names, st.lists(st.sampled_from([0, 1]), max_size=3).map(tuple),
              st.lists(values, max_size=3).map(tuple), st.lists(st.sampled_from([0, 1]), max_size=3).map(tuple)),
    st.builds(lambda kind, name: frame(F.DESCRIBE, kind + cstr(name)), st.sampled_from([b"S", b"P"]), names),
    st.builds(m.Execute, names, st.integers(0, 1000)),
    st.builds(lambda kind, name: frame(F.CLOSE, kind + cstr(name)), st.sampled_from([b"S", b"P"]), names),
    st.builds(m.Sync), st.just(frame(F.FLUSH, b"")), st.just(frame(F.COPY_DONE, b"")), st.builds(m.Terminate),
    st.builds(lambda data: frame(F.COPY_DATA, data), st.binary(max_size=20)),
    st.builds(lambda reason: frame(F.COPY_FAIL, cstr(reason)), names),
    st.builds(m.FunctionCall, oids, st.just((0,)), st.lists(values, min_size=1, max_size=1).map(tuple),
              st.sampled_from([0, 1])),
    st.builds(m.PasswordMessage, names),
    st.builds(m.SASLInitialResponse, names.filter(bool), values),
)

backend_messages = st.one_of(
    st.builds(m.AuthenticationOk), st.builds(m.AuthenticationCleartextPassword),
    st.builds(m.AuthenticationMD5Password, st.binary(min_size=4, max_size=4)),
    st.builds(m.AuthenticationSASL, st.lists(names.filter(bool), max_size=3).map(tuple)),
    st.builds(m.AuthenticationSASLContinue, st.binary(max_size=20)),
    st.builds(m.BackendKeyData, st.integers(-(1 << 31), (1 << 31) - 1), oids),
    st.builds(lambda name, value: frame(B.PARAMETER_STATUS, cstr(name) + cstr(value)), names, names),
    st.builds(lambda status: frame(B.READY_FOR_QUERY, status), st.sampled_from([b"I", b"T", b"E"])),
    st.builds(m.RowDescription, st.lists(st.builds(m.FieldDescription, names, oids, int16s, oids, int16s,
                                                   st.integers(-(1 << 31), (1 << 31) - 1), st.sampled_from([0, 1])),
                                         max_size=3).map(tuple)),
    st.builds(m.DataRow, st.lists(values, max_size=4).map(tuple)),
    st.builds(m.CommandComplete, st.sampled_from(["SELECT 1", "INSERT 0 3", "BEGIN", "COPY 2"])),
    st.sampled_from([frame(t, b"") for t in (B.EMPTY_QUERY_RESPONSE, B.NO_DATA, B.PARSE_COMPLETE, B.BIND_COMPLETE,
                                             B.CLOSE_COMPLETE, B.PORTAL_SUSPENDED)]),
    st.builds(m.ErrorResponse.build, st.sampled_from(["ERROR", "FATAL"]), st.sampled_from(["42P01", "57014"]),
              names),
    st.builds(m.NoticeResponse.build, st.just("NOTICE"), st.just("00000"), names),
    st.builds(m.NotificationResponse, st.integers(0, 99999), names, names),
    st.builds(lambda overall, cols: frame(B.COPY_IN_RESPONSE,
                                          struct.pack(f">BH{len(cols)}h", overall, len(cols), *cols)),
              st.sampled_from([0, 1]), st.lists(st.sampled_from([0, 1]), max_size=3)),
    st.builds(lambda overall: frame(B.COPY_OUT_RESPONSE, struct.pack(">BH", overall, 0)), st.sampled_from([0, 1])),
    st.builds(lambda oids: frame(B.PARAMETER_DESCRIPTION, struct.pack(f">H{len(oids)}I", len(oids), *oids)),
              st.lists(oids, max_size=3)),
    st.builds(lambda value: frame(B.FUNCTION_CALL_RESPONSE, nullable(value)), values),
    st.builds(m.NegotiateProtocolVersion, st.just(PROTOCOL_3_0), st.lists(names, max_size=2).map(tuple)),
)


@st.composite
def mutated(draw: st.DrawFn, source: st.SearchStrategy[Any]) -> tuple[int, bytes]:
    """(type byte, body) of a valid message after zero or more random edits of its body."""
    drawn = draw(source)
    encoded = drawn if isinstance(drawn, bytes) else drawn.encode()
    type_byte, body = encoded[0], bytearray(encoded[5:])
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["flip", "truncate", "extend", "insert_ff", "big_count", "bad_utf8"]))
        if action == "flip" and body:
            i = draw(st.integers(0, len(body) - 1))
            body[i] = draw(st.integers(0, 255))
        elif action == "truncate":
            del body[draw(st.integers(0, len(body))):]
        elif action == "extend":
            body += draw(st.binary(min_size=1, max_size=8))
        elif action == "insert_ff":  # lengths and counts of -1 / 0xffff
            i = draw(st.integers(0, len(body)))
            body[i:i] = b"\xff" * draw(st.integers(1, 4))
        elif action == "big_count" and len(body) >= 2:  # a count/length word far beyond the body
            i = draw(st.integers(0, len(body) - 2))
            body[i:i + 2] = b"\x7f\xff"
        elif action == "bad_utf8":
            i = draw(st.integers(0, len(body)))
            body[i:i] = draw(st.sampled_from([b"\xc3\x28", b"\xff", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]))
    return type_byte, bytes(body)


any_type = st.integers(0, 255)
# The frontend messages the proxy decodes ('p' is read raw, then interpreted by the authentication exchange).
FRONTEND_CLASSES: dict[int, Any] = {
    cls.TYPE: cls
    for cls in (m.Query, m.Parse, m.Bind, m.Execute, m.Sync, m.FunctionCall, m.AuthenticationResponse, m.Terminate)
}


# --------------------------------------------------------------------------------------------------
# Decoders


@FUZZ
@given(any_type, st.binary(max_size=300))
def test_decode_frontend_random_bytes(type_byte: int, body: bytes) -> None:
    decoder = FRONTEND_CLASSES.get(type_byte)
    if decoder is not None:
        only_protocol_violations(decoder.decode, body)


@FUZZ
@given(any_type, st.binary(max_size=300))
def test_decode_backend_random_bytes(type_byte: int, body: bytes) -> None:
    only_protocol_violations(m.decode_backend, type_byte, body)


@FUZZ
@given(mutated(frontend_messages))
def test_decode_frontend_mutated_messages(message: tuple[int, bytes]) -> None:
    type_byte, body = message
    decoder = FRONTEND_CLASSES.get(type_byte)
    decoded = only_protocol_violations(decoder.decode, body) if decoder is not None else None
    if decoded is not None and type_byte != ord("p"):  # a decoded message must describe the same bytes
        assert decoded.encode() == frame(type_byte, body)


@FUZZ
@given(mutated(backend_messages))
def test_decode_backend_mutated_messages(message: tuple[int, bytes]) -> None:
    type_byte, body = message
    decoded = only_protocol_violations(m.decode_backend, type_byte, body)
    if decoded is not None:
        assert decoded.encode() == frame(type_byte, body)


@FUZZ
@given(st.one_of(st.binary(max_size=200), mutated(frontend_messages).map(lambda t: t[1])))
def test_password_message_interpretations(body: bytes) -> None:
    """The three ways the proxy reads a 'p' message during authentication."""
    response = m.AuthenticationResponse.decode(body)
    only_protocol_violations(response.password)
    only_protocol_violations(response.sasl_initial)
    only_protocol_violations(response.sasl_response)


@FUZZ
@given(mutated(st.builds(m.Bind, names, names, st.lists(st.sampled_from([0, 1]), max_size=3).map(tuple),
                         st.lists(values, max_size=3).map(tuple), st.just(()))))
def test_statement_result_bind_of_a_mangled_bind(message: tuple[int, bytes]) -> None:
    """The audit reads bound parameters lazily from the raw Bind body: malformed bodies give None."""
    from pgproxy.protocol.tracker import StatementResult

    result = StatementResult("extended", "select $1", time.time(), bind_body=message[1])
    bind = result.bind
    assert bind is None or isinstance(bind, m.Bind)
    assert isinstance(result.params, tuple)
    assert isinstance(result.param_formats, tuple)


# --------------------------------------------------------------------------------------------------
# Startup packets


def _startup_body(version: int, pairs: list[tuple[bytes, bytes]], terminator: bool = True) -> bytes:
    body = struct.pack("!i", version)
    for k, v in pairs:
        body += k + b"\x00" + v + b"\x00"
    return body + (b"\x00" if terminator else b"")


startup_bodies = st.one_of(
    st.binary(max_size=120),
    st.builds(_startup_body,
              st.sampled_from([PROTOCOL_3_0, PROTOCOL_3_0 + 2, 2 << 16, 0, -1, 4 << 16, (3 << 16) | 0xFFFF]),
              st.lists(st.tuples(st.sampled_from([b"user", b"database", b"", b"_pq_.x", b"options", b"\xff\xfe",
                                                  b"application_name"]),
                                 st.binary(max_size=12).map(lambda b: b.replace(b"\x00", b""))), max_size=5),
              st.booleans()),
    st.builds(lambda code, extra: struct.pack("!i", code) + extra,
              st.sampled_from([SSL_REQUEST_CODE, GSSENC_REQUEST_CODE, CANCEL_REQUEST_CODE]), st.binary(max_size=16)),
    st.binary(min_size=10_000, max_size=10_100),  # over PostgreSQL's 10,000-byte startup limit
)


@FUZZ
@given(startup_bodies)
def test_decode_startup_never_raises_anything_else(body: bytes) -> None:
    packet = only_protocol_violations(decode_startup, body)
    if isinstance(packet, StartupMessage):
        assert packet.params.get("user")  # PostgreSQL refuses a startup packet without a user
        assert len(body) + 4 <= 10_000


@FUZZ
@given(st.binary(min_size=4, max_size=4), st.integers(64, 1 << 20))
def test_startup_packet_length_validates(header: bytes, max_size: int) -> None:
    length = only_protocol_violations(startup_packet_length, header, max_size)
    if length is not None:
        assert 8 <= length <= max_size


# --------------------------------------------------------------------------------------------------
# MessageRelay: only ProtocolViolation, and memory bounded by one message


@FUZZ
@given(max_size=st.integers(1024, 4096), stream=st.binary(max_size=3000),
       cuts=st.lists(st.integers(0, 3000), max_size=30), handled=st.sets(any_type, max_size=8))
def test_relay_random_stream(max_size: int, stream: bytes, cuts: list[int], handled: set[int]) -> None:
    relay = MessageRelay.for_types(max_size, frozenset(handled), lambda t, body: b"" if t % 2 else None)
    prev = 0
    for cut in [*sorted(c for c in cuts if c <= len(stream)), len(stream)]:
        try:
            relay.feed(stream[prev:cut])
        except ProtocolViolation as exc:
            assert exc.sqlstate in ("08P01", "54000")
            return
        assert relay.buffered <= max_size + 5
        prev = cut


@st.composite
def framed_stream(draw: st.DrawFn, max_size: int) -> bytes:
    """Well-framed messages with random declared lengths up to max_size (bodies possibly incomplete)."""
    out = b""
    for _ in range(draw(st.integers(0, 6))):
        length = draw(st.integers(4, max_size))
        body = draw(st.binary(max_size=min(length - 4, 64)))
        body += b"\x00" * (length - 4 - len(body))
        out += bytes([draw(any_type)]) + struct.pack("!i", length) + body
    return out


@settings(max_examples=60, deadline=None)
@given(data=st.data(), max_size=st.sampled_from([1024, 8192, 65536]))
def test_relay_buffer_never_exceeds_one_message(data: st.DataObject, max_size: int) -> None:
    stream = data.draw(framed_stream(max_size))
    stream = stream[:data.draw(st.integers(0, len(stream)))]  # stop anywhere, mid-message included
    relay = MessageRelay(max_size, {})
    forwarded = 0
    step = data.draw(st.integers(1, 70_000))
    for i in range(0, len(stream), step):
        forwarded += len(relay.feed(stream[i:i + step]))
        assert relay.buffered <= max_size + 5
    assert forwarded + relay.buffered == len(stream)


HUGE_LENGTHS = [0, 1, 3, -1, -(1 << 31), (1 << 30) + 4, (1 << 31) - 1]


@pytest.mark.parametrize("declared", HUGE_LENGTHS)
def test_relay_rejects_impossible_lengths_at_the_header(declared: int) -> None:
    """A message declaring 1 GB (or a negative/too-short length) is refused as soon as its 5-byte header
    is complete, byte by byte, before anything of its body is buffered."""
    max_size = 65536
    relay = MessageRelay(max_size, {})
    header = b"Q" + struct.pack("!i", declared)
    for i in range(4):
        assert relay.feed(header[i:i + 1]) == b""
        assert relay.buffered <= 4
    with pytest.raises(ProtocolViolation) as info:
        relay.feed(header[4:] + b"x" * 1000)
    assert info.value.sqlstate == ("54000" if declared > max_size else "08P01")


def test_relay_holds_at_most_one_maximal_message() -> None:
    """A message exactly at the limit, fed in 64 KiB chunks: never more than it is buffered."""
    max_size = 1 << 20
    body = b"x" * (max_size - 4)
    stream = frame(ord("d"), body) + frame(ord("d"), body)
    relay = MessageRelay(max_size, {})
    out = 0
    peak = 0
    for i in range(0, len(stream), 65536):
        out += len(relay.feed(stream[i:i + 65536]))
        peak = max(peak, relay.buffered)
    assert out == len(stream) and relay.buffered == 0
    assert peak <= max_size + 5
    with pytest.raises(ProtocolViolation) as info:
        relay.feed(b"d" + struct.pack("!i", max_size + 1))
    assert info.value.sqlstate == "54000"


# --------------------------------------------------------------------------------------------------
# ExchangeTracker: random traffic in both directions


tracker_traffic = st.lists(
    st.tuples(st.booleans(), st.one_of(mutated(frontend_messages), mutated(backend_messages),
                                       st.tuples(any_type, st.binary(max_size=40)))),
    max_size=40,
)


@FUZZ
@given(tracker_traffic)
def test_tracker_random_traffic(traffic: list[tuple[bool, tuple[int, bytes]]]) -> None:
    tracker = ExchangeTracker()
    for from_client, (type_byte, body) in traffic:
        if from_client:
            only_protocol_violations(tracker.on_frontend, type_byte, body)
            if type_byte in b"QPBEF":
                only_protocol_violations(tracker.peek, type_byte, memoryview(body))
        else:
            only_protocol_violations(tracker.on_backend, type_byte, body)
        for result in tracker.drain():
            assert isinstance(result.sql, str)
            _ = result.rows, result.params  # the audit reads these
    assert tracker.transaction_status in ("I", "T", "E")


# --------------------------------------------------------------------------------------------------
# A live session core fed hostile bytes: they end the session with a protocol error (08P01 / 22021 /
# 54000), never with pgproxy's internal error (XX000)


_CONFIG = parse_config({
    "listeners": [{"host": "127.0.0.1", "port": 0, "insecure_plaintext": True}],
    "identity": {"issuer": "i", "audience": "a", "algorithms": ["HS256"], "hs256_secret_env": "UNUSED"},
    "upstream": {"credentials": [{"role": "*"}]},
    "limits": {"max_message_bytes": 4096},
}, Path("."))


def _fatal_codes(data: bytes) -> list[str]:
    """SQLSTATEs of the ErrorResponses in a byte stream written to the client."""
    codes = []
    pos = 0
    while pos + 5 <= len(data):
        t = data[pos]
        length = struct.unpack_from("!i", data, pos + 1)[0]
        body = data[pos + 5:pos + 1 + length]
        if t == ord("E"):
            codes.append(m.ErrorResponse.decode(body).sqlstate or "")
        pos += 1 + length
    return codes


def _run_session(client_chunks: list[bytes], server_chunks: list[bytes]) -> tuple[bytes, bool]:
    """What the client receives, and whether the session ended, when the core is fed these chunks."""
    core = new_core(fake_server(_CONFIG))
    login(core)
    to_client = bytearray(core.upstream_data(frame(B.READY_FOR_QUERY, b"I")))
    for i in range(max(len(client_chunks), len(server_chunks))):
        if i < len(client_chunks) and not core.ended:
            core.client_data(client_chunks[i])
        if i < len(server_chunks) and not core.ended:
            to_client += core.upstream_data(server_chunks[i])
        to_client += sent_to_client(core.actions)
        core.actions.clear()
    return bytes(to_client), core.ended


def _chunks(messages: list[tuple[int, bytes]], garbage: bytes) -> list[bytes]:
    return [frame(t, b) for t, b in messages] + ([garbage] if garbage else [])


@FUZZ
@given(st.lists(st.one_of(mutated(frontend_messages), st.tuples(any_type, st.binary(max_size=30))), max_size=12),
       st.lists(st.one_of(mutated(backend_messages), st.tuples(any_type, st.binary(max_size=30))), max_size=12),
       st.binary(max_size=20))
def test_session_pump_survives_hostile_bytes(client_msgs: list[tuple[int, bytes]],
                                             server_msgs: list[tuple[int, bytes]], garbage: bytes) -> None:
    out, _ = _run_session(_chunks(client_msgs, garbage), _chunks(server_msgs, b""))
    codes = _fatal_codes(out)
    assert "XX000" not in codes, codes


@pytest.mark.parametrize("declared", HUGE_LENGTHS[2:])
def test_session_pump_refuses_a_gigabyte_message(declared: int) -> None:
    """A client message declaring 1 GB (limit here 4 KiB) ends the session with FATAL 54000 at once."""
    out, closed = _run_session([b"Q" + struct.pack("!i", declared)], [])
    assert closed
    assert _fatal_codes(out) == ["54000" if declared > 4096 else "08P01"]


def test_session_pump_invalid_utf8_query_is_22021() -> None:
    out, closed = _run_session([frame(ord("Q"), b"select '\xc3\x28'\x00")], [])
    assert closed
    assert _fatal_codes(out) == ["22021"]

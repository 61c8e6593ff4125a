"""Hostile clients against a live proxy (issue 9): random, truncated, oversized and negative-length
startup packets, failed TLS handshakes, bad password messages, unknown message types, invalid UTF-8 and
1 GB length words after authentication, plus property-based batches of random and mutated messages.

Every bad client must get a FATAL ErrorResponse with the SQLSTATE PostgreSQL (or the proxy's documented
limit) uses -- 08P01 protocol_violation, 54000 program_limit_exceeded, 22021 character_not_in_repertoire,
0A000, 28000, 08006 for the startup timeout -- or simply be disconnected; never a hang (every socket has
a timeout) and never pgproxy's internal error (XX000 to the client, an ERROR record in its log). A
healthy client connected to the same proxy keeps working throughout, and no session is leaked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import ProxyUnderTest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawwire import (
    PROTOCOL_3_0,
    errors_in,
    login,
    message,
    parse_fields,
    password,
    query,
    read_message,
    read_until_closed,
    read_until_ready,
    rows_of,
    simple_query,
    split_messages,
    startup_packet,
    wait_for,
)

from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.config import parse_config
from pgproxy.testing import RunningProxy

pytestmark = pytest.mark.timeout(120)

STARTUP_TIMEOUT = 1.0
MAX_MESSAGE = 65536
# How long a bad client waits for its answer before the test calls it a hang: the startup timeout plus
# generous slack for a loaded machine.
ANSWER_WITHIN = STARTUP_TIMEOUT + 9
SSL_CODE, GSS_CODE, CANCEL_CODE = 80877103, 80877104, 80877102
# PGPROXY_LIVE_FUZZ_BATCHES raises the number of batches for a longer local fuzzing run.
BATCHES = int(os.environ.get("PGPROXY_LIVE_FUZZ_BATCHES", "5"))
STARTUP_SQLSTATES = {"08P01", "0A000", "28000", "22021", "08006", "54000"}


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def limited(proxy: ProxyUnderTest) -> Iterator[ProxyUnderTest]:
    """A proxy with small limits: 1 s startup timeout, 64 KiB messages."""
    import copy

    data = copy.deepcopy(proxy.config_data)
    data["limits"] = {"startup_timeout_seconds": STARTUP_TIMEOUT, "max_message_bytes": MAX_MESSAGE}
    sink = MemoryAuditSink()
    running = RunningProxy(parse_config(data, Path.cwd()), audit=sink).start()
    try:
        yield ProxyUnderTest(running, sink, proxy.keys, proxy.tls, proxy.database, data)
    finally:
        running.stop()


class Healthy:
    """A client that keeps querying the proxy from a thread while the bad clients do their worst."""

    def __init__(self, p: ProxyUnderTest) -> None:
        self.conn = psycopg.connect(p.dsn(tls=False, application_name="hostile_bystander"), autocommit=True,
                                    connect_timeout=10)
        self.pid = self.conn.info.backend_pid
        self.queries = 0
        self.errors: list[BaseException] = []
        self.own_log_check = False  # set by tests that assert on the proxy's log themselves
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                row = self.conn.execute("select pg_backend_pid(), %s::int", (self.queries,)).fetchone()
                assert row == (self.pid, self.queries), row
            except BaseException as exc:
                self.errors.append(exc)
                return
            self.queries += 1
            self._stop.wait(0.02)

    def check(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the healthy client's query never got its answer"
        assert not self.errors, self.errors
        assert self.queries > 0
        assert self.conn.execute("select 'still here'").fetchone() == ("still here",)
        self.conn.close()


def internal_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """ERROR records of the proxy (internal errors, failed sessions): hostile input must cause none."""
    return [f"{r.name}: {r.getMessage()}" + (f" ({r.exc_info[0].__name__})" if r.exc_info and r.exc_info[0] else "")
            for r in caplog.records if r.name.startswith("pgproxy") and r.levelno >= logging.ERROR]


@pytest.fixture
def healthy(limited: ProxyUnderTest, caplog: pytest.LogCaptureFixture) -> Iterator[Healthy]:
    caplog.set_level(logging.WARNING, logger="pgproxy")
    baseline = len(limited.running.server.sessions)  # type: ignore[union-attr]
    h = Healthy(limited)
    yield h
    h.check()
    if not h.own_log_check:
        assert not internal_errors(caplog), internal_errors(caplog)
    # every bad client's session is gone (no leak)
    assert wait_for(lambda: len(limited.running.server.sessions) <= baseline, 10), \
        len(limited.running.server.sessions)  # type: ignore[union-attr]


def connect(p: ProxyUnderTest, timeout: float = ANSWER_WITHIN) -> socket.socket:
    return socket.create_connection(("127.0.0.1", p.plain_port), timeout=timeout)


def send_and_collect(p: ProxyUnderTest, data: bytes, timeout: float = ANSWER_WITHIN) -> bytes:
    """Send ``data`` and read until the proxy closes; a socket timeout here means the proxy hung."""
    with connect(p, timeout) as sock:
        # refused before we finished sending: the reply (if any) is still readable
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        try:
            reply = read_until_closed(sock)
        except TimeoutError:
            raise AssertionError(f"no answer and no close within {timeout} s for {data[:40]!r}") from None
    return reply


def single_fatal(reply: bytes) -> dict[str, str]:
    """The reply is exactly one FATAL ErrorResponse (then the close)."""
    messages = split_messages(reply)
    assert len(messages) == 1 and messages[0][0] == "E", reply[:200]
    assert sum(1 + 4 + len(b) for _, b in messages) == len(reply), "bytes after the FATAL"
    fields = errors_in(reply)[0]
    assert fields["S"] == "FATAL", fields
    return fields


def logged_in(p: ProxyUnderTest, **params: str) -> socket.socket:
    return login(p.plain_port, "agent_reader", p.database.database, p.token(), **params)


# ------------------------------------------------------------------------------------------------
# startup packets: fixed cases with PostgreSQL's SQLSTATEs


def _startup_body(*pairs: bytes, version: int = PROTOCOL_3_0) -> bytes:
    return struct.pack("!i", version) + b"".join(p + b"\x00" for p in pairs) + b"\x00"


def _packet(body: bytes, declared: int | None = None) -> bytes:
    return struct.pack("!i", len(body) + 4 if declared is None else declared) + body


GOOD = startup_packet("agent_reader", "postgres")

STARTUP_CASES = [
    ("negative_length", struct.pack("!i", -1) + GOOD[4:], "08P01", "invalid length of startup packet"),
    ("min_negative_length", struct.pack("!i", -(1 << 31)) + GOOD[4:], "08P01", "invalid length of startup packet"),
    ("zero_length", struct.pack("!i", 0), "08P01", "invalid length of startup packet"),
    ("one_gigabyte", struct.pack("!ii", (1 << 30) + 8, PROTOCOL_3_0) + b"user\x00x\x00\x00", "08P01",
     "invalid length of startup packet"),
    ("just_over_10000", _packet(_startup_body(b"user", b"agent_reader", b"application_name", b"x" * 9960)),
     "08P01", "invalid length of startup packet"),
    ("ssl_request_too_long", struct.pack("!iii", 12, SSL_CODE, 0), "08P01", "invalid length of startup packet"),
    ("cancel_request_too_short", struct.pack("!iii", 12, CANCEL_CODE, 1), "08P01", "invalid length"),
    ("protocol_2", _packet(_startup_body(b"user", b"agent_reader", version=2 << 16)), "0A000",
     "unsupported frontend protocol 2.0"),
    ("protocol_4", _packet(_startup_body(b"user", b"agent_reader", version=4 << 16)), "0A000",
     "unsupported frontend protocol 4.0"),
    ("no_user", _packet(_startup_body(b"database", b"postgres")), "28000", "no PostgreSQL user name"),
    ("no_terminator", GOOD[:-1] + b"x", "08P01", "invalid startup packet layout"),
    ("key_without_value", _packet(struct.pack("!i", PROTOCOL_3_0) + b"user\x00agent_reader\x00database\x00\x00"),
     "08P01", "invalid startup packet layout"),
    ("invalid_utf8_user", _packet(_startup_body(b"user", b"agent_\xc3\x28reader")), "22021",
     "invalid byte sequence"),
    ("invalid_utf8_param", _packet(_startup_body(b"user", b"agent_reader", b"application_name", b"\xff\xfe")),
     "22021", "invalid byte sequence"),
    ("invalid_utf8_key", _packet(_startup_body(b"user", b"agent_reader", b"\xed\xa0\x80", b"v")), "22021",
     "invalid byte sequence"),
]


@pytest.mark.parametrize(("packet", "sqlstate", "text"), [c[1:] for c in STARTUP_CASES],
                         ids=[c[0] for c in STARTUP_CASES])
def test_bad_startup_packet(limited: ProxyUnderTest, healthy: Healthy, packet: bytes, sqlstate: str,
                            text: str) -> None:
    reply = send_and_collect(limited, packet)
    fields = single_fatal(reply)
    assert fields["C"] == sqlstate, fields  # checked at once: a proxy waiting for more would answer 08006 (timeout)
    assert text in fields["M"], fields


@pytest.mark.parametrize("cut", [1, 3, 4, 7, 20, -1])
def test_truncated_startup_packet_times_out(limited: ProxyUnderTest, healthy: Healthy, cut: int) -> None:
    """Half a startup packet, then silence: FATAL 08006 once the startup timeout passes, not a hang."""
    reply = send_and_collect(limited, GOOD[:cut])
    fields = single_fatal(reply)
    assert fields["C"] == "08006" and "timeout" in fields["M"], fields


def test_startup_packet_of_exactly_10000_bytes_is_accepted(limited: ProxyUnderTest, healthy: Healthy) -> None:
    body = _startup_body(b"user", b"agent_reader", b"database", limited.database.database.encode(),
                         b"application_name", b"")
    pad = 10_000 - 4 - len(body)
    body = _startup_body(b"user", b"agent_reader", b"database", limited.database.database.encode(),
                         b"application_name", b"a" * pad)
    packet = _packet(body)
    assert len(packet) == 10_000
    with connect(limited) as sock:
        sock.sendall(packet)
        assert read_message(sock) == ("R", struct.pack("!i", 3))
        sock.sendall(password(limited.token()))
        assert read_until_ready(sock)[-1][0] == "Z"


TLS_GARBAGE = [
    ("http_request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("short_record", b"\x16\x03\x01\x00\x05hello"),
    ("zeros", b"\x00" * 64),
    ("startup_packet_instead", GOOD),
    ("close_after_S", b""),
]


@pytest.mark.parametrize("payload", [c[1] for c in TLS_GARBAGE], ids=[c[0] for c in TLS_GARBAGE])
def test_failed_tls_handshake_is_a_client_error(limited: ProxyUnderTest, healthy: Healthy, payload: bytes,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """SSLRequest answered 'S', then anything but a TLS ClientHello: PostgreSQL logs a one-line
    "could not accept SSL connection" and closes. Not an internal error of the proxy (ERROR with a
    traceback, twice, per connection: a log flood any unauthenticated client can trigger)."""
    with socket.create_connection(("127.0.0.1", limited.port), timeout=ANSWER_WITHIN) as sock:
        sock.sendall(struct.pack("!ii", 8, SSL_CODE))
        assert sock.recv(1) == b"S"
        if payload:
            sock.sendall(payload)
        else:
            sock.shutdown(socket.SHUT_WR)
        try:
            read_until_closed(sock)
        except TimeoutError:
            raise AssertionError("the proxy neither answered nor closed") from None
    baseline = 1  # the healthy client's session
    assert wait_for(lambda: len(limited.running.server.sessions) <= baseline, 5)  # type: ignore[union-attr]
    healthy.own_log_check = True
    assert not internal_errors(caplog), internal_errors(caplog)


# ------------------------------------------------------------------------------------------------
# the password message


PASSWORD_CASES = [
    ("one_gigabyte", b"p" + struct.pack("!i", 1 << 30), {"54000"}),
    ("negative_length", b"p" + struct.pack("!i", -5), {"08P01"}),
    ("length_below_4", b"p" + struct.pack("!i", 3), {"08P01"}),
    ("not_a_password", query("select 1"), {"08P01"}),
    ("unknown_type", message(b"\x01", b"xyz"), {"08P01"}),
    ("unterminated", message("p", b"eyJhbGciOi"), {"08P01"}),
    ("invalid_utf8", message("p", b"\xff\xfe\xfd\x00"), {"22021", "28P01"}),
    ("two_strings", message("p", b"a\x00b\x00"), {"08P01", "28P01"}),
]


@pytest.mark.parametrize(("bad", "sqlstates"), [c[1:] for c in PASSWORD_CASES], ids=[c[0] for c in PASSWORD_CASES])
def test_bad_password_message(limited: ProxyUnderTest, healthy: Healthy, bad: bytes, sqlstates: set[str]) -> None:
    with connect(limited) as sock:
        sock.sendall(GOOD)
        assert read_message(sock) == ("R", struct.pack("!i", 3))
        sock.sendall(bad)
        reply = read_until_closed(sock)
    fields = single_fatal(reply)
    assert fields["C"] in sqlstates, fields  # refused at once: waiting for more would end in 08006 (timeout)


# ------------------------------------------------------------------------------------------------
# after authentication


def _after_login(p: ProxyUnderTest, bad: bytes) -> bytes:
    sock = logged_in(p)
    sock.settimeout(ANSWER_WITHIN)
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(bad)
        return read_until_closed(sock)
    except TimeoutError:
        raise AssertionError(f"no answer and no close within {ANSWER_WITHIN} s for {bad[:40]!r}") from None
    finally:
        sock.close()


@pytest.mark.parametrize("type_byte", [b"\x00", b"\x01", b"Z", b"a", b"\xff", b"p", b"R"])
def test_unknown_message_type_after_login(limited: ProxyUnderTest, healthy: Healthy, type_byte: bytes) -> None:
    """PostgreSQL ends the session: FATAL 08P01 "invalid frontend message type"."""
    reply = _after_login(limited, message(type_byte, b"hello\x00"))
    fields = errors_in(reply)
    assert fields and fields[-1]["S"] == "FATAL" and fields[-1]["C"] == "08P01", fields
    assert all(f["C"] != "XX000" for f in fields)


@pytest.mark.parametrize(("type_byte", "declared", "sqlstate"), [
    (b"Q", 1 << 30, "54000"),
    (b"d", (1 << 31) - 1, "54000"),
    (b"Q", MAX_MESSAGE + 1, "54000"),
    (b"B", -1, "08P01"),
    (b"Q", 3, "08P01"),
    (b"\x7f", 1 << 30, "54000"),
])
def test_impossible_length_after_login(limited: ProxyUnderTest, healthy: Healthy, type_byte: bytes,
                                       declared: int, sqlstate: str) -> None:
    """A message declaring 1 GB is refused from its header alone: FATAL at once, nothing buffered."""
    reply = _after_login(limited, type_byte + struct.pack("!i", declared) + b"x" * 100)
    fields = single_fatal(reply)
    assert fields["C"] == sqlstate, fields


def test_message_at_the_limit_passes(limited: ProxyUnderTest, healthy: Healthy) -> None:
    sql = "select length('" + "x" * (MAX_MESSAGE - 4 - 30) + "')"
    sql += " " * (MAX_MESSAGE - 4 - 1 - len(sql))
    sock = logged_in(limited)
    try:
        assert len(query(sql)) == MAX_MESSAGE + 1
        assert rows_of(simple_query(sock, sql)) == [[str(MAX_MESSAGE - 4 - 30)]]
    finally:
        sock.close()


def test_server_message_over_the_limit(limited: ProxyUnderTest, healthy: Healthy) -> None:
    """A row wider than max_message_bytes ends the session as documented (docs/configuration.md, limits):
    FATAL 54000 naming limits.max_message_bytes; its upstream backend goes too."""
    sock = logged_in(limited, application_name="rb_wide_row")
    healthy.own_log_check = True  # the proxy logs the upstream's oversized message as an error
    try:
        sock.sendall(query(f"select repeat('x', {MAX_MESSAGE * 2})"))
        reply = read_until_closed(sock, limit=4 * MAX_MESSAGE)
    finally:
        sock.close()
    fields = errors_in(reply)
    assert fields and fields[-1]["S"] == "FATAL", fields
    assert fields[-1]["C"] == "54000", fields[-1]
    assert fields[-1]["M"].startswith("a message from the upstream database is over limits.max_message_bytes")
    with psycopg.connect(limited.database.dsn(), autocommit=True) as admin:
        assert wait_for(lambda: admin.execute(
            "select count(*) from pg_stat_activity where application_name = 'rb_wide_row'").fetchone() == (0,), 5)


def test_invalid_utf8_in_a_query(limited: ProxyUnderTest, healthy: Healthy) -> None:
    """SQLSTATE 22021 (PostgreSQL answers ERROR and goes on; the proxy may end the session: FATAL)."""
    sock = logged_in(limited)
    try:
        sock.sendall(query(b"select '\xc3\x28'"))
        try:
            messages = read_until_ready(sock)
        except EOFError:
            raise AssertionError("closed without an ErrorResponse") from None
    finally:
        sock.close()
    errors = [parse_fields(body) for t, body in messages if t == "E"]
    assert errors and errors[0]["C"] == "22021", errors
    assert "invalid byte sequence" in errors[0]["M"]


def test_unterminated_query_string(limited: ProxyUnderTest, healthy: Healthy) -> None:
    reply = _after_login(limited, message("Q", b"select 1"))
    fields = errors_in(reply)
    assert fields and fields[-1]["S"] == "FATAL" and fields[-1]["C"] == "08P01", fields


def test_non_utf8_client_encoding_is_honoured(limited: ProxyUnderTest, healthy: Healthy) -> None:
    """PostgreSQL converts from the client_encoding the client chose: with LATIN1, b'caf\\xe9' is 'café'.
    A proxy that decodes every Query as UTF-8 must not end such a session."""
    with psycopg.connect(limited.dsn(tls=False), autocommit=True, connect_timeout=10) as conn:
        conn.execute("set client_encoding to 'LATIN1'")
        assert conn.execute("select 'café', length('café')").fetchone() == ("café", 4)


# ------------------------------------------------------------------------------------------------
# property-based batches: many hostile connections at once, the healthy client still served

raw_startup = st.one_of(
    st.binary(max_size=64),
    # a real startup packet with its length word replaced
    st.builds(lambda n: struct.pack("!i", n) + GOOD[4:],
              st.one_of(st.integers(-(1 << 31), 7), st.integers(10_001, (1 << 31) - 1), st.integers(8, 200))),
    # a real startup packet cut short or with bytes flipped
    st.builds(lambda cut: GOOD[:cut], st.integers(0, len(GOOD) - 1)),
    st.builds(lambda i, b: GOOD[:i] + bytes([b]) + GOOD[i + 1:], st.integers(4, len(GOOD) - 1), st.integers(0, 255)),
    # special requests with a random tail
    st.builds(lambda code, tail: struct.pack("!ii", 8 + len(tail), code) + tail,
              st.sampled_from([SSL_CODE, GSS_CODE, CANCEL_CODE, PROTOCOL_3_0, 0, -1]), st.binary(max_size=12)),
    # parameters of random (often invalid UTF-8) bytes
    st.builds(lambda k, v: _packet(_startup_body(b"user", b"agent_reader", k, v)),
              st.binary(min_size=1, max_size=10).map(lambda b: b.replace(b"\x00", b"k")),
              st.binary(max_size=10).map(lambda b: b.replace(b"\x00", b""))),
)


def _check_startup_reply(packet: bytes) -> None:
    reply = send_and_collect(LIVE["proxy"], packet)  # fails if no answer and no close within ANSWER_WITHIN
    while reply[:1] == b"N" and (len(reply) == 1 or reply[1:2] in (b"E", b"R", b"N")):
        reply = reply[1:]  # "no TLS / no GSS" answers to SSLRequest / GSSENCRequest
    messages = split_messages(reply)
    assert sum(5 + len(b) for _, b in messages) == len(reply), (packet, reply)
    kinds = [t for t, _ in messages]
    assert kinds in ([], ["E"], ["R", "E"], ["v", "R", "E"]), (packet, kinds)
    if kinds:
        fields = errors_in(reply)[0]
        assert fields["S"] == "FATAL", (packet, fields)
        assert fields["C"] in STARTUP_SQLSTATES, (packet, fields)


LIVE: dict[str, Any] = {}


@settings(max_examples=BATCHES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(raw_startup, min_size=25, max_size=25))
def test_random_startup_packets(limited: ProxyUnderTest, healthy: Healthy, packets: list[bytes]) -> None:
    LIVE["proxy"] = limited
    with ThreadPoolExecutor(25) as pool:
        for f in [pool.submit(_check_startup_reply, p) for p in packets]:
            f.result()


names = st.text(st.characters(blacklist_characters="\x00", codec="utf-8"), max_size=10).map(str.encode)
bad_text = st.binary(max_size=10).map(lambda b: b.replace(b"\x00", b""))


def _bind(portal: bytes, stmt: bytes, params: list[bytes | None], count_delta: int) -> bytes:
    body = portal + b"\x00" + stmt + b"\x00" + struct.pack("!h", 0)
    body += struct.pack("!h", max(0, len(params) + count_delta))
    for v in params:
        body += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return message("B", body + struct.pack("!h", 0))


frontend = st.one_of(
    st.builds(lambda s: message("Q", s + b"\x00"), st.sampled_from([b"select 1", b"", b"select", b";;"]) | bad_text),
    st.builds(lambda n, s: message("P", n + b"\x00" + s + b"\x00" + struct.pack("!h", 0)), names,
              st.sampled_from([b"select $1", b"select 1", b"bogus"]) | bad_text),
    st.builds(_bind, names, names, st.lists(st.none() | st.binary(max_size=6), max_size=3), st.integers(-1, 3)),
    st.builds(lambda k, n: message("D", k + n + b"\x00"), st.sampled_from([b"S", b"P", b"X"]), names),
    st.builds(lambda n, r: message("E", n + b"\x00" + struct.pack("!i", r)), names, st.integers(-1, 5)),
    st.builds(lambda k, n: message("C", k + n + b"\x00"), st.sampled_from([b"S", b"P", b"?"]), names),
    st.sampled_from([message("S", b""), message("H", b""), message("c", b""), message("d", b"1\t2\n"),
                     message("f", b"no\x00"), message("S", b"junk")]),
    st.builds(lambda t, b: message(bytes([t]), b), st.sampled_from(b"QPBDECSHdcfF"), st.binary(max_size=20)),
)


def _check_session_fuzz(msgs: list[bytes]) -> None:
    p = LIVE["proxy"]
    sock = logged_in(p, options="-c statement_timeout=3000")
    sock.settimeout(10)
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"".join(msgs) + message("S", b"") + query("select 42"))
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
                msgs_in = split_messages(data)
                if ["42"] in rows_of(msgs_in) and msgs_in[-1][0] == "Z":
                    break
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(f"hang after {msgs!r}: got {split_messages(data)!r}") from None
    finally:
        sock.close()
    errors = errors_in(data)
    assert all(f["C"] != "XX000" for f in errors), errors
    if ["42"] not in rows_of(split_messages(data)):
        # the session was ended: by a FATAL, or by the client's own Terminate
        assert (errors and errors[-1]["S"] == "FATAL") or any(m_[:1] == b"X" for m_ in msgs), (msgs, errors)


@settings(max_examples=BATCHES + 3, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.lists(frontend, min_size=1, max_size=8), min_size=10, max_size=10))
def test_random_messages_after_login(limited: ProxyUnderTest, healthy: Healthy, sessions: list[list[bytes]]) -> None:
    LIVE["proxy"] = limited
    with ThreadPoolExecutor(10) as pool:
        for f in [pool.submit(_check_session_fuzz, msgs) for msgs in sessions]:
            f.result()

"""Slow, idle and non-reading clients (issue 9): none may hold the proxy's memory or its event loop.

- half a startup packet, a missing password, a password trickled byte by byte, a TLS handshake that
  never comes: each connection is dropped once ``startup_timeout_seconds`` has passed;
- a slowloris holding 50 such connections does not stop a healthy client from logging in;
- a client that stops reading a 200 MB result, one that pipelines requests without ever reading the
  answers, one that floods bytes while the proxy is still logging in upstream, and one that parses
  many large statements do not make the proxy's resident memory grow by more than a few tens of MB
  (measured on ``pgproxy serve`` run as its own process), and other clients stay responsive.
"""

from __future__ import annotations

import contextlib
import copy
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import ProxyUnderTest
from rawwire import (
    ServeProcess,
    errors_in,
    login,
    message,
    password,
    query,
    read_message,
    read_until_closed,
    read_until_ready,
    rows_of,
    serving,
    simple_query,
    startup_packet,
    wait_for,
)

from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.config import parse_config
from pgproxy.testing import RunningProxy

pytestmark = pytest.mark.timeout(120)

SSL_CODE = 80877103
# Resident memory a misbehaving client may add to the proxy process (KiB). The proxy's own buffers are
# a few 64 KiB transport buffers plus at most one message; allocator noise stays well under this.
RSS_GROWTH_LIMIT_KIB = 48 * 1024
BIG_RESULT = "select repeat('x', 1000) from generate_series(1, 200000)"  # about 200 MB of DataRows


@contextlib.contextmanager
def startup_timeout(proxy: ProxyUnderTest, seconds: float) -> Iterator[ProxyUnderTest]:
    """A proxy like ``proxy`` with the given startup timeout."""
    data = copy.deepcopy(proxy.config_data)
    data["limits"] = {"startup_timeout_seconds": seconds, "max_message_bytes": 1 << 20}
    running = RunningProxy(parse_config(data, Path.cwd()), audit=MemoryAuditSink()).start()
    try:
        yield ProxyUnderTest(running, MemoryAuditSink(), proxy.keys, proxy.tls, proxy.database, data)
    finally:
        running.stop()


@pytest.fixture(scope="module")
def quick(proxy: ProxyUnderTest) -> Iterator[ProxyUnderTest]:
    """A proxy with a 1.5 s startup timeout."""
    with startup_timeout(proxy, 1.5) as p:
        yield p


def sessions(p: ProxyUnderTest) -> int:
    assert p.running.server is not None
    return len(p.running.server.sessions)


def fatal_of(reply: bytes) -> dict[str, str]:
    errors = errors_in(reply)
    assert len(errors) == 1 and errors[0]["S"] == "FATAL", reply[:200]
    return errors[0]


def backends(proxy: ProxyUnderTest, application_name: str) -> int:
    with psycopg.connect(proxy.database.dsn(), autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("select count(*) from pg_stat_activity where application_name = %s",
                           (application_name,)).fetchone()
        assert row is not None
        return int(row[0])


# ------------------------------------------------------------------------------------------------
# stalled logins


def _stall(p: ProxyUnderTest, kind: str) -> socket.socket:
    """A connection stuck somewhere in the startup phase."""
    if kind == "tls_no_hello":  # SSLRequest answered 'S', then no ClientHello
        sock = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        sock.sendall(struct.pack("!ii", 8, SSL_CODE))
        assert sock.recv(1) == b"S"
        return sock
    sock = socket.create_connection(("127.0.0.1", p.plain_port), timeout=10)
    packet = startup_packet("agent_reader", p.database.database)
    if kind == "nothing":
        pass
    elif kind == "half_startup":
        sock.sendall(packet[:len(packet) // 2])
    elif kind == "no_password":
        sock.sendall(packet)
        assert read_message(sock) == ("R", struct.pack("!i", 3))
    elif kind == "half_password":
        sock.sendall(packet)
        assert read_message(sock)[0] == "R"
        sock.sendall(password(p.token())[:20])
    else:
        raise ValueError(kind)
    return sock


STALLS = ["nothing", "half_startup", "no_password", "half_password", "tls_no_hello"]


@pytest.mark.parametrize("kind", STALLS)
def test_stalled_login_is_dropped_after_the_startup_timeout(quick: ProxyUnderTest, kind: str) -> None:
    sock = _stall(quick, kind)
    with sock:
        try:
            reply = read_until_closed(sock)
        except TimeoutError:
            raise AssertionError("still open 10 s after a 1.5 s startup timeout") from None
    if kind != "tls_no_hello":  # on the TLS port the FATAL cannot be sent before the handshake
        fields = fatal_of(reply)
        assert fields["C"] == "08006" and "timeout" in fields["M"], fields


def test_trickled_password_is_dropped_at_the_deadline(quick: ProxyUnderTest) -> None:
    """Sending one byte every 100 ms keeps the socket busy but does not extend the startup deadline."""
    sock = _stall(quick, "no_password")
    data = password(quick.token())
    reply = b""
    with sock:
        for i in range(len(data) - 1):
            try:
                sock.sendall(data[i:i + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)
            sock.setblocking(False)
            try:
                reply += sock.recv(65536)
            except BlockingIOError:
                pass
            except ConnectionResetError:
                break
            finally:
                sock.setblocking(True)
            if reply:
                break
        sock.settimeout(5)
        try:
            reply += read_until_closed(sock)
        except TimeoutError:
            raise AssertionError("never dropped") from None
    fields = fatal_of(reply)  # a deadline reset by each byte would let the whole password in: a login, not a FATAL
    assert fields["C"] == "08006", fields


def test_slowloris_does_not_stop_logins(proxy: ProxyUnderTest) -> None:
    with startup_timeout(proxy, 10) as slow:
        _slowloris(slow)


def _slowloris(p: ProxyUnderTest) -> None:
    baseline = sessions(p)
    stalled = [_stall(p, STALLS[i % len(STALLS)]) for i in range(50)]
    try:
        assert sessions(p) >= baseline + 45
        # while 50 connections hang in the startup phase, a healthy client logs in and queries, repeatedly
        for _ in range(3):
            with psycopg.connect(p.dsn(), autocommit=True, connect_timeout=10) as conn:
                assert conn.execute("select 'in'").fetchone() == ("in",)
        # ... served while the stalled connections were still held, not once they were dropped
        assert sessions(p) >= baseline + 45, "the logins waited for the stalled connections to be dropped"
        # then every stalled connection is dropped
        assert wait_for(lambda: sessions(p) <= baseline, 30), sessions(p)
        for sock in stalled:
            sock.settimeout(3)
            try:
                read_until_closed(sock)
            except TimeoutError:
                raise AssertionError("a stalled connection was left open") from None
            except (ssl.SSLError, OSError):
                pass
    finally:
        for sock in stalled:
            sock.close()


# ------------------------------------------------------------------------------------------------
# memory of the proxy process under clients that do not read, or write too much


@pytest.fixture
def served(proxy: ProxyUnderTest, upstream_roles: str, tmp_path: Path) -> Iterator[ServeProcess]:
    with serving(proxy.config_data, tmp_path) as srv:
        yield srv


class Responsive:
    """A psycopg client of the proxy process that keeps querying; counts its answers."""

    def __init__(self, proxy: ProxyUnderTest, port: int) -> None:
        info = proxy.conninfo(tls=False)
        info["port"] = str(port)
        self.conn = psycopg.connect(**info, autocommit=True, connect_timeout=10)  # type: ignore[arg-type]
        self.count = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                assert self.conn.execute("select count(*) from generate_series(1, 100)").fetchone() == (100,)
            except BaseException as exc:
                self.errors.append(exc)
                return
            self.count += 1
            self._stop.wait(0.05)

    def check(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the healthy client's query never got its answer"
        self.conn.close()
        assert not self.errors, self.errors
        assert self.count > 5


def _sample_growth(srv: ServeProcess, baseline: int, seconds: float, action: Any = None) -> int:
    """Peak RSS growth (KiB) over ``seconds``, calling ``action()`` between samples; stops early (and
    fails later) once growth is far past the limit, to spare the machine."""
    peak = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if action is not None:
            action()
        else:
            time.sleep(0.2)
        peak = max(peak, srv.rss_kib() - baseline)
        if peak > 4 * RSS_GROWTH_LIMIT_KIB:
            break
    return peak


def test_client_that_stops_reading_a_big_result(proxy: ProxyUnderTest, served: ServeProcess) -> None:
    port = served.ports[1]
    warm = login(port, "agent_reader", proxy.database.database, proxy.token())  # warm the proxy's allocator
    warm.close()
    baseline = served.rss_kib()
    responsive = Responsive(proxy, port)
    sock = login(port, "agent_reader", proxy.database.database, proxy.token(), application_name="rb_no_reader")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    try:
        sock.sendall(query(BIG_RESULT))
        growth = _sample_growth(served, baseline, 4.0)
        assert growth < RSS_GROWTH_LIMIT_KIB, f"proxy RSS grew by {growth} KiB for a client that does not read"
        responsive.check()
    finally:
        sock.close()
    # the abandoned query's backend goes away with its client
    assert wait_for(lambda: backends(proxy, "rb_no_reader") == 0, 10)


def test_pipelined_requests_without_reading_keep_memory_bounded(proxy: ProxyUnderTest,
                                                                served: ServeProcess) -> None:
    """A client that pipelines requests (here Sync, 5 bytes each) and never reads the answers: the proxy
    must stop reading it (back-pressure) rather than keep a record of every request in flight.
    PostgreSQL itself just stops reading the socket when its output is blocked."""
    port = served.ports[1]
    warm = login(port, "agent_reader", proxy.database.database, proxy.token())
    warm.close()
    baseline = served.rss_kib()
    responsive = Responsive(proxy, port)
    sock = login(port, "agent_reader", proxy.database.database, proxy.token(), application_name="rb_pipeliner")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.settimeout(0.2)
    burst = message("S", b"") * 20_000
    sent = 0

    def send() -> None:
        nonlocal sent
        try:
            sent += sock.send(burst)
        except TimeoutError:
            time.sleep(0.05)

    try:
        growth = _sample_growth(served, baseline, 6.0, send)
        assert growth < RSS_GROWTH_LIMIT_KIB, (
            f"proxy RSS grew by {growth} KiB while a client pipelined {sent // 5} Syncs without reading")
        responsive.check()
    finally:
        sock.close()
    assert wait_for(lambda: backends(proxy, "rb_pipeliner") == 0, 10)


def test_flood_during_upstream_login_is_not_buffered(proxy: ProxyUnderTest, upstream_roles: str,
                                                     tmp_path: Path) -> None:
    """While the proxy logs in upstream (here: an upstream that accepts and never answers), bytes the
    client sends are not the proxy's to hold without limit: it stops reading (or refuses) instead of
    buffering everything the client can push."""
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(64)

    def mutate(data: dict[str, Any]) -> None:
        data["upstream"]["port"] = black_hole.getsockname()[1]
        data["upstream"]["connect_timeout_seconds"] = 3

    try:
        with serving(proxy.config_data, tmp_path, mutate=mutate) as srv:
            baseline = srv.rss_kib()
            sock = socket.create_connection(("127.0.0.1", srv.ports[1]), timeout=10)
            with sock:
                sock.sendall(startup_packet("agent_reader", proxy.database.database))
                assert read_message(sock)[0] == "R"
                sock.sendall(password(proxy.token()))
                sock.settimeout(0.2)
                junk = query("select 1") * 30_000  # ~ 420 KB of valid pipelined queries per send

                def send() -> None:
                    try:
                        sock.send(junk)
                    except TimeoutError:
                        time.sleep(0.05)
                    except OSError:
                        time.sleep(0.2)

                growth = _sample_growth(srv, baseline, 2.5, send)
                assert growth < RSS_GROWTH_LIMIT_KIB, (
                    f"proxy RSS grew by {growth} KiB buffering a client's bytes during the upstream login")
                sock.settimeout(10)
                reply = read_until_closed(sock, limit=1 << 30)
            fields = fatal_of(reply)
            assert fields["C"] == "08001", fields
    finally:
        black_hole.close()


def test_many_large_parse_messages_are_not_all_kept(proxy: ProxyUnderTest, served: ServeProcess) -> None:
    """200 different 512 KiB statements parsed one after the other as the unnamed statement: PostgreSQL
    keeps only the latest, so the proxy has no reason to keep ~100 MB of them either (a cache sized by
    entries rather than bytes would)."""
    port = served.ports[1]
    sock = login(port, "agent_reader", proxy.database.database, proxy.token())
    try:
        simple_query(sock, "select 1")
        baseline = served.rss_kib()
        for i in range(200):
            sql = f"select {i} --".encode() + b"x" * (512 * 1024)
            sock.sendall(message("P", b"\x00" + sql + b"\x00" + struct.pack("!h", 0)) + message("S", b""))
            assert read_until_ready(sock)[-1][0] == "Z"
            growth = served.rss_kib() - baseline
            if growth > 4 * RSS_GROWTH_LIMIT_KIB:
                break
        assert growth < RSS_GROWTH_LIMIT_KIB, f"proxy RSS grew by {growth} KiB after {i + 1} large Parse messages"
        assert rows_of(simple_query(sock, "select 'alive'")) == [["alive"]]
    finally:
        sock.close()

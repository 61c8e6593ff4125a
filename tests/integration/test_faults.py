"""Faults around the proxy (issue 9): an upstream that cannot be reached or restarts mid-session, clients
that vanish mid-COPY or mid-result, and a graceful shutdown of `pgproxy serve` on SIGTERM.

Each fault must reach the client as the ErrorResponse PostgreSQL would send (FATAL 08001 when the
server cannot be reached, 57P01 admin_shutdown / 08006 when it goes away, 57P01 on the proxy's own
shutdown) instead of a hang, must not leak sessions or upstream backends, and must leave the proxy
serving everyone else.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import UPSTREAM_PASSWORD_ENV, ProxyUnderTest
from rawwire import (
    errors_in,
    login,
    message,
    query,
    read_message,
    read_until_closed,
    serving,
    simple_query,
    startup_packet,
    wait_for,
)

from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.config import parse_config
from pgproxy.devdb import TemporaryCluster, create_role
from pgproxy.testing import RunningProxy

pytestmark = pytest.mark.timeout(120)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def backends(db_dsn: str, application_name: str) -> int:
    with psycopg.connect(db_dsn, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("select count(*) from pg_stat_activity where application_name = %s",
                           (application_name,)).fetchone()
        assert row is not None
        return int(row[0])


def sessions(p: ProxyUnderTest) -> int:
    assert p.running.server is not None
    return len(p.running.server.sessions)


def fatal(reply: bytes) -> dict[str, str]:
    errors = errors_in(reply)
    assert errors and errors[-1]["S"] == "FATAL", reply[:300]
    return errors[-1]


# ------------------------------------------------------------------------------------------------
# upstream unreachable


def test_upstream_refusing_connections(make_proxy: Callable[..., ProxyUnderTest], proxy: ProxyUnderTest,
                                       caplog: pytest.LogCaptureFixture) -> None:
    port = closed_port()

    def mutate(data: dict[str, Any]) -> None:
        data["upstream"]["port"] = port

    p = make_proxy(mutate)
    for _ in range(3):  # again and again: the proxy keeps answering, nothing piles up
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(p.dsn(tls=False), connect_timeout=10)  # a hang would end as "timeout expired"
        diag = info.value.diag if hasattr(info.value, "diag") else None
        text = str(info.value)
        assert "could not connect to the upstream database" in text, text
        assert "refused" in text.lower(), text
        told = text.split("FATAL:", 1)[1]  # what the proxy said (libpq's prefix names the proxy's own address)
        assert str(port) not in told and "127.0.0.1" not in told, text  # the caller never learns the address
        if diag is not None and diag.sqlstate is not None:
            assert diag.sqlstate == "08001"
    # the raw ErrorResponse: FATAL 08001, then the close
    with socket.create_connection(("127.0.0.1", p.plain_port), timeout=10) as sock:
        sock.sendall(startup_packet("agent_reader", p.database.database))
        assert read_message(sock)[0] == "R"
        sock.sendall(message("p", p.token().encode() + b"\x00"))
        fields = fatal(read_until_closed(sock))
    assert fields["C"] == "08001", fields
    assert str(port) not in str(fields), fields
    # the operator's log names the address the proxy could not reach
    assert any(f"127.0.0.1:{port}" in r.getMessage() for r in caplog.records if r.name == "pgproxy.server.session")
    assert wait_for(lambda: sessions(p) == 0, 5)
    # the failure is audited and the shared proxy is unaffected
    assert any("could not connect to the upstream database" in e["reason"] for e in p.events("session_end"))
    with psycopg.connect(proxy.dsn(tls=False), connect_timeout=10) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_upstream_that_never_answers(make_proxy: Callable[..., ProxyUnderTest]) -> None:
    """An upstream that accepts TCP and then says nothing: FATAL 08001 after connect_timeout, not a hang."""
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(16)
    try:
        def mutate(data: dict[str, Any]) -> None:
            data["upstream"]["port"] = black_hole.getsockname()[1]
            data["upstream"]["connect_timeout_seconds"] = 1

        p = make_proxy(mutate)
        with socket.create_connection(("127.0.0.1", p.plain_port), timeout=10) as sock:
            sock.sendall(startup_packet("agent_reader", p.database.database))
            assert read_message(sock)[0] == "R"
            sock.sendall(message("p", p.token().encode() + b"\x00"))
            try:
                fields = fatal(read_until_closed(sock))
            except TimeoutError:
                raise AssertionError("no FATAL within 10 s: the upstream connect never timed out") from None
        assert fields["C"] == "08001" and "timed out" in fields["M"], fields
        assert wait_for(lambda: sessions(p) == 0, 5)
    finally:
        black_hole.close()


# ------------------------------------------------------------------------------------------------
# upstream restarted mid-session


@pytest.fixture(scope="module")
def own_cluster(upstream_roles: str) -> Iterator[TemporaryCluster]:
    cluster = TemporaryCluster()
    db = cluster.start()
    try:
        create_role(db, "agent_reader", os.environ[UPSTREAM_PASSWORD_ENV])
        yield cluster
    finally:
        cluster.stop()


def pg_ctl_restart(cluster: TemporaryCluster) -> None:
    proc = cluster._run([cluster._pg("pg_ctl"), "restart", "-m", "fast", "-w", "-t", "60", "-s",
                         "-D", str(cluster.data_dir), "-l", str(cluster.log_file)], timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def on_own_cluster(proxy: ProxyUnderTest, own_cluster: TemporaryCluster) -> Iterator[ProxyUnderTest]:
    data = copy.deepcopy(proxy.config_data)
    data["upstream"]["host"] = own_cluster.database.host
    data["upstream"]["port"] = own_cluster.database.port
    data["upstream"]["credentials"] = [{"role": "agent_reader", "password_env": UPSTREAM_PASSWORD_ENV}]
    sink = MemoryAuditSink()
    running = RunningProxy(parse_config(data, Path.cwd()), audit=sink).start()
    try:
        yield ProxyUnderTest(running, sink, proxy.keys, proxy.tls, own_cluster.database, data)
    finally:
        running.stop()


def test_upstream_restart_mid_session(on_own_cluster: ProxyUnderTest, own_cluster: TemporaryCluster) -> None:
    p = on_own_cluster
    idle = login(p.plain_port, "agent_reader", "postgres", p.token())
    busy = login(p.plain_port, "agent_reader", "postgres", p.token())
    with psycopg.connect(p.dsn(tls=False, database="postgres"), autocommit=True, connect_timeout=10) as client:
        assert client.execute("select 1").fetchone() == (1,)
        busy.sendall(query("select pg_sleep(30)"))
        time.sleep(0.3)
        pg_ctl_restart(own_cluster)
        # the idle raw session: PostgreSQL's FATAL 57P01 relayed (or the proxy's 08006), then the close
        for sock in (idle, busy):
            sock.settimeout(10)
            try:
                reply = read_until_closed(sock)
            except TimeoutError:
                raise AssertionError("a session hung after its upstream went away") from None
            finally:
                sock.close()
            fields = fatal(reply)
            assert fields["C"] in ("57P01", "08006"), fields
        # the psycopg client learns on its next statement, with an error rather than a hang
        with pytest.raises(psycopg.OperationalError):
            client.execute("select 1")
    assert wait_for(lambda: sessions(p) == 0, 5), sessions(p)
    # new clients connect fine after the restart
    with psycopg.connect(p.dsn(tls=False, database="postgres"), autocommit=True, connect_timeout=10) as fresh:
        assert fresh.execute("select 'back'").fetchone() == ("back",)


def test_upstream_stopped_then_started(on_own_cluster: ProxyUnderTest, own_cluster: TemporaryCluster) -> None:
    """While the upstream is down new clients get FATAL 08001 at once; once it is back they get in."""
    p = on_own_cluster
    stop = own_cluster._run([own_cluster._pg("pg_ctl"), "stop", "-m", "fast", "-w", "-s", "-D",
                             str(own_cluster.data_dir)], timeout=60)
    assert stop.returncode == 0, stop.stderr
    try:
        with pytest.raises(psycopg.OperationalError, match="could not connect to the upstream database"):
            psycopg.connect(p.dsn(tls=False, database="postgres"), connect_timeout=10)
    finally:
        start = own_cluster._run([own_cluster._pg("pg_ctl"), "start", "-w", "-s", "-D", str(own_cluster.data_dir),
                                  "-l", str(own_cluster.log_file)], timeout=90)
        assert start.returncode == 0, start.stderr
    with psycopg.connect(p.dsn(tls=False, database="postgres"), connect_timeout=10) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


# ------------------------------------------------------------------------------------------------
# clients vanishing mid-operation


def vanish(sock: socket.socket, abort: bool) -> None:
    """Close like a crashed client (RST when ``abort``) or like a plain close."""
    if abort:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("abort", [False, True], ids=["close", "reset"])
def test_client_vanishes_mid_copy_from_stdin(proxy: ProxyUnderTest, abort: bool) -> None:
    name = f"rb_copy_vanish_{int(abort)}"
    baseline = sessions(proxy)
    sock = login(proxy.plain_port, "agent_reader", proxy.database.database, proxy.token(), application_name=name)
    simple_query(sock, "create temp table rb_copy (a int, b text)")
    sock.sendall(query("copy rb_copy from stdin"))
    assert read_message(sock)[0] == "G"  # CopyInResponse
    sock.sendall(b"".join(message("d", f"{i}\trow {i}\n".encode()) for i in range(1000)))
    assert backends(proxy.database.dsn(), name) == 1
    vanish(sock, abort)
    assert wait_for(lambda: backends(proxy.database.dsn(), name) == 0, 5), "upstream backend left behind"
    assert wait_for(lambda: sessions(proxy) <= baseline, 5), "proxy session leaked"
    with psycopg.connect(proxy.dsn(tls=False), connect_timeout=10) as conn:
        assert conn.execute("select 'fine'").fetchone() == ("fine",)


@pytest.mark.parametrize("abort", [False, True], ids=["close", "reset"])
def test_client_vanishes_mid_result(proxy: ProxyUnderTest, abort: bool) -> None:
    name = f"rb_result_vanish_{int(abort)}"
    baseline = sessions(proxy)
    sock = login(proxy.plain_port, "agent_reader", proxy.database.database, proxy.token(), application_name=name)
    sock.sendall(query("select repeat('x', 1000) from generate_series(1, 200000)"))
    got = 0
    while got < 2_000_000:  # about 1% of the result
        chunk = sock.recv(65536)
        assert chunk
        got += len(chunk)
    assert backends(proxy.database.dsn(), name) == 1
    vanish(sock, abort)
    assert wait_for(lambda: backends(proxy.database.dsn(), name) == 0, 5), "upstream backend left behind"
    assert wait_for(lambda: sessions(proxy) <= baseline, 5), "proxy session leaked"
    with psycopg.connect(proxy.dsn(tls=False), connect_timeout=10) as conn:
        assert conn.execute("select 'fine'").fetchone() == ("fine",)


def test_client_vanishes_while_a_statement_runs(proxy: ProxyUnderTest) -> None:
    """The client leaves during pg_sleep: the proxy's Terminate/close makes the backend exit once the
    statement notices (PostgreSQL checks the client socket only when it next reads or writes)."""
    name = "rb_sleep_vanish"
    sock = login(proxy.plain_port, "agent_reader", proxy.database.database, proxy.token(), application_name=name,
                 options="-c client_connection_check_interval=200")
    sock.sendall(query("select pg_sleep(30)"))
    time.sleep(0.3)
    vanish(sock, True)
    assert wait_for(lambda: backends(proxy.database.dsn(), name) == 0, 5), "upstream backend left behind"


# ------------------------------------------------------------------------------------------------
# graceful shutdown of `pgproxy serve`


@pytest.fixture
def serve_dir(tmp_path: Path, upstream_roles: str) -> Path:
    return tmp_path


def _conninfo(proxy: ProxyUnderTest, port: int, **extra: str) -> dict[str, str]:
    info = proxy.conninfo(tls=False, **extra)
    info["port"] = str(port)
    return info


def test_sigterm_drains_then_ends_idle_sessions(proxy: ProxyUnderTest, serve_dir: Path) -> None:
    with serving(proxy.config_data, serve_dir, log_level="INFO") as srv:
        port = srv.ports[1]
        idle = login(port, "agent_reader", proxy.database.database, proxy.token(), application_name="rb_drained")
        idle.settimeout(15)
        assert backends(proxy.database.dsn(), "rb_drained") == 1
        srv.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # no new connections during the drain
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        # ... while the idle session is left alone until the drain deadline (5 s) ...
        idle.setblocking(False)
        with pytest.raises(BlockingIOError):
            idle.recv(1)
        idle.settimeout(15)
        # ... and then ended with PostgreSQL's shutdown FATAL
        try:
            reply = read_until_closed(idle)
        except TimeoutError:
            raise AssertionError("the idle session was never ended after the drain") from None
        idle.close()
        fields = fatal(reply)
        assert fields["C"] == "57P01", fields
        assert fields["M"] == "terminating connection due to administrator command"
        try:
            srv.process.wait(10)
        except subprocess.TimeoutExpired:
            raise AssertionError("pgproxy serve did not exit after ending its last session") from None
        assert srv.process.returncode == 0, "".join(srv.stderr_lines)
    assert wait_for(lambda: backends(proxy.database.dsn(), "rb_drained") == 0, 5)
    # the audit log was flushed on the way out: the session's end is recorded
    events = (serve_dir / "audit.jsonl").read_text()
    assert '"session_end"' in events and "terminating connection due to administrator command" in events


def test_sigterm_exits_as_soon_as_sessions_finish(proxy: ProxyUnderTest, serve_dir: Path) -> None:
    with serving(proxy.config_data, serve_dir) as srv:
        port = srv.ports[1]
        conn = psycopg.connect(**_conninfo(proxy, port), autocommit=True, connect_timeout=10)  # type: ignore[arg-type]
        result: dict[str, Any] = {}

        def finish_work() -> None:  # a statement in flight completes during the drain
            result["row"] = conn.execute("select pg_sleep(1), 'finished'").fetchone()
            conn.close()

        worker = threading.Thread(target=finish_work)
        worker.start()
        time.sleep(0.3)
        srv.process.send_signal(signal.SIGTERM)
        worker.join(10)
        assert result.get("row") == ("", "finished"), result
        try:
            srv.process.wait(10)
        except subprocess.TimeoutExpired:
            raise AssertionError("pgproxy serve did not exit after its last session ended") from None
        assert srv.process.returncode == 0


@pytest.mark.parametrize("busy", [True, False], ids=["session_finishing", "no_session"])
def test_close_returns_once_no_session_is_left_not_at_the_drain_deadline(proxy: ProxyUnderTest, busy: bool) -> None:
    """With a drain deadline far beyond the test's patience, close() must return as soon as no session is left."""
    running = RunningProxy(parse_config(copy.deepcopy(proxy.config_data), Path.cwd()), audit=MemoryAuditSink()).start()
    try:
        result: dict[str, Any] = {}
        worker = None
        if busy:
            info = proxy.conninfo(tls=False)
            info["port"] = str(running.ports[1])
            conn = psycopg.connect(**info, autocommit=True, connect_timeout=10)  # type: ignore[arg-type]

            def finish_work() -> None:  # a statement in flight completes during the drain
                result["row"] = conn.execute("select pg_sleep(1), 'finished'").fetchone()
                conn.close()

            worker = threading.Thread(target=finish_work)
            worker.start()
            time.sleep(0.3)
        server = running.server
        assert server is not None
        try:
            running.call(server.close(drain_seconds=3600), timeout=60)
        except TimeoutError:
            raise AssertionError("close() kept draining with no session left") from None
        running.server = None
        if worker is not None:
            worker.join(10)
            assert result.get("row") == ("", "finished"), result
    finally:
        running.stop()


def test_sigterm_without_sessions_exits_at_once(proxy: ProxyUnderTest, serve_dir: Path) -> None:
    with serving(proxy.config_data, serve_dir) as srv:
        srv.process.send_signal(signal.SIGTERM)
        try:
            srv.process.wait(10)
        except subprocess.TimeoutExpired:
            raise AssertionError("pgproxy serve did not exit on SIGTERM") from None
        assert srv.process.returncode == 0

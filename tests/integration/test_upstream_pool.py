"""The upstream connection pool (``upstream.pool``): a cleanly ended session's backend goes, reset, to the next
client with exactly the same login, and to nobody else; what the first client left behind does not reach it.

Real clients (psycopg, raw wire) through a real proxy in front of the test PostgreSQL. Each test logs in with
an ``application_name`` of its own, so the tests never share a pooled connection.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from harness import ProxyUnderTest, config_edit
from psycopg import errors
from rawwire import (
    login,
    message,
    parse_fields,
    password,
    query,
    read_message,
    read_until_ready,
    rows_of,
    simple_query,
    startup_packet,
)

pytestmark = pytest.mark.timeout(60)

POOL = {"enabled": True, "idle_timeout_seconds": 30}


@pytest.fixture(scope="module")
def pooled(proxy: ProxyUnderTest) -> Iterator[ProxyUnderTest]:
    under = proxy.variant(config_edit("upstream.pool", POOL))
    try:
        yield under
    finally:
        under.running.stop()


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def parked(p: ProxyUnderTest) -> int:
    assert p.running.server is not None
    return len(p.running.server.pool)


def holds(p: ProxyUnderTest, pid: int) -> bool:
    assert p.running.server is not None
    return p.running.server.pool.holds(pid)


def connect(p: ProxyUnderTest, app: str, *, user: str = "agent_reader", **extra: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(**p.conninfo(user=user, application_name=app), autocommit=True, **extra)


def pid_of(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("select pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def session_then_park(p: ProxyUnderTest, app: str, work: Callable[[psycopg.Connection[Any]], None] | None = None,
                      **kwargs: Any) -> int:
    """Run a session that ends cleanly; returns its backend pid once the pool has it back."""
    with connect(p, app, **kwargs) as conn:
        pid = pid_of(conn)
        if work is not None:
            work(conn)
    assert wait_until(lambda: holds(p, pid)), "the connection was not given back to the pool"
    return pid


@pytest.fixture
def direct(proxy: ProxyUnderTest) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(proxy.database.dsn(), autocommit=True, connect_timeout=10) as conn:
        yield conn


def backend_alive(direct: psycopg.Connection[Any], pid: int) -> bool:
    return direct.execute("select count(*) from pg_stat_activity where pid = %s", (pid,)).fetchone() == (1,)


def test_same_login_gets_the_backend_without_the_last_clients_state(pooled: ProxyUnderTest,
                                                                      direct: psycopg.Connection[Any]) -> None:
    app = "pool_reset"
    with connect(pooled, app) as fresh:
        default_work_mem = fresh.execute("show work_mem").fetchone()

    def leave_state_behind(conn: psycopg.Connection[Any]) -> None:
        conn.execute("create temp table pool_tmp (i int)")
        conn.execute("prepare pool_stmt as select 1")
        conn.execute("set work_mem = '7MB'")
        conn.execute("set pool.custom = 'left behind'")
        conn.execute("listen pool_channel")
        conn.execute("select pg_advisory_lock(424242)")
        conn.execute("begin")
        conn.execute("declare pool_cursor cursor with hold for select 1")
        conn.execute("commit")

    pid = session_then_park(pooled, app, leave_state_behind)
    with connect(pooled, app) as conn:
        assert pid_of(conn) == pid
        assert conn.execute("select to_regclass('pool_tmp')").fetchone() == (None,)
        assert conn.execute("select count(*) from pg_prepared_statements").fetchone() == (0,)
        assert conn.execute("show work_mem").fetchone() == default_work_mem
        assert conn.execute("select current_setting('pool.custom', true)").fetchone() in ((None,), ("",))
        assert conn.execute("select count(*) from pg_listening_channels()").fetchone() == (0,)
        assert conn.execute("select count(*) from pg_cursors").fetchone() == (0,)
        assert direct.execute("select count(*) from pg_locks where locktype = 'advisory' and pid = %s",
                              (pid,)).fetchone() == (0,)
        direct.execute("notify pool_channel, 'hello'")
        conn.execute("select 1")
        assert list(conn.notifies(timeout=0.3, stop_after=1)) == []
    starts = [e for e in pooled.events("session_start") if e["application_name"] == app]
    assert [e["upstream_reused"] for e in starts] == [False, True, True]  # the first one is kept too


def test_set_role_and_session_authorization_are_undone(pooled: ProxyUnderTest, direct: psycopg.Connection[Any]) -> None:
    superuser = pooled.database.superuser
    direct.execute("drop role if exists pool_other; create role pool_other")

    def become_someone_else(conn: psycopg.Connection[Any]) -> None:
        conn.execute("set session authorization pool_other")
        conn.execute("set role none")
        assert conn.execute("select session_user, current_user").fetchone() == ("pool_other", "pool_other")

    def take_a_role(conn: psycopg.Connection[Any]) -> None:
        conn.execute("set role pool_other")

    for work in (become_someone_else, take_a_role):
        pid = session_then_park(pooled, "pool_role", work, user=superuser)
        with connect(pooled, "pool_role", user=superuser) as conn:
            assert pid_of(conn) == pid
            assert conn.execute("select session_user, current_user").fetchone() == (superuser, superuser)
            assert conn.info.parameter_status("session_authorization") == superuser
            assert conn.info.parameter_status("is_superuser") == "on"


def test_a_different_login_never_gets_it(pooled: ProxyUnderTest) -> None:
    pid = session_then_park(pooled, "pool_login_a")
    with connect(pooled, "pool_login_a", user="agent_writer") as other_role:
        assert pid_of(other_role) != pid
    with connect(pooled, "pool_login_b") as other_params:
        assert pid_of(other_params) != pid
    with connect(pooled, "pool_login_a", options="-c work_mem=5MB") as other_options:
        assert pid_of(other_options) != pid
    with connect(pooled, "pool_login_a") as same:  # it was there all along
        assert pid_of(same) == pid


def _in_transaction(sock: socket.socket) -> None:
    simple_query(sock, "begin")


def _mid_copy(sock: socket.socket) -> None:
    simple_query(sock, "create temp table pool_copy (i int)")
    sock.sendall(query("copy pool_copy from stdin"))
    time.sleep(0.2)  # the server is in COPY now
    sock.sendall(message("d", b"1\n"))


def _outstanding(sock: socket.socket) -> None:
    sock.sendall(query("select pg_sleep(0.3)"))


def _open_extended_exchange(sock: socket.socket) -> None:
    sock.sendall(message("P", b"\x00select 1\x00\x00\x00") + message("H", b""))  # Parse + Flush, no Sync


@pytest.mark.parametrize("leave", [_in_transaction, _mid_copy, _outstanding, _open_extended_exchange],
                         ids=["in-transaction", "mid-copy", "request-outstanding", "no-sync"])
@pytest.mark.parametrize("ending", ["terminate", "close"])
def test_an_unclean_end_does_not_give_the_connection_back(pooled: ProxyUnderTest, direct: psycopg.Connection[Any],
                                                          leave: Callable[[socket.socket], None], ending: str) -> None:
    app = f"pool_unclean_{leave.__name__}_{ending}"
    token = pooled.token(roles=("agent_reader",))
    sock = login(pooled.plain_port, "agent_reader", pooled.database.database, token, application_name=app)
    pid = int(rows_of(simple_query(sock, "select pg_backend_pid()"))[0][0] or 0)
    leave(sock)
    if ending == "terminate":
        sock.sendall(message("X", b""))
    sock.close()
    assert wait_until(lambda: not backend_alive(direct, pid)), "the backend was kept"
    with connect(pooled, app) as conn:
        assert pid_of(conn) != pid


def test_a_clean_raw_terminate_gives_it_back(pooled: ProxyUnderTest) -> None:
    # The same raw client as above, ending cleanly: its backend is reused (the test above is not vacuous).
    app = "pool_raw_clean"
    token = pooled.token(roles=("agent_reader",))
    sock = login(pooled.plain_port, "agent_reader", pooled.database.database, token, application_name=app)
    pid = int(rows_of(simple_query(sock, "select pg_backend_pid()"))[0][0] or 0)
    sock.sendall(message("X", b""))
    sock.close()
    assert wait_until(lambda: holds(pooled, pid))
    with connect(pooled, app) as conn:
        assert pid_of(conn) == pid


def test_the_startup_application_name_is_reported_again(pooled: ProxyUnderTest) -> None:
    app = "pool_appname"
    pid = session_then_park(pooled, app, lambda conn: conn.execute("set application_name = 'changed'"))
    with connect(pooled, app) as conn:
        assert pid_of(conn) == pid
        assert conn.info.parameter_status("application_name") == app
        assert conn.execute("show application_name").fetchone() == (app,)
        assert conn.info.parameter_status("server_version")  # the whole startup tail is there


def test_a_cancel_reaches_the_reused_backend(pooled: ProxyUnderTest, direct: psycopg.Connection[Any]) -> None:
    app = "pool_cancel"
    pid = session_then_park(pooled, app)
    with connect(pooled, app) as conn, connect(pooled, "pool_cancel_bystander") as bystander:
        assert pid_of(conn) == pid
        assert conn.info.backend_pid == pid  # its BackendKeyData names the reused backend
        threading.Timer(0.5, conn.cancel_safe, kwargs={"timeout": 5}).start()
        started = time.monotonic()
        with pytest.raises(errors.QueryCanceled):
            conn.execute("select pg_sleep(10)")
        assert time.monotonic() - started < 5
        assert bystander.execute("select 1").fetchone() == (1,)  # nobody else's query was touched
        assert conn.execute("select 2").fetchone() == (2,)


def raw_login(p: ProxyUnderTest, app: str) -> tuple[socket.socket, int, int]:
    """A plaintext raw-wire session; returns it with the BackendKeyData it was given (pid, secret)."""
    sock = socket.create_connection(("127.0.0.1", p.plain_port), timeout=10)
    sock.sendall(startup_packet("agent_reader", p.database.database, application_name=app))
    assert read_message(sock)[0] == "R"
    sock.sendall(password(p.token(roles=("agent_reader",))))
    key = next(body for t, body in read_until_ready(sock) if t == "K")
    pid, secret = struct.unpack("!iI", key)
    return sock, pid, secret


def send_cancel(p: ProxyUnderTest, pid: int, secret: int) -> None:
    with socket.create_connection(("127.0.0.1", p.plain_port), timeout=10) as sock:
        sock.sendall(struct.pack("!iiiI", 16, 80877102, pid, secret))
        sock.recv(1)  # the proxy closes it once the cancel was handled


def test_the_last_clients_cancel_key_does_not_reach_the_next_client(pooled: ProxyUnderTest) -> None:
    app = "pool_old_key"
    first, pid, old_secret = raw_login(pooled, app)
    first.sendall(message("X", b""))
    first.close()
    assert wait_until(lambda: holds(pooled, pid))
    second, second_pid, new_secret = raw_login(pooled, app)
    assert second_pid == pid and new_secret != old_secret
    with second:
        second.sendall(query("select pg_sleep(0.6)"))
        time.sleep(0.2)
        send_cancel(pooled, pid, old_secret)  # the key the first client was given: ignored
        assert [t for t, _ in read_until_ready(second)][-2:] == ["C", "Z"], "the old key cancelled the query"
        second.sendall(query("select pg_sleep(5)"))
        time.sleep(0.2)
        send_cancel(pooled, pid, new_secret)  # its own key reaches its backend
        errors_seen = [parse_fields(body) for t, body in read_until_ready(second) if t == "E"]
        assert [e["C"] for e in errors_seen] == ["57014"]


def test_a_backend_killed_while_parked_is_not_handed_out(pooled: ProxyUnderTest,
                                                         direct: psycopg.Connection[Any]) -> None:
    app = "pool_killed"
    pid = session_then_park(pooled, app)
    assert direct.execute("select pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
    assert wait_until(lambda: not holds(pooled, pid)), "the dead connection stayed in the pool"
    with connect(pooled, app) as conn:
        assert pid_of(conn) != pid
        assert conn.execute("select 1").fetchone() == (1,)


def test_without_the_pool_every_client_gets_a_new_backend(proxy: ProxyUnderTest) -> None:
    with connect(proxy, "pool_off") as conn:
        pid = pid_of(conn)
    with connect(proxy, "pool_off") as conn:
        assert pid_of(conn) != pid
    assert parked(proxy) == 0
    assert all("upstream_reused" not in e for e in proxy.events("session_start"))


def test_a_reload_that_changes_the_upstream_drains_the_pool(proxy: ProxyUnderTest,
                                                            make_proxy: Callable[..., ProxyUnderTest]) -> None:
    p = make_proxy(config_edit("upstream.pool", POOL))
    pid = session_then_park(p, "pool_reload")
    server = p.running.server
    assert server is not None
    changed = server.config.model_copy(update={"upstream": server.config.upstream.model_copy(
        update={"connect_timeout_seconds": 6.0})})
    p.running.call(server.reload(changed))
    assert parked(p) == 0
    with connect(p, "pool_reload") as conn:
        assert pid_of(conn) != pid


def test_limits_idle_timeout_and_lifetime_close_kept_connections(make_proxy: Callable[..., ProxyUnderTest],
                                                                 direct: psycopg.Connection[Any]) -> None:
    p = make_proxy(config_edit("upstream.pool", {"enabled": True, "max_idle_per_key": 1,
                                                 "idle_timeout_seconds": 1.0, "max_lifetime_seconds": 1}))
    first, second = connect(p, "pool_limits"), connect(p, "pool_limits")
    pids = [pid_of(first), pid_of(second)]
    first.close()
    assert wait_until(lambda: holds(p, pids[0]))
    second.close()  # one per login is the limit: this one is closed
    assert wait_until(lambda: not backend_alive(direct, pids[1]))
    assert holds(p, pids[0]) and parked(p) == 1
    assert wait_until(lambda: not backend_alive(direct, pids[0])), "the idle timeout did not close it"
    assert parked(p) == 0

    with connect(p, "pool_limits") as conn:  # a login older than max_lifetime_seconds is not kept
        pid = pid_of(conn)
        time.sleep(1.1)
    assert wait_until(lambda: not backend_alive(direct, pid))
    assert parked(p) == 0

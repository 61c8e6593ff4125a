"""Connection limits and idle timeouts under hostile and faulty clients (issue 9), on the raw protocol.

Complements tests/integration/test_limits.py (the happy paths) with: exact FATAL SQLSTATEs and the
moment they are sent (53300 right after the startup packet, as PostgreSQL does), slots that come back
after refusals, crashes and stalled logins, cancel requests that still work at the limit, idle timeouts
that end the upstream backend and roll back its transaction, and the states that are not idleness
(a statement whose result the client has not read yet, a COPY FROM STDIN in progress).
"""

from __future__ import annotations

import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from harness import ProxyUnderTest
from rawwire import (
    errors_in,
    login,
    message,
    password,
    query,
    read_message,
    read_until_closed,
    rows_of,
    simple_query,
    split_messages,
    startup_packet,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)


def _limits(**values: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        data["limits"].update(values)
    return mutate


def sessions(p: ProxyUnderTest) -> int:
    assert p.running.server is not None
    return len(p.running.server.sessions)


def backends(p: ProxyUnderTest, application_name: str) -> int:
    with psycopg.connect(p.database.dsn(), autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("select count(*) from pg_stat_activity where application_name = %s",
                           (application_name,)).fetchone()
        assert row is not None
        return int(row[0])


def only_fatal(reply: bytes) -> dict[str, str]:
    messages = split_messages(reply)
    assert [t for t, _ in messages] == ["E"], reply[:300]
    fields = errors_in(reply)[0]
    assert fields["S"] == "FATAL", fields
    return fields


def refused_at_startup(p: ProxyUnderTest) -> dict[str, str]:
    """Send a startup packet; the proxy must answer with one FATAL (no password request) and close."""
    with socket.create_connection(("127.0.0.1", p.plain_port), timeout=10) as sock:
        sock.sendall(startup_packet("agent_reader", p.database.database))
        return only_fatal(read_until_closed(sock))


def session(p: ProxyUnderTest, **kwargs: Any) -> socket.socket:
    return login(p.plain_port, "agent_reader", p.database.database, kwargs.pop("token", None) or p.token(), **kwargs)


# ------------------------------------------------------------------------------------------------
# max_connections


def test_max_connections_refuses_right_after_the_startup_packet(make_proxy: Callable[..., ProxyUnderTest]) -> None:
    p = make_proxy(_limits(max_connections=3))
    held = [session(p) for _ in range(3)]
    try:
        for _ in range(5):  # refused clients do not use up anything
            fields = refused_at_startup(p)
            assert (fields["C"], fields["M"]) == ("53300", "sorry, too many clients already"), fields
        # a held session still works at the limit
        assert rows_of(simple_query(held[0], "select 'held'")) == [["held"]]
        # one leaves (crashes, even): its slot is free at once
        held.pop().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        for s in held:
            s.close()
    assert wait_for(lambda: sessions(p) == 0, 5)
    again = [session(p) for _ in range(3)]
    for s in again:
        s.close()


def test_cancel_request_works_at_the_limit(make_proxy: Callable[..., ProxyUnderTest]) -> None:
    """CancelRequest arrives on a new connection; PostgreSQL honours it even when no slot is free."""
    p = make_proxy(_limits(max_connections=2))
    other = session(p)
    try:
        with psycopg.connect(p.dsn(tls=False), autocommit=True, connect_timeout=10) as conn:
            assert sessions(p) == 2
            outcome: dict[str, Any] = {}

            def run() -> None:
                try:
                    conn.execute("select pg_sleep(20)")
                except psycopg.Error as exc:
                    outcome["error"] = exc

            worker = threading.Thread(target=run)
            worker.start()
            time.sleep(0.4)
            conn.cancel_safe(timeout=5)  # cancel() holds the GIL in libpq, starving the in-process proxy
            worker.join(15)  # well before the 20 s sleep would end by itself
            assert not worker.is_alive(), "the statement still runs: the cancel did not reach the upstream"
            assert isinstance(outcome.get("error"), psycopg.errors.QueryCanceled), outcome
            assert conn.execute("select 'after cancel'").fetchone() == ("after cancel",)
    finally:
        other.close()


def test_stalled_logins_at_the_limit_free_their_slots(make_proxy: Callable[..., ProxyUnderTest]) -> None:
    """Logins stalled after their startup packet hold a slot (as in PostgreSQL, whose backends take one
    before authentication) until the startup timeout drops them; then logins succeed again."""
    p = make_proxy(_limits(max_connections=4, startup_timeout_seconds=1))
    stalled = []
    for _ in range(4):
        sock = socket.create_connection(("127.0.0.1", p.plain_port), timeout=10)
        sock.sendall(startup_packet("agent_reader", p.database.database))
        assert read_message(sock)[0] == "R"
        stalled.append(sock)
    try:
        assert refused_at_startup(p)["C"] == "53300"
        for sock in stalled:
            assert only_fatal(read_until_closed(sock))["C"] == "08006"
    finally:
        for sock in stalled:
            sock.close()
    assert wait_for(lambda: sessions(p) == 0, 5)
    with psycopg.connect(p.dsn(tls=False), connect_timeout=10) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_connections_without_a_startup_packet_take_no_slot(make_proxy: Callable[..., ProxyUnderTest]) -> None:
    """PostgreSQL counts a connection against max_connections once its backend has read the startup
    packet (InitProcess); bare TCP connections that have sent nothing yet do not make it refuse logins.
    Otherwise max_connections idle sockets from anyone lock every client out for the startup timeout."""
    p = make_proxy(_limits(max_connections=3, startup_timeout_seconds=5))
    silent = [socket.create_connection(("127.0.0.1", p.plain_port), timeout=10) for _ in range(3)]
    try:
        wait_for(lambda: sessions(p) >= 3, 2)
        with psycopg.connect(p.dsn(tls=False), connect_timeout=10) as conn:
            assert conn.execute("select 'let in'").fetchone() == ("let in",)
    finally:
        for sock in silent:
            sock.close()


# ------------------------------------------------------------------------------------------------
# max_connections_per_identity


def test_per_identity_refusal_is_53300_and_opens_no_backend(make_proxy: Callable[..., ProxyUnderTest]) -> None:
    p = make_proxy(_limits(max_connections_per_identity=2))
    sub = f"rb-{secrets.token_hex(3)}"
    held = [session(p, token=p.token(sub=sub)) for _ in range(2)]
    try:
        with socket.create_connection(("127.0.0.1", p.plain_port), timeout=10) as sock:
            sock.sendall(startup_packet("agent_reader", p.database.database, application_name="rb_over_identity"))
            assert read_message(sock)[0] == "R"
            sock.sendall(password(p.token(sub=sub)))
            fields = only_fatal(read_until_closed(sock))
        assert fields["C"] == "53300" and f'too many connections for "{sub}"' in fields["M"], fields
        assert backends(p, "rb_over_identity") == 0
        # invalid tokens claiming the same subject are refused as bad tokens, not counted
        with socket.create_connection(("127.0.0.1", p.plain_port), timeout=10) as sock:
            sock.sendall(startup_packet("agent_reader", p.database.database))
            assert read_message(sock)[0] == "R"
            sock.sendall(password(p.token(sub=sub, ttl=-60)))
            assert only_fatal(read_until_closed(sock))["C"] == "28P01"
        # a session that vanishes gives its slot back
        held.pop().close()
        assert wait_for(lambda: sessions(p) == 1, 5)
        held.append(session(p, token=p.token(sub=sub)))
    finally:
        for s in held:
            s.close()


# ------------------------------------------------------------------------------------------------
# idle timeouts


def test_idle_session_timeout_raw(make_proxy: Callable[..., ProxyUnderTest]) -> None:
    p = make_proxy(_limits(idle_timeout_seconds=0.5))
    sock = session(p, application_name="rb_idle")
    with sock:
        assert backends(p, "rb_idle") == 1
        sock.settimeout(10)
        try:
            fields = only_fatal(read_until_closed(sock))
        except TimeoutError:
            raise AssertionError("the idle session was still open 10 s after its 0.5 s idle timeout") from None
    assert (fields["C"], fields["M"]) == ("57P05", "terminating connection due to idle-session timeout"), fields
    assert wait_for(lambda: backends(p, "rb_idle") == 0, 5), "the upstream backend outlived the session"
    assert wait_for(lambda: sessions(p) == 0, 5)


def test_busy_sessions_are_not_idle(make_proxy: Callable[..., ProxyUnderTest]) -> None:
    """Neither a steady stream of short statements, nor an unread result, nor a COPY FROM STDIN whose
    client pauses counts as idleness (PostgreSQL only times out a backend waiting for a new command)."""
    p = make_proxy(_limits(idle_timeout_seconds=0.5, idle_in_transaction_timeout_seconds=0.5))
    chatty = session(p)
    unread = session(p)
    copier = session(p)
    try:
        simple_query(copier, "create temp table rb_idle_copy (a int)")
        copier.sendall(query("copy rb_idle_copy from stdin"))
        assert read_message(copier)[0] == "G"
        copier.sendall(message("d", b"1\n"))
        unread.sendall(query("select repeat('y', 1000) from generate_series(1, 20000)"))
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert rows_of(simple_query(chatty, "select 'busy'")) == [["busy"]]
            time.sleep(0.2)
        # the unread result arrives complete
        data = bytearray()
        while not data.endswith(b"Z\x00\x00\x00\x05I"):
            chunk = unread.recv(1 << 20)
            assert chunk, "the session with an unread result was ended"
            data += chunk
        assert b"SELECT 20000" in data
        # the COPY goes on after its pause
        copier.sendall(message("d", b"2\n") + message("c", b""))
        messages = []
        while not messages or messages[-1][0] != "Z":
            messages.append(read_message(copier))
        assert ("C", b"COPY 2\x00") in messages, messages
    finally:
        for s in (chatty, unread, copier):
            s.close()


def test_idle_in_transaction_timeout_raw_rolls_back(make_proxy: Callable[..., ProxyUnderTest]) -> None:
    p = make_proxy(_limits(idle_in_transaction_timeout_seconds=0.5))
    table = f"rb_iit_{secrets.token_hex(4)}"
    with psycopg.connect(p.database.dsn(), autocommit=True) as admin:
        admin.execute(f"create table {table} (a int)")
        admin.execute(f"grant all on {table} to agent_reader")
    try:
        sock = session(p, application_name="rb_iit")
        with sock:
            simple_query(sock, "begin")
            simple_query(sock, f"insert into {table} values (1)")
            sock.settimeout(5)
            fields = only_fatal(read_until_closed(sock))
        assert (fields["C"], fields["M"]) == ("25P03", "terminating connection due to idle-in-transaction timeout")
        assert wait_for(lambda: backends(p, "rb_iit") == 0, 5)
        with psycopg.connect(p.database.dsn(), autocommit=True) as admin:
            assert admin.execute(f"select count(*) from {table}").fetchone() == (0,)
    finally:
        with psycopg.connect(p.database.dsn(), autocommit=True) as admin:
            admin.execute(f"drop table {table}")

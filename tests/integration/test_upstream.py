"""The proxy's upstream side: its own SCRAM login, secrecy of the upstream password, backend lifetime
(terminate, abrupt client disconnects), role mapping refusals, audit of statements and upstream errors.

Tables: temp tables named ``upt_*``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import pg8000.native
import psycopg
import pytest
from pg8000.exceptions import DatabaseError
from psycopg import errors

pytestmark = pytest.mark.timeout(60)

UPSTREAM_PASSWORD_ENV = "PGPROXY_TEST_UPSTREAM_PASSWORD"
# Parameters a PostgreSQL 15+ server reports with ParameterStatus.
REPORTED_PARAMETERS = ("application_name", "client_encoding", "DateStyle", "default_transaction_read_only",
                       "in_hot_standby", "integer_datetimes", "IntervalStyle", "is_superuser", "server_encoding",
                       "server_version", "session_authorization", "standard_conforming_strings", "TimeZone")


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def direct(proxy: Any) -> psycopg.Connection[Any]:
    """A superuser connection straight to the upstream, bypassing the proxy."""
    return psycopg.connect(proxy.database.dsn(), autocommit=True, connect_timeout=10)


def pg8000_refusal(proxy: Any, **kwargs: Any) -> dict[str, str]:
    """Connect with pg8000 expecting a refusal; returns the ErrorResponse fields."""
    params: dict[str, Any] = {"user": "agent_reader", "host": "127.0.0.1", "port": proxy.port,
                              "database": proxy.database.database, "timeout": 10,
                              "ssl_context": ssl.create_default_context(cafile=str(proxy.tls.ca_file))}
    params.update(kwargs)
    params.setdefault("password", proxy.token(roles=(params["user"],)))
    with pytest.raises(DatabaseError) as info:
        pg8000.native.Connection(**params).close()
    fields: dict[str, str] = info.value.args[0]
    assert fields["S"] == "FATAL"
    return fields


def test_upstream_login_uses_mapped_role_with_scram(proxy: Any) -> None:
    with psycopg.connect(proxy.dsn(application_name="upt_scram"), connect_timeout=10) as conn:
        pid = conn.info.backend_pid
        assert conn.execute("select current_user, session_user").fetchone() == ("agent_reader", "agent_reader")
        with direct(proxy) as up:
            row = up.execute("select usename, application_name, datname from pg_stat_activity where pid = %s",
                             [pid]).fetchone()
            assert row == ("agent_reader", "upt_scram", proxy.database.database)
            # The role's verifier is SCRAM and the loopback rules demand a password exchange.
            assert up.execute("select rolpassword like 'SCRAM-SHA-256$%%' from pg_authid "
                              "where rolname = 'agent_reader'").fetchone() == (True,)
            methods = {r[0] for r in up.execute("select auth_method from pg_hba_file_rules "
                                                "where type like 'host%%' and error is null").fetchall()}
            assert methods and methods <= {"scram-sha-256", "md5"}, methods
    event = next(e for e in proxy.events("session_start") if e.get("application_name") == "upt_scram")
    assert event["upstream_role"] == "agent_reader"
    assert event["identity"]["subject"] == "agent-1"


def test_superuser_role_mapping(proxy: Any) -> None:
    superuser = proxy.database.superuser
    token = proxy.token(sub="upt-admin", roles=(superuser, "agent_reader"))
    with psycopg.connect(proxy.dsn(user=superuser, token=token), connect_timeout=10) as conn:
        assert conn.execute("select current_user, current_setting('is_superuser')").fetchone() == (superuser, "on")
        assert conn.pgconn.parameter_status(b"is_superuser") == b"on"
    # The same token may also pick its other role.
    with psycopg.connect(proxy.dsn(user="agent_reader", token=token), connect_timeout=10) as conn:
        assert conn.execute("select current_user").fetchone() == ("agent_reader",)


def test_upstream_password_never_reaches_the_client(proxy: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # the proxy's own log records, from its thread
    password = os.environ[UPSTREAM_PASSWORD_ENV]
    seen: list[str] = []
    with psycopg.connect(proxy.dsn(user="agent_writer", application_name="upt_secret"), autocommit=True,
                         connect_timeout=10) as conn:
        conn.add_notice_handler(lambda diag: seen.extend(str(v) for v in (
            diag.severity, diag.sqlstate, diag.message_primary, diag.message_detail, diag.message_hint,
            diag.context)))
        conn.execute("do $$ begin raise notice 'upt notice'; raise warning 'upt warning' "
                     "using detail = 'd', hint = 'h'; end $$")
        for sql in ("select 1/0", "set role agent_reader_nope", "select * from pg_authid",
                    "create role upt_not_allowed", "select pg_read_file('/nonexistent')"):
            with pytest.raises(psycopg.Error) as info:
                conn.execute(sql)
            seen.append(str(info.value))
            seen.extend(str(v) for v in (info.value.diag.message_detail, info.value.diag.message_hint))
        conn.execute("set application_name = 'upt_secret_2'")
        for name in REPORTED_PARAMETERS:
            value = conn.pgconn.parameter_status(name.encode())
            assert value is not None, name
            seen.append(value.decode())
        assert conn.pgconn.parameter_status(b"application_name") == b"upt_secret_2"
    # A refused upstream login (unknown database) is relayed too.
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(proxy.dsn(database="upt_no_such_db"), connect_timeout=10)
    seen.append(str(info.value))
    assert len(seen) > 20
    assert "upt notice" in seen and "upt warning" in seen and "division by zero" in " ".join(seen)
    assert not [s for s in seen if password in s]
    assert password not in json.dumps(proxy.events(), default=str)
    assert password not in caplog.text


def test_upstream_password_is_masked_in_relayed_messages(proxy: Any) -> None:
    # Defence in depth: were the upstream ever to echo the password in a notice, error, notification or
    # ParameterStatus, the proxy masks it. Here the client plays the upstream's part by sending it.
    # The password travels in a startup option (which the audit does not record), never in a statement.
    password = os.environ[UPSTREAM_PASSWORD_ENV]
    notices: list[str] = []
    with psycopg.connect(proxy.dsn(options=f"-c upt.pw={password}"), autocommit=True, connect_timeout=10) as conn:
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        conn.execute("do $$ begin raise notice 'pw=%', current_setting('upt.pw'); end $$")
        with pytest.raises(errors.RaiseException) as info:
            conn.execute("do $$ begin raise exception 'pw=%', current_setting('upt.pw'); end $$")
        conn.execute("listen upt_pw")
        conn.execute("select pg_notify('upt_pw', current_setting('upt.pw'))")
        notifies = list(conn.notifies(timeout=5, stop_after=1))
        conn.execute("select set_config('application_name', current_setting('upt.pw'), false)")
        app = conn.pgconn.parameter_status(b"application_name")
        # Data rows are the client's own results and are never rewritten.
        assert conn.execute("select current_setting('upt.pw')").fetchone() == (password,)
    assert notices == ["pw=********"]
    assert info.value.diag.message_primary == "pw=********"
    assert [n.payload for n in notifies] == ["********"]
    assert app == b"********"


def test_terminate_backend_of_another_session(proxy: Any) -> None:
    victim = psycopg.connect(proxy.dsn(application_name="upt_victim"), connect_timeout=10)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            victim.execute("select pg_sleep(10)")
        except psycopg.Error as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run)
    try:
        victim_pid = victim.info.backend_pid
        worker.start()
        superuser = proxy.database.superuser
        admin_token = proxy.token(sub="upt-admin", roles=(superuser,))
        with psycopg.connect(proxy.dsn(user=superuser, token=admin_token), autocommit=True,
                             connect_timeout=10) as admin:
            assert wait_until(lambda: admin.execute("select state = 'active' from pg_stat_activity where pid = %s",
                                                    [victim_pid]).fetchone() == (True,))
            assert admin.execute("select pg_terminate_backend(%s)", [victim_pid]).fetchone() == (True,)
        worker.join(5)
        assert not worker.is_alive()
        exc = outcome.get("error")
        assert isinstance(exc, errors.AdminShutdown), outcome
        assert exc.sqlstate == "57P01"
        assert "terminating connection due to administrator command" in str(exc)
        assert victim.closed
    finally:
        worker.join(10)
        victim.close()
    # The proxy goes on serving new sessions.
    with psycopg.connect(proxy.dsn(), connect_timeout=10) as conn:
        assert conn.execute("select 'still serving'").fetchone() == ("still serving",)
    ended = wait_until(lambda: [e for e in proxy.events("session_end")
                                if e["session"] in {s["session"] for s in proxy.events("session_start")
                                                    if s.get("application_name") == "upt_victim"}])
    assert ended


def test_terminate_idle_session(proxy: Any) -> None:
    # The upstream's asynchronous FATAL reaches an idle client, which sees it at its next statement.
    victim = psycopg.connect(proxy.dsn(), connect_timeout=10)
    try:
        pid = victim.info.backend_pid
        with direct(proxy) as up:
            assert up.execute("select pg_terminate_backend(%s, 5000)", [pid]).fetchone() == (True,)
        with pytest.raises(psycopg.OperationalError) as info:
            victim.execute("select 1")
        assert info.value.sqlstate == "57P01"
        assert "terminating connection due to administrator command" in str(info.value)
    finally:
        victim.close()


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
def test_abrupt_client_disconnect_ends_upstream_backend(proxy: Any, tls: bool) -> None:
    app = f"upt_abrupt_{tls}"
    conn = psycopg.connect(proxy.dsn(tls=tls, application_name=app), connect_timeout=10)
    try:
        pid = conn.info.backend_pid
        assert conn.execute("select pg_backend_pid()").fetchone() == (pid,)
        with direct(proxy) as up:
            def alive() -> bool:
                return up.execute("select count(*) from pg_stat_activity where pid = %s",
                                  [pid]).fetchone() == (1,)

            assert alive()
            # Close the socket under the driver's feet: no Terminate message, no TLS close_notify.
            sock = socket.socket(fileno=os.dup(conn.fileno()))
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            assert wait_until(lambda: not alive(), timeout=5), "the upstream backend outlived its client"
    finally:
        conn.close()
    session = next(e["session"] for e in proxy.events("session_start") if e.get("application_name") == app)
    ends = wait_until(lambda: [e for e in proxy.events("session_end") if e["session"] == session])
    assert len(ends) == 1 and ends[0]["statements"] >= 1


def test_role_without_upstream_credential_is_refused(make_proxy: Callable[..., Any]) -> None:
    def only_writer(data: dict[str, Any]) -> None:
        data["upstream"]["credentials"] = [{"role": "agent_writer", "password_env": UPSTREAM_PASSWORD_ENV}]

    limited = make_proxy(only_writer)
    fields = pg8000_refusal(limited, user="agent_reader")
    assert fields["C"] == "28000"
    assert fields["M"] == 'no upstream credential is configured for database role "agent_reader"'
    # The configured role works through the same proxy.
    conn = pg8000.native.Connection(**{**dict(user="agent_writer", host="127.0.0.1", port=limited.port,
                                                  database=limited.database.database, timeout=10,
                                                  password=limited.token(roles=("agent_writer",))),
                                       "ssl_context": ssl.create_default_context(cafile=str(limited.tls.ca_file))})
    try:
        assert conn.run("select current_user") == [["agent_writer"]]
    finally:
        conn.close()
    assert limited.events("session_start")[-1]["upstream_role"] == "agent_writer"


def test_startup_user_not_in_token_roles_is_refused(proxy: Any) -> None:
    fields = pg8000_refusal(proxy, user="agent_writer", password=proxy.token(sub="upt-reader",
                                                                             roles=("agent_reader",)))
    assert fields["C"] == "28000"
    assert fields["M"] == 'token for "upt-reader" does not allow database role "agent_writer"'
    assert fields["H"] == "Connect as one of: agent_reader"


def test_audit_records_extended_protocol_statements(proxy: Any) -> None:
    app = "upt_audit"
    with psycopg.connect(proxy.dsn(user="agent_writer", application_name=app), connect_timeout=10) as conn:
        conn.execute("create temp table upt_audit_t(v text)")
        conn.execute("insert into upt_audit_t values (%s), (%s)", ["upt_a", "upt_b"])
        rows = conn.execute("select %s::text || v from upt_audit_t, generate_series(1, %s::int)",
                            ["x_", "3"]).fetchall()
        assert len(rows) == 6
        with pytest.raises(errors.UndefinedTable):  # fails at Parse, before its parameters are bound
            conn.execute("select * from upt_audit_missing where v = %s", ["q"])
        conn.rollback()
        with pytest.raises(errors.DivisionByZero):  # fails once bound (planning or execution)
            conn.execute("select 1 / %s::int", ["0"])
    session = next(e["session"] for e in proxy.events("session_start") if e.get("application_name") == app)

    def statements() -> list[dict[str, Any]]:
        return [e for e in proxy.events("statement") if e["session"] == session]

    events = wait_until(lambda: len(statements()) >= 6 and statements())
    by_sql = {e["sql"]: e for e in events}
    insert = by_sql["insert into upt_audit_t values ($1), ($2)"]
    assert (insert["protocol"], insert["params"], insert["rows"], insert["tags"]) == \
        ("extended", ["upt_a", "upt_b"], 2, ["INSERT 0 2"])
    select = by_sql["select $1::text || v from upt_audit_t, generate_series(1, $2::int)"]
    assert (select["params"], select["rows"]) == (["x_", "3"], 6)
    failed = by_sql["select * from upt_audit_missing where v = $1"]
    assert failed["error"]["sqlstate"] == "42P01"
    divided = by_sql["select 1 / $1::int"]
    assert (divided["error"]["sqlstate"], divided["params"]) == ("22012", ["0"])
    assert all(e["duration_ms"] >= 0 for e in events)


def test_unknown_database_error_comes_from_upstream(proxy: Any) -> None:
    fields = pg8000_refusal(proxy, database="upt_no_such_db")
    assert fields["C"] == "3D000"
    assert fields["M"] == 'database "upt_no_such_db" does not exist'
    with pytest.raises(psycopg.OperationalError, match='database "upt_no_such_db" does not exist'):
        psycopg.connect(proxy.dsn(database="upt_no_such_db"), connect_timeout=10)

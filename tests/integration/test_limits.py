"""Connection limits and idle timeouts end sessions with PostgreSQL's own SQLSTATEs and messages."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest


def _limits(**values: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        data["limits"].update(values)
    return mutate


def test_global_connection_limit(make_proxy: Callable[..., Any]) -> None:
    p = make_proxy(_limits(max_connections=2))
    held = [psycopg.connect(p.dsn(tls=False)) for _ in range(2)]
    try:
        with pytest.raises(psycopg.OperationalError, match="sorry, too many clients already"):
            psycopg.connect(p.dsn(tls=False))
    finally:
        for conn in held:
            conn.close()
    deadline = time.monotonic() + 5
    while len(p.running.server.sessions) and time.monotonic() < deadline:
        time.sleep(0.05)
    with psycopg.connect(p.dsn(tls=False)) as conn:  # room again once others left
        assert conn.execute("select 1").fetchone() == (1,)


def test_per_identity_limit_is_per_subject(make_proxy: Callable[..., Any]) -> None:
    p = make_proxy(_limits(max_connections_per_identity=1))
    first = psycopg.connect(p.dsn(tls=False, token=p.token(sub="alice")))
    try:
        with pytest.raises(psycopg.OperationalError, match='too many connections for "alice"'):
            psycopg.connect(p.dsn(tls=False, token=p.token(sub="alice")))
        with psycopg.connect(p.dsn(tls=False, token=p.token(sub="bob"))) as other:
            assert other.execute("select 2").fetchone() == (2,)
    finally:
        first.close()
    refused = [e for e in p.events("auth_failed") if e.get("reason") == "too many connections for identity"]
    assert refused and refused[0]["identity"]["subject"] == "alice"


def test_idle_session_timeout(make_proxy: Callable[..., Any]) -> None:
    p = make_proxy(_limits(idle_timeout_seconds=0.5))
    with psycopg.connect(p.dsn(tls=False), autocommit=True) as conn:
        conn.execute("select pg_sleep(0.8)")  # a long statement is not idleness
        time.sleep(1.2)
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("select 1")
        assert "idle-session timeout" in str(info.value)


def test_idle_in_transaction_timeout(make_proxy: Callable[..., Any]) -> None:
    p = make_proxy(_limits(idle_in_transaction_timeout_seconds=0.5))
    with psycopg.connect(p.dsn(tls=False)) as conn:
        conn.execute("select 1")  # opens a transaction
        time.sleep(1.2)
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout) as info:
            conn.execute("select 2")
        assert "idle-in-transaction timeout" in str(info.value)
    with psycopg.connect(p.dsn(tls=False), autocommit=True) as idle_outside:
        time.sleep(1.0)  # idle outside a transaction is fine with only this limit
        assert idle_outside.execute("select 3").fetchone() == (3,)

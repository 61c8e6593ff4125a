"""The refusal seam: a gate refuses chosen requests; clients see PostgreSQL's own semantics around it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.config import parse_config
from pgproxy.protocol import errors
from pgproxy.protocol.tracker import Pending
from pgproxy.server.gates import Refuse
from pgproxy.testing import RunningProxy

MARKER = "forbidden_zone"


class MarkerGate:
    """Refuses every statement whose text mentions MARKER."""

    def inspect(self, session: Any, request: Pending, msg_type: int, body: memoryview) -> Refuse | None:
        sql = request.result.sql if request.result is not None else (request.sql or "")
        if MARKER in sql:
            return Refuse(errors.error(errors.INSUFFICIENT_PRIVILEGE, f"statement refused: mentions {MARKER}"))
        return None


@pytest.fixture(scope="module")
def gated(proxy):  # type: ignore[no-untyped-def]
    audit = MemoryAuditSink()
    running = RunningProxy(parse_config(proxy.config_data, Path.cwd()), audit=audit, gates=[MarkerGate()]).start()
    yield running, audit
    running.stop()


def _dsn(proxy, running: RunningProxy) -> str:  # type: ignore[no-untyped-def]
    return proxy.dsn(tls=False).replace(f"port='{proxy.plain_port}'", f"port='{running.ports[1]}'")


def test_simple_query_refused_and_session_continues(proxy, gated) -> None:  # type: ignore[no-untyped-def]
    running, audit = gated
    with psycopg.connect(_dsn(proxy, running), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="statement refused"):
            conn.execute(f"select 1 as {MARKER}", prepare=False)
        assert conn.execute("select 2").fetchone() == (2,)
    refused = [e for e in audit.events if e.get("event") == "statement" and e.get("refused")]
    assert refused and MARKER in refused[0]["sql"] and refused[0]["error"]["sqlstate"] == "42501"


def test_refusal_aborts_the_transaction_like_postgres(proxy, gated) -> None:  # type: ignore[no-untyped-def]
    running, _ = gated
    with psycopg.connect(_dsn(proxy, running)) as conn:
        conn.execute("select 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"select 1 as {MARKER}")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("select 3")
        conn.rollback()
        assert conn.execute("select 4").fetchone() == (4,)


def test_extended_protocol_refusal_with_parameters(proxy, gated) -> None:  # type: ignore[no-untyped-def]
    running, _ = gated
    with psycopg.connect(_dsn(proxy, running), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f"select %s::int as {MARKER}", [1])
        assert conn.execute("select %s::int + 1", [1]).fetchone() == (2,)


def test_pipeline_refusal_skips_until_sync(proxy, gated) -> None:  # type: ignore[no-untyped-def]
    running, _ = gated
    with psycopg.connect(_dsn(proxy, running), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.pipeline() as p:
            c1 = conn.execute("select %s::int", [1])
            conn.execute(f"select %s::int as {MARKER}", [2])
            c3 = conn.execute("select %s::int", [3])
            p.sync()
        assert c1.fetchone() == (1,)
        assert c3.pgresult is None or c3.pgresult.status != 2  # never ran: the server skipped it
        assert conn.execute("select 5").fetchone() == (5,)


def test_asyncpg_prepared_statement_refused(proxy, gated) -> None:  # type: ignore[no-untyped-def]
    running, _ = gated

    async def go() -> None:
        conn = await asyncpg.connect(host="127.0.0.1", port=running.ports[1], user="agent_reader",
                                     password=proxy.token(), database=proxy.database.database, ssl=False)
        try:
            with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
                await conn.fetch(f"select $1::int as {MARKER}", 1)
            assert await conn.fetchval("select $1::int * 2", 21) == 42
        finally:
            await conn.close()

    asyncio.run(go())

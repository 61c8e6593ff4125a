"""The refusal seam: a gate refuses chosen requests; clients see PostgreSQL's own semantics around it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.config import parse_config
from pgproxy.core.plugins import Hold, Refuse
from pgproxy.core.statement import Statement
from pgproxy.protocol import errors
from pgproxy.protocol.messages import NoticeResponse
from pgproxy.testing import RunningProxy

MARKER = "forbidden_zone"


class MarkerGate:
    """Refuses every statement whose text mentions MARKER."""

    def inspect(self, session: Any, request: Statement) -> Refuse | None:
        if MARKER in request.sql:
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


# --------------------------------------------------------------------------------------------------
# Hold: a request waits for a decision while the session stays alive
# --------------------------------------------------------------------------------------------------

HOLD_MARKER = "hold_me"


class HoldingGate:
    """Holds every statement mentioning HOLD_MARKER until the test decides it."""

    def __init__(self, running: RunningProxy) -> None:
        self.running = running
        self.held: list[tuple[str, asyncio.Future[Refuse | None]]] = []
        self.arrived = threading.Event()

    def inspect(self, session: Any, request: Statement) -> Hold | None:
        if HOLD_MARKER not in request.sql or request.kind not in ("query", "execute"):
            return None
        future: asyncio.Future[Refuse | None] = asyncio.get_running_loop().create_future()
        self.held.append((request.sql, future))
        self.arrived.set()
        notice = NoticeResponse.build("NOTICE", "00000", f"waiting for approval {len(self.held)}")
        return Hold(future, notice)

    def decide(self, decision: Refuse | None) -> None:
        assert self.arrived.wait(10), "no request was held"
        self.arrived.clear()
        _, future = self.held[-1]
        self.running.loop.call_soon_threadsafe(future.set_result, decision)


@pytest.fixture
def holding(proxy):  # type: ignore[no-untyped-def]
    gate_box: list[HoldingGate] = []

    class Lazy:
        def inspect(self, session: Any, request: Statement) -> Hold | None:
            return gate_box[0].inspect(session, request)

    running = RunningProxy(parse_config(proxy.config_data, Path.cwd()), audit=MemoryAuditSink(), gates=[Lazy()])
    gate_box.append(HoldingGate(running))
    running.start()
    yield running, gate_box[0]
    running.stop()


def _run_in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    box: list[Any] = []

    def target() -> None:
        try:
            box.append(fn())
        except BaseException as exc:  # handed to the test thread
            box.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def test_held_statement_runs_after_approval(proxy, holding) -> None:  # type: ignore[no-untyped-def]
    running, gate = holding
    notices: list[str] = []
    with psycopg.connect(_dsn(proxy, running), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        thread, box = _run_in_thread(lambda: conn.execute(f"select 7 as {HOLD_MARKER}").fetchone())
        gate.decide(None)
        thread.join(10)
        assert box == [(7,)]
        assert notices == ["waiting for approval 1"]
        assert conn.execute("select 8").fetchone() == (8,)


def test_held_statement_refused_in_a_transaction(proxy, holding) -> None:  # type: ignore[no-untyped-def]
    running, gate = holding
    with psycopg.connect(_dsn(proxy, running)) as conn:
        conn.execute("create temp table held_t (x int)")
        conn.commit()
        thread, box = _run_in_thread(lambda: conn.execute(f"insert into held_t select 1 where '{HOLD_MARKER}' <> ''"))
        gate.decide(Refuse(errors.error(errors.INSUFFICIENT_PRIVILEGE, "approval denied by bob")))
        thread.join(10)
        assert isinstance(box[0], psycopg.errors.InsufficientPrivilege)
        assert "approval denied by bob" in str(box[0])
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
        assert conn.execute("select count(*) from held_t").fetchone() == (0,)


def test_pipelined_requests_behind_a_held_one_wait_then_run(proxy, holding) -> None:  # type: ignore[no-untyped-def]
    running, gate = holding

    def pipeline() -> list[Any]:
        with psycopg.connect(_dsn(proxy, running), autocommit=True) as conn, conn.pipeline():
            first = conn.execute("select %s::int", [1])
            held = conn.execute(f"select %s::text as {HOLD_MARKER}", ["x"])
            last = conn.execute("select %s::int", [3])
            return [first.fetchone(), held.fetchone(), last.fetchone()]

    thread, box = _run_in_thread(pipeline)
    gate.decide(None)
    thread.join(10)
    assert box == [[(1,), ("x",), (3,)]]


def test_client_vanishing_while_held_leaves_the_proxy_serving(proxy, holding) -> None:  # type: ignore[no-untyped-def]
    running, gate = holding
    conn = psycopg.connect(_dsn(proxy, running), autocommit=True)
    conn.pgconn.send_query(f"select 1 as {HOLD_MARKER}".encode())
    assert gate.arrived.wait(10)
    conn.pgconn.finish()  # gone without waiting
    gate.decide(None)
    with psycopg.connect(_dsn(proxy, running), autocommit=True) as other:
        assert other.execute("select 9").fetchone() == (9,)

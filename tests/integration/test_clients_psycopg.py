"""psycopg 3 through the proxy: pipeline mode (with an error in the middle), server-side prepared
statements, binary results, COPY in text and binary, notifications, cancellation, transactions and
named (server-side) cursors.

Tables: temp tables named ``pg3t_*``.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from datetime import date
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import errors

pytestmark = pytest.mark.timeout(60)


def connect(proxy: Any, *, user: str = "agent_writer", app: str | None = None, **kwargs: Any) -> psycopg.Connection:
    extra = {"application_name": app} if app else {}
    return psycopg.connect(proxy.dsn(user=user, **extra), connect_timeout=10, **kwargs)


def session_events(proxy: Any, app: str, kind: str = "statement") -> list[dict[str, Any]]:
    """The audit events of kind ``kind`` of the (latest) session started with application_name ``app``."""
    sessions = [e["session"] for e in proxy.events("session_start") if e.get("application_name") == app]
    assert sessions, f"no session_start for {app}"
    return [e for e in proxy.events(kind) if e["session"] == sessions[-1]]


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


@pytest.fixture
def conn(proxy: Any) -> Iterator[psycopg.Connection]:
    with connect(proxy) as c:
        yield c


def test_pipeline_many_statements(proxy: Any) -> None:
    with connect(proxy, autocommit=True) as c:
        c.execute("create temp table pg3t_pipe(i int primary key, s text)")
        with c.pipeline(), c.cursor() as cur:
            for i in range(200):
                cur.execute("insert into pg3t_pipe values (%s, %s)", [i, f"row {i}"])
            curs = [c.execute("select s from pg3t_pipe where i = %s", [i]) for i in (0, 99, 199)]
            assert [x.fetchone() for x in curs] == [("row 0",), ("row 99",), ("row 199",)]
        assert c.execute("select count(*), sum(i) from pg3t_pipe").fetchone() == (200, 199 * 200 // 2)


def test_pipeline_error_aborts_rest_of_sync_block_then_recovers(proxy: Any) -> None:
    with connect(proxy, autocommit=True) as c:
        c.execute("create temp table pg3t_pabort(v text)")
        with c.pipeline() as p:
            c.execute("insert into pg3t_pabort values (%s)", ["one"])
            with pytest.raises(errors.DivisionByZero) as info:
                c.execute("select 1/%s::int", [0]).fetchone()
            assert info.value.sqlstate == "22012"
            # Statements sent after the error and before the next Sync are skipped by the server.
            with pytest.raises(errors.PipelineAborted):
                c.execute("select %s::text", ["aborted"]).fetchone()
            p.sync()  # the Sync ends the aborted block
            c.execute("insert into pg3t_pabort values (%s)", ["four"])
            rows = c.execute("select v from pg3t_pabort order by v").fetchall()
        # The sync block with the error ran as one implicit transaction: "one" was rolled back too.
        assert rows == [("four",)]
        assert c.execute("select 'recovered'").fetchone() == ("recovered",)


def test_server_side_prepare(proxy: Any) -> None:
    app = "pg3t_prepare"
    with connect(proxy, app=app) as c:
        for i in range(20):
            assert c.execute("select %s::int * 3, %s::text", [i, "x"], prepare=True).fetchone() == (i * 3, "x")
        names = c.execute("select name from pg_prepared_statements where statement like 'select $1::int * 3%'"
                          ).fetchall()
        assert len(names) == 1 and names[0][0].startswith("_pg3_")
        events = wait_until(lambda: [e for e in session_events(proxy, app) if e["sql"].startswith("select $1::int")])
        assert len(events) == 20
        assert {e.get("statement_name") for e in events} == {names[0][0]}
        assert events[-1]["params"] is not None and len(events[-1]["params"]) == 2


def test_binary_results(conn: psycopg.Connection) -> None:
    with conn.cursor(binary=True) as cur:
        cur.execute("select 42::int, 3.25::numeric, 'txt'::text, '\\x00ff'::bytea, date '2024-02-29', "
                    "array[1, null, 3]::int[], null::int, '{\"a\": 1}'::jsonb")
        assert cur.pgresult is not None
        assert [cur.pgresult.fformat(i) for i in range(cur.pgresult.nfields)] == [1] * 8
        assert cur.fetchone() == (42, Decimal("3.25"), "txt", b"\x00\xff", date(2024, 2, 29), [1, None, 3],
                                  None, {"a": 1})
        cur.execute("select g, g::text from generate_series(1, 3000) g")
        rows = cur.fetchall()
        assert len(rows) == 3000 and rows[-1] == (3000, "3000")


def test_copy_text_in_and_out(conn: psycopg.Connection) -> None:
    conn.execute("create temp table pg3t_copy(id int, name text, d date)")
    rows = [(i, f"name\t{i}\\ \"é\"", date(2024, 1, 1 + i % 28)) for i in range(3000)]
    rows.append((-1, None, None))
    with conn.cursor() as cur:
        with cur.copy("copy pg3t_copy (id, name, d) from stdin") as copy:
            for row in rows:
                copy.write_row(row)
        assert cur.rowcount == 3001
        with cur.copy("copy (select id, name, d from pg3t_copy order by id) to stdout") as copy:
            got = list(copy.rows())
        assert got[0] == ("-1", None, None)  # text COPY without set_types: strings
        assert got[1:] == [(str(i), n, d.isoformat()) for i, n, d in rows[:-1]]
        with cur.copy("copy (select id from pg3t_copy where id < 3) to stdout with (format csv)") as copy:
            raw = b"".join(bytes(chunk) for chunk in copy)
        assert sorted(raw.split()) == [b"-1", b"0", b"1", b"2"]


def test_copy_binary_in_and_out(conn: psycopg.Connection) -> None:
    conn.execute("create temp table pg3t_bcopy(id bigint, amount numeric, data bytea, tags text[])")
    rows = [(i, Decimal(i) / 8, bytes([i % 256]) * (i % 50), [f"t{i}", None]) for i in range(2000)]
    with conn.cursor() as cur:
        with cur.copy("copy pg3t_bcopy from stdin (format binary)") as copy:
            copy.set_types(["int8", "numeric", "bytea", "text[]"])
            for row in rows:
                copy.write_row(row)
        assert cur.rowcount == 2000
        with cur.copy("copy (select * from pg3t_bcopy order by id) to stdout (format binary)") as copy:
            copy.set_types(["int8", "numeric", "bytea", "text[]"])
            got = list(copy.rows())
        assert got == rows


def test_notifies_generator(proxy: Any) -> None:
    with connect(proxy, user="agent_reader", autocommit=True) as listener, connect(proxy, autocommit=True) as sender:
        listener.execute("listen pg3t_chan")
        sender.execute("notify pg3t_chan, 'hello'")
        sender.execute("select pg_notify('pg3t_chan', %s)", ["world"])
        got = list(listener.notifies(timeout=5, stop_after=2))
        assert [(n.channel, n.payload, n.pid) for n in got] == [
            ("pg3t_chan", "hello", sender.info.backend_pid), ("pg3t_chan", "world", sender.info.backend_pid)]
        assert sender.info.backend_pid == sender.execute("select pg_backend_pid()").fetchone()[0]  # type: ignore[index]
        # Nothing more: the generator gives up at its timeout (a hang is caught by the test timeout).
        assert list(listener.notifies(timeout=0.3)) == []


# Only cancel_safe(): the legacy conn.cancel() calls libpq's blocking PQcancel() without releasing the GIL,
# which deadlocks with the in-process proxy thread of the test harness (psql's Ctrl-C covers PQcancel).
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
def test_cancel_from_another_thread(proxy: Any, tls: bool) -> None:
    with psycopg.connect(proxy.dsn(tls=tls), connect_timeout=10) as c:
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                c.execute("select pg_sleep(10)")
                outcome["result"] = "finished"
            except psycopg.Error as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.3)
        c.cancel_safe(timeout=5)
        worker.join(8)  # well before the 10 s sleep would end by itself
        assert not worker.is_alive(), "the statement still runs: the cancel did not reach the upstream"
        assert isinstance(outcome.get("error"), errors.QueryCanceled), outcome
        assert outcome["error"].sqlstate == "57014"
        c.rollback()
        assert c.execute("select 'alive'").fetchone() == ("alive",)


def test_autocommit_and_transactions(proxy: Any) -> None:
    with connect(proxy) as c:
        c.execute("create temp table pg3t_tx(v int) on commit preserve rows")
        c.commit()
        c.execute("insert into pg3t_tx values (1)")
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        c.rollback()
        assert c.execute("select count(*) from pg3t_tx").fetchone() == (0,)
        c.rollback()

        c.autocommit = True
        c.execute("insert into pg3t_tx values (2)")
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with pytest.raises(ZeroDivisionError), c.transaction():
            c.execute("insert into pg3t_tx values (3)")
            raise ZeroDivisionError
        with c.transaction():
            c.execute("insert into pg3t_tx values (4)")
            with pytest.raises(errors.UniqueViolation), c.transaction():  # savepoint
                c.execute("create temp table pg3t_tx_u(k int primary key)")
                c.execute("insert into pg3t_tx_u values (1), (1)")
        # 1 rolled back, 2 autocommitted, 3 rolled back, 4 committed (its savepoint's failure undone).
        assert c.execute("select array_agg(v order by v) from pg3t_tx").fetchone() == ([2, 4],)
        assert c.execute("select to_regclass('pg_temp.pg3t_tx_u') is null").fetchone() == (True,)


def test_failed_transaction_state(conn: psycopg.Connection) -> None:
    conn.execute("create temp table pg3t_ftx(v int)")
    with pytest.raises(errors.UndefinedFunction):
        conn.execute("select pg3t_no_such_function()")
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
    with pytest.raises(errors.InFailedSqlTransaction) as info:
        conn.execute("select 1")
    assert info.value.sqlstate == "25P02"
    conn.rollback()
    assert conn.execute("select to_regclass('pg_temp.pg3t_ftx') is null").fetchone() == (True,)


def test_named_cursor_with_itersize(proxy: Any) -> None:
    app = "pg3t_named"
    with connect(proxy, app=app) as c, c.cursor(name="pg3t_cur") as cur:
        cur.itersize = 100
        cur.execute("select g, md5(g::text) from generate_series(1, %s) g", [1050])
        total = count = 0
        for g, digest in cur:
            total += g
            count += 1
            assert len(digest) == 32
        assert (count, total) == (1050, 1050 * 1051 // 2)
        c.commit()
    fetches = wait_until(lambda: [e for e in session_events(proxy, app)
                                  if e["sql"].upper().startswith("FETCH FORWARD 100")])
    assert len(fetches) >= 11
    assert sum(e["rows"] or 0 for e in fetches) == 1050


def test_protocol_3_2_request_is_negotiated_down(proxy: Any) -> None:
    # libpq 18 can ask for protocol 3.2 (longer cancel keys); the proxy answers NegotiateProtocolVersion
    # and the session runs on 3.0, cancellation included.
    if psycopg.pq.version() < 180000:
        pytest.skip("libpq < 18 cannot request protocol 3.2")
    with psycopg.connect(proxy.dsn(max_protocol_version="3.2"), connect_timeout=10) as c:
        assert c.info.full_protocol_version == 30000
        assert c.execute("select %s::text", ["negotiated"]).fetchone() == ("negotiated",)
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                c.execute("select pg_sleep(10)")
            except psycopg.Error as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.3)
        c.cancel_safe(timeout=5)
        worker.join(5)
        assert isinstance(outcome.get("error"), errors.QueryCanceled), outcome


def test_large_values_both_ways(conn: psycopg.Connection) -> None:
    # 40 MB of results (flow control between a fast upstream and the client) and a 5 MB parameter.
    with conn.cursor() as cur:
        cur.execute("select g, repeat(chr(65 + g % 26), 1000000) from generate_series(1, 40) g")
        total = 0
        for g, value in cur:
            assert len(value) == 1_000_000 and value[0] == chr(65 + g % 26)
            total += 1
        assert total == 40
    blob = bytes(range(256)) * (5 * 4096)
    assert conn.execute("select md5(b), length(b) from (select %s::bytea as b) s", [blob]).fetchone() == \
        (hashlib.md5(blob).hexdigest(), len(blob))

"""asyncpg through the proxy: binary codecs, prepared statements, COPY, LISTEN/NOTIFY, cancellation,
transactions, executemany and cursors, over TLS and the plaintext loopback listener.

Tables: temp tables named ``apgt_*``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

pytestmark = pytest.mark.timeout(60)


async def connect(proxy: Any, *, user: str = "agent_reader", tls: bool = True, **kwargs: Any) -> asyncpg.Connection:
    return await proxy.asyncpg_connect(user=user, token=proxy.token(sub="apgt", roles=(user,)), tls=tls, **kwargs)


@pytest.fixture
async def conn(proxy: Any) -> AsyncIterator[asyncpg.Connection]:
    c = await connect(proxy, user="agent_writer")
    try:
        yield c
    finally:
        await asyncio.wait_for(c.close(), 5)


async def test_tls_and_plaintext_listeners(proxy: Any) -> None:
    tls = await connect(proxy, server_settings={"application_name": "apgt_tls"})
    plain = await connect(proxy, tls=False, server_settings={"application_name": "apgt_plain"})
    try:
        starts = {e["application_name"]: e for e in proxy.events("session_start")}
        assert starts["apgt_tls"]["tls"] is True
        assert starts["apgt_plain"]["tls"] is False
        assert await tls.fetchval("select current_user") == "agent_reader"
        assert await tls.fetchval("select current_setting('application_name')") == "apgt_tls"
        assert await plain.fetchval("select $1::int + 1", 41) == 42
        assert tls.get_server_pid() != plain.get_server_pid()
        assert await tls.fetchval("select pg_backend_pid()") == tls.get_server_pid()
    finally:
        await tls.close()
        await plain.close()


VALUES: list[tuple[str, Any]] = [
    ("int4", 2_147_483_647),
    ("int8", -9_223_372_036_854_775_808),
    ("int2", -32768),
    ("numeric", Decimal("12345678901234567890.123456789012")),
    ("numeric", Decimal("NaN")),
    ("float8", 1.0e308),
    ("float4", 1.5),
    ("bool", True),
    ("text", "héllo wörld ✓"),
    ("bytea", bytes(range(256)) * 4),
    ("uuid", uuid.UUID("12345678-1234-5678-1234-567812345678")),
    ("timestamptz", dt.datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=dt.UTC)),
    ("timestamp", dt.datetime(1999, 12, 31, 23, 59, 59)),
    ("date", dt.date(1970, 1, 1)),
    ("interval", dt.timedelta(days=400, seconds=3661, microseconds=7)),
    ("jsonb", json.dumps({"a": [1, 2, {"b": None}], "c": "d"})),
    ("int4[]", [1, None, 3]),
    ("text[]", ["a", None, "c,d", "e\"f"]),
    ("int8[]", [[1, 2], [3, 4]]),
    ("float8[]", []),
]


async def test_binary_codecs_round_trip(conn: asyncpg.Connection) -> None:
    sql = "select " + ", ".join(f"${i + 1}::{t}" for i, (t, _) in enumerate(VALUES))
    row = await conn.fetchrow(sql, *(v for _, v in VALUES))
    assert row is not None
    for (typ, sent), got in zip(VALUES, row, strict=True):
        if typ == "numeric" and sent.is_nan():
            assert got.is_nan()
        elif typ == "jsonb":
            assert json.loads(got) == json.loads(sent)
        else:
            assert got == sent, typ
    nulls = await conn.fetchrow(sql, *([None] * len(VALUES)))
    assert nulls is not None and list(nulls) == [None] * len(VALUES)


async def test_binary_codecs_through_a_table(conn: asyncpg.Connection) -> None:
    await conn.execute("create temp table apgt_types(i int, n numeric, ts timestamptz, b bytea, a text[], j jsonb)")
    rows = [(i, Decimal(i) / 7, dt.datetime(2020, 1, 1, tzinfo=dt.UTC) + dt.timedelta(hours=i),
             bytes([i % 256]) * i, [str(i), None], json.dumps({"i": i})) for i in range(50)]
    rows.append((None, None, None, None, None, None))
    await conn.executemany("insert into apgt_types values ($1, $2, $3, $4, $5, $6)", rows)
    got = await conn.fetch("select * from apgt_types order by i nulls last")
    normalised = [(*r[:5], r[5] and json.loads(r[5])) for r in got]
    assert normalised == [(*r[:5], r[5] and json.loads(r[5])) for r in rows]


async def test_prepared_statement_reused(proxy: Any, conn: asyncpg.Connection) -> None:
    stmt = await conn.prepare("select $1::int * 2, $2::text || '!'")
    results = [await stmt.fetchrow(i, str(i)) for i in range(300)]
    assert [tuple(r) for r in results] == [(i * 2, f"{i}!") for i in range(300)]
    # asyncpg's statement cache also re-uses a named server-side statement for repeated fetches.
    for i in range(100):
        assert await conn.fetchval("select $1::bigint + 1", i) == i + 1
    prepared = await conn.fetchval("select count(*) from pg_prepared_statements "
                                   "where statement in ('select $1::int * 2, $2::text || ''!''', "
                                   "'select $1::bigint + 1')")
    assert prepared == 2


async def test_copy_records_to_table_and_back(conn: asyncpg.Connection) -> None:
    await conn.execute("create temp table apgt_copy(id int, name text, amount numeric, at timestamptz)")
    records = [(i, f"name {i}\t\"q\"", Decimal(i) / 4, dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(i))
               for i in range(5000)]
    result = await conn.copy_records_to_table("apgt_copy", records=records)
    assert result == "COPY 5000"
    assert await conn.fetchval("select sum(amount) from apgt_copy") == sum(r[2] for r in records)

    out = io.BytesIO()
    result = await conn.copy_from_query("select id, name from apgt_copy where id < $1 order by id", 3,
                                        output=out, format="csv")
    assert result == "COPY 3"
    assert out.getvalue().decode().splitlines() == [f'{i},"name {i}\t""q"""' for i in range(3)]

    src = io.BytesIO(b"10001\tfrom text\t1.5\t2024-05-01 00:00:00+00\n10002\t\\N\t\\N\t\\N\n")
    result = await conn.copy_to_table("apgt_copy", source=src)
    assert result == "COPY 2"
    assert await conn.fetch("select id, name, amount from apgt_copy where id > 10000 order by id") == \
        [(10001, "from text", Decimal("1.5")), (10002, None, None)]

    # A large COPY out (several network reads) is relayed intact.
    big = io.BytesIO()
    result = await conn.copy_from_table("apgt_copy", output=big, columns=["id"])
    assert result == "COPY 5002"
    assert sorted(int(x) for x in big.getvalue().split()) == [*range(5000), 10001, 10002]


async def test_notify_reaches_listener(proxy: Any) -> None:
    listener = await connect(proxy)
    notifier = await connect(proxy, user="agent_writer")
    try:
        received: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()
        await listener.add_listener("apgt_chan", lambda _c, pid, channel, payload:
                                    received.put_nowait((pid, channel, payload)))
        await notifier.execute("notify apgt_chan, 'first'")
        await notifier.execute("select pg_notify('apgt_chan', $1)", "second ✓")
        first = await asyncio.wait_for(received.get(), 5)
        second = await asyncio.wait_for(received.get(), 5)
        pid = notifier.get_server_pid()
        assert pid == await notifier.fetchval("select pg_backend_pid()")
        assert first == (pid, "apgt_chan", "first")
        assert second == (pid, "apgt_chan", "second ✓")
        # The listener stays usable while listening.
        assert await listener.fetchval("select 7") == 7
    finally:
        await listener.close()
        await notifier.close()


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
async def test_cancel_by_timeout(proxy: Any, tls: bool) -> None:
    app = f"apgt_cancel_{tls}"
    c = await connect(proxy, tls=tls, server_settings={"application_name": app})
    try:
        with pytest.raises(asyncio.TimeoutError):
            await c.fetch("select pg_sleep(10)", timeout=0.5)
        # If the CancelRequest had not reached the upstream, this would wait for the sleep to end.
        try:
            assert await c.fetchval("select 'usable'", timeout=7) == "usable"
        except TimeoutError:
            raise AssertionError("the connection stayed busy: the cancel did not reach the upstream") from None
        # The upstream really cancelled the statement (57014), as the proxy's audit shows.
        session = next(e["session"] for e in proxy.events("session_start") if e["application_name"] == app)
        sleeps = [e for e in proxy.events("statement") if e["session"] == session and "pg_sleep" in e["sql"]]
        assert [e.get("error", {}).get("sqlstate") for e in sleeps] == ["57014"]
    finally:
        await c.close()


async def test_transactions(conn: asyncpg.Connection) -> None:
    await conn.execute("create temp table apgt_tx(v int)")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with conn.transaction():
            await conn.execute("insert into apgt_tx values (1)")
            assert await conn.fetchval("select count(*) from apgt_tx") == 1
            raise Boom()
    assert await conn.fetchval("select count(*) from apgt_tx") == 0

    async with conn.transaction():
        await conn.execute("insert into apgt_tx values (2)")
        try:
            async with conn.transaction():  # a savepoint
                await conn.execute("insert into apgt_tx values (3)")
                await conn.execute("select 1/0")
        except asyncpg.DivisionByZeroError as exc:
            assert exc.sqlstate == "22012"
    assert await conn.fetch("select v from apgt_tx") == [(2,)]
    assert not conn.is_in_transaction()


async def test_executemany(conn: asyncpg.Connection) -> None:
    await conn.execute("create temp table apgt_many(k int primary key, v text)")
    await conn.executemany("insert into apgt_many values ($1, $2)", [(i, f"v{i}") for i in range(1000)])
    assert await conn.fetchval("select count(*) from apgt_many") == 1000
    with pytest.raises(asyncpg.UniqueViolationError) as info:
        await conn.executemany("insert into apgt_many values ($1, $2)", [(5000, "new"), (7, "dup")])
    assert info.value.sqlstate == "23505"
    # executemany runs in one implicit transaction: nothing of the failed batch stays.
    assert await conn.fetchval("select count(*) from apgt_many") == 1000


async def test_cursor_with_prefetch(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        total = 0
        count = 0
        async for record in conn.cursor("select g, repeat('x', g % 10) from generate_series(1, $1) g",
                                        2500, prefetch=100):
            total += record[0]
            count += 1
        assert (count, total) == (2500, 2500 * 2501 // 2)

        cur = await conn.cursor("select g from generate_series(1, 100) g")
        assert [r[0] for r in await cur.fetch(5)] == [1, 2, 3, 4, 5]
        await cur.forward(10)
        assert await cur.fetchrow() == (16,)

"""Masking through real drivers: binary and extended protocol (asyncpg, psycopg binary cursors), COPY via
asyncpg, and the utility contract -- unmasked queries return exactly what a direct connection returns,
the exempt identity sees raw values, masked values keep their types and documented shapes.

Tables: the ``maskt`` schema of conftest.py (read only; writes run in rolled-back transactions).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import io
import json
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import asyncpg
import psycopg
import pytest
from harness import ProxyUnderTest
from masking_support import CUSTOMERS, leaks_in_values
from rawwire import wait_for

from pgproxy.devdb import Database

pytestmark = pytest.mark.timeout(60)

C = "maskt.customers"
R1 = CUSTOMERS[0]
assert R1.email and R1.salary is not None and R1.birth_date is not None and R1.ssn and R1.card and R1.full_name


async def connect(proxy: ProxyUnderTest, token: str, user: str = "agent_writer") -> asyncpg.Connection:
    return await proxy.asyncpg_connect(user=user, token=token, tls=False)


async def connect_direct(db: Database, password: str, user: str = "agent_writer") -> asyncpg.Connection:
    return await asyncpg.connect(host=db.host, port=db.port, user=user, password=password, database=db.database,
                                 timeout=10, command_timeout=15)


# --------------------------------------------------------------------------------------------------
# Binary / extended protocol probes (asyncpg): each returns everything the driver handed back
# --------------------------------------------------------------------------------------------------

Probe = Callable[[asyncpg.Connection], Awaitable[Any]]


async def _copy_query(conn: asyncpg.Connection, fmt: str) -> bytes:
    out = io.BytesIO()
    await conn.copy_from_query(f"SELECT * FROM {C}", output=out, format=fmt)
    return out.getvalue()


async def _copy_table(conn: asyncpg.Connection, fmt: str) -> bytes:
    out = io.BytesIO()
    await conn.copy_from_table("customers", schema_name="maskt", output=out, format=fmt)
    return out.getvalue()


async def _prepared(conn: asyncpg.Connection) -> Any:
    stmt = await conn.prepare(f"SELECT * FROM {C} WHERE id = ANY($1::int[])")
    return [await stmt.fetch([1, 2]), await stmt.fetchrow([1])]


async def _cursor(conn: asyncpg.Connection) -> Any:
    async with conn.transaction():
        return [r async for r in conn.cursor(f"SELECT email, ssn, salary, birth_date FROM {C}", prefetch=1)]


async def _record_type(conn: asyncpg.Connection) -> Any:
    return await conn.fetch(f"SELECT c FROM {C} c")


PROBES: dict[str, Probe] = {
    "fetch_all": lambda c: c.fetch(f"SELECT * FROM {C}"),
    "fetch_param": lambda c: c.fetch(f"SELECT email, ssn, card, full_name FROM {C} WHERE id = $1", 1),
    "fetchval_agg": lambda c: c.fetchval(f"SELECT string_agg(email || ssn || card, ',') FROM {C}"),
    "prepared": _prepared,
    "cursor": _cursor,
    "record_type": _record_type,
    "json_row": lambda c: c.fetch(f"SELECT to_jsonb(c) FROM {C} c"),
    "param_in_expression": lambda c: c.fetch(f"SELECT $1::text || email FROM {C}", "x"),
    "copy_from_query_binary": lambda c: _copy_query(c, "binary"),
    "copy_from_query_csv": lambda c: _copy_query(c, "csv"),
    "copy_from_table_text": lambda c: _copy_table(c, "text"),
    "copy_from_table_binary": lambda c: _copy_table(c, "binary"),
}


async def _run_probe(proxy: ProxyUnderTest, token: str, probe: Probe) -> list[Any]:
    conn = await connect(proxy, token)
    notices: list[Any] = []
    conn.add_log_listener(lambda _c, msg: notices.append(msg.as_dict()))
    try:
        result = await probe(conn)
    except asyncpg.PostgresError as exc:
        result = exc.as_dict()
    finally:
        await conn.close()
    return [result, notices]


@pytest.mark.parametrize("name", list(PROBES))
async def test_asyncpg_binary_and_extended(name: str, masked: ProxyUnderTest, exempt: ProxyUnderTest,
                                           masked_token: str, exempt_token: str) -> None:
    control = await _run_probe(exempt, exempt_token, PROBES[name])
    assert leaks_in_values(control, "control"), f"control of {name} does not reach raw data: {control!r:.300}"
    before = len(masked.audit.events)
    got = await _run_probe(masked, masked_token, PROBES[name])
    leaks = leaks_in_values(got, f"asyncpg {name}")
    assert not leaks, "\n".join(str(x) for x in leaks)
    wait_for(lambda: len(masked.events("session_end")) >= len(masked.events("session_start")), 5)
    events = json.dumps(masked.events()[before:], default=str)
    assert not leaks_in_values([events], "audit"), "audit events hold raw values"


async def test_asyncpg_param_oracle(masked: ProxyUnderTest, exempt: ProxyUnderTest, masked_token: str,
                                   exempt_token: str) -> None:
    """A bound parameter compared with a masked column sees the masked value."""
    sql = f"SELECT count(*) FROM {C} WHERE email = $1 OR ssn = $2"
    raw = await _run_probe(exempt, exempt_token, lambda c: c.fetchval(sql, R1.email, R1.ssn))
    assert raw[0] == 1
    got = await _run_probe(masked, masked_token, lambda c: c.fetchval(sql, R1.email, R1.ssn))
    assert got[0] == 0


@pytest.mark.parametrize("named", [False, True], ids=["client_cursor", "server_cursor"])
def test_psycopg_binary_cursor(named: bool, masked: ProxyUnderTest, exempt: ProxyUnderTest, masked_token: str,
                               exempt_token: str) -> None:
    def fetch(proxy: ProxyUnderTest, token: str) -> list[Any]:
        with psycopg.connect(proxy.dsn(user="agent_writer", token=token, tls=False)) as conn:
            cur = conn.cursor("mcur", binary=True) if named else conn.cursor(binary=True)
            cur.execute(f"SELECT * FROM {C} ORDER BY id")
            return [[d.name for d in cur.description or []], cur.fetchall()]

    assert leaks_in_values(fetch(exempt, exempt_token), "control")
    leaks = leaks_in_values(fetch(masked, masked_token), "psycopg binary")
    assert not leaks, "\n".join(str(x) for x in leaks)


# --------------------------------------------------------------------------------------------------
# Utility: unmasked queries are untouched; masked values keep types and shapes
# --------------------------------------------------------------------------------------------------

UNMASKED_QUERIES = [
    f"SELECT count(*) FROM {C}",
    f"SELECT id, region, tier FROM {C} ORDER BY id",
    f"SELECT region, count(*), sum(tier), max(id) FROM {C} GROUP BY region ORDER BY region",
    f"SELECT id FROM {C} WHERE tier > 0 AND region = 'north' ORDER BY id",
    f"SELECT c.id, c.region, p.id, p.amount FROM {C} c JOIN maskt.payments p ON p.customer_id = c.id ORDER BY 3",
    "SELECT e.kind, count(*), sum(e.amount), avg(e.amount) FROM maskt.events e GROUP BY e.kind ORDER BY 1",
    f"SELECT e.id, e.amount, c.region FROM maskt.events e JOIN {C} c ON c.id = e.customer_id "
    "ORDER BY e.amount DESC, e.id LIMIT 500",
    "SELECT * FROM maskt.events WHERE amount BETWEEN 100 AND 300 ORDER BY id",
    f"WITH r AS (SELECT region, tier FROM {C}) SELECT region, array_agg(tier ORDER BY tier) FROM r GROUP BY 1 "
    "ORDER BY 1",
    f"SELECT count(email), count(ssn), count(*) FROM {C}",
    "SELECT id, amount FROM maskt.payments ORDER BY id",
    "SELECT relname, relkind FROM pg_class WHERE relnamespace = 'maskt'::regnamespace ORDER BY 1",
    "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = 'maskt' "
    "AND table_name = 'customers' ORDER BY ordinal_position",
    "SELECT 1 AS one, 'two'::text AS two, 3.5::numeric AS three, DATE '2024-02-29' AS four",
]


@pytest.mark.parametrize("sql", UNMASKED_QUERIES)
async def test_unmasked_queries_match_direct(sql: str, masked: ProxyUnderTest, masked_token: str,
                                             masking_schema: Database, upstream_roles: str) -> None:
    direct = await connect_direct(masking_schema, upstream_roles)
    through = await connect(masked, masked_token)
    try:
        expected = [tuple(r) for r in await direct.fetch(sql)]
        got = [tuple(r) for r in await through.fetch(sql)]
    finally:
        await asyncio.gather(direct.close(), through.close())
    assert got == expected


async def test_writes_of_unmasked_columns_match_direct(masked: ProxyUnderTest, masked_token: str,
                                                       masking_schema: Database, upstream_roles: str) -> None:
    statements = [
        (f"INSERT INTO {C} (id, region, tier) VALUES (500, 'west', 3) RETURNING id, region, tier", ()),
        (f"UPDATE {C} SET tier = tier + 1 WHERE id = $1 RETURNING id, tier", (500,)),
        (f"UPDATE {C} SET region = 'east' WHERE region = 'west' RETURNING id, region", ()),
        (f"SELECT id, region, tier FROM {C} ORDER BY id", ()),
        (f"DELETE FROM {C} WHERE id = 500 RETURNING id", ()),
    ]

    async def run(conn: asyncpg.Connection) -> list[list[tuple[Any, ...]]]:
        out = []
        tr = conn.transaction()
        await tr.start()
        try:
            for sql, args in statements:
                out.append([tuple(r) for r in await conn.fetch(sql, *args)])
        finally:
            await tr.rollback()
        return out

    direct = await connect_direct(masking_schema, upstream_roles)
    through = await connect(masked, masked_token)
    try:
        assert await run(through) == await run(direct)
    finally:
        await asyncio.gather(direct.close(), through.close())


async def test_exempt_identity_sees_raw_values(exempt: ProxyUnderTest, exempt_token: str, masking_schema: Database,
                                               upstream_roles: str) -> None:
    sql = f"SELECT * FROM {C} ORDER BY id"
    direct = await connect_direct(masking_schema, upstream_roles)
    through = await connect(exempt, exempt_token)
    try:
        assert [tuple(r) for r in await through.fetch(sql)] == [tuple(r) for r in await direct.fetch(sql)]
    finally:
        await asyncio.gather(direct.close(), through.close())


async def test_masked_types_and_shapes(masked: ProxyUnderTest, masked_token: str, masking_schema: Database,
                                       upstream_roles: str, masking_key: bytes) -> None:
    sql = f"SELECT * FROM {C} ORDER BY id"
    direct = await connect_direct(masking_schema, upstream_roles)
    through = await connect(masked, masked_token)
    try:
        raw_types = [a.type.name for a in (await direct.prepare(sql)).get_attributes()]
        masked_types = [a.type.name for a in (await through.prepare(sql)).get_attributes()]
        rows = await through.fetch(sql)
    finally:
        await asyncio.gather(direct.close(), through.close())
    assert masked_types == raw_types
    r, nulls = rows[0], rows[2]
    assert (r["id"], r["region"], r["tier"]) == (R1.id, R1.region, R1.tier)
    assert r["email"] == "****@" + R1.email.split("@")[1]
    assert r["ssn"] == "*" * (len(R1.ssn) - 4) + R1.ssn[-4:]
    assert r["card"] == "*" * (len(R1.card) - 4) + R1.card[-4:]
    assert isinstance(r["salary"], Decimal) and r["salary"] == Decimal(int(R1.salary) // 10000 * 10000)
    assert isinstance(r["birth_date"], dt.date) and r["birth_date"] == dt.date(R1.birth_date.year, 1, 1)
    assert r["full_name"] == hmac.new(masking_key, R1.full_name.encode(), hashlib.sha256).hexdigest()[:16]
    assert json.loads(r["profile"]) == {"masked": True}
    assert r["city"] == "Q..."
    assert r["phone"] is None
    assert all(nulls[k] is None for k in ("email", "ssn", "card", "salary", "birth_date", "full_name", "profile"))


async def test_keyed_hash_is_a_stable_join_key(masked: ProxyUnderTest, masked_token: str) -> None:
    """The same raw value gives the same pseudonym in every session and table, so joins on it still match."""
    first, second = await connect(masked, masked_token), await connect(masked, masked_token)
    try:
        one = await first.fetch(f"SELECT id, full_name FROM {C} ORDER BY id")
        two = await second.fetch(f"SELECT id, full_name FROM {C} ORDER BY id")
        joined = await second.fetch(f"SELECT c.id, p.id AS pid, p.payer_name = c.full_name AS same FROM {C} c "
                                    "JOIN maskt.payments p ON p.payer_name = c.full_name ORDER BY p.id")
    finally:
        await asyncio.gather(first.close(), second.close())
    assert [tuple(r) for r in one] == [tuple(r) for r in two]
    assert [(r["id"], r["pid"], r["same"]) for r in joined] == [(1, 10, True), (2, 11, True), (1, 12, True)]

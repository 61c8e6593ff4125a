"""estimate_impact on a real table, and the webhook posting to a real local aiohttp server."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web
from approval_helpers import make_request
from harness import FakeClock

from pgproxy.devdb import Database
from pgproxy.policy.approval_impact import estimate_impact, statement_kind
from pgproxy.policy.approval_webhook import WebhookNotifier, webhook_payload
from pgproxy.policy.stores.sqlite import SQLiteApprovalStore


async def test_estimate_impact_counts_and_rolls_back(database: Database) -> None:
    table = "impact_" + secrets.token_hex(4)
    conn = await asyncpg.connect(database.dsn())
    try:
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, kind text)")
        await conn.execute(f"INSERT INTO {table} SELECT g, CASE WHEN g % 4 = 0 THEN 'old' ELSE 'new' END "
                           "FROM generate_series(1, 100) g")
        impact = await estimate_impact(database.dsn(), f"DELETE FROM {table} WHERE kind = $1", ["old"])
        assert "error" not in impact, impact
        assert impact["rows"] == 25 and impact["statement"] == "DELETE"
        assert impact["plan"][0]["Plan"]["Node Type"] == "ModifyTable"
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 100  # rolled back

        upd = await estimate_impact(database.dsn(), f"/* agent */ UPDATE {table} SET kind = 'x' WHERE id <= $1",
                                    ["10"])
        assert upd["rows"] == 10
        assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE kind = 'x'") == 0

        sel = await estimate_impact(database.dsn(), f"SELECT * FROM {table} WHERE id = $1", ["5"])
        assert "rows" not in sel and sel["plan"][0]["Plan"]["Node Type"] in ("Index Scan", "Bitmap Heap Scan",
                                                                             "Seq Scan")
        quoted = await estimate_impact(database.dsn(), f"DELETE FROM {table} WHERE kind = $1", ["o'ld"])
        assert quoted["rows"] == 0

        bad = await estimate_impact(database.dsn(), "DELETE FROM no_such_table_xyz", [])
        assert "error" in bad and "no_such_table_xyz" in bad["error"]
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


async def test_estimate_impact_times_out(database: Database) -> None:
    try:  # without its 300 ms timeout the estimate sleeps 10 s for every row of pg_class
        async with asyncio.timeout(30):
            impact = await estimate_impact(database.dsn(), "DELETE FROM pg_class WHERE pg_sleep(10) IS NULL", [],
                                           timeout_ms=300)
    except TimeoutError:
        raise AssertionError("the impact estimate ignored its timeout") from None
    assert "error" in impact, impact


async def test_estimate_impact_unreachable() -> None:
    impact = await estimate_impact("postgresql://x@127.0.0.1:1/db", "DELETE FROM t", [])
    assert impact["error"].startswith("cannot connect")


def test_statement_kind() -> None:
    assert statement_kind("  -- hi\n /* x */ delete from t") == "DELETE"
    assert statement_kind("WITH x AS (SELECT 1) DELETE FROM t") == "WITH"
    assert statement_kind("") == ""


async def test_webhook_posts_new_requests(tmp_path: Path, clock: FakeClock) -> None:
    received: list[dict[str, Any]] = []
    got = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        received.append(json.loads(await request.read()))
        got.set()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    store = SQLiteApprovalStore(tmp_path / "a.db", notify=WebhookNotifier(f"http://127.0.0.1:{port}/hook"),
                                clock=clock)
    try:
        req = await store.create(make_request(clock, sql="DELETE FROM accounts WHERE id = $1", params=["3"]))
        await asyncio.wait_for(got.wait(), 5)
        await store.create(make_request(clock, sql="DELETE FROM accounts WHERE id = $1", params=["3"]))  # dup
        await asyncio.sleep(0.2)
    finally:
        await store.close()
        await runner.cleanup()
    assert len(received) == 1  # duplicates are not re-posted
    payload = received[0]
    assert payload["id"] == req.id and payload["sql"] == "DELETE FROM accounts WHERE id = $1"
    assert payload["params"] == ["3"] and payload["requester"]["subject"] == "agent-1"
    text = payload["text"]
    for part in ("agent-1", "DELETE FROM accounts", "DELETE on t", req.id, f"pgproxy approvals approve {req.id}"):
        assert part in text, part


async def test_webhook_failure_never_blocks(tmp_path: Path, clock: FakeClock) -> None:
    posted, release = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:  # answers only once the test has seen create() return
        posted.set()
        await release.wait()
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    dead = SQLiteApprovalStore(tmp_path / "b.db", notify=WebhookNotifier("http://127.0.0.1:1/refused"), clock=clock)
    slow_store = SQLiteApprovalStore(tmp_path / "c.db", clock=clock,
                                     notify=WebhookNotifier(f"http://127.0.0.1:{port}/hook", timeout=30))
    try:
        try:
            async with asyncio.timeout(10):
                assert (await dead.create(make_request(clock))).status == "pending"
                assert (await slow_store.create(make_request(clock))).status == "pending"
        except TimeoutError:
            raise AssertionError("create() waited for the webhook's answer") from None
        await asyncio.wait_for(posted.wait(), 10)  # the POST was made, and still waits for its answer
        release.set()
        await slow_store.close()  # waits for the notification
        await dead.close()
    finally:
        release.set()
        await runner.cleanup()


def test_webhook_payload_is_json() -> None:
    payload = webhook_payload(make_request(None, params=[None, "x"]))
    assert json.loads(json.dumps(payload))["params"] == [None, "x"] and "text" in payload

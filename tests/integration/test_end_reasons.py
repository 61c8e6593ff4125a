"""Session end reasons and the upstream error counter mean what they say: a client that closes cleanly
ended its session, the upstream did not fail."""

from __future__ import annotations

import os
import time
from typing import Any

import psycopg
from harness import ProxyUnderTest


def _lost(proxy: ProxyUnderTest) -> float:
    assert proxy.running.server is not None
    value = proxy.running.server.metrics.registry.get_sample_value("pgproxy_upstream_errors_total", {"kind": "lost"})
    return value or 0.0


def _session_end(proxy: ProxyUnderTest, application_name: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ids = {e["session"] for e in proxy.events("session_start") if e.get("application_name") == application_name}
        ends = [e for e in proxy.events("session_end") if e["session"] in ids]
        if ids and ends:
            return ends[-1]
        time.sleep(0.02)
    raise AssertionError(f"no session_end for {application_name}")


async def test_asyncpg_clean_close(proxy: ProxyUnderTest) -> None:
    before = _lost(proxy)
    for i in range(5):
        conn = await proxy.asyncpg_connect(server_settings={"application_name": f"end-asyncpg-{i}"})
        assert await conn.fetchval("select 1") == 1
        await conn.close()
    for i in range(5):
        assert _session_end(proxy, f"end-asyncpg-{i}")["reason"] == "client terminated"
    assert _lost(proxy) == before


def test_psycopg_clean_close_and_drop(proxy: ProxyUnderTest) -> None:
    before = _lost(proxy)
    with psycopg.connect(proxy.dsn(application_name="end-psycopg")) as conn:
        conn.execute("select 1")
    assert _session_end(proxy, "end-psycopg")["reason"] == "client terminated"
    conn = psycopg.connect(proxy.dsn(application_name="end-dropped"))
    conn.execute("select 1")
    os.close(conn.pgconn.socket)  # the socket vanishes without a Terminate
    assert _session_end(proxy, "end-dropped")["reason"] == "client disconnected"
    assert _lost(proxy) == before


def test_upstream_termination_is_counted(proxy: ProxyUnderTest) -> None:
    before = _lost(proxy)
    conn = psycopg.connect(proxy.dsn(application_name="end-killed"), autocommit=True)
    pid = conn.execute("select pg_backend_pid()").fetchone()
    assert pid is not None
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as admin:
        admin.execute("select pg_terminate_backend(%s)", pid)
    end = _session_end(proxy, "end-killed")
    assert end["reason"] == "upstream ended the session with FATAL", end
    assert _lost(proxy) == before + 1
    conn.close()

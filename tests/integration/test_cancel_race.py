"""A forwarded cancel has been processed before the client's cancel socket closes (issue 20, cause 3).

libpq and asyncpg wait for the server to close the cancel connection and then send the next query;
a cancel that arrives late would hit that next query instead.
"""

from __future__ import annotations

import asyncio

import pytest
from harness import ProxyUnderTest


@pytest.mark.timeout(90)
async def test_timeout_cancel_never_hits_the_next_query(proxy: ProxyUnderTest) -> None:
    conn = await proxy.asyncpg_connect(user="agent_reader", token=proxy.token(sub="cancel-race"))
    try:
        for _ in range(30):
            with pytest.raises(asyncio.TimeoutError):
                await conn.execute("SELECT pg_sleep(1)", timeout=0.05)
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()

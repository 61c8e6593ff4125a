"""`pgproxy_masked_values_total` counts the values the statement rewrite masked, not only the wire
backstop's: each masked column of a rewritten statement's result, in each row sent, through real clients."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from harness import ProxyUnderTest

KEY_ENV = "PGPROXY_TEST_MCOUNT_KEY"


@pytest.fixture(scope="module")
def counted(proxy: ProxyUnderTest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyUnderTest]:
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as conn:
        conn.execute("drop schema if exists mcount cascade; create schema mcount;"
                     "create table mcount.people (id int, email text, ssn text, city text);"
                     "insert into mcount.people select g, 'p' || g || '@example.com', '123-45-' || g, 'x' "
                     "from generate_series(1, 250) g;"
                     "grant usage on schema mcount to agent_reader; grant select on mcount.people to agent_reader")
    rules: Path = tmp_path_factory.mktemp("mcount")
    (rules / "people.yaml").write_text("tables:\n  mcount.people:\n    columns:\n      email: email\n"
                                      "      ssn: {mask: partial, keep_last: 2}\n")
    os.environ.setdefault(KEY_ENV, secrets.token_hex(32))
    p = proxy.variant(lambda d: d.update(masking={"rules_dir": str(rules), "key_env": KEY_ENV}))
    yield p
    p.running.stop()


def _masked(p: ProxyUnderTest) -> float:
    assert p.running.server is not None
    return p.running.server.metrics.registry.get_sample_value("pgproxy_masked_values_total") or 0.0


def test_rewrite_masking_is_counted_psycopg(counted: ProxyUnderTest) -> None:
    with psycopg.connect(counted.dsn(tls=False), autocommit=True) as conn:
        before = _masked(counted)
        rows = conn.execute("select id, email, ssn, city from mcount.people").fetchall()
        assert len(rows) == 250 and rows[0][1] == "****@example.com"
        assert _masked(counted) - before == 250 * 2  # two masked columns, every row
        before = _masked(counted)
        conn.execute("select count(*) from mcount.people where email like %s", ["%example%"]).fetchone()
        conn.execute("select id, city from mcount.people where id < %s", [10]).fetchall()
        assert _masked(counted) == before  # no masked value was sent
        before = _masked(counted)
        conn.execute("select email from mcount.people where id <= %s", [7], prepare=True).fetchall()
        for _ in range(3):  # a prepared statement: later executions do not describe their rows again
            conn.execute("select email from mcount.people where id <= %s", [7], prepare=True).fetchall()
        assert _masked(counted) - before == 4 * 7


async def test_rewrite_masking_is_counted_asyncpg(counted: ProxyUnderTest) -> None:
    conn = await counted.asyncpg_connect(tls=False)
    try:
        before = _masked(counted)
        statement = await conn.prepare("select ssn from mcount.people where id <= $1")
        for limit in (5, 10):
            assert len(await statement.fetch(limit)) == limit
        assert _masked(counted) - before == 15
    finally:
        await conn.close()

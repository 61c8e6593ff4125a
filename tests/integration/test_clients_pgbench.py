"""pgbench through the proxy: initialisation (COPY, VACUUM, DDL) then short runs in every query mode.

The pgbench tables live in their own schema ``pgbt`` (chosen with PGOPTIONS=-c search_path=pgbt, which
also checks that startup options reach the upstream), so they never collide with other modules.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

pytestmark = pytest.mark.timeout(90)

SCHEMA = "pgbt"


def pgbench(proxy: Any, *args: str, timeout: float = 60, **conn: Any) -> subprocess.CompletedProcess[str]:
    env = proxy.env(user="agent_writer", **conn)
    env["PGOPTIONS"] = f"-c search_path={SCHEMA}"
    return subprocess.run(["pgbench", *args], env=env, capture_output=True, text=True, timeout=timeout)


def summary(out: subprocess.CompletedProcess[str]) -> tuple[int, int]:
    """(transactions processed, failed transactions) from pgbench's report."""
    assert out.returncode == 0, out.stderr + out.stdout
    processed = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    assert processed and failed, out.stdout
    return int(processed.group(1)), int(failed.group(1))


@pytest.fixture(scope="module")
def initialized(proxy: Any) -> Iterator[None]:
    with psycopg.connect(proxy.database.dsn(), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"drop schema if exists {SCHEMA} cascade")
        conn.execute(f"create schema {SCHEMA} authorization agent_writer")
    try:
        # Drop, create tables, client-side generate (COPY FROM STDIN), vacuum, primary keys.
        out = pgbench(proxy, "-i", "-s", "1", "-I", "dtgvp")
        assert out.returncode == 0, out.stderr
        assert "done in" in out.stderr
        with psycopg.connect(proxy.database.dsn(), connect_timeout=10) as conn:
            counts = conn.execute(f"select (select count(*) from {SCHEMA}.pgbench_accounts), "
                                  f"(select count(*) from {SCHEMA}.pgbench_branches), "
                                  f"(select relowner::regrole::text from pg_class "
                                  f"where oid = '{SCHEMA}.pgbench_accounts'::regclass)").fetchone()
        assert counts == (100_000, 1, "agent_writer")
        yield
    finally:
        with psycopg.connect(proxy.database.dsn(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"drop schema if exists {SCHEMA} cascade")


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_select_only(proxy: Any, initialized: None, mode: str) -> None:
    out = pgbench(proxy, "-n", "-S", "-T", "2", "-c", "4", "-M", mode)
    processed, failed = summary(out)
    assert processed > 0
    assert failed == 0
    assert f"query mode: {mode}" in out.stdout


def test_tpcb_like_writes(proxy: Any, initialized: None) -> None:
    # The default script: a 5-statement read-write transaction, in prepared mode over TLS.
    out = pgbench(proxy, "-n", "-T", "2", "-c", "2", "-M", "prepared")
    processed, failed = summary(out)
    assert processed > 0
    assert failed == 0
    with psycopg.connect(proxy.database.dsn(), connect_timeout=10) as conn:
        history = conn.execute(f"select count(*) from {SCHEMA}.pgbench_history").fetchone()
    assert history is not None and history[0] >= processed


def test_new_connection_per_transaction(proxy: Any, initialized: None) -> None:
    # -C: every transaction opens a new connection (TLS handshake, token check, upstream SCRAM login).
    before = len(proxy.events("session_start"))
    out = pgbench(proxy, "-n", "-S", "-C", "-T", "2", "-c", "2")
    processed, failed = summary(out)
    assert processed > 0
    assert failed == 0
    assert len(proxy.events("session_start")) - before >= processed


def test_plaintext_listener(proxy: Any, initialized: None) -> None:
    out = pgbench(proxy, "-n", "-S", "-t", "50", "-c", "2", "-M", "extended", tls=False)
    processed, failed = summary(out)
    assert (processed, failed) == (100, 0)

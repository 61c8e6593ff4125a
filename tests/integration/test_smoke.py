"""First contact: psql and psycopg through the proxy, over TLS and the plaintext loopback listener."""

from __future__ import annotations

import subprocess

import psycopg


def test_psql_through_tls_listener(proxy) -> None:
    out = subprocess.run(["psql", "-XAtc", "select current_user, pg_backend_pid() > 0"], env=proxy.env(),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "agent_reader|t"


def test_psycopg_plaintext_listener(proxy) -> None:
    with psycopg.connect(proxy.dsn(tls=False)) as conn:
        assert conn.execute("select %s::int + 1", [41]).fetchone() == (42,)

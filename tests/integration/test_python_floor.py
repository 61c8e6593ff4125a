"""bench/python_floor.py, the reference middle bench/pgbench_compare.py compares pgproxy with: the floor
does the work the benchmark says it does (one hash-chained record per statement, simple and extended
protocol, errors included) against the real server, so its ratios measure that work."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from pgproxy.devdb import Database

pytestmark = pytest.mark.timeout(60)

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "python_floor.py"


def _start(mode: str, database: Database, records: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), mode, "--port", "0",
                                 "--upstream-host", database.host, "--upstream-port", str(database.port),
                                 "--record-file", str(records)], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = re.search(r"listening on (\d+)", log.read_text())
        if found:
            return proc, int(found.group(1))
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"{mode} did not start: {log.read_text()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0


def _client_env(database: Database, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update({"PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": database.superuser,
                "PGPASSWORD": database.password, "PGDATABASE": database.database,
                "PGSSLMODE": "disable", "PGGSSENCMODE": "disable"})
    return env


def test_floor_records_each_statement_in_a_hash_chain(database: Database, tmp_path: Path) -> None:
    records = tmp_path / "records"
    proc, port = _start("floor", database, records, tmp_path / "floor.log")
    try:
        env = _client_env(database, port)
        simple = subprocess.run(["psql", "-XAtq", "-c", "SELECT 40 + 2", "-c", "SELECT * FROM no_such_table"],
                                env=env, capture_output=True, text=True, timeout=20)
        assert simple.stdout.strip() == "42"
        assert "no_such_table" in simple.stderr
        with psycopg.connect(host="127.0.0.1", port=port, user=database.superuser, password=database.password,
                             dbname=database.database, sslmode="disable", autocommit=True) as conn:
            assert conn.execute("SELECT %s::int + 1 AS n FROM generate_series(1, 3)", ("41",)).fetchall() == [(42,)] * 3
            assert conn.execute("SELECT %b::int - %t::int", (50, "8")).fetchone() == (42,)  # binary, then text
    finally:
        _stop(proc)

    lines = records.read_bytes().splitlines()
    prev = hashlib.sha256(b"floor").digest()
    recorded = []
    for line in lines:
        encoded, _, digest = line.rpartition(b" ")
        prev = hashlib.sha256(prev + encoded).digest()
        assert digest.decode() == prev.hex()  # every record chained to the one before
        recorded.append(json.loads(encoded))
    statements = [(r["sql"], r["params"], r.get("tag"), r.get("sqlstate"), r["rows"]) for r in recorded]
    assert ("SELECT 40 + 2", [], "SELECT 1", None, 1) in statements
    assert ("SELECT * FROM no_such_table", [], None, "42P01", 0) in statements
    assert ("SELECT $1::int + 1 AS n FROM generate_series(1, 3)", ["41"], "SELECT 3", None, 3) in statements
    mixed = next(r for r in recorded if r["sql"] == "SELECT $1::int - $2::int")
    assert re.fullmatch(r"\\x0*32", mixed["params"][0]) and mixed["params"][1] == "8"  # 50 in binary: hex
    assert all(r["row_digest"] for r in recorded if r["rows"])


def test_pump_relays_without_records(database: Database, tmp_path: Path) -> None:
    records = tmp_path / "records"
    proc, port = _start("pump", database, records, tmp_path / "pump.log")
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user=database.superuser, password=database.password,
                             dbname=database.database, sslmode="disable", autocommit=True) as conn:
            assert conn.execute("SELECT %s::text || 'b'", ("a",)).fetchone() == ("ab",)
    finally:
        _stop(proc)
    assert records.read_bytes() == b""

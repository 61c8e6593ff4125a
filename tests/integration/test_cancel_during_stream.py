"""A cancel is forwarded promptly while the proxy relays a large result stream to the same client.

The proxy relays every session on one event loop; a session streaming a big COPY TO STDOUT (every
CopyData counted for the signed audit log) must not make the cancel connection's steps wait behind
whole upstream chunks, or the stream can end before the cancel lands (psycopg cancels on COPY exit).
The proxy runs as its own process (`pgproxy serve`), as in production: the test's client does not share
its interpreter.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from pgproxy.audit.keys import generate_key
from pgproxy.audit.logformat import iter_records

ROWS = 1_000_000  # ~13 MB on the wire: more than the socket buffers on the way hold


@pytest.fixture
def proxy_process(proxy: Any, tmp_path: Path) -> Iterator[dict[str, str]]:
    """`pgproxy serve` with the signed audit log (result capture: a hook per CopyData); yields conninfo."""
    key = tmp_path / "audit.key"
    generate_key(key)
    data = copy.deepcopy(proxy.config_data)
    data["listeners"] = [data["listeners"][1]]  # plaintext loopback only
    data["audit"] = {"dir": str(tmp_path / "log"), "signing_key_file": str(key), "fsync": "always"}
    config = tmp_path / "pgproxy.yaml"
    config.write_text(yaml.safe_dump(data))
    process = subprocess.Popen([sys.executable, "-m", "pgproxy", "--log-level", "WARNING", "serve", "-c", str(config)],
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        assert "listening on ports" in line, line
        info = proxy.conninfo(tls=False)
        info["port"] = line.rsplit(" ", 1)[1].strip()
        info["log_dir"] = str(tmp_path / "log")
        yield info
    finally:
        process.kill()
        process.wait(10)


def _libpq(info: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in info.items() if k != "log_dir"}


def _cancel_during_copy(conninfo: dict[str, str], rows: int = ROWS) -> bool:
    """Whether ``cancel_safe`` cancelled a COPY TO STDOUT the client stopped reading after one row (meanwhile
    the server keeps sending, into the socket buffers on the way) before the server finished it."""
    with psycopg.connect(**_libpq(conninfo)) as conn:  # type: ignore[arg-type]
        with conn.cursor().copy(f"COPY (SELECT generate_series(1, {rows})) TO STDOUT") as cp:
            cp.read_row()
            conn.cancel_safe()
            try:
                while cp.read():
                    pass
            except psycopg.errors.QueryCanceled:
                return True
        return False


@pytest.mark.timeout(120)
def test_cancel_lands_while_copy_out_streams(proxy_process: dict[str, str]) -> None:
    """psycopg's test_copy_out_error_with_copy_not_finished, repeated: the cancel must reach the server
    while it still streams. With whole 256 KiB reads relayed per loop turn it took 140-290 ms and 4 of 30
    COPYs ran to the end (so this failed about 3 times in 4); timings are in bench/results/conformance.md."""
    outcomes = [_cancel_during_copy(proxy_process) for _ in range(9)]
    assert all(outcomes), outcomes


def test_large_results_relayed_in_slices_arrive_whole_and_in_order(proxy: Any, proxy_process: dict[str, str]) -> None:
    """Reads of up to 256 KiB are relayed in slices: the client gets every byte in order, the log counts them."""
    copy_sql = "COPY (SELECT g, repeat(md5(g::text), g % 50) FROM generate_series(1, 20000) g) TO STDOUT"
    select_sql = "SELECT g, repeat('x', g % 3000) FROM generate_series(1, 3000) g"

    def fetch(info: dict[str, str]) -> tuple[bytes, list[tuple[Any, ...]]]:
        with psycopg.connect(**info, autocommit=True) as conn:  # type: ignore[arg-type]
            with conn.cursor().copy(copy_sql) as cp:
                copied = b"".join(bytes(block) for block in cp)
            return copied, conn.execute(select_sql).fetchall()

    direct = fetch(psycopg.conninfo.conninfo_to_dict(proxy.database.dsn()))  # type: ignore[arg-type]
    through = fetch(_libpq(proxy_process))
    assert len(direct[0]) > 10 * 1024 * 1024 and len(direct[1]) == 3000
    assert through == direct
    events = [rec["event"] for _, rec in iter_records(Path(proxy_process["log_dir"]))]
    results = {e["sql"]: e["result"] for e in events
               if e.get("event") == "statement" and e["sql"] in (copy_sql, select_sql)}
    assert results[copy_sql]["copy_out_bytes"] == len(direct[0])
    assert results[select_sql]["rows_sent"] == 3000

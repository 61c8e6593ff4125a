"""The signed log under `pgproxy serve` as a real process: kill -9, and a log that cannot be written."""

from __future__ import annotations

import copy
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from click.testing import CliRunner

from pgproxy.audit.keys import generate_key
from pgproxy.audit.logformat import iter_records, list_segments
from pgproxy.cli import main


def _start(proxy: Any, tmp_path: Path, **audit: Any) -> tuple[subprocess.Popen[str], int, Path]:
    key = tmp_path / "k"
    pub, _ = generate_key(key)
    data = copy.deepcopy(proxy.config_data)
    data["listeners"] = [data["listeners"][1]]  # plaintext loopback only
    data["audit"] = {"dir": str(tmp_path / "log"), "signing_key_file": str(key), **audit}
    config = tmp_path / "pgproxy.yaml"
    config.write_text(yaml.safe_dump(data))
    process = subprocess.Popen([sys.executable, "-m", "pgproxy", "--log-level", "WARNING", "serve", "-c", str(config)],
                               stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    line = process.stderr.readline()
    assert "listening on ports" in line, line
    return process, int(line.rsplit(" ", 1)[1]), pub


@pytest.fixture
def cleanup() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def _conninfo(proxy: Any, port: int, **kwargs: Any) -> dict[str, str]:
    info = proxy.conninfo(tls=False, **kwargs)
    info["port"] = str(port)
    return info


def test_kill_9_leaves_a_log_that_verifies(proxy: Any, tmp_path: Path,
                                           cleanup: list[subprocess.Popen[str]]) -> None:
    process, port, pub = _start(proxy, tmp_path, fsync="always", checkpoint_every_records=7)
    cleanup.append(process)
    with psycopg.connect(**_conninfo(proxy, port), autocommit=True) as conn:  # type: ignore[arg-type]
        for i in range(25):
            conn.execute("select %s::int", (i,))
        process.send_signal(signal.SIGKILL)  # mid-session: no session_end, no final checkpoint
        process.wait(10)
    out = CliRunner().invoke(main, ["audit", "verify", str(tmp_path / "log"), "--pubkey", str(pub)])
    assert out.exit_code == 0, out.output
    records = list(iter_records(tmp_path / "log"))
    statements = [r for _, r in records if r["event"]["event"] == "statement"]
    assert len(statements) == 25  # fsync always: every statement that returned was durable
    assert "chain-checked only" in out.output or "OK" in out.output


def test_unwritable_log_fails_closed_and_recovers(proxy: Any, tmp_path: Path,
                                                  cleanup: list[subprocess.Popen[str]]) -> None:
    process, port, pub = _start(proxy, tmp_path, fsync="always")
    cleanup.append(process)
    with psycopg.connect(**_conninfo(proxy, port), autocommit=True) as conn:  # type: ignore[arg-type]
        conn.execute("select 1")
    segment = list_segments(tmp_path / "log")[-1][1]
    # The file-size limit makes every further write fail (EFBIG), as a full disk would.
    limit = segment.stat().st_size
    resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        with pytest.raises(psycopg.OperationalError, match="the audit log is unavailable"), \
                psycopg.connect(**_conninfo(proxy, port), autocommit=True) as conn:  # type: ignore[arg-type]
            conn.execute("select 2")
    finally:
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert process.poll() is None  # the proxy still runs
    deadline = time.monotonic() + 10
    while True:  # writable again: new sessions run and are recorded
        try:
            with psycopg.connect(**_conninfo(proxy, port), autocommit=True) as conn:  # type: ignore[arg-type]
                conn.execute("select 'after recovery'")
            break
        except psycopg.OperationalError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    process.wait(15)
    out = CliRunner().invoke(main, ["audit", "verify", str(tmp_path / "log"), "--pubkey", str(pub)])
    assert out.exit_code == 0, out.output
    sqls = [r["event"].get("sql") for _, r in iter_records(tmp_path / "log")]
    assert "select 'after recovery'" in sqls
    assert os.path.getsize(segment) > limit


def test_a_statement_is_checked_against_the_log_before_it_runs(proxy: Any, tmp_path: Path,
                                                               cleanup: list[subprocess.Popen[str]]) -> None:
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as admin:
        admin.execute("DROP TABLE IF EXISTS audit_gate_rows")
        admin.execute("CREATE TABLE audit_gate_rows (id int)")
        admin.execute("GRANT ALL ON audit_gate_rows TO agent_writer")
    process, port, _ = _start(proxy, tmp_path, fsync="always")
    cleanup.append(process)
    writer = {"user": "agent_writer", "token": proxy.token(roles=("agent_writer",))}
    with psycopg.connect(**_conninfo(proxy, port, **writer), autocommit=True) as first, \
            psycopg.connect(**_conninfo(proxy, port, **writer), autocommit=True) as second:  # type: ignore[arg-type]
        segment = list_segments(tmp_path / "log")[-1][1]
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (segment.stat().st_size, resource.RLIM_INFINITY))
        try:
            # It ran (and committed) before its record failed: the client is told so, not to retry.
            with pytest.raises(psycopg.OperationalError, match="the last statement DID run on the database"):
                first.execute("INSERT INTO audit_gate_rows VALUES (1)")
            # While the log is failing, another session's statement never reaches the server.
            with pytest.raises(psycopg.OperationalError, match="the audit log is unavailable") as refused:
                second.execute("INSERT INTO audit_gate_rows VALUES (2)")
        finally:
            resource.prlimit(process.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert "NOT sent to the database" in str(refused.value) or "refusing to continue" in str(refused.value)
    with psycopg.connect(proxy.database.dsn()) as admin:
        assert admin.execute("SELECT array_agg(id) FROM audit_gate_rows").fetchone() == ([1],)

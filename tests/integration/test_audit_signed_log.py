"""The signed audit log end to end: real sessions through the real proxy, then the `pgproxy audit` tools."""

from __future__ import annotations

import copy
import hashlib
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from click.testing import CliRunner

from pgproxy.audit.keys import generate_key
from pgproxy.audit.logformat import iter_records
from pgproxy.cli import main
from pgproxy.config import parse_config
from pgproxy.testing import RunningProxy


def _events(directory: Path) -> list[dict[str, Any]]:
    return [rec["event"] for _, rec in iter_records(directory)]


def _run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def signed(proxy: Any, tmp_path: Path) -> Iterator[tuple[Any, Path, Path]]:
    """A proxy writing a signed log (fsync always) to tmp_path/log; yields (proxy, log dir, public key)."""
    key = tmp_path / "audit.key"
    pub, _ = generate_key(key)
    data = copy.deepcopy(proxy.config_data)
    data["audit"] = {"dir": str(tmp_path / "log"), "signing_key_file": str(key), "fsync": "always",
                     "checkpoint_every_records": 5, "max_result_rows": 3,
                     "witness_dir": str(tmp_path / "witness")}
    running = RunningProxy(parse_config(data, Path.cwd())).start()
    under = type(proxy)(running, proxy.audit, proxy.keys, proxy.tls, proxy.database, data)
    try:
        yield under, tmp_path / "log", pub
    finally:
        if running.server is not None:  # the test may have stopped it already
            running.stop()


def test_session_recorded_verified_exported_and_replayed(signed: tuple[Any, Path, Path],
                                                         tmp_path: Path) -> None:
    p, log_dir, pub = signed
    with psycopg.connect(**p.conninfo(application_name="forensics")) as conn:  # type: ignore[arg-type]
        conn.autocommit = True
        conn.execute("select %s::int + 1, %s::text", (41, "hello"))
        rows = conn.execute("select g, 'row ' || g from generate_series(1, 7) g").fetchall()
        assert len(rows) == 7
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        conn.execute("select 'AKIAABCDEFGHIJKLMNOP' as k")
        conn.execute("select %s", ("Bearer abcdefghijklmnopqrstuvwxyz012345",))
    p.running.stop()  # flush, final checkpoint

    events = _events(log_dir)
    session = next(e["session"] for e in events if e["event"] == "session_start")
    mine = [e for e in events if e.get("session") == session]
    assert next(e["event"] for e in mine) == "session_start" and mine[-1]["event"] == "session_end"
    stmts = [e for e in mine if e["event"] == "statement"]
    series = next(e for e in stmts if "generate_series" in e["sql"])
    result = series["result"]
    assert result["rows_sent"] == 7 and len(result["sample_rows"]) == 3 and result["rows_truncated"]
    assert result["sample_rows"][0] == ["1", "row 1"]
    assert [c["name"] for c in result["columns"]] == ["g", "?column?"]
    param = next(e for e in stmts if "%s" not in e["sql"] and "::int + 1" in e["sql"])
    assert param["params"] == ["\\x0029", "hello"] and param["param_formats"] == [1, 0]  # psycopg: int2 binary
    assert param["param_types"][0] == 21 and param["result"]["sample_rows"] == [["42", "hello"]]
    error = next(e for e in stmts if e["sql"] == "select 1/0")
    assert error["error"]["sqlstate"] == "22012"
    assert not any("AKIAABCDEFGHIJKLMNOP" in e["sql"] for e in stmts)
    assert any("[redacted:aws_access_key]" in e["sql"] for e in stmts)
    assert any(e.get("params") == ["Bearer [redacted:bearer_token]"] for e in stmts)

    # The digest is SHA-256 over every DataRow message as sent: recompute it from the sample-free facts.
    expected = hashlib.sha256()
    for g in range(1, 8):
        vals = [str(g).encode(), f"row {g}".encode()]
        body = len(vals).to_bytes(2, "big") + b"".join(len(v).to_bytes(4, "big") + v for v in vals)
        expected.update(b"D" + (len(body) + 4).to_bytes(4, "big") + body)
    assert result["row_digest"] == expected.hexdigest()

    out = _run("audit", "verify", str(log_dir), "--pubkey", str(pub), "--witness", str(tmp_path / "witness"))
    assert out.exit_code == 0, out.output
    assert "OK:" in out.output

    out = _run("audit", "sessions", str(log_dir))
    assert out.exit_code == 0 and session in out.output and "agent-1" in out.output
    out = _run("audit", "show", str(log_dir), session)
    assert out.exit_code == 0, out.output
    assert "generate_series" in out.output and "ERROR 22012" in out.output
    assert "application_name=forensics" in out.output
    # durations read as durations, never as raw floats or JSON
    assert re.search(r"\[extended, [\d.]+ (ms|s)\]", out.output), out.output
    assert re.search(r"session_end: .* statements in [\d.]+ (ms|s)", out.output), out.output
    assert "{" not in out.output.split("session_end")[-1]
    out = _run("audit", "show", str(log_dir), session, "--json")
    assert out.exit_code == 0, out.output
    events = [orjson.loads(line) for line in out.output.splitlines()]
    assert events[0]["event"] == "session_start" and events[-1]["event"] == "session_end"
    assert all(isinstance(e["seq"], int) and isinstance(e["ts"], float) for e in events)
    out = _run("audit", "sessions", str(log_dir), "--json")
    assert any(s["session"] == session and s["subject"] == "agent-1" for s in orjson.loads(out.output))

    bundle = tmp_path / "bundle.json"
    out = _run("audit", "export", str(log_dir), "--session", session, "-o", str(bundle), "--pubkey", str(pub))
    assert out.exit_code == 0, out.output
    offline = tmp_path / "offline"
    offline.mkdir()
    shutil.copy(bundle, offline / "bundle.json")
    shutil.copy(pub, offline / "key.pub")
    out = _run("audit", "verify-bundle", str(offline / "bundle.json"), "--pubkey", str(offline / "key.pub"))
    assert out.exit_code == 0, out.output
    assert "trust anchor: --pubkey" in out.output and "all 7 records of the session, in order" in out.output

    # A forged record in the bundle fails its inclusion proof.
    data = orjson.loads(bundle.read_bytes())
    data["records"][1]["record"] = data["records"][1]["record"].replace("select", "SELECT", 1)
    forged = offline / "forged.json"
    forged.write_bytes(orjson.dumps(data))
    out = _run("audit", "verify-bundle", str(forged))
    assert out.exit_code == 1 and "not included in the signed tree" in out.output

    out = _run("audit", "replay", str(offline / "bundle.json"), "--target", p.database.dsn(),
               "--pubkey", str(offline / "key.pub"))
    assert out.exit_code == 0, out.output
    assert "0 differ" in out.output and "MATCH" in out.output
    matched = out.output.count("MATCH")
    assert matched >= 3  # the parameterised select, the series, the division error


def test_log_continues_after_restart_and_checkpoints_rotate_segments(proxy: Any, tmp_path: Path) -> None:
    key = tmp_path / "k"
    pub, _ = generate_key(key)
    data = copy.deepcopy(proxy.config_data)
    data["audit"] = {"dir": str(tmp_path / "log"), "signing_key_file": str(key), "segment_max_bytes": 2048,
                     "fsync": "always"}
    for _ in range(2):
        running = RunningProxy(parse_config(data, Path.cwd())).start()
        under = type(proxy)(running, proxy.audit, proxy.keys, proxy.tls, proxy.database, data)
        try:
            with psycopg.connect(**under.conninfo()) as conn:  # type: ignore[arg-type]
                for i in range(10):
                    conn.execute("select %s::int", (i,))
        finally:
            running.stop()
    assert len(list((tmp_path / "log").glob("segment-*.jsonl"))) > 2
    out = _run("audit", "verify", str(tmp_path / "log"), "--pubkey", str(pub))
    assert out.exit_code == 0, out.output
    assert len({e["session"] for e in _events(tmp_path / "log")}) == 2


def test_postgres_witness_catches_truncation(database: Any, tmp_path: Path) -> None:
    from pgproxy.audit.keys import load_private_key
    from pgproxy.audit.signed import SignedAuditLog
    from pgproxy.audit.witness import PostgresWitness

    key = tmp_path / "k"
    pub, _ = generate_key(key)
    log = SignedAuditLog(tmp_path / "log", load_private_key(key), checkpoint_every_records=4,
                         witness=PostgresWitness(database.dsn()))
    for i in range(10):
        log.emit({"event": "statement", "session": "w", "ts": float(i), "sql": f"select {i}"})
        log.flush()
    log.close()  # waits for the witness thread to publish
    out = _run("audit", "verify", str(tmp_path / "log"), "--pubkey", str(pub), "--witness", database.dsn())
    assert out.exit_code == 0, out.output
    segment = next((tmp_path / "log").glob("segment-*.jsonl"))
    segment.write_bytes(b"".join(segment.read_bytes().splitlines(keepends=True)[:5]))
    (tmp_path / "log" / "checkpoints.jsonl").write_bytes(b"")  # the attacker removes local checkpoints
    out = _run("audit", "verify", str(tmp_path / "log"), "--pubkey", str(pub), "--witness", database.dsn())
    assert out.exit_code == 1 and "log truncated" in out.output

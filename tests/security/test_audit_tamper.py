"""The signed audit log's tamper suite: every kind of tampering is caught by `pgproxy audit verify`,
with a message naming what and where, and exit status 1."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from pgproxy.audit.keys import generate_key, load_private_key
from pgproxy.audit.logformat import CHECKPOINTS_FILE, list_segments
from pgproxy.audit.signed import SignedAuditLog
from pgproxy.cli import main


def _verify(directory: Path, *extra: str) -> Any:
    return CliRunner().invoke(main, ["audit", "verify", str(directory), *extra], catch_exceptions=False)


def _write_log(directory: Path, key: Path, sessions: int = 3, per_session: int = 4, **kwargs: Any) -> None:
    log = SignedAuditLog(directory, load_private_key(key), checkpoint_every_records=1000, **kwargs)
    for s in range(sessions):
        sid = f"s{s:015d}"
        log.emit({"event": "session_start", "session": sid, "ts": 1.0 + s, "identity": {"subject": f"agent-{s}"}})
        for i in range(per_session):
            log.emit({"event": "statement", "session": sid, "ts": 2.0 + i, "sql": f"select {i}", "tags": ["SELECT 1"]})
        log.emit({"event": "session_end", "session": sid, "ts": 9.0, "reason": "client terminated"})
        log.flush()
    log.close()


@pytest.fixture
def log(tmp_path: Path) -> tuple[Path, Path, Path]:
    key = tmp_path / "k"
    pub, _ = generate_key(key)
    _write_log(tmp_path / "log", key)
    return tmp_path / "log", key, pub


def _lines(directory: Path) -> tuple[Path, list[bytes]]:
    seg = list_segments(directory)[0][1]
    return seg, seg.read_bytes().splitlines(keepends=True)


def test_intact_log_verifies(log: tuple[Path, Path, Path]) -> None:
    directory, _, pub = log
    out = _verify(directory, "--pubkey", str(pub))
    assert out.exit_code == 0, out.output
    assert "OK: log" in out.output and "18 records" in out.output


def test_modified_byte(log: tuple[Path, Path, Path]) -> None:
    directory, _, pub = log
    seg, lines = _lines(directory)
    assert b"select 3" in lines[4]
    lines[4] = lines[4].replace(b"select 3", b"select 4")
    seg.write_bytes(b"".join(lines))
    out = _verify(directory, "--pubkey", str(pub))
    assert out.exit_code == 1
    assert f"{seg.name}:6 (record 5): hash chain broken" in out.output
    assert "record 4 or this record was modified" in out.output


def test_modified_last_record_caught_by_checkpoint(log: tuple[Path, Path, Path]) -> None:
    directory, _, pub = log
    seg, lines = _lines(directory)
    lines[-1] = lines[-1].replace(b"client terminated", b"client terminatex")
    seg.write_bytes(b"".join(lines))
    out = _verify(directory, "--pubkey", str(pub))
    assert out.exit_code == 1 and "fork" in out.output and "records 0..17" in out.output


def test_deleted_record(log: tuple[Path, Path, Path]) -> None:
    directory, _, pub = log
    seg, lines = _lines(directory)
    del lines[4]
    seg.write_bytes(b"".join(lines))
    out = _verify(directory, "--pubkey", str(pub))
    assert out.exit_code == 1
    assert f"{seg.name}:5: found record 5 where record 4 belongs" in out.output
    assert "record(s) 4 missing from the log (deleted)" in out.output


def test_reordered_records(log: tuple[Path, Path, Path]) -> None:
    directory, _, pub = log
    seg, lines = _lines(directory)
    lines[3], lines[4] = lines[4], lines[3]
    seg.write_bytes(b"".join(lines))
    out = _verify(directory, "--pubkey", str(pub))
    assert out.exit_code == 1
    assert "record 3 is out of order (reordered records)" in out.output


def test_truncated_tail_against_checkpoint(log: tuple[Path, Path, Path]) -> None:
    directory, _, pub = log
    seg, lines = _lines(directory)
    seg.write_bytes(b"".join(lines[:-3]))
    out = _verify(directory, "--pubkey", str(pub))
    assert out.exit_code == 1
    assert "log truncated" in out.output and "records 15..17 are missing" in out.output


def test_truncated_tail_and_checkpoints_caught_by_witness(tmp_path: Path) -> None:
    key = tmp_path / "k"
    pub, _ = generate_key(key)
    from pgproxy.audit.witness import DirectoryWitness

    directory = tmp_path / "log"
    _write_log(directory, key, witness=DirectoryWitness(tmp_path / "witness"))
    seg, lines = _lines(directory)
    seg.write_bytes(b"".join(lines[:6]))  # the attacker also rewrites the local checkpoints
    cps = (directory / CHECKPOINTS_FILE).read_bytes().splitlines(keepends=True)
    (directory / CHECKPOINTS_FILE).write_bytes(cps[0])  # keeps the first (6 records)
    assert _verify(directory, "--pubkey", str(pub)).exit_code == 0  # undetectable locally ...
    out = _verify(directory, "--pubkey", str(pub), "--witness", str(tmp_path / "witness"))
    assert out.exit_code == 1 and "log truncated" in out.output  # ... but not against the witness


def test_fork_two_signed_checkpoints(tmp_path: Path) -> None:
    key = tmp_path / "k"
    pub, _ = generate_key(key)
    a = tmp_path / "a"
    _write_log(a, key, sessions=1)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for directory, sql in ((a, "select 'history A'"), (b, "select 'history B'")):  # same key, two histories
        log = SignedAuditLog(directory, load_private_key(key))
        log.emit({"event": "statement", "session": "x", "ts": 5.0, "sql": sql})
        log.close()
    foreign = (b / CHECKPOINTS_FILE).read_bytes().splitlines(keepends=True)[-1]
    with (a / CHECKPOINTS_FILE).open("ab") as f:
        f.write(foreign)
    out = _verify(a, "--pubkey", str(pub))
    assert out.exit_code == 1
    assert f"fork: {CHECKPOINTS_FILE}:3 signs root" in out.output


def test_wrong_key(log: tuple[Path, Path, Path], tmp_path: Path) -> None:
    directory, _, _ = log
    other, _kid = generate_key(tmp_path / "other")
    out = _verify(directory, "--pubkey", str(other))
    assert out.exit_code == 1 and "signed by unknown key id" in out.output


def test_forged_checkpoint_signature(log: tuple[Path, Path, Path]) -> None:
    directory, _, pub = log
    path = directory / CHECKPOINTS_FILE
    cps = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    cps[-1]["tree_size"] += 1
    path.write_bytes(b"".join(orjson.dumps(c, option=orjson.OPT_SORT_KEYS) + b"\n" for c in cps))
    out = _verify(directory, "--pubkey", str(pub))
    assert out.exit_code == 1 and "bad signature" in out.output


def test_torn_tail_after_checkpoint_is_not_tampering(log: tuple[Path, Path, Path]) -> None:
    directory, key, pub = log
    seg, _ = _lines(directory)
    with seg.open("ab") as f:
        f.write(b'{"event":{"event":"statement","sql":"sel')  # a crash mid-write
    out = _verify(directory, "--pubkey", str(pub))
    assert out.exit_code == 0, out.output
    assert "truncated tail" in out.output and "intact up to record 17" in out.output
    # Reopening sets the torn bytes aside, records that, and the log verifies cleanly.
    log = SignedAuditLog(directory, load_private_key(key))
    log.close()
    out = _verify(directory, "--pubkey", str(pub))
    assert out.exit_code == 0 and "truncated tail" not in out.output
    assert list(directory.glob("*.torn"))
    assert b"log_recovered" in seg.read_bytes()


def test_key_rotation_keeps_old_checkpoints_verifiable(log: tuple[Path, Path, Path], tmp_path: Path) -> None:
    directory, _, pub = log
    new_pub, _ = generate_key(tmp_path / "new")
    from pgproxy.audit.sink import AuditUnavailable

    with pytest.raises(AuditUnavailable, match="signed by unknown key id"):  # the old key must be trusted
        _write_log(directory, tmp_path / "new", sessions=1)
    _write_log(directory, tmp_path / "new", sessions=1, trusted_keys=[pub])
    assert _verify(directory, "--pubkey", str(pub)).exit_code == 1  # new checkpoints: unknown to the old key
    out = _verify(directory, "--pubkey", str(pub), "--pubkey", str(new_pub))
    assert out.exit_code == 0, out.output


def test_tampered_log_refuses_to_reopen(log: tuple[Path, Path, Path]) -> None:
    directory, key, _ = log
    seg, lines = _lines(directory)
    del lines[2]
    seg.write_bytes(b"".join(lines))
    from pgproxy.audit.sink import AuditUnavailable

    with pytest.raises(AuditUnavailable, match="fails verification"):
        SignedAuditLog(directory, load_private_key(key))

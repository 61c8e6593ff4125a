"""The admin UI's view of a signed log: per-record verified / not covered yet / FAILED, session summaries."""

from __future__ import annotations

from pathlib import Path

from pgproxy.admin.audit_view import AuditLogView
from pgproxy.audit.keys import generate_key, load_private_key
from pgproxy.audit.signed import SignedAuditLog


def _session(log: SignedAuditLog, sid: str, *, error: bool = False) -> None:
    log.emit({"event": "session_start", "ts": 1.0, "session": sid, "identity": {"subject": f"agent-{sid}"},
              "upstream_role": "agent_reader", "client": "127.0.0.1:5"})
    stmt = {"event": "statement", "ts": 2.0, "session": sid, "sql": "select 1", "protocol": "simple"}
    if error:
        stmt["error"] = {"severity": "ERROR", "sqlstate": "22012", "message": "division by zero"}
    log.emit(stmt)


def test_statuses_follow_checkpoints_and_tampering(tmp_path: Path) -> None:
    key = tmp_path / "audit.key"
    generate_key(key)
    log = SignedAuditLog(tmp_path / "log", load_private_key(key), checkpoint_every_records=1000,
                         checkpoint_every_seconds=3600, fsync="always")
    view = AuditLogView(tmp_path / "log", (key,))
    _session(log, "a", error=True)
    log.emit({"event": "session_end", "ts": 3.0, "session": "a", "reason": "client terminated"})  # checkpoint
    _session(log, "b")
    log.flush()

    a, b = view.session("a"), view.session("b")
    assert a is not None and b is not None and view.session("nope") is None
    assert [r.status for r in a.records] == ["verified"] * 3 and a.status == "verified"
    assert [r.status for r in b.records] == ["uncovered"] * 2 and b.status == "uncovered"
    assert a.log.ok and a.log.checkpoint_size == 3 and a.log.records == 5
    sessions = {s["session"]: s for s in view.sessions()}
    assert sessions["a"]["errors"] == 1 and sessions["a"]["statements"] == 1 and sessions["b"]["errors"] == 0
    assert sessions["a"]["subject"] == "agent-a" and sessions["b"]["end"] is None
    log.close()

    segment = next((tmp_path / "log").glob("segment-*.jsonl"))
    segment.write_bytes(segment.read_bytes().replace(b"select 1", b"select 2", 1))
    tampered = view.session("a")
    assert tampered is not None and tampered.status == "failed" and not tampered.log.ok
    assert {r.status for r in tampered.records} == {"failed"}
    assert any("hash chain" in p or "fork" in p for p in tampered.log.problems)


def test_untrusted_key_fails(tmp_path: Path) -> None:
    key, other = tmp_path / "audit.key", tmp_path / "other.key"
    generate_key(key)
    other_pub, _ = generate_key(other)
    log = SignedAuditLog(tmp_path / "log", load_private_key(key), fsync="always")
    _session(log, "a")
    log.close()
    view = AuditLogView(tmp_path / "log", (other_pub,))
    result = view.session("a")
    assert result is not None and result.status == "failed"
    assert any("unknown key" in p for p in result.log.problems)

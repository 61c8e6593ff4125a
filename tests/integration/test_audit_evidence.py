"""Evidence that holds up: no secret stored in any event kind or sink, pinned keys, complete bundles.

Real sessions through the real proxy, then the stored bytes and the `pgproxy audit` tools.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import yaml
from click.testing import CliRunner

from pgproxy.audit.keys import generate_key, load_private_key
from pgproxy.audit.logformat import iter_records
from pgproxy.audit.signed import SignedAuditLog
from pgproxy.audit.sink import AuditUnavailable
from pgproxy.cli import main
from pgproxy.config import parse_config
from pgproxy.testing import RunningProxy

SECRET = "Sup3r-Secret-Pw"
ALTER = f"ALTER ROLE agent_writer PASSWORD '{SECRET}'"
POLICY = """
rules:
  - name: dba-approves-dcl
    match: {classes: [dcl]}
    action: approve
    approvers: [dba]
default: allow
"""


def _run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _start(proxy: Any, tmp_path: Path, mutate: Callable[[dict[str, Any]], None]) -> Any:
    data = copy.deepcopy(proxy.config_data)
    mutate(data)
    running = RunningProxy(parse_config(data, Path.cwd())).start()
    return type(proxy)(running, proxy.audit, proxy.keys, proxy.tls, proxy.database, data)


@pytest.fixture
def signing_key(tmp_path: Path) -> tuple[Path, Path]:
    key = tmp_path / "audit.key"
    pub, _ = generate_key(key)
    return key, pub


def _policy(data: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    data["policy"] = {"file": str(tmp_path / "policy.yaml"), "audit_allowed": True}
    data["approvals"] = {"store": "sqlite", "path": str(tmp_path / "approvals.sqlite3")}


def _alter_role_through(p: Any) -> None:
    """The secret reaches the proxy as SQL text (refused: needs approval) and as a bound parameter."""
    with psycopg.connect(**p.conninfo(user="agent_writer", token=p.token(roles=("agent_writer",))),
                         autocommit=True) as conn:
        with pytest.raises(psycopg.ProgrammingError, match="approval apr_"):
            conn.execute(ALTER.encode(), prepare=False)  # type: ignore[call-overload]
        conn.execute("select %s::text", (f"password '{SECRET}'",))


@pytest.mark.parametrize("sink", ["jsonl", "signed"])
def test_no_secret_stored_in_any_event_kind_or_sink(proxy: Any, tmp_path: Path, signing_key: tuple[Path, Path],
                                                     sink: str) -> None:
    def mutate(data: dict[str, Any]) -> None:
        _policy(data, tmp_path)
        data["audit"] = ({"jsonl_path": str(tmp_path / "audit.jsonl")} if sink == "jsonl" else
                         {"dir": str(tmp_path / "log"), "signing_key_file": str(signing_key[0])})

    p = _start(proxy, tmp_path, mutate)
    try:
        _alter_role_through(p)
    finally:
        p.running.stop()
    stored = (tmp_path / "audit.jsonl").read_bytes() if sink == "jsonl" else b"".join(
        f.read_bytes() for f in sorted((tmp_path / "log").glob("segment-*.jsonl")))
    text = stored.decode()
    # Each kind that carries the statement text was written, and none kept the secret.
    for kind in ("policy_decision", "approval_requested", "statement"):
        assert f'"event":"{kind}"' in text
    assert SECRET not in text
    assert "PASSWORD [redacted:password]" in text and "password [redacted:password]" in text
    assert text.count("[redacted:password]") >= 4  # decision, request, refused statement, parameter


def _signed(proxy: Any, tmp_path: Path, key: Path, **audit: Any) -> Any:
    def mutate(data: dict[str, Any]) -> None:
        data["audit"] = {"dir": str(tmp_path / "log"), "signing_key_file": str(key), "fsync": "always", **audit}

    return _start(proxy, tmp_path, mutate)


def _session(p: Any, *statements: str) -> None:
    with psycopg.connect(**p.conninfo(), autocommit=True) as conn:
        for sql in statements:
            conn.execute(sql.encode())  # type: ignore[call-overload]


def _session_ids(directory: Path) -> list[str]:
    out: list[str] = []
    for _, rec in iter_records(directory):
        sid = rec["event"].get("session")
        if rec["event"]["event"] == "session_start" and sid not in out:
            out.append(sid)
    return out


def test_every_record_of_a_session_is_numbered_and_the_end_counts_them(proxy: Any, tmp_path: Path,
                                                                        signing_key: tuple[Path, Path]) -> None:
    p = _signed(proxy, tmp_path, signing_key[0])
    try:
        _session(p, "select 1", "select 2")
    finally:
        p.running.stop()
    sid = _session_ids(tmp_path / "log")[0]
    events = [rec["event"] for _, rec in iter_records(tmp_path / "log") if rec["event"].get("session") == sid]
    assert [e["session_seq"] for e in events] == list(range(len(events)))
    assert events[-1]["event"] == "session_end" and events[-1]["session_records"] == len(events)


# ------------------------------------------------------------------------------------------ pinned keys


def _config_file(data: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _forge(original: Path, forged: Path, attacker_key: Path) -> None:
    """Re-sign the log end to end with another key: same log id, records of the attacker's choosing,
    the attacker's checkpoints and public key in keys/."""
    forged.mkdir()
    shutil.copy(original / "log.json", forged / "log.json")
    log = SignedAuditLog(forged, load_private_key(attacker_key), fsync="always")
    for _, rec in iter_records(original):
        event = rec["event"]
        if event["event"] == "statement" and "secret_table" in event.get("sql", ""):
            continue  # what the attacker wants gone
        log.emit(event)
    log.close()
    shutil.rmtree(original)
    forged.rename(original)


def test_a_log_resigned_with_another_key_fails_verify_and_serve(proxy: Any, tmp_path: Path,
                                                                  signing_key: tuple[Path, Path]) -> None:
    key, pub = signing_key
    p = _signed(proxy, tmp_path, key, witness_dir=str(tmp_path / "witness"))
    try:
        _session(p, "select 1", "select 'secret_table'")
    finally:
        p.running.stop()
    config = _config_file(p.config_data, tmp_path / "proxy.yaml")
    log_dir = tmp_path / "log"

    # The genuine log: trusted only through a pin, and the output says which one.
    out = _run("audit", "verify", str(log_dir))
    assert out.exit_code == 1 and "not pinned" in out.output and "trust anchor: none" in out.output
    for pin, anchor in ((["--config", str(config)], f"trust anchor: {config}"),
                        (["--pubkey", str(pub)], f"trust anchor: --pubkey {pub}"),
                        (["--witness", str(tmp_path / "witness")], "trust anchor: witness")):
        out = _run("audit", "verify", str(log_dir), *pin)
        assert out.exit_code == 0 and anchor in out.output, out.output

    attacker_key = tmp_path / "attacker.key"
    generate_key(attacker_key)
    _forge(log_dir, tmp_path / "forged", attacker_key)
    out = _run("audit", "verify", str(log_dir))
    assert out.exit_code == 1 and "not pinned" in out.output  # the attacker's key in keys/ proves nothing
    for pin in (["--config", str(config)], ["--pubkey", str(pub)], ["--witness", str(tmp_path / "witness")]):
        out = _run("audit", "verify", str(log_dir), *pin)
        assert out.exit_code == 1 and "signed by unknown key id" in out.output, out.output

    # The proxy holds the real key: it refuses to continue a log whose checkpoints it did not sign ...
    out = CliRunner().invoke(main, ["serve", "-c", str(config)])
    assert out.exit_code != 0
    assert "fails verification, refusing to append" in out.output and "signed by unknown key id" in out.output
    # ... and one whose checkpoints were removed: it would otherwise sign the forged records itself.
    (log_dir / "checkpoints.jsonl").write_bytes(b"")
    out = CliRunner().invoke(main, ["serve", "-c", str(config)])
    assert out.exit_code != 0 and "no checkpoint signed by this proxy's keys" in out.output, out.output


# ------------------------------------------------------------------------------------ complete bundles


def _bundle_of_refusal(proxy: Any, tmp_path: Path, key: Path, pub: Path) -> tuple[Path, dict[str, Any]]:
    def mutate(data: dict[str, Any]) -> None:
        _policy(data, tmp_path)
        data["audit"] = {"dir": str(tmp_path / "log"), "signing_key_file": str(key), "fsync": "always"}

    p = _start(proxy, tmp_path, mutate)
    try:
        _alter_role_through(p)
    finally:
        p.running.stop()
    session = next(sid for sid in _session_ids(tmp_path / "log"))
    bundle = tmp_path / "bundle.json"
    out = _run("audit", "export", str(tmp_path / "log"), "--session", session, "-o", str(bundle), "--pubkey", str(pub))
    assert out.exit_code == 0, out.output
    return bundle, orjson.loads(bundle.read_bytes())


def _kinds(data: dict[str, Any]) -> list[str]:
    return [orjson.loads(r["record"])["event"]["event"] for r in data["records"]]


def test_a_bundle_missing_reordering_or_repeating_records_fails(proxy: Any, tmp_path: Path,
                                                                 signing_key: tuple[Path, Path]) -> None:
    key, pub = signing_key
    bundle, data = _bundle_of_refusal(proxy, tmp_path, key, pub)
    kinds = _kinds(data)
    assert kinds[0] == "session_start" and kinds[-1] == "session_end" and "policy_decision" in kinds
    out = _run("audit", "verify-bundle", str(bundle), "--pubkey", str(pub))
    assert out.exit_code == 0 and f"all {len(kinds)} records of the session, in order" in out.output, out.output
    out = _run("audit", "verify-bundle", str(bundle))  # the bundle's own key is no anchor
    assert out.exit_code == 1 and "not pinned" in out.output

    refused = next(i for i, r in enumerate(data["records"]) if '"refused":true' in r["record"])
    decision = kinds.index("policy_decision")
    records = data["records"]
    variants = {
        "refusal removed": [r for i, r in enumerate(records) if i not in (decision, refused)],
        "session_end removed": records[:-1],
        "reordered": [records[0], records[2], records[1], *records[3:]],
        "duplicated": [*records[:2], records[1], *records[2:]],
    }
    for name, changed in variants.items():
        forged = tmp_path / f"{name.replace(' ', '_')}.json"
        forged.write_bytes(orjson.dumps({**data, "records": changed}))
        out = _run("audit", "verify-bundle", str(forged), "--pubkey", str(pub))
        assert out.exit_code == 1, (name, out.output)
        assert "TAMPERED" in out.output, (name, out.output)


def test_export_refuses_a_session_that_has_not_ended(proxy: Any, tmp_path: Path,
                                                     signing_key: tuple[Path, Path]) -> None:
    key, pub = signing_key
    p = _signed(proxy, tmp_path, key, checkpoint_every_records=1)
    try:
        with psycopg.connect(**p.conninfo(), autocommit=True) as conn:
            conn.execute("select 1")
            session = _session_ids(tmp_path / "log")[0]
            out = _run("audit", "export", str(tmp_path / "log"), "--session", session, "-o",
                       str(tmp_path / "b.json"), "--pubkey", str(pub))
            assert out.exit_code == 1 and "has not ended yet" in out.output, out.output
    finally:
        p.running.stop()


# ------------------------------------------------------------------------------------ one writer per dir


def test_a_second_serve_on_the_same_audit_dir_refuses(proxy: Any, tmp_path: Path,
                                                      signing_key: tuple[Path, Path]) -> None:
    key, pub = signing_key
    p = _signed(proxy, tmp_path, key)
    config = _config_file(p.config_data, tmp_path / "proxy.yaml")
    try:
        second = subprocess.run([sys.executable, "-m", "pgproxy", "serve", "-c", str(config)], capture_output=True,
                                text=True, timeout=60)
        assert second.returncode != 0
        assert f"in use by another writer (pid {os.getpid()} on " in second.stderr, second.stderr
        assert "give every proxy process its own audit.dir" in second.stderr
        _session(p, "select 1")  # the first proxy is unaffected
    finally:
        p.running.stop()
    # Once the first has stopped, the directory is free, and the log is whole.
    SignedAuditLog(tmp_path / "log", load_private_key(key)).close()
    out = _run("audit", "verify", str(tmp_path / "log"), "--pubkey", str(pub))
    assert out.exit_code == 0, out.output


# ----------------------------------------------------------------------------------------------- replay


def test_replay_compares_command_tags_and_row_counts(proxy: Any, tmp_path: Path,
                                                     signing_key: tuple[Path, Path]) -> None:
    key, pub = signing_key
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as admin:
        admin.execute("DROP TABLE IF EXISTS evidence_rows")
        admin.execute("CREATE TABLE evidence_rows AS SELECT g AS id FROM generate_series(1, 1000) g")
        admin.execute("GRANT ALL ON evidence_rows TO agent_writer")
    p = _signed(proxy, tmp_path, key)
    try:
        with psycopg.connect(**p.conninfo(user="agent_writer", token=p.token(roles=("agent_writer",))),
                             autocommit=True) as conn:
            conn.execute("DELETE FROM evidence_rows")
    finally:
        p.running.stop()
    session = _session_ids(tmp_path / "log")[0]
    bundle = tmp_path / "bundle.json"
    out = _run("audit", "export", str(tmp_path / "log"), "--session", session, "-o", str(bundle), "--pubkey", str(pub))
    assert out.exit_code == 0, out.output

    # Against the same 1000 rows, the DELETE matches (rolled back); against an empty table it deletes
    # nothing: the same (empty) row digest, but a different effect.
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as admin:
        admin.execute("INSERT INTO evidence_rows SELECT g FROM generate_series(1, 1000) g")
    out = _run("audit", "replay", str(bundle), "--target", proxy.database.dsn(), "--pubkey", str(pub))
    assert out.exit_code == 0 and "MATCH: DELETE FROM evidence_rows (DELETE 1000)" in out.output, out.output
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as admin:
        admin.execute("TRUNCATE evidence_rows")
    out = _run("audit", "replay", str(bundle), "--target", proxy.database.dsn(), "--pubkey", str(pub))
    assert out.exit_code == 1, out.output
    assert "DIFFER: DELETE FROM evidence_rows (command tags DELETE 0 (recorded DELETE 1000))" in out.output


# ------------------------------------------------------------------------------------------------ resume


def _fill(directory: Path, key: Path, records: int, **kwargs: Any) -> None:
    log = SignedAuditLog(directory, load_private_key(key), checkpoint_every_records=500, **kwargs)
    for i in range(records):
        log.emit({"event": "statement", "session": f"s{i // 50}", "ts": 1.0, "sql": f"select {i}"})
    log.close()


def test_reopening_resumes_at_the_saved_checkpoint_and_verifies_only_the_tail(
        tmp_path: Path, signing_key: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    key, pub = signing_key
    directory = tmp_path / "log"
    _fill(directory, key, 3000)
    caplog.set_level("INFO", logger="pgproxy.audit.signed")
    log = SignedAuditLog(directory, load_private_key(key))
    for i in range(7):
        log.emit({"event": "statement", "session": "t", "ts": 1.0, "sql": f"select {i}"})
    log.close()
    assert "resumed at record 3000, verified the 0 record(s) after it" in caplog.text
    caplog.clear()
    SignedAuditLog(directory, load_private_key(key)).close()
    assert "resumed at record 3007, verified the 0 record(s) after it" in caplog.text
    out = _run("audit", "verify", str(directory), "--pubkey", str(pub))
    assert out.exit_code == 0 and "3007 records" in out.output, out.output


def test_reopening_verifies_the_tail_and_ignores_a_resume_point_that_lies(
        tmp_path: Path, signing_key: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    key, _ = signing_key
    directory = tmp_path / "log"
    _fill(directory, key, 1200)
    saved = (directory / "resume.json").read_bytes()
    assert orjson.loads(saved)["tree_size"] == 1200
    _fill(directory, key, 10)  # records 1200..1209; the resume point moves on to 1210 at close
    caplog.set_level("INFO", logger="pgproxy.audit.signed")

    # A resume point that does not hash to a signed root is ignored: the whole log is read.
    lie = {**orjson.loads(saved), "frontier": ["00" * 32] * 4}
    (directory / "resume.json").write_bytes(orjson.dumps(lie))
    SignedAuditLog(directory, load_private_key(key)).close()
    assert "resume.json does not match the signed log; verified all 1210 records" in caplog.text

    # From an older resume point, the records after it are read and checked ...
    (directory / "resume.json").write_bytes(saved)
    SignedAuditLog(directory, load_private_key(key)).close()
    assert "resumed at record 1200, verified the 10 record(s) after it" in caplog.text
    # ... so one deleted there stops the proxy from starting.
    (directory / "resume.json").write_bytes(saved)
    seg = sorted(directory.glob("segment-*.jsonl"))[-1]
    lines = seg.read_bytes().splitlines(keepends=True)
    assert b'"seq":1205' in lines[-5]
    del lines[-5]
    seg.write_bytes(b"".join(lines))
    with pytest.raises(AuditUnavailable, match=r"fails verification, refusing to append: .*record 1206"):
        SignedAuditLog(directory, load_private_key(key))

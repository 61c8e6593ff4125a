"""Evidence that holds up: no secret stored in any event kind or sink, pinned keys, complete bundles.

Real sessions through the real proxy, then the stored bytes and the `pgproxy audit` tools.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from pgproxy.audit.keys import generate_key
from pgproxy.audit.logformat import iter_records
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

"""The policy gate through the real proxy: deny, syntax errors, approvals in refuse and hold mode."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.config import parse_config
from pgproxy.policy.approvals import ApprovalRequest
from pgproxy.policy.gate import PolicyGate
from pgproxy.policy.rules import load_policy
from pgproxy.policy.stores.sqlite import SQLiteApprovalStore
from pgproxy.testing import RunningProxy

POLICY = """
rules:
  - name: no-code
    match: {classes: [procedural, dangerous_function, function_call]}
    action: deny
    message: no server-side code
  - name: hold-truncate
    match: {classes: [destructive], tables: ["*pg_hold*"]}
    action: approve
    approvers: [dba]
    mode: hold
    timeout: 20
  - name: quick-timeout
    match: {classes: [destructive], tables: ["*pg_quick*"]}
    action: approve
    approvers: [dba]
    mode: hold
    timeout: 0.5
  - name: txn-hold
    match: {classes: [destructive], tables: ["*pg_txhold*"]}
    action: approve
    approvers: [dba]
    in_transaction: hold
  - name: dba-approves
    match: {classes: [destructive, dcl]}
    action: approve
    approvers: [dba]
default: allow
"""


@dataclass
class Gated:
    running: RunningProxy
    store: SQLiteApprovalStore
    audit: MemoryAuditSink
    dsn: str
    port: int
    token: str

    def pending(self, sql: str, timeout: float = 10.0) -> ApprovalRequest:
        """The newest pending request for ``sql`` (waits until one exists)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = [r for r in self.running.call(self.store.list("pending")) if r.sql == sql]
            if pending:
                return max(pending, key=lambda r: r.created_at)
            time.sleep(0.05)
        raise AssertionError("no pending approval request")

    def decide(self, approval_id: str, approve: bool = True, reason: str | None = None) -> ApprovalRequest:
        return self.running.call(self.store.decide(approval_id, "dba-alice", ["dba"], approve, reason))

    def status(self, approval_id: str) -> str:
        request = self.running.call(self.store.get(approval_id))
        assert request is not None
        return request.status


@pytest.fixture(scope="module")
def gated(proxy, tmp_path_factory) -> Iterator[Gated]:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("policy")
    policy_file = tmp / "policy.yaml"
    policy_file.write_text(POLICY)
    store = SQLiteApprovalStore(tmp / "approvals.sqlite")
    audit = MemoryAuditSink()
    gate = PolicyGate(load_policy(policy_file), store)
    running = RunningProxy(parse_config(proxy.config_data, Path.cwd()), audit=audit, gates=[gate]).start()
    token = proxy.token(roles=("agent_writer",))
    dsn = proxy.dsn(tls=False, user="agent_writer", token=token).replace(
        f"port='{proxy.plain_port}'", f"port='{running.ports[1]}'")
    with psycopg.connect(proxy.dsn(tls=False, user="agent_writer"), autocommit=True) as conn:  # no gate there
        for t in ("pg_policy_t", "pg_hold_t", "pg_quick_t", "pg_txhold_t"):
            conn.execute(f"drop table if exists {t}")
            conn.execute(f"create table {t} (x int)")
    yield Gated(running, store, audit, dsn, running.ports[1], token)
    running.call(store.close())
    running.stop()


def _run_in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    box: list[Any] = []

    def target() -> None:
        try:
            box.append(fn())
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _approval_id(exc: BaseException) -> str:
    text = str(exc)
    start = text.index("apr_")
    return text[start:start + 20]


# --------------------------------------------------------------------------------------------------
# deny and syntax


def test_deny_with_42501_and_the_session_continues(gated: Gated) -> None:
    with psycopg.connect(gated.dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgproxy policy no-code: no server-side code"):
            conn.execute("DO $$ begin perform 1; end $$")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-code"):
            conn.execute("select pg_read_file(%s)", ["/etc/passwd"])
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-code"):
            conn.execute("select x from (select pg_ls_dir('.') as x) s")
        assert conn.execute("select 1").fetchone() == (1,)
    events = [e for e in gated.audit.events if e.get("event") == "policy_decision" and e["decision"] == "deny"]
    assert events and events[0]["rule"] == "no-code" and "procedural" in events[0]["classes"]


@pytest.mark.parametrize("sql", ["selec 1", "select 'é' from t whre x", "select (1"])
def test_syntax_error_where_a_rule_may_apply_is_refused_by_the_proxy(gated: Gated, proxy, sql: str) -> None:  # type: ignore[no-untyped-def]
    """Deny rules match every caller here, so a statement the proxy cannot read is not sent: the error says
    that the proxy refused it, at the position the server reports."""
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as direct, pytest.raises(psycopg.Error) as want:
        direct.execute(sql)
    with psycopg.connect(gated.dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.SyntaxError) as got:
            conn.execute(sql)  # extended protocol: refused at Parse
        primary = got.value.diag.message_primary or ""
        assert primary == "pgproxy could not parse this statement: " + (want.value.diag.message_primary or "")
        assert got.value.diag.statement_position == want.value.diag.statement_position
        assert got.value.diag.sqlstate == "42601"
        assert conn.execute("select 2").fetchone() == (2,)


def test_simple_protocol_syntax_error(gated: Gated) -> None:
    with psycopg.connect(gated.dsn, autocommit=True) as conn:
        result = conn.pgconn.exec_(b"select 1; selec 2")
        assert result.error_field(ord("C")) == b"42601"
        assert result.error_field(ord("P")) == b"11"
        message = b'pgproxy could not parse this statement: syntax error at or near "selec"'
        assert result.error_field(ord("M")) == message


def test_a_constant_true_filter_needs_approval_after_a_false_one_of_the_same_shape(gated: Gated) -> None:
    """Classifications are cached by shape (constants taken out): WHERE 1 = 2 and WHERE 1 = 1 share one,
    but only the second deletes every row, so only the second needs an approval, whichever came first."""
    with psycopg.connect(gated.dsn, autocommit=True) as conn:
        conn.execute("insert into pg_policy_t values (7)")
        for harmless in ("delete from pg_policy_t where 1 = 2", "delete from pg_policy_t where 'a' = 'b'",
                         "delete from pg_policy_t where false"):
            assert conn.pgconn.exec_(harmless.encode()).error_field(ord("C")) is None  # simple protocol
            assert conn.execute(harmless).rowcount == 0  # extended protocol
        for destructive in ("delete from pg_policy_t where 1 = 1", "delete from pg_policy_t where 'a' = 'a'",
                            "delete from pg_policy_t where true"):
            assert conn.pgconn.exec_(destructive.encode()).error_field(ord("C")) == b"PXA01"
            with pytest.raises(psycopg.Error) as refused:
                conn.execute(destructive)
            assert refused.value.sqlstate == "PXA01"
        assert conn.execute("delete from pg_policy_t where x = 7").rowcount == 1  # nothing else ran


# --------------------------------------------------------------------------------------------------
# refuse mode


def test_refuse_mode_approve_retry_once(gated: Gated) -> None:
    with psycopg.connect(gated.dsn, autocommit=True) as conn:
        conn.execute("insert into pg_policy_t values (1), (2)")
        with pytest.raises(psycopg.Error) as first:
            conn.execute("delete from pg_policy_t")
        assert first.value.sqlstate == "PXA01"
        approval = _approval_id(first.value)
        assert "pgproxy approvals approve " + approval in str(first.value)
        assert "ask an approver in dba" in str(first.value)
        # the approver sees what it would do: the plan, and the rows it would delete (rolled back)
        deadline = time.monotonic() + 10
        while (request := gated.running.call(gated.store.get(approval))) is not None and request.impact is None:
            assert time.monotonic() < deadline, "no impact estimate"
            time.sleep(0.05)
        assert request is not None and request.impact is not None
        assert request.impact.get("rows") == 2 and request.impact.get("plan"), request.impact
        # asking again before the approval finds the same pending request
        with pytest.raises(psycopg.Error) as again:
            conn.execute("delete from pg_policy_t")
        assert _approval_id(again.value) == approval
        gated.decide(approval)
        cur = conn.execute("delete from pg_policy_t")
        assert cur.rowcount == 2
        assert gated.status(approval) == "used"
        with pytest.raises(psycopg.Error) as second:
            conn.execute("delete from pg_policy_t")
        assert second.value.sqlstate == "PXA01" and _approval_id(second.value) != approval


def test_refuse_mode_approval_is_for_these_parameters(gated: Gated) -> None:
    with psycopg.connect(gated.dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as first:
            conn.execute("update pg_policy_t set x = %s", [1])
        approval = _approval_id(first.value)
        gated.decide(approval)
        with pytest.raises(psycopg.Error) as other:
            conn.execute("update pg_policy_t set x = %s", [2])
        assert other.value.sqlstate == "PXA01" and _approval_id(other.value) != approval
        conn.execute("update pg_policy_t set x = %s", [1])
        assert gated.status(approval) == "used"


def test_refuse_mode_denied_request_keeps_refusing(gated: Gated) -> None:
    with psycopg.connect(gated.dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as first:
            conn.execute("drop table if exists pg_policy_never")
        gated.decide(_approval_id(first.value), approve=False, reason="no")
        with pytest.raises(psycopg.Error) as second:
            conn.execute("drop table if exists pg_policy_never")
        assert second.value.sqlstate == "PXA01"


def test_asyncpg_prepared_statement_refuse_then_approved(gated: Gated) -> None:
    async def attempt() -> str:
        conn = await asyncpg.connect(host="127.0.0.1", port=gated.port, user="agent_writer", password=gated.token,
                                     database=gated_database(gated), ssl=False)
        try:
            try:
                await conn.execute("update pg_policy_t set x = $1", 42)
            except asyncpg.PostgresError as exc:
                assert exc.sqlstate == "PXA01"
                return _approval_id(exc)
            return "ran"
        finally:
            await conn.close()

    approval = asyncio.run(attempt())
    assert approval.startswith("apr_")
    gated.decide(approval)
    assert asyncio.run(attempt()) == "ran"
    assert asyncio.run(attempt()).startswith("apr_")


def gated_database(gated: Gated) -> str:
    return dict(part.split("=", 1) for part in gated.dsn.split())["dbname"].strip("'")


# --------------------------------------------------------------------------------------------------
# hold mode


def test_hold_mode_waits_then_runs_after_approval(gated: Gated) -> None:
    notices: list[str] = []
    with psycopg.connect(gated.dsn, autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("insert into pg_hold_t values (1)")
        thread, box = _run_in_thread(lambda: conn.execute("truncate pg_hold_t").statusmessage)
        request = gated.pending("truncate pg_hold_t")
        assert request.rule == "hold-truncate" and request.sql == "truncate pg_hold_t"
        assert box == []  # still waiting
        gated.decide(request.id)
        thread.join(10)
        assert box == ["TRUNCATE TABLE"]
        assert notices == [f"waiting for approval {request.id} (rule hold-truncate)"]
        assert conn.execute("select count(*) from pg_hold_t").fetchone() == (0,)


def test_hold_mode_denied_gives_pxa02(gated: Gated) -> None:
    with psycopg.connect(gated.dsn, autocommit=True) as conn:
        thread, box = _run_in_thread(lambda: conn.execute("delete from pg_hold_t"))
        request = gated.pending("delete from pg_hold_t")
        gated.decide(request.id, approve=False, reason="not today")
        thread.join(10)
        assert isinstance(box[0], psycopg.Error) and box[0].sqlstate == "PXA02"
        assert f"approval {request.id} denied by dba-alice: not today" in str(box[0])
        assert conn.execute("select 3").fetchone() == (3,)


def test_hold_mode_times_out(gated: Gated) -> None:
    with psycopg.connect(gated.dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute("delete from pg_quick_t")
        assert info.value.sqlstate == "PXA02" and "timed out" in str(info.value)
        message = info.value.diag.message_primary or ""
        approval = _approval_id(info.value)
        assert f"`pgproxy approvals approve {approval}`" in message and "run the statement again" in message


def test_refuse_inside_a_transaction_fails_at_once_with_what_to_do(gated: Gated) -> None:
    """The default: no silent hold. The error carries the id and says to roll back and run it again."""
    with psycopg.connect(gated.dsn) as conn:
        conn.execute("insert into pg_policy_t values (8)")  # opens the transaction block
        with pytest.raises(psycopg.Error) as info:
            conn.execute("delete from pg_policy_t where true")
        assert info.value.sqlstate == "PXA01"  # refused, not held until the approval wait timed out (PXA02)
        message = info.value.diag.message_primary or ""
        approval = _approval_id(info.value)
        assert f"pgproxy approvals approve {approval}" in message and "roll back this transaction" in message
        conn.rollback()
        assert gated.pending("delete from pg_policy_t where true").id == approval
        gated.decide(approval)
        # The agent runs the transaction again: the approved statement runs once, inside it.
        conn.execute("insert into pg_policy_t values (8)")
        assert conn.execute("delete from pg_policy_t where true").rowcount >= 1
        conn.commit()
    assert gated.status(approval) == "used"


def test_in_transaction_hold_waits_for_the_decision(gated: Gated) -> None:
    with psycopg.connect(gated.dsn) as conn:
        conn.execute("insert into pg_txhold_t values (7)")  # opens the transaction block
        thread, box = _run_in_thread(lambda: conn.execute("delete from pg_txhold_t where true").rowcount)
        request = gated.pending("delete from pg_txhold_t where true")
        assert request.rule == "txn-hold" and request.mode == "hold"
        gated.decide(request.id)
        thread.join(10)
        assert isinstance(box[0], int) and box[0] >= 1
        conn.commit()
        assert conn.execute("select count(*) from pg_txhold_t").fetchone() == (0,)


# --------------------------------------------------------------------------------------------------
# psql (simple protocol)


def test_psql_deny_and_syntax(gated: Gated, proxy) -> None:  # type: ignore[no-untyped-def]
    env = proxy.env(tls=False, user="agent_writer", token=gated.token)
    env["PGPORT"] = str(gated.port)
    out = subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=0", "-c", "DO $$ begin end $$", "-c", "select 5",
                          "-c", "selec 6"], env=env, capture_output=True, text=True, timeout=30)
    assert "pgproxy policy no-code: no server-side code" in out.stderr
    assert " 5" in out.stdout
    assert 'syntax error at or near "selec"' in out.stderr and "LINE 1: selec 6" in out.stderr
    out = subprocess.run(["psql", "-X", "-c", "truncate pg_policy_t"], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode != 0 and "approval apr_" in out.stderr

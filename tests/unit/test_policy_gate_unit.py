"""PolicyGate without a network: which message is judged, function calls, caching, failing closed."""

from __future__ import annotations

import asyncio
from types import MappingProxyType, SimpleNamespace
from typing import Any

import pytest
import yaml

from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.config import ConfigError
from pgproxy.core.plugins import Hold, Refuse
from pgproxy.core.statement import Statement
from pgproxy.identity import Identity
from pgproxy.policy.approvals import ApprovalRequest, ApprovalStoreUnavailable
from pgproxy.policy.gate import PolicyGate
from pgproxy.policy.rules import parse_policy
from pgproxy.protocol.messages import Bind, FunctionCall

POLICY = parse_policy(yaml.safe_load("""
rules:
  - {name: no-fastpath, match: {classes: [function_call]}, action: deny, message: no fast path}
  - {name: approve-drop, match: {classes: [destructive]}, action: approve, approvers: [dba]}
default: allow
"""))


class MemoryStore:
    """The smallest ApprovalStore for refuse mode."""

    def __init__(self, fail: bool = False) -> None:
        self.requests: dict[str, ApprovalRequest] = {}
        self.fail = fail

    async def consume(self, fingerprint: str) -> ApprovalRequest | None:
        if self.fail:
            raise ApprovalStoreUnavailable("down")
        for r in self.requests.values():
            if r.fingerprint == fingerprint and r.status == "approved":
                r.status = "used"
                return r
        return None

    async def create(self, request: ApprovalRequest) -> ApprovalRequest:
        for r in self.requests.values():
            if r.fingerprint == request.fingerprint and r.status in ("pending", "approved"):
                return r
        self.requests[request.id] = request
        return request


class FakeSession(SimpleNamespace):
    __hash__ = object.__hash__  # weak references and identity hashing, like a Session


def session(status: str = "I") -> Any:
    identity = Identity(subject="agent-1", groups=("agents",), db_roles=("r",), agent_id=None, session_id=None,
                        tool_call_id=None, token_id="t", issuer="i", expires_at=0.0, claims=MappingProxyType({}))
    return FakeSession(id="s1", identity=identity, database="app", db_role="r",
                       tracker=SimpleNamespace(transaction_status=status),
                       emit_audit=MemoryAuditSink().emit)


def run(verdict: Any) -> Any:
    assert isinstance(verdict, Hold)
    return asyncio.run(verdict.decision)  # type: ignore[arg-type]


def test_only_query_bind_and_function_call_are_judged() -> None:
    gate, s = PolicyGate(POLICY, MemoryStore()), session()
    assert gate.inspect(s, Statement(0x50, "drop table t", "")) is None  # Parse: syntax only
    bind = Bind("", "", (), (), ()).encode()[5:]
    assert isinstance(run(gate.inspect(s, Statement(0x42, "drop table t", "", bind))), Refuse)
    assert gate.inspect(s, Statement(0x45, "drop table t", "", bind)) is None  # Execute: judged at Bind
    assert isinstance(run(gate.inspect(s, Statement(0x51, "drop table t"))), Refuse)


def test_fast_path_function_call_is_denied() -> None:
    gate, s = PolicyGate(POLICY, MemoryStore()), session()
    oid = FunctionCall(764, (), (), 0).function_oid
    verdict = gate.inspect(s, Statement(0x46, f"<function call oid={oid}>"))
    assert isinstance(verdict, Refuse) and verdict.error.sqlstate == "42501"
    assert verdict.error.message == "pgproxy policy no-fastpath: no fast path"


def test_syntax_error_at_parse_has_position() -> None:
    verdict = PolicyGate(POLICY).inspect(session(), Statement(0x50, "select 1 frm t where", "s1"))
    assert isinstance(verdict, Refuse)
    assert verdict.error.sqlstate == "42601" and verdict.error.get("P") == "14"


def test_refuse_mode_with_memory_store() -> None:
    store = MemoryStore()
    gate, s = PolicyGate(POLICY, store), session()
    first = run(gate.inspect(s, Statement(0x51, "drop table t")))
    assert isinstance(first, Refuse) and first.error.sqlstate == "PXA01"
    (request,) = store.requests.values()
    assert request.id in (first.error.message or "") and request.rule == "approve-drop"
    request.status = "approved"
    assert run(gate.inspect(s, Statement(0x51, "drop table t"))) is None
    assert request.status == "used"
    again = run(gate.inspect(s, Statement(0x51, "drop table t")))
    assert isinstance(again, Refuse) and again.error.sqlstate == "PXA01"


def test_in_a_transaction_refuse_mode_refuses_with_the_id() -> None:
    verdict = run(PolicyGate(POLICY, MemoryStore()).inspect(session("T"), Statement(0x51, "drop table t")))
    assert isinstance(verdict, Refuse) and verdict.error.sqlstate == "PXA01"
    message = verdict.error.get("M") or ""
    assert message.startswith("approval apr_") and "roll back this transaction" in message


def test_in_a_transaction_hold_when_the_rule_says_so() -> None:
    policy = parse_policy(yaml.safe_load(
        "rules: [{name: a, match: {}, action: approve, approvers: [dba], in_transaction: hold}]"))
    verdict = PolicyGate(policy, MemoryStore()).inspect(session("T"), Statement(0x51, "drop table t"))
    assert isinstance(verdict, Hold) and verdict.notice is not None
    assert (verdict.notice.get("M") or "").startswith("waiting for approval apr_")
    verdict.decision.close()  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"rules\[0\]\.in_transaction: must be refuse or hold"):
        parse_policy(yaml.safe_load(
            "rules: [{name: a, match: {}, action: approve, approvers: [dba], in_transaction: wait}]"))
    with pytest.raises(ConfigError, match=r"rules\[0\]\.in_transaction: only valid with action approve"):
        parse_policy(yaml.safe_load("rules: [{name: a, match: {}, action: allow, in_transaction: hold}]"))


def test_store_unavailable_fails_closed() -> None:
    verdict = run(PolicyGate(POLICY, MemoryStore(fail=True)).inspect(session(), Statement(0x51, "drop table t")))
    assert isinstance(verdict, Refuse) and verdict.error.sqlstate == "57P03"
    assert isinstance(PolicyGate(POLICY, None).inspect(session(), Statement(0x51, "drop table t")), Refuse)


def test_decisions_are_cached_per_session() -> None:
    gate, s = PolicyGate(POLICY), session()
    assert gate.inspect(s, Statement(0x51, "select 1")) is None
    assert "select 1" in gate._decisions[s].by_text


def test_a_statement_with_new_literals_reuses_the_decision_of_its_shape() -> None:
    """The policy is evaluated once per shape whose classification holds for every text of it; a shape
    whose classification reads its constants (destructive detection: WHERE true) is judged text by text."""
    calls: list[str] = []

    class Counting:
        def decide(self, identity: Any, classification: Any, database: str, role: str) -> Any:
            calls.append(classification.statements[0].sql)
            return POLICY.decide(identity, classification, database, role)

    gate, s = PolicyGate(POLICY, MemoryStore()), session()
    gate.policy = Counting()  # type: ignore[assignment]
    for n in range(3):
        assert gate.inspect(s, Statement(0x51, f"select * from t where id = {n}")) is None
    assert calls == ["select * from t where id = 0"]
    assert gate.inspect(s, Statement(0x51, "delete from t where id = 1")) is None
    verdict = gate.inspect(s, Statement(0x51, "delete from t where true"))
    assert isinstance(verdict, Hold)  # destructive: the approve rule, not the decision for id = 1
    verdict.decision.close()  # type: ignore[attr-defined]
    verdict = gate.inspect(s, Statement(0x51, "delete from t where 1 = 1"))
    assert isinstance(verdict, Hold)
    verdict.decision.close()  # type: ignore[attr-defined]
    assert calls[-2:] == ["delete from t where true", "delete from t where 1 = 1"]

"""PolicyGate: classify each statement, decide by policy, and ask for approvals when a rule says so.

Where it judges:

* Query (simple protocol): the whole string, at once.
* Parse: only the syntax. A string pglast cannot read (its grammar is PostgreSQL 17's, not exactly the
  server's) goes to the server when the policy allows any statement there (``Policy.decide_unparsed``), so
  the server answers it; otherwise the proxy refuses it with 42601, saying that the proxy could not read it.
* Bind: the statement with its bound parameters (the fingerprint of an approval covers them, so an
  approval for ``id = 1`` does not run ``id = 2``). Bind, not Execute: the server plans an unnamed
  statement at Bind, and planning can already run functions (constant folding) or fail on them, so
  Bind is the earliest point where the parameters are known and nothing has run yet. One Bind may be
  followed by several Executes of the same portal (fetching in batches): they need no new decision.
* Execute: nothing (its portal was judged at Bind).
* FunctionCall (fast path, e.g. libpq's lo_import): class ``function_call``.

Decisions: allow lets the request through; deny refuses it with 42501 "pgproxy policy <rule>:
<message>"; approve goes to the approval store (see ``pgproxy.policy.approvals``):

* refuse mode: an approved, unused request for this exact statement is consumed and the statement runs
  once; otherwise a request is filed and the statement fails with PXA01 naming the approval id.
  Inside a transaction block refusing would abort the transaction, so the gate holds instead.
* hold mode: the session waits (a NOTICE names the approval id) until the request is approved (the
  statement runs), denied or timed out (PXA02).

A store that cannot be reached refuses the statement with 57P03 (fail closed: nothing that needs an
approval runs without one).

Cost: classification is cached by SQL text and by shape (``classify.analyse``); decisions per session by
SQL text, and by shape when the classification holds for every text of the shape (a decision depends on
the classification, the caller, the database and the role only), so a repeated or prepared statement
costs a dict lookup and a statement with new literals no policy evaluation. Every deny/approve decision is
written to the audit log as a ``policy_decision`` event; allows only when ``audit_allowed`` (the
``statement`` event records what ran anyway).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import TYPE_CHECKING, Any

from cachebox import FIFOCache

from ..core.plugins import Hold, Refuse, SessionContext, Verdict
from ..core.reading import unparsed_error
from ..core.statement import SqlSyntaxError, Statement
from ..metrics import SYNTAX_ERROR_CLASSES, ProxyMetrics
from ..protocol import errors
from ..protocol.messages import ErrorResponse, NoticeResponse
from ..protocol.types import Frontend
from ..upstream_login import upstream_dsn
from .approval_factory import new_request
from .approval_impact import estimate_impact
from .approvals import ApprovalRequest, ApprovalStore
from .classify import Classification, StatementInfo, analyse_statement, classify_statement
from .rules import ApprovalRequirement, Decision, Policy

if TYPE_CHECKING:
    from ..identity import Identity

    Session = SessionContext[Identity]

log = logging.getLogger(__name__)

MAX_CACHED_DECISIONS = 2048  # per session
_KIND_QUERY, _KIND_PARSE, _KIND_EXECUTE = Frontend.QUERY, Frontend.PARSE, Frontend.EXECUTE
_KIND_FUNCTION, _KIND_BIND = Frontend.FUNCTION_CALL, Frontend.BIND
_JUDGED = frozenset({_KIND_QUERY, _KIND_BIND, _KIND_FUNCTION})


def function_call_classification(sql: str) -> Classification:
    info = StatementInfo(sql, "FunctionCall", frozenset({"function_call"}), (), (), (),
                         (f"fast-path function call ({sql.strip('<>')})",))
    return Classification((info,), info.classes, (), (), (), info.reasons)


def params_as_text(request: Statement) -> list[str | None]:
    """The bound parameters as the fingerprint sees them: text as text, binary as \\x-hex."""
    bind = request.bind
    if bind is None:
        return []
    out: list[str | None] = []
    for i, value in enumerate(bind.params):
        if value is None:
            out.append(None)
        elif bind.param_format(i) == 0:
            out.append(bytes(value).decode("utf-8", "surrogateescape"))
        else:
            out.append("\\x" + bytes(value).hex())
    return out


class PolicyGate:
    """A FrontendGate that enforces ``policy``, filing approval requests in ``store``."""

    def __init__(self, policy: Policy, store: ApprovalStore | None = None, *, audit_allowed: bool = False,
                 metrics: ProxyMetrics | None = None) -> None:
        self.policy = policy
        self.metrics = metrics if metrics is not None else ProxyMetrics()  # statements by class and decision
        self.store = store
        self.audit_allowed = audit_allowed
        # Per session (dropped with it), by statement text and by shape: a repeated statement is judged once.
        self._decisions: weakref.WeakKeyDictionary[Session, _Decisions] = weakref.WeakKeyDictionary()
        self._background: set[asyncio.Future[None]] = set()

    def use_policy(self, policy: Policy, *, audit_allowed: bool) -> None:
        """Judge every statement from now on by ``policy`` (a config reload); decisions cached under the
        old policy are dropped, so open sessions get the new rules at their next statement."""
        self.policy = policy
        self.audit_allowed = audit_allowed
        self._decisions = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------------------------- the seam

    def inspect(self, session: Session, request: Statement) -> Verdict:
        msg_type = request.msg_type
        if msg_type in _JUDGED:
            return self._judge(session, request)
        if msg_type == _KIND_PARSE:
            try:
                classify_statement(request)
            except SqlSyntaxError as exc:
                return self._unparsed(session, request, exc)
            return None
        return None  # Execute: its portal was judged at Bind

    def _unparsed(self, session: Session, request: Statement, exc: SqlSyntaxError) -> Verdict:
        """A statement pglast cannot read: the server answers it if the policy allows any statement
        here; otherwise the proxy refuses it, saying that it (not the server) could not read it."""
        identity = session.identity
        if identity is None:
            return Refuse(errors.error(errors.INSUFFICIENT_PRIVILEGE, "pgproxy policy: no identity"))
        decision = self.policy.decide_unparsed(identity, session.database, session.db_role)
        if decision.action == "allow":
            self.metrics.statement(SYNTAX_ERROR_CLASSES, "allow")
            if self.audit_allowed:
                self._emit(session, request, None, "allow", decision.rule, None, error=exc.message)
            return None
        self.metrics.statement(SYNTAX_ERROR_CLASSES, "refused")
        self._emit(session, request, None, "refuse", decision.rule, None, error=exc.message)
        return Refuse(unparsed_error(exc, f"policy rule {decision.rule} may apply to it"))

    def _judge(self, session: Session, request: Statement) -> Verdict:
        decisions = self._decisions.get(session)
        if decisions is None:
            decisions = self._decisions[session] = _Decisions()
        try:
            sql = request.server_text()
        except SqlSyntaxError as exc:
            return self._unparsed(session, request, exc)
        cached = decisions.by_text.get(sql)
        if cached is None:
            shape: str | None = None
            if request.msg_type == _KIND_FUNCTION:
                classification = function_call_classification(sql)
            else:
                try:
                    analysis = analyse_statement(request)
                except SqlSyntaxError as exc:
                    return self._unparsed(session, request, exc)
                classification = analysis.classification
                if analysis.shaped:
                    shape = analysis.shape
            decision = decisions.by_shape.get(shape) if shape is not None else None
            if decision is None:
                identity = session.identity
                if identity is None:  # cannot happen after login; fail closed
                    return Refuse(errors.error(errors.INSUFFICIENT_PRIVILEGE, "pgproxy policy: no identity"))
                decision = self.policy.decide(identity, classification, session.database, session.db_role)
                if shape is not None:
                    decisions.by_shape[shape] = decision
            cached = decisions.by_text[sql] = (decision, classification)
        decision, classification = cached
        action = decision.action
        self.metrics.statement(classification.classes, action)
        if action == "allow":
            if self.audit_allowed:
                self._emit(session, request, classification, "allow", decision.rule, None)
            return None
        if action == "deny":
            self._emit(session, request, classification, "deny", decision.rule, None)
            return Refuse(errors.error(errors.INSUFFICIENT_PRIVILEGE,
                                       f"pgproxy policy {decision.rule}: {decision.message}",
                                       detail="; ".join(decision.reasons) or None))
        return self._approve(session, request, classification, decision)

    # ------------------------------------------------------------------------------------ approvals

    def _approve(self, session: Session, request: Statement, classification: Classification,
                 decision: Decision) -> Verdict:
        requirement = decision.approval
        assert requirement is not None
        identity = session.identity
        assert identity is not None
        params = params_as_text(request)
        mode = requirement.mode
        in_transaction = session.tracker.transaction_status != "I"
        if mode == "refuse" and in_transaction and requirement.in_transaction == "hold":
            mode = "hold"  # the rule asks to wait rather than abort the caller's transaction
        pending = new_request(requester=identity.audit_fields(), database=session.database,
                              sql=request.server_text(),
                              params=params, classification=classification.summary(), rule=decision.rule,
                              approver_groups=requirement.approvers, required_approvals=requirement.approvals,
                              mode=mode, expiry_seconds=requirement.expires)
        # The request's id is known once the store has it (it may reuse an existing one): the
        # policy_approval events carry it.
        self._emit(session, request, classification, "approve", decision.rule, None, mode=mode)
        if self.store is None:
            return Refuse(_unavailable("no approval store is configured"))
        if mode == "hold":
            notice = NoticeResponse.build("NOTICE", "00000", f"waiting for approval {pending.id} (rule "
                                          f"{decision.rule})", hint=_how_to_approve(pending.id, requirement))
            return Hold(self._hold(session, pending, requirement), notice)
        return Hold(self._refuse(session, pending, requirement, in_transaction=in_transaction))

    async def _use_approval(self, session: Session, fingerprint: str) -> bool:
        """Consume an approved, unused approval for this statement (recording it); False if none."""
        assert self.store is not None
        used = await self.store.consume(fingerprint)
        if used is None:
            return False
        self._emit_approval(session, used, "used")
        return True

    async def _refuse(self, session: Session, pending: ApprovalRequest, requirement: ApprovalRequirement, *,
                      in_transaction: bool = False) -> Refuse | None:
        store = self.store
        assert store is not None
        try:
            if await self._use_approval(session, pending.fingerprint):
                return None
            stored = await store.create(pending)
            self._estimate_impact(session, stored)
            if stored.status == "approved" and await self._use_approval(session, pending.fingerprint):
                return None  # approved between our two calls
        except Exception as exc:  # ApprovalStoreUnavailable and anything else: fail closed
            log.warning("session %s: approval store failed: %s", session.id, exc)
            return Refuse(_unavailable(str(exc)))
        self._emit_approval(session, stored, "required")
        groups = " or ".join(requirement.approvers)
        retry = ("then roll back this transaction (this error aborted it) and run it again: the approved "
                 "statement runs once" if in_transaction else "then run the same statement again")
        return Refuse(errors.error(
            errors.APPROVAL_REQUIRED,
            f"approval {stored.id} required (rule {stored.rule}): ask an approver in {groups} to run "
            f"`pgproxy approvals approve {stored.id}`, {retry}",
            detail="; ".join(stored.classification.get("reasons", ())) or None,
            hint="The approval is for this exact statement, parameters, database and caller, and runs it once."))

    async def _hold(self, session: Session, pending: ApprovalRequest,
                    requirement: ApprovalRequirement) -> Refuse | None:
        store = self.store
        assert store is not None
        try:
            if await self._use_approval(session, pending.fingerprint):
                return None
            stored = await store.create(pending)
            self._estimate_impact(session, stored)
            self._emit_approval(session, stored, "waiting")
            result = (stored if stored.status != "pending"
                      else await self.metrics.approval_wait(store.wait(stored.id, requirement.timeout)))
            if result.status == "approved":
                if await self._use_approval(session, pending.fingerprint):
                    return None
                return Refuse(errors.error(errors.APPROVAL_DENIED, f"approval {result.id} was already used"))
        except Exception as exc:
            log.warning("session %s: approval store failed: %s", session.id, exc)
            return Refuse(_unavailable(str(exc)))
        if result.status == "denied":
            refusals = [d for d in result.decisions if not d.approve]
            by = f" by {refusals[-1].approver}" if refusals else ""
            why = f": {refusals[-1].reason}" if refusals and refusals[-1].reason else ""
            self._emit_approval(session, result, "denied")
            return Refuse(errors.error(errors.APPROVAL_DENIED, f"approval {result.id} denied{by}{why}",
                                       hint="Do not run this statement again; ask the approver if it is needed."))
        self._emit_approval(session, result, "timed out")
        return Refuse(errors.error(
            errors.APPROVAL_DENIED,
            f"approval {result.id} timed out after {requirement.timeout:g} s (rule {result.rule}): ask an approver "
            f"in {' or '.join(requirement.approvers)} to run `pgproxy approvals approve {result.id}`, then run the "
            "statement again (in a transaction: roll back and run the transaction again)",
            hint="The request stays open until it expires; once approved, the same statement runs once."))

    async def aclose(self) -> None:
        """Stop background work (impact estimates) when the proxy shuts down."""
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _estimate_impact(self, session: Session, request: ApprovalRequest) -> None:
        """In the background: the plan (and rows touched) for the approver, as the caller's own role."""
        if request.impact is not None or request.status != "pending" or self.store is None:
            return
        try:
            dsn = upstream_dsn(session.upstream_config, session.db_role, session.database)
        except Exception as exc:  # best effort: never fails the statement
            log.warning("session %s: no impact estimate: %s", session.id, exc)
            return
        store = self.store

        async def estimate() -> None:
            # Counting rows runs the statement (rolled back); functions could act beyond the
            # transaction (dblink, pg_terminate_backend...), so such statements are only EXPLAINed.
            calls_functions = bool(request.classification.get("functions"))
            impact = await estimate_impact(dsn, request.sql, request.params, count_rows=not calls_functions)
            try:
                await store.set_impact(request.id, impact)
            except Exception as exc:  # the request stands without an estimate
                log.warning("cannot store impact estimate for %s: %s", request.id, exc)

        task = asyncio.ensure_future(estimate())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---------------------------------------------------------------------------------------- audit

    def _emit(self, session: Session, request: Statement, classification: Classification | None, decision: str,
              rule: str, approval_id: str | None, **extra: Any) -> None:
        event: dict[str, Any] = {"event": "policy_decision", "ts": time.time(), "session": session.id,
                                 "kind": request.kind, "sql": request.sql, "decision": decision, "rule": rule}
        if classification is not None:
            event["classes"] = sorted(classification.classes)
            event["tables"] = list(classification.tables)
            event["reasons"] = list(classification.reasons)
        if approval_id is not None:
            event["approval_id"] = approval_id
        event.update(extra)
        _emit(session, event)

    def _emit_approval(self, session: Session, request: ApprovalRequest, outcome: str) -> None:
        # Who decided, when and why goes into the proxy's own (signed) log, whichever front end
        # (CLI, HTTP API) recorded the decision in the store.
        _emit(session, {"event": "policy_approval", "ts": time.time(), "session": session.id,
                        "approval_id": request.id, "rule": request.rule, "outcome": outcome,
                        "status": request.status,
                        "decisions": [{"approver": d.approver, "approve": d.approve, "reason": d.reason, "at": d.at}
                                      for d in request.decisions]})


class _Decisions:
    """One session's decisions: by statement text (with its classification), and by shape."""

    __slots__ = ("by_shape", "by_text")

    def __init__(self) -> None:
        self.by_text: FIFOCache[str, tuple[Decision, Classification]] = FIFOCache(MAX_CACHED_DECISIONS)
        self.by_shape: FIFOCache[str, Decision] = FIFOCache(MAX_CACHED_DECISIONS)


def _emit(session: Session, event: dict[str, Any]) -> None:
    try:
        session.emit_audit(event)
    except Exception as exc:  # the session's own statement events fail closed on the same sink
        log.error("session %s: cannot record policy decision: %s", session.id, exc)


def _unavailable(why: str) -> ErrorResponse:
    return errors.error(errors.CANNOT_CONNECT_NOW,
                        "the approval store is unavailable: statements that need an approval are refused",
                        detail=why)


def _how_to_approve(approval_id: str, requirement: ApprovalRequirement) -> str:
    return (f"An approver in {' or '.join(requirement.approvers)} runs `pgproxy approvals approve {approval_id}`; "
            f"this session waits up to {requirement.timeout:g} s.")


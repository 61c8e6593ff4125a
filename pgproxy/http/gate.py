"""Approvals for HTTP requests, through the same store, CLI and admin API as SQL approvals.

An HTTP request is filed as an ``ApprovalRequest`` whose ``database`` is ``http:<target>``, whose
``sql`` is ``METHOD /path?query`` and whose single parameter is ``sha256:<body digest>``: the
fingerprint therefore covers subject, target, method, path and body, so an approval runs exactly that
request once. Modes behave as on the SQL side (``pgproxy.policy.gate``): ``refuse`` answers at once
(428 with the approval id; the caller retries once approved), ``hold`` waits for the decision.

A store that fails refuses the request (503): nothing that needs an approval runs without one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..audit.sink import AuditSink
from ..identity import Identity
from ..policy.approval_factory import new_request
from ..policy.approvals import ApprovalRequest, ApprovalStore
from ..policy.rules import Decision

log = logging.getLogger(__name__)


@dataclass
class Verdict:
    """``status`` 0 means go ahead (``approval_id`` says which approval it used, if any)."""

    status: int = 0
    message: str = ""
    approval_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def approval_request(identity: Identity, target: str, method: str, path_qs: str, body_sha256: str,
                     decision: Decision, mode: str, preview: dict[str, Any]) -> ApprovalRequest:
    requirement = decision.approval
    assert requirement is not None
    return new_request(requester=identity.audit_fields(), database=f"http:{target}", sql=f"{method} {path_qs}",
                       params=[f"sha256:{body_sha256}"],
                       classification={"classes": ["http"], "reasons": list(decision.reasons),
                                       "target": target, "method": method, "body": preview},
                       rule=decision.rule, approver_groups=requirement.approvers,
                       required_approvals=requirement.approvals, mode="hold" if mode == "hold" else "refuse",
                       expiry_seconds=requirement.expires)


class HttpApprovals:
    def __init__(self, store: ApprovalStore | None, audit: AuditSink) -> None:
        self.store = store
        self.audit = audit

    async def check(self, session: str, exchange: str, pending: ApprovalRequest, decision: Decision) -> Verdict:
        """Use an approval for ``pending`` (consuming it), file it, or wait for it, depending on the mode."""
        requirement = decision.approval
        assert requirement is not None
        store = self.store
        if store is None:
            return Verdict(503, "no approval store is configured: requests that need an approval are refused")
        try:
            used = await self._use(store, session, exchange, pending.fingerprint)
            if used is not None:
                return Verdict(0, approval_id=used)
            stored = await store.create(pending)
            if stored.status == "approved":
                used = await self._use(store, session, exchange, pending.fingerprint)
                if used is not None:  # approved between our two calls
                    return Verdict(0, approval_id=used)
            if requirement.mode != "hold":
                self._emit(session, exchange, stored, "required")
                groups = " or ".join(requirement.approvers)
                return Verdict(428, f"approval {stored.id} required (rule {stored.rule}): ask an approver in "
                               f"{groups} to run `pgproxy approvals approve {stored.id}`, then send the same "
                               "request again", stored.id,
                               {"retry": "send the identical request (same method, path, query and body) once "
                                         "the approval is granted; it runs once"})
            self._emit(session, exchange, stored, "waiting")
            result = stored if stored.status != "pending" else await store.wait(stored.id, requirement.timeout)
            if result.status == "approved":
                used = await self._use(store, session, exchange, pending.fingerprint)
                if used is not None:
                    return Verdict(0, approval_id=used)
                return Verdict(403, f"approval {result.id} was already used", result.id)
        except Exception as exc:  # ApprovalStoreUnavailable and anything else: fail closed
            log.warning("http exchange %s: approval store failed: %s", exchange, exc)
            return Verdict(503, "the approval store is unavailable: requests that need an approval are refused")
        if result.status == "denied":
            refusals = [d for d in result.decisions if not d.approve]
            by = f" by {refusals[-1].approver}" if refusals else ""
            why = f": {refusals[-1].reason}" if refusals and refusals[-1].reason else ""
            self._emit(session, exchange, result, "denied")
            return Verdict(403, f"approval {result.id} denied{by}{why}", result.id)
        self._emit(session, exchange, result, "timed out")
        return Verdict(504, f"approval {result.id} timed out after {requirement.timeout:g} s", result.id)

    async def _use(self, store: ApprovalStore, session: str, exchange: str, fingerprint: str) -> str | None:
        """Consume an approved, unused approval for this request (recording it): its id, or None."""
        used = await store.consume(fingerprint)
        if used is None:
            return None
        self._emit(session, exchange, used, "used")
        return used.id

    def _emit(self, session: str, exchange: str, request: ApprovalRequest, outcome: str) -> None:
        try:
            self.audit.emit({"event": "policy_approval", "ts": time.time(), "session": session,
                             "exchange": exchange, "approval_id": request.id, "rule": request.rule,
                             "outcome": outcome, "status": request.status,
                             "decisions": [{"approver": d.approver, "approve": d.approve, "reason": d.reason,
                                            "at": d.at} for d in request.decisions]})
        except Exception as exc:  # the exchange record itself fails closed on the same sink
            log.error("http exchange %s: cannot record approval: %s", exchange, exc)

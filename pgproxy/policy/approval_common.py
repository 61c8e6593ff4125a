"""What every approval store shares: (de)serialisation, the decision rules, audit events and notifications.

The rules live here once and every store applies them inside its own transaction, so the CLI, the HTTP
API and the gate all get the same answers:

- nobody decides their own request (the approver's subject equals the requester's subject);
- the approver must be in at least one of the request's ``approver_groups`` (OR);
- ``required_approvals`` distinct approvers approve it; a single deny denies it;
- a closed request (denied, expired, used) takes no more decisions; an approved one can still be denied
  (revoked) until it is used, but not approved again;
- one decision per approver and request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import Any

from pgproxy.audit.sink import AuditSink
from pgproxy.policy.approvals import (
    ApprovalConflict,
    ApprovalDecision,
    ApprovalForbidden,
    ApprovalRequest,
    ApprovalStatus,
)

log = logging.getLogger(__name__)

STATUSES: tuple[ApprovalStatus, ...] = ("pending", "approved", "denied", "expired", "used")
OPEN_STATUSES: tuple[ApprovalStatus, ...] = ("pending", "approved")
# Fields that never change after creation; stored together as one JSON document.
_MUTABLE = ("status", "decisions", "impact")

Notifier = Callable[[ApprovalRequest], Awaitable[None]]


def request_to_dict(request: ApprovalRequest) -> dict[str, Any]:
    """JSON-ready view of a request (what the CLI, the HTTP API and the webhook show)."""
    return asdict(request)


def request_body(request: ApprovalRequest) -> dict[str, Any]:
    """The immutable part of a request, as stored in a store's ``body`` column."""
    data = asdict(request)
    for key in _MUTABLE:
        data.pop(key, None)
    return data


def request_from_parts(body: dict[str, Any], status: str, impact: dict[str, Any] | None,
                       decisions: Sequence[ApprovalDecision]) -> ApprovalRequest:
    if status not in STATUSES:
        raise ValueError(f"unknown approval status {status!r}")
    return ApprovalRequest(
        id=str(body["id"]), fingerprint=str(body["fingerprint"]), created_at=float(body["created_at"]),
        expires_at=float(body["expires_at"]), mode=body["mode"], requester=dict(body["requester"]),
        database=str(body["database"]), sql=str(body["sql"]), params=list(body["params"]),
        classification=dict(body["classification"]), rule=str(body["rule"]),
        approver_groups=list(body["approver_groups"]), required_approvals=int(body["required_approvals"]),
        reason=body.get("reason"), impact=impact, status=status,
        decisions=list(decisions))


def requester_subject(request: ApprovalRequest) -> str:
    return str(request.requester.get("subject", ""))


def effective_status(request: ApprovalRequest, now: float) -> ApprovalStatus:
    """The status with expiry applied (pending and approved requests expire at ``expires_at``)."""
    if request.status in OPEN_STATUSES and now >= request.expires_at:
        return "expired"
    return request.status


def may_decide(request: ApprovalRequest, approver: str, approver_groups: Sequence[str]) -> str | None:
    """Why ``approver`` may not decide ``request`` (self-approval, group), or None when allowed."""
    if approver == requester_subject(request):
        return "nobody may approve or deny their own request"
    if not set(approver_groups) & set(request.approver_groups):
        return f"not in an approver group of this request ({', '.join(request.approver_groups) or 'none'})"
    return None


def evaluate_decision(request: ApprovalRequest, approver: str, approver_groups: Sequence[str], approve: bool,
                      now: float) -> ApprovalStatus:
    """Check the rules for one decision and return the request's status after it.

    ``request.status`` must already have expiry applied. Raises ApprovalForbidden (self-approval, group)
    or ApprovalConflict (closed, already approved, already decided by this approver).
    """
    if not approver:
        raise ApprovalForbidden("the approver has no subject")
    why = may_decide(request, approver, approver_groups)
    if why is not None:
        raise ApprovalForbidden(why)
    if request.status not in OPEN_STATUSES:
        raise ApprovalConflict(f"request {request.id} is {request.status}: it takes no more decisions")
    if any(d.approver == approver for d in request.decisions):
        raise ApprovalConflict(f"{approver} has already decided request {request.id}")
    if not approve:
        return "denied"
    if request.status == "approved":
        raise ApprovalConflict(f"request {request.id} is already approved")
    approvers = {d.approver for d in request.decisions if d.approve} | {approver}
    return "approved" if len(approvers) >= max(1, request.required_approvals) else "pending"


class StoreEvents:
    """Audit events and new-request notifications (webhook) for a store. Never raises into the caller."""

    def __init__(self, audit: AuditSink | None = None, notify: Notifier | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.audit = audit
        self.notify = notify
        self.clock = clock
        self._tasks: set[asyncio.Task[None]] = set()

    def _emit(self, event: dict[str, Any]) -> None:
        if self.audit is None:
            return
        try:
            self.audit.emit(event)
        except Exception as exc:  # the decision is recorded in the store either way
            log.error("cannot audit %s: %s", event.get("event"), exc)

    def requested(self, request: ApprovalRequest) -> None:
        self._emit({"event": "approval_requested", "ts": self.clock(), "approval_id": request.id,
                    "fingerprint": request.fingerprint, "requester": request.requester,
                    "database": request.database, "sql": request.sql, "rule": request.rule,
                    "mode": request.mode, "approver_groups": request.approver_groups,
                    "required_approvals": request.required_approvals, "expires_at": request.expires_at,
                    "reason": request.reason})
        if self.notify is not None:
            task = asyncio.get_running_loop().create_task(self._notify(self.notify, request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _notify(notify: Notifier, request: ApprovalRequest) -> None:
        try:
            await notify(request)
        except Exception as exc:
            log.warning("approval notification for %s failed: %s", request.id, exc)

    def decided(self, request: ApprovalRequest, decision: ApprovalDecision, approver_groups: Sequence[str]) -> None:
        self._emit({"event": "approval_decided", "ts": decision.at, "approval_id": request.id,
                    "fingerprint": request.fingerprint, "approver": decision.approver,
                    "approver_groups": list(approver_groups), "approve": decision.approve,
                    "reason": decision.reason, "status": request.status,
                    "requester": requester_subject(request)})

    def used(self, request: ApprovalRequest) -> None:
        self._emit({"event": "approval_used", "ts": self.clock(), "approval_id": request.id,
                    "fingerprint": request.fingerprint, "requester": requester_subject(request)})

    async def drain(self, timeout: float = 6.0) -> None:
        """Wait for pending notifications (at close)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

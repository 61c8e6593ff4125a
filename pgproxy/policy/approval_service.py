"""What an approver may see and do, shared by the CLI and the HTTP API.

The approver is whoever the token says (verified by the same TokenVerifier and identity config as agents'
tokens): its subject decides, its groups authorise. A request is visible to, and decidable by, members of
its approver groups only; the store enforces the remaining rules (self-approval, quorum, closed...).
"""

from __future__ import annotations

from typing import Any

from pgproxy.identity import Identity, TokenVerifier
from pgproxy.policy.approval_common import may_decide, request_to_dict
from pgproxy.policy.approvals import (
    ApprovalForbidden,
    ApprovalNotFound,
    ApprovalRequest,
    ApprovalStatus,
    ApprovalStore,
)


def can_view(identity: Identity, request: ApprovalRequest) -> bool:
    return bool(set(identity.groups) & set(request.approver_groups))


class ApproverService:
    def __init__(self, store: ApprovalStore, verifier: TokenVerifier) -> None:
        self.store = store
        self.verifier = verifier

    async def authenticate(self, token: str) -> Identity:
        """The approver's identity; raises TokenError for a missing, invalid or expired token."""
        return await self.verifier.verify(token)

    async def list(self, identity: Identity, status: ApprovalStatus | None = None,
                   limit: int = 100) -> list[ApprovalRequest]:
        return [r for r in await self.store.list(status, limit) if can_view(identity, r)]

    async def show(self, identity: Identity, approval_id: str) -> ApprovalRequest:
        request = await self.store.get(approval_id)
        if request is None:
            raise ApprovalNotFound(f"no approval request {approval_id}")
        if not can_view(identity, request):
            raise ApprovalForbidden(f"not in an approver group of this request "
                                    f"({', '.join(request.approver_groups) or 'none'})")
        return request

    async def decide(self, identity: Identity, approval_id: str, approve: bool,
                     reason: str | None) -> ApprovalRequest:
        return await self.store.decide(approval_id, identity.subject, identity.groups, approve, reason)


def approver_view(request: ApprovalRequest, identity: Identity | None = None) -> dict[str, Any]:
    """Everything an approver needs to decide: exact SQL, parameters, identity, reasons, rule, impact,
    status and decisions (plus whether this approver may still decide)."""
    view = request_to_dict(request)
    approvers = {d.approver for d in request.decisions if d.approve}
    view["approvals"] = len(approvers)
    if identity is not None:
        view["you_may_decide"] = (request.status in ("pending", "approved")
                                  and may_decide(request, identity.subject, identity.groups) is None
                                  and all(d.approver != identity.subject for d in request.decisions))
    return view

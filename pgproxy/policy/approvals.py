"""Approval requests for individual statements, and the store interface they live in.

An approval is asked for one statement as one identity ran it: its fingerprint covers the subject, the
database, the SQL text and the bound parameters, so an approval can never be reused for a different
statement or by somebody else. Stores (SQLite by default, PostgreSQL for several proxy replicas)
implement ``ApprovalStore``; they enforce the rules (no self-approval, approver groups, quorum, expiry,
single use) so that every front end (CLI, HTTP API, web UI) gets them for free.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

ApprovalStatus = Literal["pending", "approved", "denied", "expired", "used"]
ApprovalMode = Literal["refuse", "hold"]


class ApprovalError(Exception):
    """A decision that breaks a rule (self-approval, wrong group, already decided, unknown id...)."""


class ApprovalNotFound(ApprovalError):
    """No request with that id (HTTP 404)."""


class ApprovalForbidden(ApprovalError):
    """The approver may not decide this request: self-approval or not in an approver group (HTTP 403)."""


class ApprovalConflict(ApprovalError):
    """The request is closed (denied, expired, used), already approved, or already decided by you (409)."""


class ApprovalStoreUnavailable(Exception):
    """The store cannot be reached: statements needing approval must be refused (fail closed)."""


def statement_fingerprint(subject: str, database: str, sql: str, params: Sequence[str | None]) -> str:
    """SHA-256 over who runs what where, with which parameters (length-prefixed, unambiguous)."""
    h = hashlib.sha256()
    for part in (subject, database, sql, *("\x00NULL" if p is None else p for p in params)):
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def new_approval_id() -> str:
    return "apr_" + secrets.token_hex(8)


@dataclass
class ApprovalDecision:
    approver: str  # subject of the approver's token
    approve: bool
    reason: str | None
    at: float


@dataclass
class ApprovalRequest:
    """One statement waiting for (or having received) human decisions."""

    id: str
    fingerprint: str
    created_at: float
    expires_at: float  # when a pending request expires, and how long an approval stays usable
    mode: ApprovalMode
    requester: dict[str, Any]  # Identity.audit_fields() of the caller
    database: str
    sql: str
    params: list[str | None]
    classification: dict[str, Any]  # classes, tables, functions, reasons
    rule: str  # the policy rule that asked for approval
    approver_groups: list[str]  # any of these groups may approve (OR)
    required_approvals: int
    reason: str | None = None  # why the caller wants it (e.g. from application_name or a comment)
    impact: dict[str, Any] | None = None  # plan, rows that would be touched
    status: ApprovalStatus = "pending"
    decisions: list[ApprovalDecision] = field(default_factory=list)


class ApprovalStore(Protocol):
    """Where approval requests live; every method may raise ApprovalStoreUnavailable."""

    async def create(self, request: ApprovalRequest) -> ApprovalRequest:
        """Store a new request, or return the pending/approved one with the same fingerprint."""

    async def get(self, approval_id: str) -> ApprovalRequest | None: ...

    async def list(self, status: ApprovalStatus | None = None, limit: int = 100) -> list[ApprovalRequest]: ...

    async def decide(self, approval_id: str, approver: str, approver_groups: Sequence[str], approve: bool,
                     reason: str | None) -> ApprovalRequest:
        """Record a decision; raises ApprovalError for self-approval, a group mismatch or a closed request."""

    async def consume(self, fingerprint: str) -> ApprovalRequest | None:
        """Refuse mode: an approved, unexpired, unused request for this fingerprint, now marked used."""

    async def wait(self, approval_id: str, timeout: float) -> ApprovalRequest:
        """Hold mode: return once the request is decided or expired (or after ``timeout``)."""

    async def set_impact(self, approval_id: str, impact: dict[str, Any]) -> None: ...

    async def close(self) -> None: ...

"""Build the configured approval store, and new requests with the configured defaults."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from pgproxy.audit.sink import AuditSink
from pgproxy.config import ApprovalsConfig, ConfigError, ProxyConfig
from pgproxy.policy.approval_common import Notifier
from pgproxy.policy.approval_webhook import WebhookNotifier
from pgproxy.policy.approvals import (
    ApprovalMode,
    ApprovalRequest,
    ApprovalStore,
    new_approval_id,
    statement_fingerprint,
)


def build_approval_store(config: ProxyConfig | ApprovalsConfig, *, audit: AuditSink | None = None,
                         clock: Callable[[], float] = time.time) -> ApprovalStore:
    """The store named in ``config.approvals`` (SQLite or PostgreSQL), with the webhook when configured.

    Connects lazily: an unreachable store shows up as ApprovalStoreUnavailable on first use.
    """
    approvals = config.approvals if isinstance(config, ProxyConfig) else config
    if approvals is None:
        raise ConfigError("approvals: not configured (add an approvals section: store, path or dsn_env)")
    notifiers: list[Notifier] = []
    if approvals.webhook_url:
        notifiers.append(WebhookNotifier(approvals.webhook_url))
    if approvals.slack is not None:
        from pgproxy.policy.approval_slack import SlackNotifier

        notifiers.append(SlackNotifier(approvals.slack))
    notify = notifiers[0] if len(notifiers) == 1 else _Notifiers(notifiers) if notifiers else None
    if approvals.store == "sqlite":
        from pgproxy.policy.stores.sqlite import SQLiteApprovalStore

        assert approvals.path is not None
        return SQLiteApprovalStore(approvals.path, audit=audit, notify=notify, clock=clock)
    from pgproxy.policy.stores.postgres import PostgresApprovalStore

    return PostgresApprovalStore(approvals.dsn(), schema=approvals.schema, audit=audit, notify=notify, clock=clock)


class _Notifiers:
    """Several notifiers as one (each already logs and swallows its own failures)."""

    def __init__(self, notifiers: Sequence[Notifier]) -> None:
        self.notifiers = tuple(notifiers)

    async def __call__(self, request: ApprovalRequest) -> None:
        await asyncio.gather(*(notify(request) for notify in self.notifiers))


def new_request(*, requester: dict[str, Any], database: str, sql: str, params: Sequence[str | None],
                classification: dict[str, Any], rule: str, approver_groups: Sequence[str],
                required_approvals: int = 1, mode: ApprovalMode = "refuse", reason: str | None = None,
                expiry_seconds: float = 900.0, now: float | None = None) -> ApprovalRequest:
    """A fresh pending request with its fingerprint computed from who/where/what/parameters."""
    created = time.time() if now is None else now
    subject = str(requester.get("subject", ""))
    return ApprovalRequest(
        id=new_approval_id(), fingerprint=statement_fingerprint(subject, database, sql, params),
        created_at=created, expires_at=created + expiry_seconds, mode=mode, requester=dict(requester),
        database=database, sql=sql, params=list(params), classification=dict(classification), rule=rule,
        approver_groups=list(approver_groups), required_approvals=required_approvals, reason=reason)

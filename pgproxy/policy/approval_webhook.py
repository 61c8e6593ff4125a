"""Posts each new approval request to a webhook (Slack-compatible): never blocks or fails a statement.

The payload is the request as JSON (exactly what ``pgproxy approvals show --json`` prints) plus a
``text`` field that Slack and most chat tools display: who wants to run what, why, the approval id and
the command that approves it. Failures (timeout, refused, non-2xx) are logged and otherwise ignored.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp

from pgproxy.policy.approval_common import request_to_dict, requester_subject
from pgproxy.policy.approvals import ApprovalRequest

log = logging.getLogger(__name__)

WEBHOOK_TIMEOUT_SECONDS = 5.0
_SQL_PREVIEW_CHARS = 500


def webhook_text(request: ApprovalRequest) -> str:
    """The human summary: who / what / why / approval id / how to approve."""
    sql = request.sql if len(request.sql) <= _SQL_PREVIEW_CHARS else request.sql[:_SQL_PREVIEW_CHARS] + "…"
    reasons = request.classification.get("reasons") or []
    why = "; ".join(str(r) for r in reasons) if isinstance(reasons, list) and reasons else request.rule
    lines = [
        f"Approval needed: {requester_subject(request)} wants to run on database {request.database}:",
        f"```{sql}```",
        f"Why it needs approval: {why} (rule {request.rule})",
    ]
    if request.params:
        lines.append(f"Parameters: {request.params!r}"[:_SQL_PREVIEW_CHARS])
    if request.reason:
        lines.append(f"Caller's reason: {request.reason}")
    groups = ", ".join(request.approver_groups)
    lines.append(f"Approval id: {request.id} — needs {request.required_approvals} approval(s) from: {groups}")
    lines.append(f"Approve: pgproxy approvals approve {request.id} --reason '...'   "
                 f"(deny: pgproxy approvals deny {request.id})")
    return "\n".join(lines)


def webhook_payload(request: ApprovalRequest) -> dict[str, Any]:
    payload = request_to_dict(request)
    payload["approval_id"] = request.id
    payload["text"] = webhook_text(request)
    return payload


class WebhookNotifier:
    """Callable ``notify(request)`` for the stores: one POST per new request, 5 s timeout."""

    def __init__(self, url: str, *, timeout: float = WEBHOOK_TIMEOUT_SECONDS) -> None:
        self.url = url
        self.timeout = timeout

    async def __call__(self, request: ApprovalRequest) -> None:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session, \
                    session.post(self.url, json=webhook_payload(request)) as response:
                if response.status >= 300:
                    log.warning("approval webhook for %s: HTTP %d", request.id, response.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("approval webhook for %s failed: %s", request.id, exc or type(exc).__name__)

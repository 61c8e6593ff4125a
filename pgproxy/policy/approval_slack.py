"""Approval requests as Slack messages with Approve / Deny buttons (``approvals.slack``).

:class:`SlackNotifier` posts each new request with ``chat.postMessage`` (Block Kit: a summary
section and an actions block whose buttons carry the approval id); :func:`decided_blocks` is the
message after a decision, which pgproxy/admin/slack.py writes back with ``chat.update``. Button
presses come back signed to the admin listener, never here. A Slack failure is logged and never
fails or blocks a statement.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp

from pgproxy.config import ConfigError, SlackConfig
from pgproxy.policy.approval_webhook import webhook_text
from pgproxy.policy.approvals import ApprovalRequest

log = logging.getLogger(__name__)

SLACK_TIMEOUT_SECONDS = 5.0
APPROVE_ACTION = "pgproxy_approve"
DENY_ACTION = "pgproxy_deny"
MAX_SECTION_CHARS = 3000  # Slack's limit for a section's text


class SlackApiError(Exception):
    """Slack answered ``ok: false`` (the ``error`` code is the message) or could not be reached."""


class SlackApi:
    """The few Web API methods pgproxy calls, with the bot token, as JSON."""

    def __init__(self, config: SlackConfig, *, timeout: float = SLACK_TIMEOUT_SECONDS) -> None:
        self.config = config
        self.base = config.api_url if config.api_url.endswith("/") else config.api_url + "/"
        self.timeout = timeout

    async def call(self, method: str, payload: dict[str, Any]) -> dict[str, Any]:
        try:  # read when used: `pgproxy approvals` builds the store too, and never posts
            token = self.config.bot_token()
        except ConfigError as exc:
            raise SlackApiError(f"{method}: {exc}") from None
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json; charset=utf-8"}
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout)) as session, \
                    session.post(self.base + method, json=payload, headers=headers) as response:
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise SlackApiError(f"{method}: {exc or type(exc).__name__}") from None
        if not isinstance(body, dict) or body.get("ok") is not True:
            error = body.get("error") if isinstance(body, dict) else None
            raise SlackApiError(f"{method}: {error or 'not ok'}")
        return body


def escape(text: str) -> str:
    """Slack's mrkdwn escaping: &, < and > in user-provided text would otherwise be markup."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _summary(request: ApprovalRequest) -> dict[str, Any]:
    text = escape(webhook_text(request))
    if len(text) > MAX_SECTION_CHARS:
        text = text[:MAX_SECTION_CHARS - 1] + "…"
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


def _buttons(request: ApprovalRequest) -> dict[str, Any]:
    return {"type": "actions", "block_id": "pgproxy_decision", "elements": [
        {"type": "button", "action_id": APPROVE_ACTION, "style": "primary", "value": request.id,
         "text": {"type": "plain_text", "text": "Approve"}},
        {"type": "button", "action_id": DENY_ACTION, "style": "danger", "value": request.id,
         "text": {"type": "plain_text", "text": "Deny"}},
    ]}


def request_blocks(request: ApprovalRequest) -> list[dict[str, Any]]:
    """The message for a new request: the summary and the two buttons."""
    return [_summary(request), _buttons(request)]


def decision_line(request: ApprovalRequest) -> str:
    """Who decided what so far, and the request's status."""
    parts = [f"{'approved' if d.approve else 'denied'} by {d.approver}" for d in request.decisions]
    needed = f" ({sum(d.approve for d in request.decisions)} of {request.required_approvals} approvals)" \
        if request.status == "pending" else ""
    return escape(f"{'; '.join(parts) or 'no decision yet'} — the request is {request.status}{needed}")


def decided_blocks(request: ApprovalRequest) -> list[dict[str, Any]]:
    """The message after a decision: buttons stay only while the request still needs approvals."""
    blocks = [_summary(request), {"type": "context", "elements": [{"type": "mrkdwn", "text": decision_line(request)}]}]
    if request.status == "pending":
        blocks.append(_buttons(request))
    return blocks


class SlackNotifier:
    """Callable ``notify(request)`` for the stores: one ``chat.postMessage`` per new request."""

    def __init__(self, config: SlackConfig) -> None:
        self.channel = config.channel
        self.api = SlackApi(config)

    async def __call__(self, request: ApprovalRequest) -> None:
        try:
            await self.api.call("chat.postMessage", {"channel": self.channel,
                                                     "text": escape(webhook_text(request))[:MAX_SECTION_CHARS],
                                                     "blocks": request_blocks(request)})
        except SlackApiError as exc:
            log.warning("Slack message for approval %s failed: %s", request.id, exc)

"""Slack's button presses on approval messages: ``POST /slack/interactions`` on the admin listener.

Every request must carry Slack's signature (``X-Slack-Signature``: ``v0=`` HMAC-SHA256 of
``v0:<timestamp>:<body>`` with the app's signing secret) and a timestamp within
``timestamp_tolerance_seconds`` of now; a request whose signature was already seen is a replay and
is refused (401 for all three). The Slack user is then mapped to an identity through
``approvals.slack.approvers`` (Slack user id -> subject and groups) and decides through the same
ApproverService as the API and the UI, so the store's rules hold: approver groups, quorum, no
self-approval, single decision. The message is then updated with the decision (``chat.update``);
a refusal is told only to the person who pressed (``chat.postEphemeral``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

from pgproxy.config import SlackConfig
from pgproxy.identity import Identity
from pgproxy.policy.approval_service import ApproverService
from pgproxy.policy.approval_slack import (
    APPROVE_ACTION,
    DENY_ACTION,
    SlackApi,
    SlackApiError,
    decided_blocks,
)
from pgproxy.policy.approvals import ApprovalError, ApprovalStoreUnavailable

log = logging.getLogger(__name__)

PATH = "/slack/interactions"
DECISION_SECONDS = 60.0  # how long the identity built for one button press is good for


class _Refused(Exception):
    pass


class SlackInteractions:
    """Verifies and carries out Approve / Deny presses."""

    def __init__(self, config: SlackConfig, *, now: Callable[[], float] = time.time) -> None:
        self.config = config
        self._secret = config.signing_secret()
        self._approvers = {a.slack_user: a for a in config.approvers}
        self._seen: dict[str, float] = {}  # signatures of accepted requests -> their timestamp
        self._now = now
        self.api = SlackApi(config)
        self._service: ApproverService | None = None

    def install(self, app: web.Application, service: ApproverService) -> None:
        self._service = service
        app.router.add_post(PATH, self.handle)

    # ------------------------------------------------------------------------------------------
    # Request verification

    def verify(self, timestamp: str, signature: str, body: bytes) -> None:
        """Raise _Refused unless the request is Slack's, fresh and not seen before."""
        try:
            ts = int(timestamp)
        except ValueError:
            raise _Refused("missing or malformed X-Slack-Request-Timestamp") from None
        now = self._now()
        tolerance = self.config.timestamp_tolerance_seconds
        if abs(now - ts) > tolerance:
            raise _Refused("stale X-Slack-Request-Timestamp")
        expected = "v0=" + hmac.new(self._secret, b"v0:" + timestamp.encode() + b":" + body,
                                    hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
            raise _Refused("bad X-Slack-Signature")
        for seen, at in list(self._seen.items()):
            if at < now - 2 * tolerance:
                del self._seen[seen]
        if signature in self._seen:
            raise _Refused("replayed request")
        self._seen[signature] = ts

    # ------------------------------------------------------------------------------------------
    # The endpoint

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            self.verify(request.headers.get("X-Slack-Request-Timestamp", ""),
                        request.headers.get("X-Slack-Signature", ""), body)
        except _Refused as exc:
            log.warning("Slack interaction refused: %s", exc)
            return web.json_response({"error": str(exc)}, status=401)
        try:
            payload: Any = json.loads(parse_qs(body.decode("utf-8")).get("payload", [""])[0])
        except (ValueError, UnicodeDecodeError):
            return web.json_response({"error": "body must be a form with a JSON payload"}, status=400)
        if not isinstance(payload, dict) or payload.get("type") != "block_actions":
            return web.Response(status=200)  # other interaction types are not ours: acknowledge them
        try:
            user_id, channel, ts, action, approval_id = _press(payload)
        except (KeyError, TypeError, ValueError, IndexError):
            return web.json_response({"error": "malformed block_actions payload"}, status=400)
        if action not in (APPROVE_ACTION, DENY_ACTION):
            return web.Response(status=200)
        await self._decide(user_id, channel, ts, approval_id, action == APPROVE_ACTION)
        return web.Response(status=200)

    async def _decide(self, user_id: str, channel: str, ts: str, approval_id: str, approve: bool) -> None:
        assert self._service is not None, "not installed"
        approver = self._approvers.get(user_id)
        if approver is None:
            await self._tell(channel, user_id, "You are not a pgproxy approver (your Slack user is not in "
                                               "approvals.slack.approvers).")
            return
        now = self._now()
        identity = Identity(subject=approver.subject, groups=approver.groups, db_roles=(), agent_id=None,
                            session_id=None, tool_call_id=None, token_id=f"slack:{user_id}", issuer="slack",
                            expires_at=now + DECISION_SECONDS, claims={})
        try:
            decided = await self._service.decide(identity, approval_id, approve, f"decided in Slack by {user_id}")
        except ApprovalStoreUnavailable:
            await self._tell(channel, user_id, "The approval store is unavailable: try again later.")
            return
        except ApprovalError as exc:
            await self._tell(channel, user_id, f"Your decision on {approval_id} was refused: {exc}")
            return
        try:
            await self.api.call("chat.update", {"channel": channel, "ts": ts, "blocks": decided_blocks(decided),
                                                "text": f"{approval_id} is {decided.status}"})
        except SlackApiError as exc:
            log.warning("cannot update the Slack message of %s: %s", approval_id, exc)

    async def _tell(self, channel: str, user_id: str, text: str) -> None:
        try:
            await self.api.call("chat.postEphemeral", {"channel": channel, "user": user_id, "text": text})
        except SlackApiError as exc:
            log.warning("cannot tell Slack user %s: %s", user_id, exc)


def _press(payload: dict[str, Any]) -> tuple[str, str, str, str, str]:
    """(user id, channel id, message ts, action id, approval id) of a block_actions payload."""
    action = payload["actions"][0]
    values = (payload["user"]["id"], payload["channel"]["id"], payload["container"]["message_ts"],
              action["action_id"], action["value"])
    if not all(isinstance(v, str) and v for v in values):
        raise ValueError("empty field")
    return values

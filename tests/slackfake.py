"""A local stand-in for Slack's Web API and its interactivity requests, strict where Slack is strict.

What for: the Slack approval tests (tests/approvals/test_slack_approvals.py) need Slack's side without
the network. The fake serves ``chat.postMessage``, ``chat.update`` and ``chat.postEphemeral`` on a
loopback port and refuses what Slack refuses: a missing or wrong bot token (``not_authed`` /
``invalid_auth``), a body that is not JSON, an unknown channel, user or message, a message without
text, and Block Kit that breaks Slack's limits (block types, 50 blocks, 3000-character sections,
25 elements, 75-character button labels, unique ``action_id`` and ``block_id``, button values).
:meth:`FakeSlack.press` then does what Slack does when someone presses a button of a posted message:
it POSTs a signed ``block_actions`` payload (form-encoded, ``v0`` HMAC-SHA256 signature over
``v0:<timestamp>:<body>``) to the app's interactivity URL.

Must never: accept a call a real Slack workspace would refuse.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx
from aiohttp import web

BLOCK_TYPES = {"section", "actions", "context", "divider", "header"}


class _Invalid(Exception):
    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


@dataclass
class Message:
    channel: str
    ts: str
    text: str
    blocks: list[dict[str, Any]]
    updates: int = 0


@dataclass
class Press:
    """One signed interactivity request, kept so a test can send it again (a replay)."""

    headers: dict[str, str]
    body: bytes


@dataclass
class FakeSlack:
    token: str = field(default_factory=lambda: "xoxb-" + secrets.token_hex(12))
    signing_secret: str = field(default_factory=lambda: secrets.token_hex(16))
    channels: set[str] = field(default_factory=lambda: {"C0APPROVALS"})
    users: set[str] = field(default_factory=set)
    messages: list[Message] = field(default_factory=list)
    ephemerals: list[dict[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (method, Slack error code)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-slack", daemon=True)
        self._runner: web.AppRunner | None = None
        self._ts = itertools.count(1)
        self.port = 0

    # ------------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> FakeSlack:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        app = web.Application()
        for method in ("chat.postMessage", "chat.update", "chat.postEphemeral"):
            app.router.add_post(f"/api/{method}", self._handler(method))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    # ------------------------------------------------------------------------------------------
    # Web API

    def _handler(self, method: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            try:
                result = self._call(method, request.headers, await request.read())
            except _Invalid as exc:
                self.refused.append((method, exc.error))
                return web.json_response({"ok": False, "error": exc.error})
            return web.json_response({"ok": True, **result})
        return handle

    def _call(self, method: str, headers: Any, raw: bytes) -> dict[str, Any]:
        auth = headers.get("Authorization", "")
        if not auth:
            raise _Invalid("not_authed")
        if not hmac.compare_digest(auth, f"Bearer {self.token}"):
            raise _Invalid("invalid_auth")
        if not headers.get("Content-Type", "").startswith("application/json"):
            raise _Invalid("invalid_form_data")
        try:
            body = json.loads(raw)
        except ValueError:
            raise _Invalid("invalid_json") from None
        if not isinstance(body, dict):
            raise _Invalid("invalid_json")
        channel = body.get("channel")
        if channel not in self.channels:
            raise _Invalid("channel_not_found")
        blocks = body.get("blocks")
        if blocks is not None:
            _check_blocks(blocks)
        if method == "chat.postEphemeral":
            if body.get("user") not in self.users:
                raise _Invalid("user_not_in_channel")
            if not body.get("text") and not blocks:
                raise _Invalid("no_text")
            self.ephemerals.append({"channel": channel, "user": body["user"], "text": str(body.get("text", ""))})
            return {"message_ts": f"{time.time():.6f}"}
        if not body.get("text") and not blocks:
            raise _Invalid("no_text")
        if method == "chat.postMessage":
            message = Message(channel, f"{int(time.time())}.{next(self._ts):06d}", str(body.get("text", "")),
                              list(blocks or []))
            self.messages.append(message)
            return {"channel": channel, "ts": message.ts, "message": {"text": message.text, "blocks": message.blocks}}
        existing = next((m for m in self.messages if m.channel == channel and m.ts == body.get("ts")), None)
        if existing is None:
            raise _Invalid("message_not_found")
        existing.text = str(body.get("text", existing.text))
        existing.blocks = list(blocks) if blocks is not None else existing.blocks
        existing.updates += 1
        return {"channel": channel, "ts": existing.ts, "text": existing.text}

    # ------------------------------------------------------------------------------------------
    # Interactivity

    def wait_for_message(self, needle: str, timeout: float = 10.0) -> Message:
        """The posted message whose text contains ``needle`` (the notifier posts asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            found = next((m for m in self.messages if needle in m.text), None)
            if found is not None:
                return found
            assert time.monotonic() < deadline, f"no Slack message mentions {needle!r}: {self.messages}"
            time.sleep(0.05)

    def signed(self, body: bytes, timestamp: int | None = None, secret: str | None = None) -> Press:
        ts = str(int(time.time()) if timestamp is None else timestamp)
        digest = hmac.new((secret or self.signing_secret).encode(), f"v0:{ts}:".encode() + body,
                          hashlib.sha256).hexdigest()
        return Press({"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={digest}",
                      "Content-Type": "application/x-www-form-urlencoded"}, body)

    def press(self, message: Message, action_id: str, user: str, **signing: Any) -> Press:
        """The signed request Slack sends when ``user`` presses the button ``action_id`` of ``message``."""
        button = next((e for b in message.blocks if b.get("type") == "actions" for e in b["elements"]
                       if e.get("action_id") == action_id), None)
        assert button is not None, f"the message has no {action_id} button now: {message.blocks}"
        payload = {
            "type": "block_actions", "team": {"id": "T0TEST", "domain": "test"},
            "user": {"id": user, "username": user.lower(), "team_id": "T0TEST"},
            "api_app_id": "A0PGPROXY", "token": "deprecated-verification-token",
            "container": {"type": "message", "message_ts": message.ts, "channel_id": message.channel,
                          "is_ephemeral": False},
            "trigger_id": f"{secrets.randbelow(10**10)}.{secrets.token_hex(8)}",
            "channel": {"id": message.channel, "name": "approvals"},
            "message": {"type": "message", "ts": message.ts, "text": message.text, "blocks": message.blocks},
            "response_url": f"{self.api_url}response/{secrets.token_hex(8)}",
            "actions": [{"type": "button", "action_id": action_id, "block_id": "pgproxy_decision",
                         "value": button["value"], "text": button["text"], "action_ts": f"{time.time():.6f}"}],
        }
        return self.signed(urlencode({"payload": json.dumps(payload)}).encode(), **signing)

    @staticmethod
    def send(url: str, press: Press) -> httpx.Response:
        return httpx.post(url, content=press.body, headers=press.headers, timeout=10, trust_env=False)


def _check_blocks(blocks: Any) -> None:
    """Slack's Block Kit limits for the blocks pgproxy sends (invalid_blocks otherwise)."""
    if not isinstance(blocks, list) or not 1 <= len(blocks) <= 50:
        raise _Invalid("invalid_blocks")
    block_ids: set[str] = set()
    action_ids: set[str] = set()
    for block in blocks:
        if not isinstance(block, dict) or block.get("type") not in BLOCK_TYPES:
            raise _Invalid("invalid_blocks")
        block_id = block.get("block_id")
        if block_id is not None:
            if not isinstance(block_id, str) or len(block_id) > 255 or block_id in block_ids:
                raise _Invalid("invalid_blocks")
            block_ids.add(block_id)
        kind = block["type"]
        if kind == "section":
            text = block.get("text")
            if (not isinstance(text, dict) or text.get("type") not in ("mrkdwn", "plain_text")
                    or not isinstance(text.get("text"), str) or not 1 <= len(text["text"]) <= 3000):
                raise _Invalid("invalid_blocks")
        elif kind == "context":
            elements = block.get("elements")
            if not isinstance(elements, list) or not 1 <= len(elements) <= 10:
                raise _Invalid("invalid_blocks")
        elif kind == "actions":
            elements = block.get("elements")
            if not isinstance(elements, list) or not 1 <= len(elements) <= 25:
                raise _Invalid("invalid_blocks")
            for element in elements:
                _check_button(element, action_ids)


def _check_button(element: Any, action_ids: set[str]) -> None:
    if not isinstance(element, dict) or element.get("type") != "button":
        raise _Invalid("invalid_blocks")
    text, action_id, value = element.get("text"), element.get("action_id"), element.get("value")
    if (not isinstance(text, dict) or text.get("type") != "plain_text" or not isinstance(text.get("text"), str)
            or not 1 <= len(text["text"]) <= 75):
        raise _Invalid("invalid_blocks")
    if not isinstance(action_id, str) or not 1 <= len(action_id) <= 255 or action_id in action_ids:
        raise _Invalid("invalid_blocks")
    action_ids.add(action_id)
    if value is not None and (not isinstance(value, str) or len(value) > 2000):
        raise _Invalid("invalid_blocks")
    if element.get("style") not in (None, "primary", "danger"):
        raise _Invalid("invalid_blocks")

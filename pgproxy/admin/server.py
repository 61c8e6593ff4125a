"""The approvals HTTP API (aiohttp), served on the admin listener.

Every request needs ``Authorization: Bearer <JWT>``, verified by the same TokenVerifier as agents'
tokens: 401 without a token or with an invalid one, 403 when the caller is in none of the request's
approver groups (or asks to decide their own request). Errors are JSON ``{"error": "..."}``:

- ``GET  /api/approvals?status=pending&limit=100`` — the requests the caller may decide, newest first;
- ``GET  /api/approvals/{id}`` — one request (exact SQL, parameters, identity, reasons, impact...);
- ``POST /api/approvals/{id}/approve`` and ``/deny`` with optional JSON ``{"reason": "..."}``.

Status codes: 400 (bad input), 401, 403, 404 (unknown id), 409 (closed, already decided), 503 (store
unavailable). TLS is required by the config unless the listener is on loopback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pgproxy.audit.sink import AuditSink
from pgproxy.config import AdminConfig, ProxyConfig
from pgproxy.identity import Identity, TokenError, TokenVerifier
from pgproxy.policy.approval_common import STATUSES
from pgproxy.policy.approval_service import ApproverService, approver_view
from pgproxy.policy.approvals import (
    ApprovalConflict,
    ApprovalError,
    ApprovalForbidden,
    ApprovalNotFound,
    ApprovalStore,
    ApprovalStoreUnavailable,
)
from pgproxy.tlsutil import server_context

if TYPE_CHECKING:
    from .slack import SlackInteractions
    from .ui import AdminUI

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
MAX_REASON_CHARS = 2000
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> web.Response:
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="pgproxy-approvals"'
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except _Refused as exc:
        return _error(exc.status, exc.message)
    except ApprovalNotFound as exc:
        return _error(404, str(exc))
    except ApprovalForbidden as exc:
        return _error(403, str(exc))
    except ApprovalConflict as exc:
        return _error(409, str(exc))
    except ApprovalError as exc:
        return _error(409, str(exc))
    except ApprovalStoreUnavailable as exc:
        log.error("approval store unavailable: %s", exc)
        return _error(503, "approval store unavailable")
    except web.HTTPException as exc:
        return _error(exc.status, exc.reason)
    response.headers.setdefault("Cache-Control", "no-store")
    return response


class AdminServer:
    """The admin listener. ``app`` can also be served by aiohttp's test client."""

    def __init__(self, config: AdminConfig, store: ApprovalStore, verifier: TokenVerifier, *,
                 owns_store: bool = False, ui: AdminUI | None = None,
                 slack: SlackInteractions | None = None) -> None:
        self.config = config
        self.store = store
        self.service = ApproverService(store, verifier)
        self._owns_store = owns_store
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[_json_errors], client_max_size=MAX_BODY_BYTES)
        self.app.router.add_get("/api/approvals", self._list)
        self.app.router.add_get("/api/approvals/{id}", self._show)
        self.app.router.add_post("/api/approvals/{id}/approve", self._approve)
        self.app.router.add_post("/api/approvals/{id}/deny", self._deny)
        if ui is not None:  # the web UI under /ui/ (pgproxy/admin/ui.py)
            ui.install(self.app, self.service)
        if slack is not None:  # Approve / Deny buttons in Slack (pgproxy/admin/slack.py)
            slack.install(self.app, self.service)

    @classmethod
    def from_config(cls, config: ProxyConfig, *, store: ApprovalStore | None = None,
                    verifier: TokenVerifier | None = None, audit: AuditSink | None = None) -> AdminServer:
        """From the ``admin:`` and ``approvals:`` sections; builds (and then owns) a store if none is given."""
        assert config.admin is not None
        owns = store is None
        if store is None:
            from pgproxy.policy.approval_factory import build_approval_store

            store = build_approval_store(config, audit=audit)
        from .ui import AdminUI

        ui = AdminUI(config) if config.admin.ui else None
        slack = None
        if config.approvals is not None and config.approvals.slack is not None:
            from .slack import SlackInteractions

            slack = SlackInteractions(config.approvals.slack)
        return cls(config.admin, store, verifier or TokenVerifier(config.identity), owns_store=owns, ui=ui,
                   slack=slack)

    # ------------------------------------------------------------------------------------------
    # Lifecycle

    async def start(self) -> None:
        ssl_context = (server_context(self.config.tls.cert_file, self.config.tls.key_file)
                       if self.config.tls is not None else None)
        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port, ssl_context=ssl_context,
                           reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("admin API listening on %s:%d (%s)", self.config.host, self.port,
                 "tls" if ssl_context else "plaintext, loopback")

    @property
    def port(self) -> int:
        assert self._runner is not None, "not started"
        return int(self._runner.addresses[0][1])

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self._owns_store:
            await self.store.close()

    # ------------------------------------------------------------------------------------------
    # Handlers

    async def _identity(self, request: web.Request) -> Identity:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Refused(401, "missing bearer token (Authorization: Bearer <JWT>)")
        try:
            return await self.service.authenticate(token.strip())
        except TokenError as exc:
            raise _Refused(401, f"invalid token: {exc.reason}") from None

    async def _list(self, request: web.Request) -> web.Response:
        identity = await self._identity(request)
        status = request.query.get("status")
        if status is not None and status not in STATUSES:
            raise _Refused(400, f"status must be one of {', '.join(STATUSES)}")
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            raise _Refused(400, "limit must be an integer") from None
        if not 1 <= limit <= 1000:
            raise _Refused(400, "limit must be between 1 and 1000")
        requests = await self.service.list(identity, status, limit)
        return web.json_response({"approvals": [approver_view(r, identity) for r in requests]},
                                 dumps=_dumps)

    async def _show(self, request: web.Request) -> web.Response:
        identity = await self._identity(request)
        approval = await self.service.show(identity, request.match_info["id"])
        return web.json_response(approver_view(approval, identity), dumps=_dumps)

    async def _approve(self, request: web.Request) -> web.Response:
        return await self._decide(request, True)

    async def _deny(self, request: web.Request) -> web.Response:
        return await self._decide(request, False)

    async def _decide(self, request: web.Request, approve: bool) -> web.Response:
        identity = await self._identity(request)
        reason = await self._reason(request)
        approval = await self.service.decide(identity, request.match_info["id"], approve, reason)
        return web.json_response(approver_view(approval, identity), dumps=_dumps)

    @staticmethod
    async def _reason(request: web.Request) -> str | None:
        raw = await request.read()
        if not raw.strip():
            return None
        try:
            body: Any = json.loads(raw)
        except ValueError:
            raise _Refused(400, "body must be JSON, e.g. {\"reason\": \"...\"}") from None
        if not isinstance(body, dict):
            raise _Refused(400, "body must be a JSON object")
        unknown = sorted(set(body) - {"reason"})
        if unknown:
            raise _Refused(400, f"unknown field {unknown[0]!r}")
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise _Refused(400, "reason must be a string")
        if reason is not None and len(reason) > MAX_REASON_CHARS:
            raise _Refused(400, f"reason is longer than {MAX_REASON_CHARS} characters")
        return reason or None


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)

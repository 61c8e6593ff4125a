"""Operations endpoints on the admin listener: liveness, readiness and config reload.

- ``GET /livez``: 200 while the proxy's event loop answers. It checks no dependency, so an orchestrator
  restarts the process only when the process itself is stuck.
- ``GET /readyz``: 200 when a new session can work: the upstream server accepts connections, the audit
  log is writable and the approval store answers (when there is one); else 503. The JSON names each
  check and its state, never an address or a credential.
- ``POST /api/reload``: reload the config file as SIGHUP does; needs a bearer JWT of a member of one of
  ``admin.operator_groups``. 200 when applied, 409 with the reason when the running config was kept.

The probes need no credentials: probes (kubelet, Docker) cannot send a secret header.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from pgproxy import __version__
from pgproxy.audit.sink import AuditUnavailable
from pgproxy.identity import TokenError
from pgproxy.reload import ReloadError

if TYPE_CHECKING:
    from pgproxy.server.listener import ProxyServer

log = logging.getLogger(__name__)

READY_CHECK_TIMEOUT_SECONDS = 2.0


async def readiness(server: ProxyServer) -> dict[str, str]:
    """Each dependency a new session needs, ``ok`` or what is wrong with it."""
    checks = {"upstream": await _upstream(server), "audit": _audit(server)}
    store = server.approval_store or (server.admin.store if server.admin is not None else None)
    if store is not None:
        try:
            async with asyncio.timeout(READY_CHECK_TIMEOUT_SECONDS):
                await store.list(None, 1)
            checks["approvals"] = "ok"
        except Exception as exc:
            log.warning("readiness: the approval store does not answer: %s", exc)
            checks["approvals"] = "unreachable"
    if server.closing:
        checks["listeners"] = "shutting down"
    return checks


async def _upstream(server: ProxyServer) -> str:
    cfg = server.config.upstream
    try:
        async with asyncio.timeout(min(READY_CHECK_TIMEOUT_SECONDS, cfg.connect_timeout_seconds)):
            _, writer = await asyncio.open_connection(cfg.host, cfg.port)
    except (OSError, TimeoutError) as exc:
        log.warning("readiness: cannot connect to the upstream database at %s:%d: %s", cfg.host, cfg.port,
                    "timed out" if isinstance(exc, TimeoutError) else exc.strerror or exc)
        return "unreachable"
    writer.close()
    return "ok"


def _audit(server: ProxyServer) -> str:
    try:
        server.audit.flush()  # writes what is pending: a full or read-only disk shows up here
    except AuditUnavailable:
        return "not writable"
    return "not writable" if getattr(server.audit, "problem", None) is not None else "ok"


def add_operations_routes(app: web.Application, server: ProxyServer) -> None:
    """Serve /livez, /readyz and POST /api/reload of ``server`` on ``app`` (before the app starts)."""

    async def livez(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "version": __version__})

    async def readyz(request: web.Request) -> web.Response:
        checks = await readiness(server)
        ready = all(state == "ok" for state in checks.values())
        return web.json_response({"status": "ready" if ready else "not ready", "checks": checks},
                                 status=200 if ready else 503)

    async def reload(request: web.Request) -> web.Response:
        admin = server.config.admin
        groups = admin.operator_groups if admin is not None else ()
        if not groups:
            return _error(403, "reload over the API is off: set admin.operator_groups (SIGHUP always reloads)")
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _error(401, "missing bearer token (Authorization: Bearer <JWT>)")
        try:
            identity = await server.verifier.verify(token.strip())
        except TokenError as exc:
            return _error(401, f"invalid token: {exc.reason}")
        if not set(identity.groups) & set(groups):
            return _error(403, f"only members of {', '.join(groups)} may reload the config")
        log.info("config reload requested over the API by %s", identity.subject)
        try:
            await server.reload()
        except ReloadError as exc:
            return _error(409, f"reload failed, the running config stays in force: {exc}")
        return web.json_response({"reloaded": True, "source": str(server.config.source)})

    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/api/reload", reload)


def _error(status: int, message: str) -> web.Response:
    headers = {"WWW-Authenticate": 'Bearer realm="pgproxy-admin"'} if status == 401 else {}
    return web.json_response({"error": message}, status=status, headers=headers)

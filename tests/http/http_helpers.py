"""Helpers for the HTTP proxy tests (importable by name): a real upstream aiohttp app and the config."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from harness import companion_config, companion_token

from pgproxy.audit.sink import AuditSink, MemoryAuditSink
from pgproxy.identity import DevKeys
from pgproxy.server.listener import ProxyServer

# The `start_proxy` fixture's type (tests/http/conftest.py): start a ProxyServer with a changed config.
StartProxy = Callable[..., Awaitable[ProxyServer]]

CREDENTIAL_ENV = "PGPROXY_TEST_HTTP_CREDENTIAL"
CREDENTIAL = "sk-live-UPSTREAM-0123456789abcdef"
CUSTOMER = {"customer": {"name": "Ann", "email": "ann@example.com"},
            "items": [{"sku": "A1", "ssn": "111-22-3333"}, {"sku": "B2", "ssn": "444-55-6666"}]}


def pattern(n: int) -> bytes:
    """Deterministic bytes for the large-body tests."""
    block = hashlib.sha256(b"pgproxy").digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


def upstream_app() -> web.Application:
    """The upstream service: echoes what it received (including the injected credential), serves JSON with
    personal data, streams large bodies, hashes large uploads and can be slow."""

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({"method": request.method, "path": request.path_qs,
                                  "headers": dict(request.headers), "body": body.decode("utf-8", "replace"),
                                  "sha256": hashlib.sha256(body).hexdigest()},
                                 headers={"X-Echo-Auth": request.headers.get("Authorization", "")})

    async def customer(request: web.Request) -> web.Response:
        return web.json_response(CUSTOMER)

    async def big(request: web.Request) -> web.StreamResponse:
        n = int(request.query["n"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        data = pattern(min(n, 1 << 20))
        sent = 0
        while sent < n:
            piece = data[:min(len(data), n - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    async def sink(request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(1 << 16):
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"bytes": size, "sha256": digest.hexdigest()})

    async def cookie(request: web.Request) -> web.Response:
        response = web.json_response({"set": True})
        response.set_cookie("upstream_session", "caller-one-session", path="/")
        return response

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.json_response({"late": True})

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/echo{tail:.*}", echo)
    app.router.add_get("/customer", customer)
    app.router.add_get("/big", big)
    app.router.add_post("/sink", sink)
    app.router.add_get("/slow", slow)
    app.router.add_get("/cookie", cookie)
    return app


def config_data(keys: DevKeys, upstream_url: str, tmp_path: Path, **http: Any) -> dict[str, Any]:
    """A full proxy config: the Postgres side on loopback plaintext, the http section on port 0."""
    section: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0, "insecure_plaintext": True},
        "targets": [
            {"name": "api", "upstream": upstream_url,
             "credential": {"kind": "bearer", "value_env": CREDENTIAL_ENV},
             "read_timeout_seconds": 1.0, "max_request_bytes": 64 * 1024 * 1024,
             "max_response_bytes": 128 * 1024 * 1024,
             "masks": [{"paths": ["$.customer.email", "items[*].ssn"], "in": ["request", "response"]},
                       {"paths": ["$.customer.email"], "in": ["response"], "caller": True}]},
            {"name": "down", "upstream": "http://127.0.0.1:9", "connect_timeout_seconds": 2},
        ],
        "rules": [
            {"name": "no-deletes", "match": {"methods": ["DELETE"]}, "action": "deny",
             "message": "deletes are not allowed"},
            {"name": "refunds", "match": {"targets": ["api"], "methods": ["POST"], "paths": ["/echo/refunds*"]},
             "action": "approve", "approvers": ["finance"], "mode": "refuse"},
            {"name": "payouts", "match": {"targets": ["api"], "paths": ["/echo/payouts*"]},
             "action": "approve", "approvers": ["finance"], "mode": "hold", "timeout": 30},
            {"name": "quick-hold", "match": {"paths": ["/echo/quick*"]},
             "action": "approve", "approvers": ["finance"], "mode": "hold", "timeout": 0.3},
        ],
        "default": "allow",
    }
    section.update(http)
    return companion_config(keys, tmp_path, "http", section)


token = companion_token


def base(server: ProxyServer) -> str:
    """The HTTP listener's base URL."""
    assert server.http is not None
    return f"http://127.0.0.1:{server.http.port}"


def bearer(jwt: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {jwt}"}


def exchanges(audit: AuditSink) -> list[dict[str, Any]]:
    """The http_exchange records of a proxy's MemoryAuditSink."""
    assert isinstance(audit, MemoryAuditSink)
    return [e for e in audit.events if e.get("event") == "http_exchange"]

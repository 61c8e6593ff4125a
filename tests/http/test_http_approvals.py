"""HTTP approvals through the shared store and the real `pgproxy approvals` CLI, in refuse and hold modes."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from harness import approvals_cli
from http_helpers import base, bearer, exchanges, token

from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.identity import DevKeys
from pgproxy.policy.approvals import ApprovalStore
from pgproxy.server.listener import ProxyServer

pytestmark = pytest.mark.timeout(60)




def store(server: ProxyServer) -> ApprovalStore:
    assert server.approval_store is not None
    return server.approval_store


def audit(server: ProxyServer) -> MemoryAuditSink:
    assert isinstance(server.audit.sink, MemoryAuditSink)
    return server.audit.sink


async def test_refuse_mode_then_approve_with_the_cli_runs_once(
        proxy: ProxyServer, client: aiohttp.ClientSession, dev_keys: DevKeys) -> None:
    agent = bearer(token(dev_keys))
    url = f"{base(proxy)}/api/echo/refunds?order=42"
    payload = {"amount": 10}
    async with client.post(url, json=payload, headers=agent) as r:
        assert r.status == 428
        refused = await r.json()
    approval_id = refused["approval_id"]
    assert approval_id.startswith("apr_") and f"pgproxy approvals approve {approval_id}" in refused["error"]
    assert "retry" in refused
    request = await store(proxy).get(approval_id)
    assert request is not None and request.sql == "POST /echo/refunds?order=42" and request.database == "http:api"

    # A different body is a different request: it needs its own approval.
    async with client.post(url, json={"amount": 9999}, headers=agent) as r:
        assert r.status == 428 and (await r.json())["approval_id"] != approval_id

    assert "approved" in await approvals_cli(proxy.config.source, dev_keys, "approve", approval_id)
    async with client.post(url, json=payload, headers=agent) as r:
        assert r.status == 200
        assert (await r.json())["body"] == json.dumps(payload)
    async with client.post(url, json=payload, headers=agent) as r:  # used: the next one needs a new approval
        assert r.status == 428 and (await r.json())["approval_id"] != approval_id

    ran = [e for e in exchanges(audit(proxy)) if e.get("response")]
    assert len(ran) == 1 and ran[0]["decision"] == {"action": "approve", "rule": "refunds", "approval_id": approval_id}
    outcomes = [e["outcome"] for e in audit(proxy).events if e.get("event") == "policy_approval"
                and e["approval_id"] == approval_id]
    assert outcomes == ["required", "used"]


async def test_refused_request_after_deny(proxy: ProxyServer, client: aiohttp.ClientSession,
                                          dev_keys: DevKeys) -> None:
    agent = bearer(token(dev_keys))
    url = f"{base(proxy)}/api/echo/refunds/7"
    async with client.post(url, data=b"x", headers=agent) as r:
        approval_id = (await r.json())["approval_id"]
    await approvals_cli(proxy.config.source, dev_keys, "deny", approval_id)
    async with client.post(url, data=b"x", headers=agent) as r:  # a fresh request is filed, nothing runs
        assert r.status == 428 and (await r.json())["approval_id"] != approval_id
    assert not [e for e in exchanges(audit(proxy)) if e.get("response")]


async def _pending_id(server: ProxyServer) -> str:
    for _ in range(200):
        pending = await store(server).list("pending")
        if pending:
            return pending[0].id
        await asyncio.sleep(0.02)
    raise AssertionError("no approval request was filed")


async def test_hold_mode_waits_for_approval(proxy: ProxyServer, client: aiohttp.ClientSession,
                                            dev_keys: DevKeys) -> None:
    agent = bearer(token(dev_keys))

    async def call() -> tuple[int, Any]:
        async with client.put(f"{base(proxy)}/api/echo/payouts/1", json={"to": "acct"}, headers=agent) as r:
            return r.status, await r.json()

    waiting = asyncio.ensure_future(call())
    approval_id = await _pending_id(proxy)
    assert not waiting.done()
    await approvals_cli(proxy.config.source, dev_keys, "approve", approval_id)
    status, body = await waiting
    assert status == 200 and body["method"] == "PUT"


async def test_hold_mode_denied_is_403_and_timeout_is_504(proxy: ProxyServer, client: aiohttp.ClientSession,
                                                          dev_keys: DevKeys) -> None:
    agent = bearer(token(dev_keys))

    async def call(path: str) -> tuple[int, Any]:
        async with client.post(f"{base(proxy)}/api/echo/{path}", data=b"{}", headers=agent) as r:
            return r.status, await r.json()

    waiting = asyncio.ensure_future(call("payouts/2"))
    approval_id = await _pending_id(proxy)
    await approvals_cli(proxy.config.source, dev_keys, "deny", approval_id)
    status, body = await waiting
    assert status == 403 and body["error"] == f"approval {approval_id} denied by fin-1"

    status, body = await call("quick")  # hold timeout 0.3 s, nobody decides
    assert status == 504 and "timed out" in body["error"] and body["approval_id"].startswith("apr_")


async def test_store_unavailable_fails_closed(start_proxy: Any, client: aiohttp.ClientSession,
                                              dev_keys: DevKeys) -> None:
    def no_store(data: dict[str, Any]) -> None:
        del data["approvals"]

    proxy = await start_proxy(no_store)
    async with client.post(f"{base(proxy)}/api/echo/refunds", data=b"x", headers=bearer(token(dev_keys))) as r:
        assert r.status == 503
        assert "approval" in (await r.json())["error"]
    async with client.get(f"{base(proxy)}/api/echo/ok", headers=bearer(token(dev_keys))) as r:
        assert r.status == 200

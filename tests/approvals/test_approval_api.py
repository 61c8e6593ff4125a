"""The approvals HTTP API end to end: a real admin server on port 0, real JWTs, both stores."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from approval_helpers import StoreFactory, base_config_data, make_request, mint
from harness import FakeClock

from pgproxy.admin.server import AdminServer
from pgproxy.config import AdminConfig, parse_config
from pgproxy.identity import DevKeys, TokenVerifier
from pgproxy.policy.approvals import ApprovalStore


class Api:
    def __init__(self, session: aiohttp.ClientSession, base: str, keys: DevKeys) -> None:
        self.session, self.base, self.keys = session, base, keys

    async def call(self, method: str, path: str, *, token: str | None = None, sub: str | None = None,
                   groups: list[str] | None = None, **kwargs: Any) -> tuple[int, Any]:
        headers = dict(kwargs.pop("headers", {}))
        if sub is not None:
            token = mint(self.keys, sub, groups or [])
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.session.request(method, self.base + path, headers=headers, **kwargs) as resp:
            return resp.status, await resp.json()


@pytest.fixture
async def api(store_factory: StoreFactory, verifier: TokenVerifier, dev_keys: DevKeys
              ) -> AsyncIterator[tuple[Api, ApprovalStore]]:
    store = store_factory()
    server = AdminServer(AdminConfig(host="127.0.0.1", port=0), store, verifier)
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield Api(session, f"http://127.0.0.1:{server.port}", dev_keys), store
    finally:
        await server.close()


async def test_auth_required(api: tuple[Api, ApprovalStore], dev_keys: DevKeys) -> None:
    client, _ = api
    assert (await client.call("GET", "/api/approvals"))[0] == 401
    status, body = await client.call("GET", "/api/approvals", token="not.a.jwt")
    assert status == 401 and body["error"].startswith("invalid token")
    expired = mint(dev_keys, "alice", ["dba"], ttl=-10)
    assert (await client.call("GET", "/api/approvals", token=expired))[0] == 401
    status, body = await client.call("GET", "/api/approvals", headers={"Authorization": "Basic YTpi"})
    assert status == 401 and "bearer" in body["error"]


async def test_list_show_approve_flow(api: tuple[Api, ApprovalStore], clock: FakeClock) -> None:
    client, store = api
    req = await store.create(make_request(clock, sql="DELETE FROM t WHERE id = $1", params=["42"], quorum=2))
    await store.set_impact(req.id, {"rows": 1, "estimated_rows": 1})
    other = await store.create(make_request(clock, sql="DROP TABLE x", groups=["security"]))

    status, body = await client.call("GET", "/api/approvals?status=pending", sub="alice", groups=["dba"])
    assert status == 200 and [a["id"] for a in body["approvals"]] == [req.id]  # only what alice may decide
    status, body = await client.call("GET", f"/api/approvals/{req.id}", sub="alice", groups=["dba"])
    assert status == 200
    assert body["sql"] == "DELETE FROM t WHERE id = $1" and body["params"] == ["42"]
    assert body["requester"]["subject"] == "agent-1" and body["classification"]["reasons"] == ["DELETE on t"]
    assert body["rule"] == "writes-need-approval" and body["impact"]["rows"] == 1
    assert body["status"] == "pending" and body["decisions"] == [] and body["you_may_decide"] is True

    status, body = await client.call("GET", f"/api/approvals/{other.id}", sub="alice", groups=["dba"])
    assert status == 403
    status, body = await client.call("GET", "/api/approvals/apr_nope", sub="alice", groups=["dba"])
    assert status == 404

    status, body = await client.call("POST", f"/api/approvals/{req.id}/approve", sub="alice", groups=["dba"],
                                     json={"reason": "one row, fine"})
    assert status == 200 and body["status"] == "pending" and body["approvals"] == 1
    status, body = await client.call("POST", f"/api/approvals/{req.id}/approve", sub="alice", groups=["dba"])
    assert status == 409
    status, body = await client.call("POST", f"/api/approvals/{req.id}/approve", sub="bob", groups=["oncall"])
    assert status == 200 and body["status"] == "approved"
    assert [(d["approver"], d["reason"]) for d in body["decisions"]] == [("alice", "one row, fine"), ("bob", None)]
    assert (await store.consume(req.fingerprint)) is not None
    status, body = await client.call("POST", f"/api/approvals/{req.id}/deny", sub="carol", groups=["dba"])
    assert status == 409 and "used" in body["error"]


async def test_forbidden_and_bad_input(api: tuple[Api, ApprovalStore], clock: FakeClock) -> None:
    client, store = api
    req = await store.create(make_request(clock, subject="alice"))
    status, body = await client.call("POST", f"/api/approvals/{req.id}/approve", sub="alice", groups=["dba"])
    assert status == 403 and "own request" in body["error"]
    status, body = await client.call("POST", f"/api/approvals/{req.id}/approve", sub="eve", groups=["devs"])
    assert status == 403
    status, body = await client.call("POST", f"/api/approvals/{req.id}/deny", sub="bob", groups=["dba"],
                                     data=b"{not json")
    assert status == 400
    status, body = await client.call("POST", f"/api/approvals/{req.id}/deny", sub="bob", groups=["dba"],
                                     json={"reason": 5})
    assert status == 400 and "reason" in body["error"]
    status, body = await client.call("GET", "/api/approvals?status=bogus", sub="bob", groups=["dba"])
    assert status == 400
    status, body = await client.call("POST", "/api/approvals/apr_nope/deny", sub="bob", groups=["dba"])
    assert status == 404
    status, body = await client.call("GET", "/api/nothing", sub="bob", groups=["dba"])
    assert status == 404 and "error" in body
    status, body = await client.call("POST", f"/api/approvals/{req.id}/deny", sub="bob", groups=["dba"],
                                     json={"reason": "no"})
    assert status == 200 and body["status"] == "denied"
    got = await store.get(req.id)
    assert got is not None and got.status == "denied" and got.decisions[0].approver == "bob"


async def test_admin_server_from_config_over_tls(tmp_path: Path, dev_keys: DevKeys, tls_files: Any,
                                                 clock: FakeClock) -> None:
    """Built from the config sections, serving HTTPS, on its own SQLite store."""
    import ssl

    data = base_config_data(dev_keys, approvals={"path": str(tmp_path / "a.db")},
                            admin={"host": "127.0.0.1", "port": 0,
                                   "tls": {"cert_file": str(tls_files.cert_file), "key_file": str(tls_files.key_file)}})
    server = AdminServer.from_config(parse_config(data, tmp_path))
    await server.start()
    try:
        req = await server.store.create(make_request(clock))
        ctx = ssl.create_default_context(cafile=str(tls_files.ca_file))
        async with aiohttp.ClientSession() as session:
            client = Api(session, f"https://localhost:{server.port}", dev_keys)
            status, body = await client.call("POST", f"/api/approvals/{req.id}/approve", sub="bob", groups=["dba"],
                                             ssl=ctx)
        assert status == 200 and body["status"] == "approved"
    finally:
        await server.close()


def test_proxy_server_starts_admin_listener(make_proxy: Any, tmp_path: Path, dev_keys: DevKeys) -> None:
    """ProxyServer.start() serves the admin API when `admin:` is configured, and close() stops it."""
    import urllib.error
    import urllib.request

    def mutate(data: dict[str, Any]) -> None:
        data["approvals"] = {"path": str(tmp_path / "approvals.db")}
        data["admin"] = {"host": "127.0.0.1", "port": 0}

    proxy = make_proxy(mutate)
    server = proxy.running.server
    assert server.admin is not None
    port = server.admin.port
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/approvals", timeout=5)
    assert exc.value.code == 401
    token = proxy.token(sub="alice", groups=["dba"])
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/approvals",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.status == 200 and json.loads(resp.read()) == {"approvals": []}

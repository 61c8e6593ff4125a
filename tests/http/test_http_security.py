"""Who gets through the HTTP proxy: the token matrix (every refusal is a 401 JSON answer, nothing reaches
the upstream, the token is never recorded) and the signed audit log with HTTP exchanges: verify, export a
bundle, verify it offline, replay it against a sandbox upstream."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import time_machine
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from harness import AUDIENCE, ISSUER
from http_helpers import StartProxy, base, bearer, config_data, exchanges, token

from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.cli import main
from pgproxy.config import parse_config
from pgproxy.identity import DevKeys, generate_dev_keys
from pgproxy.server.listener import ProxyServer

pytestmark = pytest.mark.timeout(60)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_built(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes] | None) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64url(sign(signing_input.encode())) if sign else ''}"


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base_claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "attacker", "iat": now, "nbf": now, "exp": now + 600,
                   "jti": secrets.token_hex(8)}
    return {**base_claims, **overrides}


def public_pem(keys: DevKeys) -> bytes:
    private = serialization.load_pem_private_key(keys.private_key_file.read_bytes(), password=None)
    return private.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


ATTACKS: list[tuple[str, Callable[[DevKeys], dict[str, str]], str]] = [
    ("missing", lambda k: {}, "missing bearer token"),
    ("basic_scheme", lambda k: {"Authorization": "Basic YWxpY2U6c2VjcmV0"}, "missing bearer token"),
    ("garbage", lambda k: bearer("not.a.jwt"), "invalid token"),
    ("alg_none", lambda k: bearer(hand_built({"alg": "none", "typ": "JWT"}, claims(), None)),
     "invalid token: algorithm not allowed"),
    ("alg_confusion_hs256_with_public_key", lambda k: bearer(hand_built(
        {"alg": "HS256", "typ": "JWT", "kid": k.kid}, claims(),
        lambda msg: hmac.new(public_pem(k), msg, hashlib.sha256).digest())), "invalid token: algorithm not allowed"),
    ("expired", lambda k: bearer(token(k, ttl=-60)), "invalid token"),
    ("wrong_audience", lambda k: bearer(token(k, aud="someone-else")), "invalid token"),
    ("tampered_payload", lambda k: bearer(_tampered(token(k))), "invalid token"),
]


def _tampered(jwt: str) -> str:
    header, _, signature = jwt.split(".")
    return f"{header}.{b64url(json.dumps(claims(sub='admin')).encode())}.{signature}"


@pytest.mark.parametrize(("name", "headers", "reason"), ATTACKS, ids=[a[0] for a in ATTACKS])
async def test_refused_tokens(proxy: ProxyServer, client: aiohttp.ClientSession, dev_keys: DevKeys, name: str,
                              headers: Callable[[DevKeys], dict[str, str]], reason: str) -> None:
    sent = headers(dev_keys)
    async with client.post(f"{base(proxy)}/api/echo/x", data=b"{}", headers=sent) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer ")
        body = await r.json()
    assert body["status"] == 401 and body["error"].startswith(reason), body
    audit = proxy.audit.sink
    assert isinstance(audit, MemoryAuditSink)
    assert not exchanges(audit)  # nothing was forwarded
    failed = [e for e in audit.events if e.get("event") == "http_auth_failed"]
    assert len(failed) == 1 and failed[0]["reason"] == body["error"]
    presented = sent.get("Authorization", "").partition(" ")[2]
    assert not presented or presented not in json.dumps(audit.events)


async def test_signed_log_export_and_replay(start_proxy: StartProxy, client: aiohttp.ClientSession,
                                            dev_keys: DevKeys, upstream_url: str, tmp_path: Path) -> None:
    runner = CliRunner()
    key = tmp_path / "audit.key"
    assert runner.invoke(main, ["audit", "keygen", "--out", str(key)]).exit_code == 0
    log_dir = tmp_path / "log"

    def signed(data: dict[str, Any]) -> None:
        data["audit"] = {"dir": str(log_dir), "signing_key_file": str(key), "fsync": "never"}

    proxy = await start_proxy(signed)
    jwt = token(dev_keys)
    async with client.get(f"{base(proxy)}/api/customer", headers=bearer(jwt)) as r:
        assert r.status == 200
    async with client.post(f"{base(proxy)}/api/sink", json={"n": 1}, headers=bearer(jwt)) as r:
        assert r.status == 200
    async with client.post(f"{base(proxy)}/api/sink", json={"customer": {"email": "x@y.z"}},
                           headers=bearer(jwt)) as r:  # masked in the log: cannot be replayed
        assert r.status == 200
    async with client.delete(f"{base(proxy)}/api/echo/1", headers=bearer(jwt)) as r:
        assert r.status == 403
    await proxy.close(drain_seconds=0)  # writes the final checkpoint

    pin = ["--pubkey", f"{key}.pub"]
    result = runner.invoke(main, ["audit", "verify", str(log_dir), *pin])
    assert result.exit_code == 0 and result.output.startswith("OK:"), result.output
    sessions = runner.invoke(main, ["audit", "sessions", str(log_dir)]).output
    session = next(line.split()[0] for line in sessions.splitlines() if line.startswith("http-"))
    bundle = tmp_path / "bundle.json"
    result = runner.invoke(main, ["audit", "export", str(log_dir), "--session", session, "-o", str(bundle), *pin])
    assert result.exit_code == 0, result.output
    records = [json.loads(r["record"])["event"] for r in json.loads(bundle.read_text())["records"]]
    assert [r["event"] for r in records] == ["http_exchange"] * 4
    assert all(jwt not in json.dumps(r) and "x@y.z" not in json.dumps(r) for r in records)
    result = runner.invoke(main, ["audit", "verify-bundle", str(bundle), *pin])
    assert result.exit_code == 0 and "4 records" in result.output, result.output

    # The CLI runs its own event loop: in a thread, while this loop serves the sandbox upstream.
    replay = ["audit", "replay-http", str(bundle), *pin, "--base-url"]
    result = await asyncio.to_thread(runner.invoke, main, [*replay, upstream_url])
    assert result.exit_code == 0, result.output
    assert "2 matched, 0 differ, 2 skipped" in result.output
    assert "masked, redacted, truncated or binary" in result.output and "no upstream response" in result.output

    # A sandbox that answers differently is reported, with exit status 1.
    result = await asyncio.to_thread(runner.invoke, main, [*replay, upstream_url + "/echo"])
    assert result.exit_code == 1 and "0 matched, 2 differ" in result.output, result.output


async def test_token_expiring_between_requests(proxy: ProxyServer, client: aiohttp.ClientSession,
                                               dev_keys: DevKeys) -> None:
    """Verified tokens are reused for a while, but never past their expiry."""
    headers = bearer(token(dev_keys, ttl=1.5))
    async with client.get(f"{base(proxy)}/api/echo/1", headers=headers) as r:
        assert r.status == 200
    with time_machine.travel(time.time() + 1.6):  # the wall clock, 1.6 s on; nothing waits
        async with client.get(f"{base(proxy)}/api/echo/2", headers=headers) as r:
            assert r.status == 401
            assert (await r.json())["error"] == "invalid token: token expired"


@pytest.mark.parametrize("path", ["/api/x/../echo/refunds", "/api/echo/%2e%2e/echo/refunds", "/api/echo%2Frefunds",
                                  "/api//echo/refunds", "/api/echo/.%2Frefunds", "/api/echo\\refunds"])
async def test_paths_that_could_dodge_the_policy_are_refused(proxy: ProxyServer, dev_keys: DevKeys,
                                                             path: str) -> None:
    """A path the upstream might normalise into one no rule was asked about (here: the approval-gated
    /echo/refunds) is refused before the policy runs. Sent raw: HTTP clients would normalise it."""
    assert proxy.http is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.http.port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token(dev_keys)}\r\n"
                 "Content-Length: 2\r\nConnection: close\r\n\r\n{}".encode())
    await writer.drain()
    head, _, body = (await reader.read()).partition(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert json.loads(body)["error"].startswith("refused path: ")
    assert not exchanges(proxy.audit.sink)[-1].get("response")


async def test_upstream_cookies_are_not_kept_for_other_callers(start_proxy: StartProxy,
                                                                client: aiohttp.ClientSession,
                                                                dev_keys: DevKeys) -> None:
    def by_name(data: dict[str, Any]) -> None:  # cookies are only stored for host names, not IP addresses
        data["http"]["targets"][0]["upstream"] = data["http"]["targets"][0]["upstream"].replace("127.0.0.1",
                                                                                                "localhost")

    proxy = await start_proxy(by_name)
    async with client.get(f"{base(proxy)}/api/cookie", headers=bearer(token(dev_keys, sub="one"))) as r:
        assert r.status == 200 and "caller-one-session" in r.headers["Set-Cookie"]  # the caller gets it
    assert len(client.cookie_jar) == 0  # the test client keeps no cookie for 127.0.0.1 either
    async with client.get(f"{base(proxy)}/api/echo/next", headers=bearer(token(dev_keys, sub="two"))) as r:
        echoed = await r.json()
    assert "caller-one-session" not in json.dumps(echoed["headers"])  # the proxy sent nobody's cookie on


async def test_a_reload_gives_the_http_listener_the_new_identity_settings(
        proxy: ProxyServer, client: aiohttp.ClientSession, dev_keys: DevKeys, upstream_url: str,
        tmp_path: Path) -> None:
    """After a reload that changes the signing keys, HTTP callers are checked against the new keys only."""
    rotated = generate_dev_keys(tmp_path / "rotated")
    old, new = token(dev_keys), token(rotated)
    async with client.get(f"{base(proxy)}/api/echo/x", headers=bearer(new)) as r:
        assert r.status == 401  # not yet trusted
    data = config_data(dev_keys, upstream_url, tmp_path)  # the running proxy's config
    data["identity"]["jwks_file"] = str(rotated.jwks_file)
    await proxy.reload(parse_config(data, tmp_path))
    async with client.get(f"{base(proxy)}/api/echo/x", headers=bearer(new)) as r:
        assert r.status == 200, await r.text()
    async with client.get(f"{base(proxy)}/api/echo/x", headers=bearer(old)) as r:
        assert r.status == 401  # the old key is no longer trusted

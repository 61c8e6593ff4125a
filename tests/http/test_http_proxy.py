"""The HTTP proxy against a real upstream: credential injection, masking, policy, limits and failures."""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
from typing import Any

import aiohttp
import pytest
from http_helpers import CREDENTIAL, CUSTOMER, StartProxy, base, bearer, exchanges, pattern, token

from pgproxy.identity import DevKeys
from pgproxy.server.listener import ProxyServer
from pgproxy.tlsutil import DevTLS

pytestmark = pytest.mark.timeout(60)


async def test_credential_is_injected_and_never_reaches_the_caller(
        proxy: ProxyServer, client: aiohttp.ClientSession, dev_keys: DevKeys) -> None:
    jwt = token(dev_keys)
    async with client.post(f"{base(proxy)}/api/echo/things?x=1", json={"q": "hello"}, headers=bearer(jwt)) as r:
        assert r.status == 200
        raw = await r.read()
        echoed_header = r.headers["X-Echo-Auth"]
    body = json.loads(raw)
    # The upstream received the proxy's credential, not the caller's token...
    assert body["method"] == "POST" and body["path"] == "/echo/things?x=1" and body["body"] == '{"q": "hello"}'
    assert jwt not in raw.decode()
    # ...and echoed it back, but the caller only sees stars of the same length.
    assert CREDENTIAL.encode() not in raw
    assert body["headers"]["Authorization"] == "Bearer " + "*" * len(CREDENTIAL)
    assert echoed_header == "Bearer " + "*" * len(CREDENTIAL)
    assert body["headers"]["Accept-Encoding"] == "identity"
    record = json.dumps(exchanges(proxy.audit.sink)[-1])
    assert CREDENTIAL not in record and jwt not in record


async def test_small_answers_are_sent_whole_and_head_keeps_the_upstream_length(
        start_proxy: StartProxy, client: aiohttp.ClientSession, dev_keys: DevKeys) -> None:
    def audit_masks_only(data: dict[str, Any]) -> None:  # no caller mask: answers are relayed as they are
        data["http"]["targets"][0]["masks"] = data["http"]["targets"][0]["masks"][:1]

    proxy = await start_proxy(audit_masks_only)
    headers = bearer(token(dev_keys))
    async with client.get(f"{base(proxy)}/api/echo/size", headers=headers) as r:
        body = await r.read()
        assert r.status == 200 and int(r.headers["Content-Length"]) == len(body)
        assert r.headers["Content-Type"].startswith("application/json") and r.headers["X-Pgproxy-Exchange"]
        assert r.headers["X-Echo-Auth"] == "Bearer " + "*" * len(CREDENTIAL)
    echoed = json.loads(body)
    assert echoed["method"] == "GET" and echoed["headers"]["Authorization"] == "Bearer " + "*" * len(CREDENTIAL)
    record = exchanges(proxy.audit.sink)[-1]
    assert record["response"]["body"]["bytes"] == len(body) and record["response"]["body"]["credential_scrubbed"] == 2
    assert record["response"]["body"]["sha256"] == hashlib.sha256(body).hexdigest()
    async with client.head(f"{base(proxy)}/api/echo/size", headers=headers) as r:
        assert r.status == 200 and await r.read() == b""
        assert int(r.headers["Content-Length"]) == len(body) + 1  # "HEAD" where the GET said "GET"
    record = exchanges(proxy.audit.sink)[-1]
    assert record["method"] == "HEAD" and record["response"]["body"]["bytes"] == 0


async def test_caller_cannot_override_the_credential(start_proxy: StartProxy, client: aiohttp.ClientSession,
                                                     dev_keys: DevKeys) -> None:
    def api_key(data: dict[str, Any]) -> None:
        data["http"]["targets"][0]["credential"] = {"kind": "header", "header": "X-Api-Key",
                                                    "value_env": "PGPROXY_TEST_HTTP_CREDENTIAL"}

    proxy = await start_proxy(api_key)
    headers = {**bearer(token(dev_keys)), "X-Api-Key": "caller-chosen"}
    async with client.get(f"{base(proxy)}/api/echo", headers=headers) as r:
        body = await r.json()
    assert body["headers"]["X-Api-Key"] == "*" * len(CREDENTIAL)
    assert "Authorization" not in body["headers"]  # the caller's token is not forwarded either
    record = exchanges(proxy.audit.sink)[-1]
    assert record["request"]["headers"]["x-api-key"] == "[redacted]"
    assert record["request"]["headers"]["authorization"] == "[redacted]"


async def test_masking_in_the_audit_log_and_for_the_caller(proxy: ProxyServer, client: aiohttp.ClientSession,
                                                           dev_keys: DevKeys) -> None:
    async with client.get(f"{base(proxy)}/api/customer", headers=bearer(token(dev_keys))) as r:
        assert r.status == 200
        sent = await r.read()
    received = json.loads(sent)
    # caller: true for the e-mail only; the SSNs reach the caller but not the log.
    assert received["customer"] == {"name": "Ann", "email": "[masked]"}
    assert [i["ssn"] for i in received["items"]] == ["111-22-3333", "444-55-6666"]
    record = exchanges(proxy.audit.sink)[-1]
    body = record["response"]["body"]
    assert body["json"]["customer"]["email"] == "[masked]"
    assert [i["ssn"] for i in body["json"]["items"]] == ["[masked]", "[masked]"]
    assert body["sha256"] == hashlib.sha256(sent).hexdigest()  # the digest is of what the caller got
    assert body["upstream_sha256"] != body["sha256"]
    assert body["masked_for_caller"] == ["$.customer.email"]
    assert "ann@example.com" not in json.dumps(record) and "111-22-3333" not in json.dumps(record)
    async with client.head(f"{base(proxy)}/api/customer", headers=bearer(token(dev_keys))) as r:
        # No body to mask: the upstream's headers pass as they are (the length of the unmasked body).
        assert r.status == 200 and await r.read() == b"" and int(r.headers["Content-Length"]) > 0

    # Request bodies are masked in the log too, and secrets in them are redacted.
    payload = {"customer": {"email": "bob@example.com"}, "note": "password 'hunter2' AKIAABCDEFGHIJKLMNOP"}
    async with client.post(f"{base(proxy)}/api/echo/x", json=payload, headers=bearer(token(dev_keys))) as r:
        assert r.status == 200
    stored = exchanges(proxy.audit.sink)[-1]["request"]["body"]
    assert stored["json"]["customer"]["email"] == "[masked]" and stored["masked"] == ["$.customer.email"]
    assert "AKIAABCDEFGHIJKLMNOP" not in json.dumps(stored) and "[redacted:aws_access_key]" in json.dumps(stored)
    assert CUSTOMER["customer"]["email"] not in json.dumps(exchanges(proxy.audit.sink))


async def test_policy_deny_and_unknown_target(proxy: ProxyServer, client: aiohttp.ClientSession,
                                              dev_keys: DevKeys) -> None:
    headers = bearer(token(dev_keys))
    async with client.delete(f"{base(proxy)}/api/echo/1", headers=headers) as r:
        assert r.status == 403
        body = await r.json()
    assert body["error"] == "pgproxy policy no-deletes: deletes are not allowed" and body["status"] == 403
    async with client.get(f"{base(proxy)}/nope/x", headers=headers) as r:
        assert r.status == 404 and (await r.json())["error"] == "unknown target 'nope'"
    record = exchanges(proxy.audit.sink)[-2]
    assert record["decision"] == {"action": "deny", "rule": "no-deletes"} and "response" not in record
    assert record["error"]["status"] == 403


async def test_upstream_down_is_502_and_slow_is_504(proxy: ProxyServer, client: aiohttp.ClientSession,
                                                   dev_keys: DevKeys) -> None:
    headers = bearer(token(dev_keys))
    async with client.get(f"{base(proxy)}/down/anything", headers=headers) as r:
        assert r.status == 502
        assert (await r.json())["error"].startswith("upstream down is unreachable or failed")
    async with client.get(f"{base(proxy)}/api/slow", headers=headers) as r:  # read_timeout_seconds: 1
        assert r.status == 504
        assert (await r.json())["error"] == "upstream api did not answer in time"
    statuses = [e["error"]["status"] for e in exchanges(proxy.audit.sink)[-2:]]
    assert statuses == [502, 504]


async def test_request_size_limit(start_proxy: StartProxy, client: aiohttp.ClientSession, dev_keys: DevKeys) -> None:
    def small(data: dict[str, Any]) -> None:
        data["http"]["targets"][0]["max_request_bytes"] = 1000

    proxy = await start_proxy(small)
    headers = bearer(token(dev_keys))
    async with client.post(f"{base(proxy)}/api/sink", data=b"x" * 2000, headers=headers) as r:
        assert r.status == 413 and "over the limit of 1000" in (await r.json())["error"]

    async def chunks() -> Any:  # no Content-Length: the limit is found while streaming
        for _ in range(4):
            yield b"y" * 400

    async with client.post(f"{base(proxy)}/api/sink", data=chunks(), headers=headers) as r:
        assert r.status == 413


async def test_large_bodies_stream_both_ways(proxy: ProxyServer, client: aiohttp.ClientSession,
                                             dev_keys: DevKeys) -> None:
    """50 MB up and 50 MB down through the proxy: digests match, the audit keeps only the excerpt."""
    import tracemalloc

    n = 50 * 1024 * 1024
    expected = hashlib.sha256(pattern(n)).hexdigest()
    headers = bearer(token(dev_keys))

    async def upload() -> Any:
        block = pattern(1 << 20)
        for _ in range(n // len(block)):
            yield block

    tracemalloc.start()
    try:
        async with client.post(f"{base(proxy)}/api/sink", data=upload(), headers=headers) as r:
            assert r.status == 200
            assert await r.json() == {"bytes": n, "sha256": expected}
        digest, size = hashlib.sha256(), 0
        async with client.get(f"{base(proxy)}/api/big?n={n}", headers=headers) as r:
            assert r.status == 200
            async for chunk in r.content.iter_chunked(1 << 16):
                digest.update(chunk)
                size += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size == n and digest.hexdigest() == expected
    # Client, proxy and upstream share this process: nothing held a body (50 MB) in memory.
    assert peak < 16 * 1024 * 1024, f"peak traced memory {peak / 1e6:.1f} MB"
    up, down = exchanges(proxy.audit.sink)[-2:]
    assert up["request"]["body"]["bytes"] == n and up["request"]["body"]["sha256"] == expected
    assert down["response"]["body"]["bytes"] == n and down["response"]["body"]["sha256"] == expected
    assert down["response"]["body"]["omitted"] == "binary body"


async def test_response_over_the_limit_is_cut_not_completed(start_proxy: StartProxy, client: aiohttp.ClientSession,
                                                            dev_keys: DevKeys) -> None:
    def small(data: dict[str, Any]) -> None:
        data["http"]["targets"][0]["max_response_bytes"] = 100_000

    proxy = await start_proxy(small)
    with pytest.raises(aiohttp.ClientPayloadError):  # a streamed body that was cut must not look complete
        async with client.get(f"{base(proxy)}/api/big?n=1000000", headers=bearer(token(dev_keys))) as r:
            assert r.status == 200
            await r.read()
    record = exchanges(proxy.audit.sink)[-1]
    assert record["error"]["status"] == 502 and "over the limit of 100000" in record["error"]["message"]


async def test_tls_listener_and_basic_credential(start_proxy: StartProxy, client: aiohttp.ClientSession,
                                                 dev_keys: DevKeys, tls_files: DevTLS) -> None:
    def tls_basic(data: dict[str, Any]) -> None:
        data["http"]["listen"] = {"host": "127.0.0.1", "port": 0,
                                  "tls": {"cert_file": str(tls_files.cert_file), "key_file": str(tls_files.key_file)}}
        data["http"]["targets"][0]["credential"] = {"kind": "basic", "username": "svc",
                                                    "value_env": "PGPROXY_TEST_HTTP_CREDENTIAL"}

    proxy = await start_proxy(tls_basic)
    assert proxy.http is not None
    context = ssl.create_default_context(cafile=str(tls_files.ca_file))
    url = f"https://localhost:{proxy.http.port}/api/echo/tls"
    async with client.get(url, headers=bearer(token(dev_keys)), ssl=context) as r:
        assert r.status == 200
        raw = await r.read()
    sent = base64.b64encode(f"svc:{CREDENTIAL}".encode()).decode()
    assert sent.encode() not in raw and CREDENTIAL.encode() not in raw
    assert json.loads(raw)["headers"]["Authorization"] == "Basic " + "*" * len(sent)

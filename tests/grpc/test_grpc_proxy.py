"""The gRPC proxy against a real grpcio upstream: relay, credential injection, masking, policy, streams,
deadlines, cancellation and failures."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_helpers import (
    CREDENTIAL,
    Upstream,
    address,
    bearer,
    calls,
    client_certificate,
    order,
    shop_pb2,
    shop_pb2_grpc,
    start_upstream,
    stream_digest,
    token,
)

from pgproxy.audit.sink import AuditUnavailable, MemoryAuditSink
from pgproxy.identity import DevKeys
from pgproxy.server.listener import ProxyServer
from pgproxy.tlsutil import DevTLS

pytestmark = pytest.mark.timeout(30)


async def test_unary_call_is_relayed_with_the_credential_and_masked(
        proxy: ProxyServer, orders: Any, upstream: Upstream, dev_keys: DevKeys) -> None:
    jwt = token(dev_keys)
    reply = await orders.GetOrder(shop_pb2.GetOrderRequest(id=7, note="hi"), metadata=bearer(jwt))
    assert reply.id == 7 and reply.customer.name == "Ann" and reply.items[0].ssn == "111-22-3333"
    assert reply.customer.card == "[masked]"  # caller: true
    assert reply.customer.email == "ann@example.com"  # masked in the audit log only
    seen = upstream.state.metadata[-1]
    assert seen["x-api-key"] == CREDENTIAL and "authorization" not in seen
    record = calls(proxy.audit.sink)[-1]
    assert record["method"] == "/shop.v1.Orders/GetOrder" and record["kind"] == "unary"
    assert record["status"] == {"code": "OK", "message": "", "by": "upstream"}
    assert record["request"]["messages"]["messages"][0]["json"] == {"id": "7", "note": "hi"}
    sent = record["response"]["messages"]["messages"][0]
    assert sent["json"]["customer"] == {"name": "Ann", "email": "[masked]", "card": "[masked]"}
    assert [i["ssn"] for i in sent["json"]["items"]] == ["[masked]", "[masked]"]
    assert sent["bytes"] == reply.ByteSize() and "upstream_sha256" in sent
    assert record["response"]["masked_for_caller"] == ["customer.card"]
    assert record["request"]["metadata"]["authorization"] == "[redacted]"
    text = json.dumps(record)
    assert jwt not in text and CREDENTIAL not in text and "ann@example.com" not in text


async def test_upstream_status_and_message_are_relayed(proxy: ProxyServer, orders: Any, dev_keys: DevKeys) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await orders.GetOrder(shop_pb2.GetOrderRequest(id=404), metadata=bearer(token(dev_keys)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and err.value.details() == "no order 404"
    call_id = dict(err.value.trailing_metadata())["pgproxy-call-id"]
    record = calls(proxy.audit.sink)[-1]
    assert record["call"] == call_id
    assert record["status"]["code"] == "NOT_FOUND" and record["status"]["by"] == "upstream"


@pytest.mark.parametrize("case", ["missing", "garbage", "expired", "wrong-audience"])
async def test_bad_tokens_are_unauthenticated(proxy: ProxyServer, orders: Any, upstream: Upstream,
                                              dev_keys: DevKeys, case: str) -> None:
    metadata: tuple[tuple[str, str], ...] = {
        "missing": (),
        "garbage": bearer("not-a-jwt"),
        "expired": bearer(token(dev_keys, ttl=-60)),
        "wrong-audience": (("authorization", "Bearer " + token(dev_keys, aud="someone-else")),),
    }[case]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await orders.GetOrder(shop_pb2.GetOrderRequest(id=1), metadata=metadata, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ("missing bearer token" if case == "missing" else "invalid token") in (err.value.details() or "")
    assert not upstream.state.metadata and not calls(proxy.audit.sink)
    assert [e["event"] for e in proxy.audit.sink.events] == ["grpc_auth_failed"]  # type: ignore[attr-defined]


async def test_policy_deny_and_unknown_service(proxy: ProxyServer, channel: grpc.aio.Channel,
                                               orders: Any, dev_keys: DevKeys) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await orders.DeleteOrder(shop_pb2.GetOrderRequest(id=1), metadata=bearer(token(dev_keys)))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == "pgproxy policy no-deletes: deletes are not allowed"
    assert calls(proxy.audit.sink)[-1]["decision"] == {"action": "deny", "rule": "no-deletes"}
    unknown = channel.unary_unary("/other.v1.Things/Get")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await unknown(b"", metadata=bearer(token(dev_keys)))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "no target serves other.v1.Things" in str(
        err.value.details())


async def test_server_streaming_in_order_with_a_capped_record(proxy: ProxyServer, orders: Any,
                                                              dev_keys: DevKeys) -> None:
    got = [o async for o in orders.ListOrders(shop_pb2.ListRequest(count=40), metadata=bearer(token(dev_keys)))]
    assert [o.id for o in got] == list(range(40))
    assert all(o.customer.card == "[masked]" for o in got)
    record = calls(proxy.audit.sink)[-1]
    assert record["kind"] == "server_streaming"
    stream = record["response"]["messages"]
    assert stream["count"] == 40 and stream["messages_omitted"] == 35  # audit_messages: 5
    assert [m["json"].get("id") for m in stream["messages"]] == [None, "1", "2", "3", "4"]  # 0 is the default
    assert stream["sha256"] == stream_digest([o.SerializeToString() for o in got])
    upstream_view = [order(i) for i in range(40)]
    assert record["response"]["upstream_sha256"] == stream_digest([o.SerializeToString() for o in upstream_view])


async def test_client_streaming(proxy: ProxyServer, orders: Any, dev_keys: DevKeys) -> None:
    chunks = [shop_pb2.Chunk(index=i, data=bytes([i]) * 1000) for i in range(12)]

    async def send() -> Any:
        for c in chunks:
            yield c

    summary = await orders.Upload(send(), metadata=bearer(token(dev_keys)))
    assert summary.count == 12 and summary.bytes == 12_000
    record = calls(proxy.audit.sink)[-1]
    assert record["kind"] == "client_streaming" and record["request"]["messages"]["count"] == 12
    assert record["request"]["messages"]["sha256"] == stream_digest([c.SerializeToString() for c in chunks])
    assert record["response"]["messages"]["messages"][0]["json"]["sha256"] == summary.sha256


async def test_bidirectional_stream_answers_each_message_before_the_next(proxy: ProxyServer, orders: Any,
                                                                         dev_keys: DevKeys) -> None:
    call = orders.Chat(metadata=bearer(token(dev_keys)))
    for i in range(1, 6):  # one in, one out: the proxy holds nothing back
        await call.write(shop_pb2.Chunk(index=i, data=b"abc%d" % i))
        answer = await call.read()
        assert answer.index == i * 10 and answer.data == (b"abc%d" % i)[::-1]
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    record = calls(proxy.audit.sink)[-1]
    assert record["kind"] == "bidi_streaming"
    assert record["request"]["messages"]["count"] == record["response"]["messages"]["count"] == 5


async def test_error_in_the_middle_of_a_stream(proxy: ProxyServer, orders: Any, dev_keys: DevKeys) -> None:
    call = orders.ListOrders(shop_pb2.ListRequest(count=10, fail_at=3), metadata=bearer(token(dev_keys)))
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for o in call:
            got.append(o.id)
    assert got == [0, 1, 2]
    assert err.value.code() == grpc.StatusCode.ABORTED and err.value.details() == "stopped at 3"
    record = calls(proxy.audit.sink)[-1]
    assert record["status"]["code"] == "ABORTED" and record["response"]["messages"]["count"] == 3


async def test_deadline_is_passed_upstream(proxy: ProxyServer, orders: Any, upstream: Upstream,
                                           dev_keys: DevKeys) -> None:
    started = asyncio.get_running_loop().time()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await orders.Slow(shop_pb2.GetOrderRequest(id=1), metadata=bearer(token(dev_keys)), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert asyncio.get_running_loop().time() - started < 2
    await asyncio.wait_for(upstream.state.cancelled.wait(), 3)  # the upstream call ended too
    await _until(lambda: bool(calls(proxy.audit.sink)))
    assert calls(proxy.audit.sink)[-1]["status"]["code"] in ("DEADLINE_EXCEEDED", "CANCELLED")


async def test_cancelled_stream_is_cancelled_upstream(proxy: ProxyServer, orders: Any, upstream: Upstream,
                                                      dev_keys: DevKeys) -> None:
    call = orders.ListOrders(shop_pb2.ListRequest(count=1_000_000), metadata=bearer(token(dev_keys)))
    assert (await call.read()).id == 0
    call.cancel()
    await asyncio.wait_for(upstream.state.cancelled.wait(), 3)
    await _until(lambda: bool(calls(proxy.audit.sink)))
    assert calls(proxy.audit.sink)[-1]["status"]["code"] == "CANCELLED"


async def test_backpressure_a_slow_reader_holds_the_upstream_back(proxy: ProxyServer, orders: Any,
                                                                  upstream: Upstream, dev_keys: DevKeys) -> None:
    # 400 orders of 64 KiB (25 MiB): a proxy that read ahead without limit would drain them all.
    call = orders.ListOrders(shop_pb2.ListRequest(count=400, blob_bytes=64 * 1024), metadata=bearer(token(dev_keys)))
    assert (await call.read()).id == 0
    await asyncio.sleep(0.5)
    assert upstream.state.produced < 200, upstream.state.produced
    last = None
    while (message := await call.read()) != grpc.aio.EOF:
        last = message.id
    assert last == 399 and upstream.state.produced == 400


async def test_down_upstream_is_unavailable(start_proxy: Any, dev_keys: DevKeys) -> None:
    def route_down(data: dict[str, Any]) -> None:
        targets = data["grpc"]["targets"]
        targets[1]["services"] = ["shop.v1.Echo"]
        targets.reverse()  # the first target whose services match is chosen

    proxy = await start_proxy(route_down)
    async with grpc.aio.insecure_channel(address(proxy)) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await shop_pb2_grpc.EchoStub(ch).Echo(shop_pb2.EchoRequest(text="x"), metadata=bearer(token(dev_keys)),
                                                  timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    record = calls(proxy.audit.sink)[-1]
    assert record["target"] == "down" and record["status"]["code"] == "UNAVAILABLE" and "response" not in record
    assert record["request"]["messages"]["messages"][0]["omitted"] == "undecodable message"  # no descriptors


async def test_undecodable_request_is_refused(proxy: ProxyServer, channel: grpc.aio.Channel, upstream: Upstream,
                                              dev_keys: DevKeys) -> None:
    raw = channel.unary_unary("/shop.v1.Orders/GetOrder")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw(b"\x0a\xff\xff", metadata=bearer(token(dev_keys)))  # a truncated field
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    unknown_field = shop_pb2.GetOrderRequest(id=1).SerializeToString() + b"\xa0\x06\x01"  # field 100: not in the proto
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw(unknown_field, metadata=bearer(token(dev_keys)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not upstream.state.metadata  # neither reached the upstream
    record = calls(proxy.audit.sink)[-1]
    assert record["status"]["by"] == "proxy" and record["request"]["messages"]["count"] == 0


async def test_without_descriptors_digest_mode_relays_and_records_digests(
        start_proxy: Any, upstream: Upstream, dev_keys: DevKeys) -> None:
    def no_descriptors(data: dict[str, Any]) -> None:
        target = data["grpc"]["targets"][0]
        del target["descriptors"], target["masks"]
        target["undecodable"] = "digest"

    proxy = await start_proxy(no_descriptors)
    async with grpc.aio.insecure_channel(address(proxy)) as ch:
        reply = await shop_pb2_grpc.OrdersStub(ch).GetOrder(shop_pb2.GetOrderRequest(id=3),
                                                            metadata=bearer(token(dev_keys)))
    assert reply.customer.card == "4111111111111111"
    record = calls(proxy.audit.sink)[-1]
    message = record["response"]["messages"]["messages"][0]
    assert message == {"bytes": reply.ByteSize(), "sha256": hashlib.sha256(reply.SerializeToString()).hexdigest(),
                       "omitted": "undecodable message"}
    assert record["kind"] is None


async def test_without_descriptors_refuse_mode_refuses(start_proxy: Any, upstream: Upstream,
                                                       dev_keys: DevKeys) -> None:
    def no_descriptors(data: dict[str, Any]) -> None:
        target = data["grpc"]["targets"][0]
        del target["descriptors"], target["masks"]

    proxy = await start_proxy(no_descriptors)
    async with grpc.aio.insecure_channel(address(proxy)) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await shop_pb2_grpc.OrdersStub(ch).GetOrder(shop_pb2.GetOrderRequest(id=3),
                                                        metadata=bearer(token(dev_keys)))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "cannot be decoded" in str(err.value.details())
    assert not upstream.state.metadata


async def test_descriptors_by_server_reflection(start_proxy: Any, dev_keys: DevKeys) -> None:
    def reflection(data: dict[str, Any]) -> None:
        data["grpc"]["targets"][0]["descriptors"] = {"reflection": True}

    proxy = await start_proxy(reflection)
    async with grpc.aio.insecure_channel(address(proxy)) as ch:
        reply = await shop_pb2_grpc.OrdersStub(ch).GetOrder(shop_pb2.GetOrderRequest(id=5),
                                                            metadata=bearer(token(dev_keys)))
    assert reply.customer.card == "[masked]"
    assert calls(proxy.audit.sink)[-1]["response"]["messages"]["messages"][0]["json"]["customer"]["email"] == "[masked]"


async def test_message_size_limit(start_proxy: Any, upstream: Upstream, dev_keys: DevKeys) -> None:
    def larger_elsewhere(data: dict[str, Any]) -> None:  # the listener then takes up to 1 MiB
        data["grpc"]["targets"][1]["max_message_bytes"] = 1024 * 1024

    proxy = await start_proxy(larger_elsewhere)
    async with grpc.aio.insecure_channel(address(proxy)) as ch:
        orders = shop_pb2_grpc.OrdersStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:  # max_message_bytes of target shop: 256 KiB
            await orders.GetOrder(shop_pb2.GetOrderRequest(id=1, note="x" * 300_000), metadata=bearer(token(dev_keys)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "target shop" in str(err.value.details())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await orders.GetOrder(shop_pb2.GetOrderRequest(id=1, note="x" * 2_000_000),
                                  metadata=bearer(token(dev_keys)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # over every limit: refused by the listener
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in orders.ListOrders(shop_pb2.ListRequest(count=1, blob_bytes=300_000),
                                             metadata=bearer(token(dev_keys))):
                pass
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not upstream.state.metadata


async def test_credential_echoed_by_the_upstream_is_starred_out(proxy: ProxyServer, channel: grpc.aio.Channel,
                                                               dev_keys: DevKeys) -> None:
    reply = await shop_pb2_grpc.EchoStub(channel).Echo(shop_pb2.EchoRequest(text="hi"),
                                                       metadata=(*bearer(token(dev_keys)), ("x-trace", "t1"),
                                                                 ("x-api-key", "caller-chosen")))
    # The upstream got the proxy's credential (not the caller's value), echoed it, and the caller sees stars.
    assert reply.metadata["x-api-key"] == "*" * len(CREDENTIAL) and reply.metadata["x-trace"] == "t1"
    record = calls(proxy.audit.sink)[-1]
    assert record["response"]["credential_scrubbed"] == 1 and CREDENTIAL not in json.dumps(record)


async def test_tls_on_both_sides_with_a_client_certificate(start_proxy: Any, tls_files: DevTLS, tmp_path: Path,
                                                           dev_keys: DevKeys) -> None:
    secure = await start_upstream(tls_files)
    cert, key = client_certificate(tls_files, tmp_path)
    try:
        def over_tls(data: dict[str, Any]) -> None:
            data["grpc"]["listen"] = {"host": "127.0.0.1", "port": 0,
                                      "tls": {"cert_file": str(tls_files.cert_file),
                                              "key_file": str(tls_files.key_file)}}
            data["grpc"]["targets"][0].update(
                upstream=f"localhost:{secure.port}",
                tls={"ca_file": str(tls_files.ca_file), "cert_file": str(cert), "key_file": str(key)})

        proxy = await start_proxy(over_tls)
        creds = grpc.ssl_channel_credentials(root_certificates=tls_files.ca_file.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{proxy.grpc.port}", creds) as ch:
            reply = await shop_pb2_grpc.EchoStub(ch).Echo(shop_pb2.EchoRequest(text="over tls"),
                                                          metadata=bearer(token(dev_keys)))
        assert reply.text == "over tls" and reply.client_cn == "pgproxy-client"
        async with grpc.aio.insecure_channel(f"localhost:{proxy.grpc.port}") as ch:  # plaintext is not served
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await shop_pb2_grpc.EchoStub(ch).Echo(shop_pb2.EchoRequest(text="x"), metadata=bearer(token(dev_keys)),
                                                      timeout=3)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await secure.server.stop(0)


async def _until(condition: Any, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


class BreakableAudit(MemoryAuditSink):
    """An audit sink whose disk can fill up."""

    broken = False

    def emit(self, event: dict[str, Any]) -> None:
        if self.broken:
            raise AuditUnavailable("disk full")
        super().emit(event)

    def flush(self) -> None:
        if self.broken:
            raise AuditUnavailable("disk full")


async def test_calls_are_refused_while_the_audit_log_is_unavailable(start_proxy: Any, upstream: Upstream,
                                                                   dev_keys: DevKeys) -> None:
    audit = BreakableAudit()
    proxy = await start_proxy(audit=audit)
    metadata = bearer(token(dev_keys))
    async with grpc.aio.insecure_channel(address(proxy)) as ch:
        orders = shop_pb2_grpc.OrdersStub(ch)
        await orders.GetOrder(shop_pb2.GetOrderRequest(id=1), metadata=metadata)
        audit.broken = True
        await orders.GetOrder(shop_pb2.GetOrderRequest(id=2), metadata=metadata)  # its record is lost...
        seen = len(upstream.state.metadata)
        with pytest.raises(grpc.aio.AioRpcError) as err:  # ...so nothing more runs until the log recovers
            await orders.GetOrder(shop_pb2.GetOrderRequest(id=3), metadata=metadata)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "audit log" in str(err.value.details())
        assert len(upstream.state.metadata) == seen
        audit.broken = False
        assert (await orders.GetOrder(shop_pb2.GetOrderRequest(id=4), metadata=metadata)).id == 4
    assert [c["request"]["messages"]["messages"][0]["json"]["id"] for c in calls(audit)] == ["1", "4"]


async def test_undecodable_response_is_not_relayed(start_proxy: Any, dev_keys: DevKeys) -> None:
    async def garbage(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"\x0a\xff"  # a truncated field, whatever GetOrder's request was

    broken = grpc.aio.server()
    broken.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "shop.v1.Orders", {"GetOrder": grpc.unary_unary_rpc_method_handler(garbage)})])
    port = broken.add_insecure_port("127.0.0.1:0")
    await broken.start()
    try:
        proxy = await start_proxy(lambda data: data["grpc"]["targets"][0].update(upstream=f"127.0.0.1:{port}"))
        async with grpc.aio.insecure_channel(address(proxy)) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await shop_pb2_grpc.OrdersStub(ch).GetOrder(shop_pb2.GetOrderRequest(id=1),
                                                            metadata=bearer(token(dev_keys)))
        assert err.value.code() == grpc.StatusCode.INTERNAL and "cannot be decoded as shop.v1.Order" in str(
            err.value.details())
        record = calls(proxy.audit.sink)[-1]
        assert record["status"]["code"] == "INTERNAL" and record["status"]["by"] == "proxy"
    finally:
        await broken.stop(0)


async def test_undecodable_message_in_a_client_stream_ends_the_call(proxy: ProxyServer, channel: grpc.aio.Channel,
                                                                    dev_keys: DevKeys) -> None:
    upload = channel.stream_unary("/shop.v1.Orders/Upload")

    async def messages() -> Any:
        yield shop_pb2.Chunk(index=1, data=b"ok").SerializeToString()
        yield b"\x0a\xff"  # truncated

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await upload(messages(), metadata=bearer(token(dev_keys)), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request message 2 cannot be decoded as shop.v1.Chunk" in str(err.value.details())
    await _until(lambda: bool(calls(proxy.audit.sink)))
    record = calls(proxy.audit.sink)[-1]
    assert record["status"]["code"] == "INVALID_ARGUMENT" and record["request"]["messages"]["count"] == 1


async def test_a_request_stream_that_never_ends_is_bounded_by_the_target_timeout(
        start_proxy: Any, upstream: Upstream, dev_keys: DevKeys) -> None:
    def approve_uploads(data: dict[str, Any]) -> None:  # an approval needs the whole request stream first
        data["grpc"]["targets"][0]["timeout_seconds"] = 0.3
        data["grpc"]["rules"].insert(0, {"name": "uploads", "match": {"methods": ["Upload"]}, "action": "approve",
                                         "approvers": ["finance"]})

    proxy = await start_proxy(approve_uploads)
    async with grpc.aio.insecure_channel(address(proxy)) as ch:
        call = shop_pb2_grpc.OrdersStub(ch).Upload(metadata=bearer(token(dev_keys)))  # no deadline
        await call.write(shop_pb2.Chunk(index=1))  # and never done_writing()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call, 5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "did not end within 0.3 s" in str(err.value.details())

"""gRPC approvals through the shared store and the real `pgproxy approvals` CLI, in refuse and hold modes."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2
from grpc_helpers import Upstream, address, bearer, calls, shop_pb2, shop_pb2_grpc, stream_digest, token
from grpc_status import rpc_status
from harness import approvals_cli

from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.identity import DevKeys
from pgproxy.policy.approvals import ApprovalStore
from pgproxy.server.listener import ProxyServer

pytestmark = pytest.mark.timeout(30)




def store(server: ProxyServer) -> ApprovalStore:
    assert server.approval_store is not None
    return server.approval_store


def approval_in_details(error: grpc.aio.AioRpcError) -> str:
    """The approval id from the google.rpc.Status details (an ErrorInfo), checked against the plain trailer."""
    status = rpc_status.from_call(error)
    assert status is not None and len(status.details) == 1
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.domain == "pgproxy"
    approval_id = info.metadata["approval_id"]
    assert dict(error.trailing_metadata())["pgproxy-approval-id"] == approval_id
    return approval_id


async def test_refuse_mode_then_approve_with_the_cli_runs_once(
        proxy: ProxyServer, orders: Any, upstream: Upstream, dev_keys: DevKeys) -> None:
    agent = bearer(token(dev_keys))
    refund = shop_pb2.RefundRequest(order_id=42, amount_cents=1000)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await orders.Refund(refund, metadata=agent)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    approval_id = approval_in_details(err.value)
    assert f"pgproxy approvals approve {approval_id}" in str(err.value.details())
    request = await store(proxy).get(approval_id)
    assert request is not None and request.database == "grpc:shop" and request.sql == "/shop.v1.Orders/Refund"
    assert request.params == [f"sha256:{stream_digest([refund.SerializeToString()])}"]
    assert request.classification["request"][0]["json"] == {"order_id": "42", "amount_cents": "1000"}

    # A different message is a different request: it needs its own approval.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await orders.Refund(shop_pb2.RefundRequest(order_id=42, amount_cents=999_999), metadata=agent)
    assert approval_in_details(err.value) != approval_id

    assert "approved" in await approvals_cli(proxy.config.source, dev_keys, "approve", approval_id)
    # Bound to the identity: another caller sending the identical request is not covered.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await orders.Refund(refund, metadata=bearer(token(dev_keys, sub="agent-2")))
    assert approval_in_details(err.value) != approval_id
    reply = await orders.Refund(refund, metadata=agent)
    assert reply.refund_id == "rf-42-1" and upstream.state.refunds == [(42, 1000)]
    with pytest.raises(grpc.aio.AioRpcError) as err:  # used: the next one needs a new approval
        await orders.Refund(refund, metadata=agent)
    assert approval_in_details(err.value) != approval_id
    assert upstream.state.refunds == [(42, 1000)]

    ran = [c for c in calls(proxy.audit.sink) if c["status"]["code"] == "OK"]
    assert len(ran) == 1 and ran[0]["decision"] == {"action": "approve", "rule": "refunds", "approval_id": approval_id}
    assert isinstance(proxy.audit.sink, MemoryAuditSink)
    outcomes = [e["outcome"] for e in proxy.audit.sink.events if e.get("event") == "policy_approval"
                and e["approval_id"] == approval_id]
    assert outcomes == ["required", "used"]


async def _pending_id(server: ProxyServer) -> str:
    for _ in range(200):
        pending = await store(server).list("pending")
        if pending:
            return pending[0].id
        await asyncio.sleep(0.02)
    raise AssertionError("no approval request was filed")


async def test_hold_mode_waits_for_the_decision(proxy: ProxyServer, orders: Any, upstream: Upstream,
                                                dev_keys: DevKeys) -> None:
    agent = bearer(token(dev_keys))
    waiting = asyncio.ensure_future(orders.Payout(shop_pb2.RefundRequest(order_id=1, amount_cents=5), metadata=agent))
    approval_id = await _pending_id(proxy)
    assert not waiting.done() and not upstream.state.refunds
    await approvals_cli(proxy.config.source, dev_keys, "approve", approval_id)
    assert (await waiting).refund_id == "rf-1-1"

    waiting = asyncio.ensure_future(orders.Payout(shop_pb2.RefundRequest(order_id=2, amount_cents=5), metadata=agent))
    approval_id = await _pending_id(proxy)
    await approvals_cli(proxy.config.source, dev_keys, "deny", approval_id)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await waiting
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == f"approval {approval_id} denied by fin-1"
    assert approval_in_details(err.value) == approval_id
    assert upstream.state.refunds == [(1, 5)]


async def test_streaming_requests_are_approved_as_a_whole(start_proxy: Any, upstream: Upstream,
                                                          dev_keys: DevKeys) -> None:
    def approve_uploads(data: dict[str, Any]) -> None:
        data["grpc"]["rules"].insert(0, {"name": "uploads", "match": {"methods": ["Upload", "Chat"]},
                                         "action": "approve", "approvers": ["finance"]})

    proxy = await start_proxy(approve_uploads)
    agent = bearer(token(dev_keys))
    chunks = [shop_pb2.Chunk(index=i, data=b"d%d" % i) for i in range(3)]

    async def send() -> Any:
        for c in chunks:
            yield c

    async with grpc.aio.insecure_channel(address(proxy)) as ch:
        stub = shop_pb2_grpc.OrdersStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Upload(send(), metadata=agent)
        approval_id = approval_in_details(err.value)
        request = await store(proxy).get(approval_id)
        assert request is not None
        assert request.params == [f"sha256:{stream_digest([c.SerializeToString() for c in chunks])}"]
        await approvals_cli(proxy.config.source, dev_keys, "approve", approval_id)
        assert (await stub.Upload(send(), metadata=agent)).count == 3
        with pytest.raises(grpc.aio.AioRpcError) as err:  # a bidirectional stream cannot be known in advance
            chat = stub.Chat(metadata=agent)
            await chat.write(chunks[0])
            await chat.done_writing()
            await chat.read()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "bidirectional" in str(err.value.details())


async def test_no_store_fails_closed(start_proxy: Any, upstream: Upstream, dev_keys: DevKeys) -> None:
    def no_store(data: dict[str, Any]) -> None:
        del data["approvals"]

    proxy = await start_proxy(no_store)
    async with grpc.aio.insecure_channel(address(proxy)) as ch:
        stub = shop_pb2_grpc.OrdersStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Refund(shop_pb2.RefundRequest(order_id=1), metadata=bearer(token(dev_keys)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "approval" in str(err.value.details())
        assert (await stub.GetOrder(shop_pb2.GetOrderRequest(id=1), metadata=bearer(token(dev_keys)))).id == 1
    assert not upstream.state.refunds


async def test_hold_mode_without_a_decision_times_out(start_proxy: Any, upstream: Upstream,
                                                      dev_keys: DevKeys) -> None:
    def quick_hold(data: dict[str, Any]) -> None:
        data["grpc"]["rules"].insert(0, {"name": "quick-hold", "match": {"methods": ["Payout"]},
                                         "action": "approve", "approvers": ["finance"], "mode": "hold",
                                         "timeout": 0.3})

    proxy = await start_proxy(quick_hold)
    async with grpc.aio.insecure_channel(address(proxy)) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await shop_pb2_grpc.OrdersStub(ch).Payout(shop_pb2.RefundRequest(order_id=3),
                                                      metadata=bearer(token(dev_keys)), timeout=10)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "timed out after 0.3 s" in str(
        err.value.details())
    assert approval_in_details(err.value).startswith("apr_") and not upstream.state.refunds

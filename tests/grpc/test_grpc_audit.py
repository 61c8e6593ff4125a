"""gRPC calls in the signed audit log: verify, export a session bundle, verify it offline, replay it
against a sandbox gRPC server with the results compared."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from click.testing import CliRunner
from grpc_helpers import (
    CREDENTIAL,
    DESCRIPTOR_SET,
    Orders,
    address,
    bearer,
    order,
    shop_pb2,
    shop_pb2_grpc,
    start_upstream,
    token,
)

from pgproxy.cli import main
from pgproxy.identity import DevKeys

pytestmark = pytest.mark.timeout(60)


class ChangedOrders(Orders):
    """A sandbox whose GetOrder answers differently from the recorded upstream."""

    async def GetOrder(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        changed = order(request.id)
        changed.total_cents += 1
        return changed


async def test_signed_log_export_and_replay(start_proxy: Any, dev_keys: DevKeys, tmp_path: Path) -> None:
    runner = CliRunner()
    key = tmp_path / "audit.key"
    assert runner.invoke(main, ["audit", "keygen", "--out", str(key)]).exit_code == 0
    log_dir = tmp_path / "log"

    def signed(data: dict[str, Any]) -> None:
        data["audit"] = {"dir": str(log_dir), "signing_key_file": str(key), "fsync": "never"}

    proxy = await start_proxy(signed)
    jwt = token(dev_keys)
    async with grpc.aio.insecure_channel(address(proxy)) as ch:
        orders = shop_pb2_grpc.OrdersStub(ch)
        assert (await orders.GetOrder(shop_pb2.GetOrderRequest(id=7), metadata=bearer(jwt))).id == 7
        listed = [o.id async for o in orders.ListOrders(shop_pb2.ListRequest(count=3), metadata=bearer(jwt))]
        assert listed == [0, 1, 2]

        async def chunks() -> Any:
            for i in range(3):
                yield shop_pb2.Chunk(index=i, data=bytes(range(i * 10, i * 10 + 10)))

        assert (await orders.Upload(chunks(), metadata=bearer(jwt))).count == 3
        with pytest.raises(grpc.aio.AioRpcError):  # needs an approval: nothing to replay
            await orders.Refund(shop_pb2.RefundRequest(order_id=1), metadata=bearer(jwt))
        echo = await shop_pb2_grpc.EchoStub(ch).Echo(shop_pb2.EchoRequest(text="e"), metadata=bearer(jwt))
        assert CREDENTIAL not in echo.metadata["x-api-key"]
    await proxy.close(drain_seconds=0)  # writes the final checkpoint

    pin = ["--pubkey", f"{key}.pub"]
    result = runner.invoke(main, ["audit", "verify", str(log_dir), *pin])
    assert result.exit_code == 0 and result.output.startswith("OK:"), result.output
    sessions = runner.invoke(main, ["audit", "sessions", str(log_dir)]).output
    session = next(line.split()[0] for line in sessions.splitlines() if line.startswith("grpc-"))
    bundle = tmp_path / "bundle.json"
    result = runner.invoke(main, ["audit", "export", str(log_dir), "--session", session, "-o", str(bundle), *pin])
    assert result.exit_code == 0, result.output
    records = [json.loads(r["record"])["event"] for r in json.loads(bundle.read_text())["records"]]
    grpc_calls = [r for r in records if r["event"] == "grpc_call"]
    assert [r["method"].rsplit("/", 1)[1] for r in grpc_calls] == ["GetOrder", "ListOrders", "Upload", "Refund",
                                                                  "Echo"]
    assert all(jwt not in json.dumps(r) and CREDENTIAL not in json.dumps(r) and "ann@example.com" not in json.dumps(r)
               for r in records)
    result = runner.invoke(main, ["audit", "verify-bundle", str(bundle), *pin])
    assert result.exit_code == 0 and f"{len(records)} records" in result.output, result.output

    # The CLI runs its own event loop: in a thread, while this loop serves the sandbox.
    sandbox = await start_upstream()
    changed = await start_upstream(orders=ChangedOrders)
    try:
        replay = ["audit", "replay-grpc", str(bundle), *pin, "--metadata", "x-api-key: sandbox", "--target"]
        result = await asyncio.to_thread(runner.invoke, main, [*replay, sandbox.address])  # by reflection
        assert result.exit_code == 0, result.output
        assert "3 matched, 0 differ, 2 skipped" in result.output
        assert "no upstream answer" in result.output and "echoed the proxy's credential" in result.output
        assert sandbox.state.metadata[-1]["x-api-key"] == "sandbox"

        result = await asyncio.to_thread(runner.invoke, main, [*replay, changed.address, "--descriptor-set",
                                                               str(DESCRIPTOR_SET)])
        assert result.exit_code == 1 and "2 matched, 1 differ" in result.output, result.output
        assert "GetOrder (1 messages, digest" in result.output
    finally:
        await sandbox.server.stop(0)
        await changed.server.stop(0)

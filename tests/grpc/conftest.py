"""Fixtures for the gRPC proxy tests: a real grpcio upstream and the real proxy in front of it.

Everything runs on the test's event loop: the upstream (``grpc.aio`` server on a free port), the proxy
(``ProxyServer``, which starts the gRPC listener exactly as ``pgproxy serve`` does) and the client.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
import yaml
from grpc_helpers import (
    CREDENTIAL,
    CREDENTIAL_ENV,
    StartProxy,
    Upstream,
    address,
    config_data,
    shop_pb2_grpc,
    start_upstream,
)

from pgproxy.audit.sink import AuditSink, MemoryAuditSink
from pgproxy.config import load_config
from pgproxy.identity import DevKeys
from pgproxy.server.listener import ProxyServer


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    started = await start_upstream()
    yield started
    await started.server.stop(0)


@pytest.fixture
async def start_proxy(dev_keys: DevKeys, upstream: Upstream, tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[StartProxy]:
    """``await start_proxy(mutate=None, audit=None)``: a started ProxyServer (closed at the end)."""
    monkeypatch.setenv(CREDENTIAL_ENV, CREDENTIAL)
    started: list[ProxyServer] = []

    async def start(mutate: Callable[[dict[str, Any]], None] | None = None,
                    audit: AuditSink | None = None) -> ProxyServer:
        data = copy.deepcopy(config_data(dev_keys, upstream.address, tmp_path))
        if mutate is not None:
            mutate(data)
        # From a file, as `pgproxy serve -c FILE` does: `pgproxy approvals -c FILE` then shares the store.
        path = tmp_path / f"pgproxy-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(data))
        if audit is None and "dir" not in data["audit"]:  # the signed log, when configured, is the real one
            audit = MemoryAuditSink()
        server = ProxyServer(load_config(path), audit=audit)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close(drain_seconds=0)


@pytest.fixture
async def proxy(start_proxy: StartProxy) -> ProxyServer:
    return await start_proxy()


@pytest.fixture
async def channel(proxy: ProxyServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(address(proxy)) as ch:
        yield ch


@pytest.fixture
def orders(channel: grpc.aio.Channel) -> Any:
    return shop_pb2_grpc.OrdersStub(channel)

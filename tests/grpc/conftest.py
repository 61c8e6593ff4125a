"""Fixtures for the gRPC proxy tests: a real grpcio upstream and the real proxy in front of it.

Everything runs on the test's event loop: the upstream (``grpc.aio`` server on a free port), the proxy
(``ProxyServer``, which starts the gRPC listener exactly as ``pgproxy serve`` does) and the client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
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
from harness import ProxyServers

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
    servers = ProxyServers(config_data(dev_keys, upstream.address, tmp_path), tmp_path)
    yield servers.start
    await servers.close()


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

"""Fixtures for the HTTP proxy tests: a real upstream aiohttp server and the real proxy in front of it.

Everything runs on the test's event loop: the upstream (``web.AppRunner`` on a free port), the proxy
(``ProxyServer``, which starts the HTTP listener exactly as ``pgproxy serve`` does) and the client.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from http_helpers import CREDENTIAL, CREDENTIAL_ENV, StartProxy, config_data, upstream_app

from pgproxy.audit.sink import AuditSink, MemoryAuditSink
from pgproxy.config import load_config
from pgproxy.identity import DevKeys
from pgproxy.server.listener import ProxyServer


@pytest.fixture
async def upstream_url() -> AsyncIterator[str]:
    runner = web.AppRunner(upstream_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()




@pytest.fixture
async def start_proxy(dev_keys: DevKeys, upstream_url: str, tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[StartProxy]:
    """``await start_proxy(mutate=None, audit=None)``: a started ProxyServer (closed at the end)."""
    monkeypatch.setenv(CREDENTIAL_ENV, CREDENTIAL)
    started: list[ProxyServer] = []

    async def start(mutate: Callable[[dict[str, Any]], None] | None = None,
                    audit: AuditSink | None = None) -> ProxyServer:
        data = copy.deepcopy(config_data(dev_keys, upstream_url, tmp_path))
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
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session

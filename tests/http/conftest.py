"""Fixtures for the HTTP proxy tests: a real upstream aiohttp server and the real proxy in front of it.

Everything runs on the test's event loop: the upstream (``web.AppRunner`` on a free port), the proxy
(``ProxyServer``, which starts the HTTP listener exactly as ``pgproxy serve`` does) and the client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from harness import ProxyServers
from http_helpers import CREDENTIAL, CREDENTIAL_ENV, StartProxy, config_data, upstream_app

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
    servers = ProxyServers(config_data(dev_keys, upstream_url, tmp_path), tmp_path)
    yield servers.start
    await servers.close()


@pytest.fixture
async def proxy(start_proxy: StartProxy) -> ProxyServer:
    return await start_proxy()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session

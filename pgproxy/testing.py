"""Run a real proxy on a background event loop, for tests, benchmarks and embedding.

The proxy runs in its own thread with its own (uvloop, when installed) event loop, exactly as
`pgproxy serve` runs it, so synchronous clients (psql, pgbench, psycopg) can talk to it from the
calling thread. Ports are chosen by the OS (port 0) and read back.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from .app import build_server
from .audit.sink import AuditSink
from .config import ProxyConfig
from .core.plugins import FrontendGate
from .server.listener import ProxyServer

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when available (what production uses), else the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class RunningProxy:
    """A ProxyServer serving from a daemon thread until ``stop``."""

    def __init__(self, config: ProxyConfig, *, audit: AuditSink | None = None,
                 gates: Sequence[FrontendGate] = ()) -> None:
        self.config = config
        self._audit = audit
        self._gates = gates
        self.loop = new_event_loop()
        self.server: ProxyServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="pgproxy", daemon=True)

    def start(self) -> RunningProxy:
        self._thread.start()
        self.server = self.call(self._start())
        return self

    async def _start(self) -> ProxyServer:
        server = build_server(self.config, audit=self._audit, gates=self._gates)
        await server.start()
        return server

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the proxy's loop and wait for its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    @property
    def ports(self) -> list[int]:
        assert self.server is not None
        return self.server.bound_ports

    def stop(self, drain_seconds: float = 0.0) -> None:
        if self.server is not None:
            self.call(self.server.close(drain_seconds=drain_seconds))
            self.server = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self.loop.is_running():
            self.loop.close()

    def __enter__(self) -> RunningProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""The proxy server: listeners, the shared pieces every session uses, and graceful shutdown.

Thin I/O around ``Session``: it accepts sockets, starts one task per connection and keeps the things
sessions share (token verifier, cancel-key registry, audit sink, TLS contexts). A failure inside one
session never reaches another or the listener.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Callable, Sequence

from ..audit.sink import AuditSink, JsonLinesAuditSink
from ..config import ConfigError, ListenerConfig, ProxyConfig
from ..identity import TokenVerifier
from ..protocol import errors
from ..tlsutil import server_context
from .cancel import CancelRegistry
from .gates import FrontendGate
from .link import Link
from .session import Session

log = logging.getLogger(__name__)


class ProxyServer:
    """Serves every configured listener until closed."""

    def __init__(self, config: ProxyConfig, *, audit: AuditSink | None = None,
                 verifier: TokenVerifier | None = None, gates: Sequence[FrontendGate] = ()) -> None:
        self.config = config
        self.gates = tuple(gates)
        if audit is None:
            if config.audit.jsonl_path is None:
                raise ConfigError("audit.jsonl_path: required: the proxy does not run statements it cannot record")
            audit = JsonLinesAuditSink(config.audit.jsonl_path)
        self.audit: AuditSink = audit
        self.verifier = verifier or TokenVerifier(config.identity)
        self.cancels = CancelRegistry()
        self.sessions: set[Session] = set()
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._tls: dict[int, ssl.SSLContext] = {}
        self._flusher: asyncio.Task[None] | None = None

    def tls_context(self, listener: ListenerConfig) -> ssl.SSLContext | None:
        if listener.tls is None:
            return None
        key = id(listener)
        context = self._tls.get(key)
        if context is None:
            context = server_context(listener.tls.cert_file, listener.tls.key_file)
            self._tls[key] = context
        return context

    async def start(self) -> None:
        """Bind every listener (port 0 picks a free port; see ``bound_ports``)."""
        loop = asyncio.get_running_loop()
        for listener in self.config.listeners:
            self.tls_context(listener)  # fail at start, not at the first client, on a bad cert
            server = await loop.create_server(functools.partial(Link, self._accepted(listener)),
                                              listener.host, listener.port, reuse_address=True)
            self._servers.append(server)
            log.info("listening on %s:%d (%s)", listener.host, server.sockets[0].getsockname()[1],
                     "tls" if listener.tls else "plaintext")
        self._flusher = asyncio.create_task(self._flush_audit_periodically())

    def _accepted(self, listener: ListenerConfig) -> Callable[[Link], None]:
        def on_made(link: Link) -> None:
            session = Session(self, link, listener)
            self.sessions.add(session)
            task = asyncio.get_running_loop().create_task(self._run(session))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return on_made

    async def _run(self, session: Session) -> None:
        try:
            await session.run()
        except Exception:
            log.exception("session %s failed", session.id)
        finally:
            self.sessions.discard(session)

    @property
    def bound_ports(self) -> list[int]:
        return [int(s.sockets[0].getsockname()[1]) for s in self._servers]

    async def _flush_audit_periodically(self, interval: float = 0.2) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.audit.flush()
            except Exception as exc:  # the sink reports itself broken; sessions then fail closed
                log.error("audit flush failed: %s", exc)

    async def serve_forever(self) -> None:
        await asyncio.gather(*(s.serve_forever() for s in self._servers))

    async def close(self, drain_seconds: float = 5.0) -> None:
        """Stop accepting, give sessions ``drain_seconds`` to finish, then end the rest with FATAL."""
        for server in self._servers:
            server.close()
        if self.sessions and drain_seconds > 0:
            deadline = asyncio.get_running_loop().time() + drain_seconds
            while self.sessions and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.terminate(errors.ADMIN_SHUTDOWN, "terminating connection due to administrator command")
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._flusher is not None:
            self._flusher.cancel()
        self.audit.close()

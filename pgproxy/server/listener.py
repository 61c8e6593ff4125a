"""The proxy server: listeners, the shared pieces every session uses, and graceful shutdown.

Thin I/O around ``Session``: it accepts sockets, starts one task per connection and keeps the things
sessions share (token verifier, cancel-key registry, audit sink, TLS contexts). A failure inside one
session never reaches another or the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import ssl
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..admin.metrics import add_metrics_route
from ..admin.server import AdminServer
from ..audit.events import AuditEmitter, as_emitter
from ..audit.factory import sink_from_config
from ..audit.sink import AuditSink, AuditUnavailable
from ..config import ListenerConfig, ProxyConfig
from ..http.proxy import HttpProxy
from ..identity import TokenVerifier
from ..logsetup import session_context
from ..metrics import ProxyMetrics
from ..policy.approvals import ApprovalStore
from ..protocol import errors
from ..tlsutil import server_context
from .cancel import CancelRegistry
from .gates import FrontendGate
from .link import Link
from .session import Session

if TYPE_CHECKING:
    from ..masking.engine import Masking

log = logging.getLogger(__name__)


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (where the loop supports signal handlers)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


class ProxyServer:
    """Serves every configured listener until closed."""

    def __init__(self, config: ProxyConfig, *, audit: AuditSink | None = None,
                 verifier: TokenVerifier | None = None, gates: Sequence[FrontendGate] = (),
                 approval_store: ApprovalStore | None = None) -> None:
        self.config = config
        self.gates = tuple(gates)
        if audit is None:
            audit = sink_from_config(config.audit)  # JSON lines or the signed log; ConfigError if neither
        # Every event of every producer passes the one emitter: timestamps, redaction, session numbering.
        self.audit: AuditEmitter = as_emitter(audit)
        audit = self.audit
        self.metrics = ProxyMetrics()  # served at /metrics on the admin listener (docs/operations.md)
        self.metrics.watch_audit(self.audit.sink)
        from ..audit.store import StoreShipper  # the signed log's copy in the central store, if configured

        self.shipper = (StoreShipper(config.audit.dir, config.audit.store_dsn(), config.audit.store_schema)
                        if config.audit.dir is not None and config.audit.store_dsn_env is not None else None)
        # The policy gate (config `policy:`) runs first; its approvals go to ``approval_store``, else to
        # the store of the `approvals:` section, else every approval is refused (fail closed).
        self.approval_store = approval_store
        self._owns_approval_store = False
        if config.policy is not None:
            from ..policy.gate import PolicyGate
            from ..policy.rules import load_policy

            if self.approval_store is None and config.approvals is not None:
                from ..policy.approval_factory import build_approval_store

                self.approval_store = build_approval_store(config, audit=audit)
                self._owns_approval_store = True
            gate = PolicyGate(load_policy(config.policy.file), self.approval_store,
                              audit_allowed=config.policy.audit_allowed, metrics=self.metrics)
            self.gates = (gate, *self.gates)
        # Column masking (config `masking:`) judges last, so it rewrites exactly what policy let through.
        self.masking: Masking | None = None
        if config.masking is not None:
            from ..masking.engine import Masking

            self.masking = Masking(config.masking, config.upstream)
            self.gates = (*self.gates, self.masking)
        if config.http is not None and self.approval_store is None and config.approvals is not None:
            from ..policy.approval_factory import build_approval_store

            self.approval_store = build_approval_store(config, audit=audit)  # HTTP approvals use it too
            self._owns_approval_store = True
        self.verifier = verifier or TokenVerifier(config.identity)
        self.cancels = CancelRegistry()
        self.sessions: set[Session] = set()
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._tls: dict[int, ssl.SSLContext] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.admin: AdminServer | None = None  # the approvals HTTP API (config `admin:`), started by start()
        self.http: HttpProxy | None = None  # the HTTP companion proxy (config `http:`), started by start()

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
            self.metrics.listener_bound(listener, f"{listener.host}:{server.sockets[0].getsockname()[1]}")
            log.info("listening on %s:%d (%s)", listener.host, server.sockets[0].getsockname()[1],
                     "tls" if listener.tls else "plaintext")
        self._flusher = asyncio.create_task(self._flush_audit_periodically())
        if self.shipper is not None:
            self.shipper.start()
        limits = self.config.limits
        if limits.idle_timeout_seconds or limits.idle_in_transaction_timeout_seconds:
            self._sweeper = asyncio.create_task(self._sweep_idle_sessions())
        if self.config.admin is not None:
            self.admin = AdminServer.from_config(self.config, store=self.approval_store, verifier=self.verifier,
                                                 audit=self.audit)
            add_metrics_route(self.admin.app, self.metrics, self.config.admin)
            await self.admin.start()
        if self.config.http is not None:  # same verifier, audit log and approval store as the SQL side
            self.http = HttpProxy(self.config.http, verifier=self.verifier, audit=self.audit,
                                  approval_store=self.approval_store)
            await self.http.start()

    def _accepted(self, listener: ListenerConfig) -> Callable[[Link], None]:
        def on_made(link: Link) -> None:
            session = Session(self, link, listener)
            self.sessions.add(session)
            self.metrics.connection_opened(listener)
            task = asyncio.get_running_loop().create_task(self._run(session))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return on_made

    async def _run(self, session: Session) -> None:
        session_context.set(session)  # JSON log lines from this task name the session and subject
        try:
            await session.run()
        except Exception:
            log.exception("session %s failed", session.id)
        finally:
            self.sessions.discard(session)
            self.metrics.connection_closed(session.listener)

    def over_connection_limit(self) -> bool:
        """True when one more started session would exceed ``limits.max_connections``.

        As in PostgreSQL, a connection counts once it has sent its startup packet: sockets that have
        sent nothing yet cannot lock everybody out (the startup timeout ends them).
        """
        started = sum(1 for s in self.sessions if s.started)
        return started >= self.config.limits.max_connections

    async def _sweep_idle_sessions(self) -> None:
        limits = self.config.limits
        timeouts = [t for t in (limits.idle_timeout_seconds, limits.idle_in_transaction_timeout_seconds) if t]
        interval = max(0.05, min(1.0, min(timeouts) / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for session in list(self.sessions):
                session.idle_check(now)

    @property
    def bound_ports(self) -> list[int]:
        return [int(s.sockets[0].getsockname()[1]) for s in self._servers]

    async def _flush_audit_periodically(self, interval: float = 0.2) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.audit.flush()
            except AuditUnavailable as exc:  # fail closed now: no session goes on unrecorded
                log.error("audit flush failed: %s", exc)
                for session in list(self.sessions):
                    if session.upstream is not None:
                        session.terminate(errors.CANNOT_CONNECT_NOW,
                                          "the audit log is unavailable; refusing to continue (a statement in "
                                          "progress may have run on the database)")
            except Exception as exc:  # the sink reports itself broken; sessions then fail closed
                log.error("audit flush failed: %s", exc)

    async def serve_forever(self) -> None:
        await asyncio.gather(*(s.serve_forever() for s in self._servers))

    async def close(self, drain_seconds: float = 5.0) -> None:
        """Stop accepting, give sessions ``drain_seconds`` to finish, then end the rest with FATAL."""
        for server in self._servers:
            server.close()
        if self.admin is not None:
            await self.admin.close()
        if self.http is not None:
            await self.http.close()
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
        if self._sweeper is not None:
            self._sweeper.cancel()
        for gate in self.gates:  # gates with background work (e.g. impact estimates) stop it here
            aclose = getattr(gate, "aclose", None)
            if aclose is not None:
                await aclose()
        if self._owns_approval_store and self.approval_store is not None:
            try:
                await self.approval_store.close()
            except Exception as exc:
                log.warning("closing the approval store failed: %s", exc)
        self.audit.close()
        if self.shipper is not None:  # one last pass over what the log now holds
            await asyncio.to_thread(self.shipper.close)

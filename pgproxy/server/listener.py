"""The proxy server: listeners, the shared pieces every session uses, and graceful shutdown.

Thin I/O around ``Session``: it accepts sockets, starts one task per connection and keeps the things
sessions share (token verifier, cancel-key registry, audit sink, TLS contexts). A failure inside one
session never reaches another or the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import signal
import ssl
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from ..config import ConfigError, ListenerConfig, ProxyConfig, load_config
from ..core.plugins import FrontendGate
from ..logsetup import session_context
from ..metrics import ProxyMetrics
from ..protocol import errors
from ..reload import ReloadError, restart_only_changes
from ..tlsutil import server_context
from .cancel import CancelRegistry
from .link import Link
from .pool import UpstreamPool
from .session import Session

if TYPE_CHECKING:
    from ..admin.server import AdminServer
    from ..audit.events import AuditEmitter
    from ..audit.store import StoreShipper
    from ..grpcproxy.proxy import GrpcProxy
    from ..http.proxy import HttpProxy
    from ..identity import TokenVerifier
    from ..masking.engine import Masking
    from ..policy.approvals import ApprovalStore

log = logging.getLogger(__name__)


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (where the loop supports signal handlers)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


def reload_on_sighup(server: ProxyServer) -> None:
    """Reload ``server``'s config file on SIGHUP (where the loop supports signal handlers).

    The outcome is logged either way; a failed reload keeps the running config (ProxyServer.reload).
    """
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        with contextlib.suppress(ReloadError):  # logged by reload()
            await server.reload()

    def on_hup() -> None:
        task = loop.create_task(reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, on_hup)


@dataclasses.dataclass(frozen=True)
class Rebuilt:
    """What a reload built from the new config, before anything is swapped."""

    verifier: TokenVerifier
    masking: Masking | None
    commit: Callable[[], None]  # swaps the new policy and verifier into the features; cannot fail


class Wiring(Protocol):
    """What only the composition root (``pgproxy.app``) knows how to do for a running server."""

    async def check_masking(self, config: ProxyConfig, masking: Masking) -> None:
        """Raise ConfigError when the masking rules do not fit the live schema (unless allowed)."""

    async def rebuild(self, config: ProxyConfig) -> Rebuilt:
        """Build what a reload replaces; ConfigError, OSError or ValueError when it cannot."""

    async def start_companions(self, server: ProxyServer) -> None:
        """Start the admin listener and the HTTP and gRPC companion proxies the config asks for."""

    async def close(self) -> None:
        """Release what the composition root built for this server (e.g. an approval store it opened)."""


class ProxyServer:
    """Serves every configured listener until closed.

    It gets every feature built (``pgproxy.app.build_server``): ``gates`` judge each statement in
    order, then ``masking`` (replaced by a reload) rewrites what they let through.
    """

    def __init__(self, config: ProxyConfig, *, audit: AuditEmitter, metrics: ProxyMetrics,
                 verifier: TokenVerifier, wiring: Wiring, gates: Sequence[FrontendGate] = (),
                 masking: Masking | None = None, approval_store: ApprovalStore | None = None,
                 shipper: StoreShipper | None = None) -> None:
        self.config = config
        # Every event of every producer passes the one emitter: timestamps, redaction, session numbering.
        self.audit = audit
        self.metrics = metrics  # served at /metrics on the admin listener (docs/operations.md)
        self.verifier = verifier
        self._wiring = wiring
        self._fixed_gates = tuple(gates)
        self.masking = masking  # column masking judges last: it rewrites exactly what the gates let through
        self.gates: tuple[FrontendGate, ...] = (*self._fixed_gates, *((masking,) if masking else ()))
        self.approval_store = approval_store  # shared by the policy gate and the HTTP/gRPC companions
        self.shipper = shipper  # the signed log's copy in the central store, if configured
        self._reloading = asyncio.Lock()
        self.closing = False  # set by close(): /readyz then answers 503
        self.cancels = CancelRegistry()
        self.pool = UpstreamPool(config.upstream.pool, metrics)  # idle upstream connections (upstream.pool)
        self.sessions: set[Session] = set()
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._tls: dict[int, ssl.SSLContext] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.admin: AdminServer | None = None  # the approvals HTTP API (config `admin:`), started by start()
        self.http: HttpProxy | None = None  # the HTTP companion proxy (config `http:`), started by start()
        self.grpc: GrpcProxy | None = None  # the gRPC companion proxy (config `grpc:`), started by start()

    def tls_context(self, listener: ListenerConfig) -> ssl.SSLContext | None:
        """The listener's server context: built at start, replaced by a reload with the new certificate."""
        if listener.tls is None:
            return None
        key = id(listener)
        context = self._tls.get(key)
        if context is None:
            context = server_context(listener.tls.cert_file, listener.tls.key_file)
            self._tls[key] = context
        return context

    async def reload(self, config: ProxyConfig | None = None) -> None:
        """Apply ``config`` (default: the config file read again) without dropping open sessions.

        Everything is built and checked before anything is swapped: on any problem the running config
        stays in force and ReloadError says why. New sessions get the new identity settings, TLS
        certificates, upstream, limits and masking rules; open sessions get the new policy at their
        next statement and keep the rest of the config they started with.
        """
        async with self._reloading:
            try:
                await self._reload(config)
            except ReloadError as exc:
                self.metrics.config_reloaded(False)
                log.error("config reload failed, the running config stays in force: %s", exc)
                raise
            self.metrics.config_reloaded(True)
            log.info("config reloaded%s", f" from {self.config.source}" if self.config.source else "")

    async def _reload(self, config: ProxyConfig | None) -> None:
        try:
            if config is None:
                if self.config.source is None:
                    raise ReloadError("the running config was not read from a file")
                config = load_config(self.config.source)
            changed = restart_only_changes(self.config, config)
            if changed:
                raise ReloadError(f"{', '.join(changed)}: changed, and only take effect after a restart")
            contexts = {id(old): server_context(new.tls.cert_file, new.tls.key_file)
                        for old, new in zip(self.config.listeners, config.listeners, strict=True)
                        if new.tls is not None}
            rebuilt = await self._wiring.rebuild(config)
        except ConfigError as exc:
            raise ReloadError(str(exc)) from None
        except (OSError, ValueError) as exc:
            raise ReloadError(f"listeners: cannot load certificate/key: {exc}") from None
        # Nothing below can fail: swap it all at once (the loop runs nothing else meanwhile).
        rebuilt.commit()
        self.masking = rebuilt.masking
        self.gates = (*self._fixed_gates, *((rebuilt.masking,) if rebuilt.masking else ()))
        self.verifier = rebuilt.verifier
        self._tls.update(contexts)
        if config.upstream != self.config.upstream:  # connections logged in the old way are not handed out
            self.pool.drain(config.upstream.pool)
        self.config = config.model_copy(update={"listeners": self.config.listeners})  # the bound listeners

    async def start(self) -> None:
        """Bind every listener (port 0 picks a free port; see ``bound_ports``)."""
        loop = asyncio.get_running_loop()
        if self.masking is not None:
            await self._wiring.check_masking(self.config, self.masking)
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
        await self._wiring.start_companions(self)

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
            for session in list(self.sessions):
                session.idle_check()

    @property
    def bound_ports(self) -> list[int]:
        return [int(s.sockets[0].getsockname()[1]) for s in self._servers]

    async def _flush_audit_periodically(self, interval: float = 0.2) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                self.audit.flush()
            except Exception as exc:
                log.error("audit flush failed: %s", exc)
            if self.audit.problem is not None:  # the sink cannot record: fail closed, nothing goes on unrecorded
                for session in list(self.sessions):
                    if session.upstream is not None:
                        session.terminate(errors.CANNOT_CONNECT_NOW,
                                          "the audit log is unavailable; refusing to continue (a statement in "
                                          "progress may have run on the database)")

    async def serve_forever(self) -> None:
        await asyncio.gather(*(s.serve_forever() for s in self._servers))

    async def close(self, drain_seconds: float = 5.0) -> None:
        """Stop accepting, give sessions ``drain_seconds`` to finish, then end the rest with FATAL."""
        self.closing = True
        for server in self._servers:
            server.close()
        if self.admin is not None:
            await self.admin.close()
        if self.http is not None:
            await self.http.close()
        if self.grpc is not None:
            await self.grpc.close()
        if self.sessions and drain_seconds > 0:
            deadline = asyncio.get_running_loop().time() + drain_seconds
            while self.sessions and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
        for session in list(self.sessions):
            session.terminate(errors.ADMIN_SHUTDOWN, "terminating connection due to administrator command")
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        await self.pool.close()
        if self._flusher is not None:
            self._flusher.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for gate in self.gates:  # gates with background work (e.g. impact estimates) stop it here
            aclose = getattr(gate, "aclose", None)
            if aclose is not None:
                await aclose()
        await self._wiring.close()
        self.audit.close()
        if self.shipper is not None:  # one last pass over what the log now holds
            await asyncio.to_thread(self.shipper.close)

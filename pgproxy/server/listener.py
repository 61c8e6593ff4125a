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
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..admin.metrics import add_metrics_route
from ..admin.operations import add_operations_routes
from ..admin.server import AdminServer
from ..audit.events import AuditEmitter, as_emitter
from ..audit.factory import sink_from_config
from ..audit.sink import AuditSink, AuditUnavailable
from ..config import ConfigError, ListenerConfig, ProxyConfig, load_config
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
from .reload import ReloadError, restart_only_changes
from .session import Session

if TYPE_CHECKING:
    from ..grpcproxy.proxy import GrpcProxy
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


class ProxyServer:
    """Serves every configured listener until closed."""

    def __init__(self, config: ProxyConfig, *, audit: AuditSink | None = None,
                 verifier: TokenVerifier | None = None, gates: Sequence[FrontendGate] = (),
                 approval_store: ApprovalStore | None = None) -> None:
        self.config = config
        self._extra_gates = tuple(gates)
        self.gates = tuple(gates)
        self._reloading = asyncio.Lock()
        self.closing = False  # set by close(): /readyz then answers 503
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
            self.policy_gate: PolicyGate | None = PolicyGate(load_policy(config.policy.file), self.approval_store,
                                                             audit_allowed=config.policy.audit_allowed,
                                                             metrics=self.metrics)
            self.gates = (self.policy_gate, *self.gates)
        else:
            self.policy_gate = None
        # Column masking (config `masking:`) judges last, so it rewrites exactly what policy let through.
        self.masking: Masking | None = None
        if config.masking is not None:
            from ..masking.engine import Masking

            self.masking = Masking(config.masking, config.upstream)
            self.gates = (*self.gates, self.masking)
        companions = config.http is not None or config.grpc is not None
        if companions and self.approval_store is None and config.approvals is not None:
            from ..policy.approval_factory import build_approval_store

            self.approval_store = build_approval_store(config, audit=audit)  # HTTP/gRPC approvals use it too
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

    @staticmethod
    async def _check_masking_schema(config: ProxyConfig, masking: Masking) -> None:
        """Fail closed (ConfigError) on rules that do not fit the live schema, unless explicitly allowed."""
        from ..masking.check import check_schema

        problems = await check_schema(config, masking.rules)
        assert config.masking is not None
        if problems and config.masking.allow_schema_mismatch:
            for problem in problems:
                log.warning("%s (masking.allow_schema_mismatch: starting anyway)", problem)
        elif problems:
            raise ConfigError("the masking rules do not match the live schema (a misspelt column would stay "
                              "unmasked; set masking.allow_schema_mismatch to start anyway): " + "; ".join(problems))

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
            verifier = TokenVerifier(config.identity)
            contexts = {id(old): server_context(new.tls.cert_file, new.tls.key_file)
                        for old, new in zip(self.config.listeners, config.listeners, strict=True)
                        if new.tls is not None}
            policy = None
            if config.policy is not None:
                from ..policy.rules import load_policy

                policy = load_policy(config.policy.file)
            masking: Masking | None = None
            if config.masking is not None:
                from ..masking.engine import Masking

                masking = Masking(config.masking, config.upstream)
                await self._check_masking_schema(config, masking)
        except ConfigError as exc:
            raise ReloadError(str(exc)) from None
        except (OSError, ValueError) as exc:
            raise ReloadError(f"listeners: cannot load certificate/key: {exc}") from None
        # Nothing below can fail: swap it all at once (the loop runs nothing else meanwhile).
        if self.policy_gate is not None and policy is not None and config.policy is not None:
            self.policy_gate.use_policy(policy, audit_allowed=config.policy.audit_allowed)
        self.masking = masking
        self.gates = (*((self.policy_gate,) if self.policy_gate else ()), *self._extra_gates,
                      *((masking,) if masking else ()))
        self.verifier = verifier
        self._tls.update(contexts)
        if self.admin is not None:
            self.admin.service.verifier = verifier
        if self.http is not None:
            self.http.verifier = verifier
        self.config = dataclasses.replace(config, listeners=self.config.listeners)  # the bound listeners

    async def start(self) -> None:
        """Bind every listener (port 0 picks a free port; see ``bound_ports``)."""
        loop = asyncio.get_running_loop()
        if self.masking is not None:
            await self._check_masking_schema(self.config, self.masking)
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
            add_operations_routes(self.admin.app, self)
            await self.admin.start()
        if self.config.http is not None:  # same verifier, audit log and approval store as the SQL side
            self.http = HttpProxy(self.config.http, verifier=self.verifier, audit=self.audit,
                                  approval_store=self.approval_store)
            await self.http.start()
        if self.config.grpc is not None:  # the same again for gRPC calls (grpcio is loaded only then)
            from ..grpcproxy.proxy import GrpcProxy

            self.grpc = GrpcProxy(self.config.grpc, verifier=self.verifier, audit=self.audit,
                                  approval_store=self.approval_store)
            await self.grpc.start()

    def _accepted(self, listener: ListenerConfig) -> Callable[[Link], None]:
        def on_made(link: Link) -> None:
            session = Session(self, link, listener)
            session.tracker.on_desync = self.metrics.protocol_desync
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

"""The composition root: builds the application from a config and hands the built parts to the server.

This is the one module that knows every feature package. ``server/`` only runs sockets and sessions
over what it is given (gates, masking, audit emitter, verifier ...), and asks back here for what only
the features know: the masking schema check, a reload's new policy and masking, the admin listener
and the HTTP and gRPC companions. ``cli.py``, the demo, ``pgproxy.testing`` and tests call
``build_server``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .admin.metrics import add_metrics_route
from .admin.operations import add_operations_routes
from .admin.server import AdminServer
from .audit.events import AuditEmitter, as_emitter
from .audit.factory import sink_from_config
from .audit.sink import AuditSink
from .config import ConfigError, ProxyConfig
from .core.plugins import FrontendGate
from .http.proxy import HttpProxy
from .identity import TokenVerifier
from .metrics import ProxyMetrics
from .server.listener import ProxyServer, Rebuilt

if TYPE_CHECKING:
    from .audit.store import StoreShipper
    from .masking.engine import Masking
    from .policy.approvals import ApprovalStore
    from .policy.gate import PolicyGate

log = logging.getLogger(__name__)


def build_server(config: ProxyConfig, *, audit: AuditSink | None = None, verifier: TokenVerifier | None = None,
                 gates: Sequence[FrontendGate] = (), approval_store: ApprovalStore | None = None) -> ProxyServer:
    """The proxy for ``config``, not yet started.

    ``audit`` (default: the sink ``config.audit`` names), ``verifier`` (default: one for
    ``config.identity``) and ``approval_store`` (default: the `approvals:` section's) replace what the
    config would build; ``gates`` run after the policy gate and before masking.
    """
    emitter = as_emitter(audit if audit is not None else sink_from_config(config.audit))
    metrics = ProxyMetrics()  # served at /metrics on the admin listener (docs/operations.md)
    metrics.watch_audit(emitter.sink)
    shipper = _shipper(config)
    # The policy gate (config `policy:`) runs first; its approvals go to ``approval_store``, else to
    # the store of the `approvals:` section, else every approval is refused (fail closed).
    owned_store: ApprovalStore | None = None
    policy_gate: PolicyGate | None = None
    if config.policy is not None:
        from .policy.gate import PolicyGate
        from .policy.rules import load_policy

        if approval_store is None and config.approvals is not None:
            approval_store = owned_store = _approval_store(config, emitter)
        policy_gate = PolicyGate(load_policy(config.policy.file), approval_store,
                                 audit_allowed=config.policy.audit_allowed, metrics=metrics)
    masking = _masking(config)
    companions = config.http is not None or config.grpc is not None
    if companions and approval_store is None and config.approvals is not None:
        approval_store = owned_store = _approval_store(config, emitter)  # HTTP/gRPC approvals use it too
    wiring = Wiring(policy_gate, owned_store)
    return ProxyServer(config, audit=emitter, metrics=metrics, verifier=verifier or TokenVerifier(config.identity),
                       wiring=wiring, gates=(*((policy_gate,) if policy_gate else ()), *gates), masking=masking,
                       approval_store=approval_store, shipper=shipper)


def _shipper(config: ProxyConfig) -> StoreShipper | None:
    """The signed log's copy in the central store, if configured."""
    if config.audit.dir is None or config.audit.store_dsn_env is None:
        return None
    from .audit.store import StoreShipper

    return StoreShipper(config.audit.dir, config.audit.store_dsn(), config.audit.store_schema)


def _approval_store(config: ProxyConfig, audit: AuditEmitter) -> ApprovalStore:
    from .policy.approval_factory import build_approval_store

    return build_approval_store(config, audit=audit)


def _masking(config: ProxyConfig) -> Masking | None:
    """Column masking (config `masking:`): it judges last, so it rewrites exactly what policy let through."""
    if config.masking is None:
        return None
    from .masking.engine import Masking

    return Masking(config.masking, config.upstream)


class Wiring:
    """What the server asks of the composition root while it runs (``server.listener.Wiring``)."""

    def __init__(self, policy_gate: PolicyGate | None, owned_store: ApprovalStore | None) -> None:
        self.policy_gate = policy_gate
        self.owned_store = owned_store  # opened here for this server, so closed with it
        self.server: ProxyServer | None = None  # known once its companions start

    async def check_masking(self, config: ProxyConfig, masking: Masking) -> None:
        """Fail closed (ConfigError) on rules that do not fit the live schema, unless explicitly allowed."""
        from .masking.check import check_schema

        problems = await check_schema(config, masking.rules)
        assert config.masking is not None
        if problems and config.masking.allow_schema_mismatch:
            for problem in problems:
                log.warning("%s (masking.allow_schema_mismatch: starting anyway)", problem)
        elif problems:
            raise ConfigError("the masking rules do not match the live schema (a misspelt column would stay "
                              "unmasked; set masking.allow_schema_mismatch to start anyway): " + "; ".join(problems))

    async def rebuild(self, config: ProxyConfig) -> Rebuilt:
        """The new verifier, policy and masking of a reload, built and checked; nothing swapped yet."""
        verifier = TokenVerifier(config.identity)
        policy = None
        if config.policy is not None:
            from .policy.rules import load_policy

            policy = load_policy(config.policy.file)
        masking = _masking(config)
        if masking is not None:
            await self.check_masking(config, masking)

        def commit() -> None:
            if self.policy_gate is not None and policy is not None and config.policy is not None:
                self.policy_gate.use_policy(policy, audit_allowed=config.policy.audit_allowed)
            server = self.server
            if server is not None and server.admin is not None:
                server.admin.service.verifier = verifier
            if server is not None and server.http is not None:
                server.http.use_verifier(verifier)
            if server is not None and server.grpc is not None:
                server.grpc.use_verifier(verifier)

        return Rebuilt(verifier=verifier, masking=masking, commit=commit)

    async def start_companions(self, server: ProxyServer) -> None:
        """The admin listener and the HTTP and gRPC proxies, with the server's verifier, audit and store."""
        self.server = server
        config = server.config
        if config.admin is not None:
            server.admin = AdminServer.from_config(config, store=server.approval_store, verifier=server.verifier,
                                                   audit=server.audit)
            add_metrics_route(server.admin.app, server.metrics, config.admin)
            add_operations_routes(server.admin.app, server)
            await server.admin.start()
        if config.http is not None:  # same verifier, audit log and approval store as the SQL side
            server.http = HttpProxy(config.http, verifier=server.verifier, audit=server.audit,
                                    approval_store=server.approval_store)
            await server.http.start()
        if config.grpc is not None:  # the same again for gRPC calls (grpcio is loaded only then)
            from .grpcproxy.proxy import GrpcProxy

            server.grpc = GrpcProxy(config.grpc, verifier=server.verifier, audit=server.audit,
                                    approval_store=server.approval_store)
            await server.grpc.start()

    async def close(self) -> None:
        if self.owned_store is not None:
            try:
                await self.owned_store.close()
            except Exception as exc:
                log.warning("closing the approval store failed: %s", exc)

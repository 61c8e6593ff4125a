"""Prometheus metrics of one proxy: what the listener, sessions, policy gate and audit sink count.

Every ``ProxyServer`` owns a ``ProxyMetrics`` with its own ``CollectorRegistry`` (never the global
one), so several proxies in one process never collide. Child metrics for every label value are made
up front or cached on first use, so the per-statement cost is a dict lookup and a few increments.
This module never sees SQL text, parameters, identities or rows: only counts, durations and the
fixed label values below. The admin listener serves the registry at ``/metrics``
(``pgproxy.admin.metrics``).

The per-statement and per-row metrics (statements, statement durations, masked values) are plain
ints and floats turned into metric families only when scraped: prometheus_client's own counters take
a lock on every increment, which costs several times more. They are safe without one because only
the proxy's event loop updates them, and scrapes run on that same loop.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator, Sequence
from itertools import accumulate
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from cachebox import FIFOCache
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from . import __version__
from .config import ListenerConfig
from .policy.classify import CLASSES

if TYPE_CHECKING:
    from .policy.approvals import ApprovalRequest

CONNECTION_OUTCOMES = ("accepted", "auth_failed", "refused")
DECISIONS = ("allow", "deny", "approve", "refused")
SYNTAX_ERROR = "syntax_error"  # the class of a statement the gate refused because it does not parse
SYNTAX_ERROR_CLASSES = frozenset({SYNTAX_ERROR})
STATEMENT_CLASSES = (*sorted(CLASSES), SYNTAX_ERROR)
UPSTREAM_ERRORS = ("connect_failed", "login_refused", "lost")
UPSTREAM_POOL_OUTCOMES = ("hit", "miss", "parked", "discarded")
RELOAD_OUTCOMES = ("ok", "failed")
APPROVAL_OUTCOMES = ("approved", "denied", "timed_out", "error")
STATEMENT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
AUDIT_WRITE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
APPROVAL_WAIT_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
MAX_CACHED_CLASS_SETS = 4096


@runtime_checkable
class ObservableSink(Protocol):
    """An audit sink that reports its write latency and how many records wait to be written."""

    on_write: Callable[[float], None] | None

    @property
    def pending_records(self) -> int: ...


class LoopHistogram:
    """A lock-free histogram for the event loop's thread (see the module docstring)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative = list(accumulate(self.counts))
        buckets = [(repr(float(b)), n) for b, n in zip(self.bounds, cumulative, strict=False)]
        return HistogramMetricFamily(name, documentation, buckets=[*buckets, ("+Inf", cumulative[-1])],
                                     sum_value=self.sum)


class ProxyMetrics:
    """The metrics of one proxy, each a ``pgproxy_*`` series in ``registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._connections_open = Gauge("pgproxy_connections_open", "Client connections open now, by listener.",
                                       ["listener"], registry=r)
        self._listeners: dict[int, Gauge] = {}
        connections = Counter("pgproxy_connections_total", "Client logins by outcome: accepted (logged in "
                              "upstream), auth_failed (token or role refused), refused (anything else).",
                              ["outcome"], registry=r)
        self._outcomes = {o: connections.labels(o) for o in CONNECTION_OUTCOMES}
        self._statement_keys = [(c, d) for c in STATEMENT_CLASSES for d in DECISIONS]
        self._statement_index = {key: i for i, key in enumerate(self._statement_keys)}
        self._statement_counts = [0] * len(self._statement_keys)
        self._by_class_set: FIFOCache[tuple[frozenset[str], str], tuple[int, ...]] = FIFOCache(MAX_CACHED_CLASS_SETS)
        self.statement_seconds = LoopHistogram(STATEMENT_BUCKETS)
        self._masked = 0
        self.approvals_pending = Gauge("pgproxy_approvals_pending", "Statements held in this proxy waiting for "
                                       "an approver's decision.", registry=r)
        wait = Histogram("pgproxy_approval_wait_seconds", "How long held statements waited for a decision, by "
                         "outcome.", ["outcome"], buckets=APPROVAL_WAIT_BUCKETS, registry=r)
        self._approval_wait = {o: wait.labels(o) for o in APPROVAL_OUTCOMES}
        upstream = Counter("pgproxy_upstream_errors", "Upstream failures by kind: connect_failed, login_refused "
                           "(the proxy's own credential), lost (connection ended mid-session).", ["kind"],
                           registry=r)
        self._upstream_errors = {k: upstream.labels(k) for k in UPSTREAM_ERRORS}
        pool = Counter("pgproxy_upstream_pool", "Pooled upstream connections (upstream.pool) by outcome: hit (a "
                       "login reused one), miss (none to reuse), parked (reset and kept), discarded (closed).",
                       ["outcome"], registry=r)
        self._upstream_pool = {o: pool.labels(o) for o in UPSTREAM_POOL_OUTCOMES}
        self._desyncs = Counter("pgproxy_protocol_desyncs", "Server messages that answered no outstanding "
                                "request (the session was ended with a protocol violation).", registry=r)
        self._audit_write = Histogram("pgproxy_audit_write_seconds", "Time to write (and sync, per the fsync "
                                      "policy) one batch of audit records.", buckets=AUDIT_WRITE_BUCKETS, registry=r)
        self._audit_pending = Gauge("pgproxy_audit_pending_records", "Audit records accepted but not yet written "
                                    "to the log.", registry=r)
        Info("pgproxy_build", "The running pgproxy's version.", registry=r).info({"version": __version__})
        reloads = Counter("pgproxy_config_reloads", "Config reloads (SIGHUP or POST /api/reload) by outcome: ok, "
                          "failed (the running config was kept).", ["outcome"], registry=r)
        self._reloads = {o: reloads.labels(o) for o in RELOAD_OUTCOMES}
        self._last_reload = Gauge("pgproxy_config_last_reload_success_timestamp_seconds", "When the running "
                                  "config was loaded (start or last successful reload), Unix time.", registry=r)
        self._last_reload.set_to_current_time()
        r.register(self)

    # ------------------------------------------------------------------------------ connections

    def listener_bound(self, listener: ListenerConfig, address: str) -> None:
        """Name ``listener`` by the address it is bound to (its configured port may be 0)."""
        self._listeners[id(listener)] = self._connections_open.labels(address)

    def connection_opened(self, listener: ListenerConfig) -> None:
        self._listeners[id(listener)].inc()

    def connection_closed(self, listener: ListenerConfig) -> None:
        self._listeners[id(listener)].dec()

    def connection_outcome(self, outcome: str) -> None:
        """One of CONNECTION_OUTCOMES."""
        self._outcomes[outcome].inc()

    def upstream_error(self, kind: str) -> None:
        """One of UPSTREAM_ERRORS."""
        self._upstream_errors[kind].inc()

    def upstream_pool(self, outcome: str) -> None:
        """One of UPSTREAM_POOL_OUTCOMES."""
        self._upstream_pool[outcome].inc()

    def protocol_desync(self) -> None:
        """The request tracking of a session lost step with its server (pgproxy.protocol.tracker.Desync)."""
        self._desyncs.inc()

    def config_reloaded(self, ok: bool) -> None:
        """Count a reload; a successful one also stamps the config's load time."""
        self._reloads["ok" if ok else "failed"].inc()
        if ok:
            self._last_reload.set_to_current_time()

    # ------------------------------------------------------------------------------- statements

    def statement(self, classes: frozenset[str], decision: str) -> None:
        """Count one judged statement under each of its classes (one of DECISIONS)."""
        key = (classes, decision)
        try:
            indexes = self._by_class_set[key]
        except KeyError:
            indexes = self._by_class_set[key] = tuple(self._statement_index[(c, decision)] for c in classes)
        counts = self._statement_counts
        for i in indexes:
            counts[i] += 1

    def masked_values(self, n: int) -> None:
        """``n`` values were masked (the masking layer calls it once per row or batch, not per value)."""
        self._masked += n

    async def approval_wait(self, waiting: Awaitable[ApprovalRequest]) -> ApprovalRequest:
        """Await an approver's decision, counting it as pending meanwhile and timing it."""
        self.approvals_pending.inc()
        started = time.monotonic()
        outcome = "error"
        try:
            request = await waiting
            outcome = request.status if request.status in ("approved", "denied") else "timed_out"
            return request
        finally:
            self.approvals_pending.dec()
            self._approval_wait[outcome].observe(time.monotonic() - started)

    # ------------------------------------------------------------------------------------ audit

    def watch_audit(self, sink: object) -> None:
        """Report the write latency and backlog of ``sink`` when it can tell them."""
        if isinstance(sink, ObservableSink):
            sink.on_write = self._audit_write.observe
            self._audit_pending.set_function(lambda: sink.pending_records)

    def collect(self) -> Iterator[Metric]:
        """The loop-updated metrics, as the registry asks for them at each scrape."""
        statements = CounterMetricFamily("pgproxy_statements", "Statements judged by the policy gate, by class "
                                         "and decision; a statement with several classes counts once under each.",
                                         labels=["class", "decision"])
        for (cls, decision), n in zip(self._statement_keys, self._statement_counts, strict=True):
            statements.add_metric([cls, decision], n)
        yield statements
        yield self.statement_seconds.family("pgproxy_statement_duration_seconds", "Time from a statement's "
                                            "request to the server's complete answer.")
        yield CounterMetricFamily("pgproxy_masked_values", "Values replaced by a mask before reaching a client.",
                                  value=self._masked)

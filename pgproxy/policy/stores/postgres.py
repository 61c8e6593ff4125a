"""Approval store in PostgreSQL (asyncpg), shared by several proxy replicas and the CLI.

Tables live in a configurable schema and are created if missing (under an advisory lock, so replicas
starting together don't race). Every change is one transaction; ``consume`` is a single
``UPDATE ... RETURNING`` on the row whose status is still ``approved``, so of two replicas racing for the
same approval exactly one gets it. Decisions send ``NOTIFY`` on a channel named after the schema; every
store instance LISTENs on a dedicated connection and wakes its ``wait`` calls at once. Should that
connection be lost, ``wait`` still re-reads the request every second until it reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import asyncpg

from pgproxy.audit.sink import AuditSink
from pgproxy.policy.approval_common import (
    Notifier,
    StoreEvents,
    effective_status,
    evaluate_decision,
    request_body,
    request_from_parts,
)
from pgproxy.policy.approvals import (
    ApprovalDecision,
    ApprovalNotFound,
    ApprovalRequest,
    ApprovalStatus,
    ApprovalStoreUnavailable,
)

log = logging.getLogger(__name__)

SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
WAIT_FALLBACK_SECONDS = 1.0
# Errors that mean "the store is not usable right now": the gate then fails closed.
_UNAVAILABLE: tuple[type[BaseException], ...] = (OSError, TimeoutError, asyncpg.PostgresError,
                                                 asyncpg.InterfaceError)


def _ddl(schema: str) -> str:
    s = f'"{schema}"'
    return f"""
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.approval_requests (
    id          text PRIMARY KEY,
    fingerprint text NOT NULL,
    status      text NOT NULL,
    created_at  double precision NOT NULL,
    expires_at  double precision NOT NULL,
    body        jsonb NOT NULL,
    impact      jsonb,
    closed_at   double precision
);
CREATE UNIQUE INDEX IF NOT EXISTS approval_requests_open_fingerprint
    ON {s}.approval_requests (fingerprint) WHERE status IN ('pending', 'approved');
CREATE INDEX IF NOT EXISTS approval_requests_status ON {s}.approval_requests (status, created_at);
CREATE TABLE IF NOT EXISTS {s}.approval_decisions (
    approval_id     text NOT NULL REFERENCES {s}.approval_requests (id),
    approver        text NOT NULL,
    approver_groups jsonb NOT NULL,
    approve         boolean NOT NULL,
    reason          text,
    at              double precision NOT NULL,
    PRIMARY KEY (approval_id, approver)
);
"""


class PostgresApprovalStore:
    """ApprovalStore in PostgreSQL; connects lazily on first use."""

    def __init__(self, dsn: str, *, schema: str = "pgproxy", audit: AuditSink | None = None,
                 notify: Notifier | None = None, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, connect_timeout: float = 5.0,
                 pool_size: int = 4) -> None:
        if not SCHEMA_NAME.match(schema):
            raise ValueError(f"invalid schema name {schema!r}")
        self.schema = schema
        self.channel = f"pgproxy_approvals_{schema}"[:63]
        self.clock = clock  # wall time: creation, expiry
        self.monotonic = monotonic  # the deadline of wait()
        self.events = StoreEvents(audit, notify, clock)
        self._dsn = dsn
        self._connect_timeout = connect_timeout
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._listener: asyncpg.Connection | None = None
        self._listener_lock = asyncio.Lock()
        self._wakeups: dict[str, set[asyncio.Event]] = {}
        self._t = f'"{schema}".approval_requests'
        self._d = f'"{schema}".approval_decisions'

    # ------------------------------------------------------------------------------------------
    # Connections

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:
            if self._pool is None:
                try:
                    pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=self._pool_size,
                                                     timeout=self._connect_timeout, command_timeout=30)
                except _UNAVAILABLE as exc:
                    raise ApprovalStoreUnavailable(f"approval store (postgres): {exc}") from None
                try:
                    async with pool.acquire() as conn, conn.transaction():
                        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", self.channel)
                        await conn.execute(_ddl(self.schema))
                except _UNAVAILABLE as exc:
                    await pool.close()
                    raise ApprovalStoreUnavailable(f"approval store (postgres): {exc}") from None
                self._pool = pool
        return self._pool

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[asyncpg.Connection]:
        pool = await self._get_pool()
        try:
            async with pool.acquire() as conn, conn.transaction():
                yield conn
        except _UNAVAILABLE as exc:
            raise ApprovalStoreUnavailable(f"approval store (postgres): {exc}") from None

    async def _ensure_listener(self) -> None:
        """LISTEN on a dedicated connection; failures only leave ``wait`` on its 1 s fallback."""
        if self._listener is not None and not self._listener.is_closed():
            return
        async with self._listener_lock:
            if self._listener is not None and not self._listener.is_closed():
                return
            try:
                conn = await asyncpg.connect(self._dsn, timeout=self._connect_timeout)
                await conn.add_listener(self.channel, self._on_notify)
            except _UNAVAILABLE as exc:
                log.warning("approval store: cannot LISTEN (falling back to polling): %s", exc)
                return
            conn.add_termination_listener(self._on_listener_lost)
            self._listener = conn

    def _on_listener_lost(self, conn: Any) -> None:
        if self._listener is conn:
            self._listener = None

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        for event in self._wakeups.get(payload, ()):
            event.set()

    async def _notify(self, conn: asyncpg.Connection, approval_id: str) -> None:
        # Delivered at commit, to every replica (and to this one, through its listener).
        await conn.execute("SELECT pg_notify($1, $2)", self.channel, approval_id)

    # ------------------------------------------------------------------------------------------
    # Rows

    async def _from_row(self, conn: asyncpg.Connection, row: asyncpg.Record) -> ApprovalRequest:
        body = json.loads(row["body"])
        records = await conn.fetch(f"SELECT approver, approve, reason, at FROM {self._d} WHERE approval_id = $1 "
                                   "ORDER BY at, approver", body["id"])
        decisions = [ApprovalDecision(approver=r["approver"], approve=r["approve"], reason=r["reason"],
                                      at=float(r["at"])) for r in records]
        impact = json.loads(row["impact"]) if row["impact"] is not None else None
        request = request_from_parts(body, row["status"], impact, decisions)
        request.status = effective_status(request, self.clock())
        return request

    async def _load(self, conn: asyncpg.Connection, approval_id: str, *, lock: bool = False
                    ) -> ApprovalRequest | None:
        row = await conn.fetchrow(f"SELECT body, status, impact FROM {self._t} WHERE id = $1"
                                  + (" FOR UPDATE" if lock else ""), approval_id)
        return None if row is None else await self._from_row(conn, row)

    async def _expire(self, conn: asyncpg.Connection, now: float) -> None:
        rows = await conn.fetch(f"UPDATE {self._t} SET status = 'expired', closed_at = $1 "
                                "WHERE status IN ('pending', 'approved') AND expires_at <= $1 RETURNING id", now)
        for row in rows:
            await self._notify(conn, row["id"])

    # ------------------------------------------------------------------------------------------
    # ApprovalStore

    async def create(self, request: ApprovalRequest) -> ApprovalRequest:
        now = self.clock()
        async with self._tx() as conn:
            await self._expire(conn, now)
            inserted = await conn.fetchval(
                f"INSERT INTO {self._t} (id, fingerprint, status, created_at, expires_at, body, impact) "
                "VALUES ($1, $2, 'pending', $3, $4, $5::jsonb, $6::jsonb) "
                "ON CONFLICT (fingerprint) WHERE status IN ('pending', 'approved') DO NOTHING RETURNING id",
                request.id, request.fingerprint, request.created_at, request.expires_at,
                json.dumps(request_body(request)), json.dumps(request.impact) if request.impact else None)
            if inserted is None:
                row = await conn.fetchrow(f"SELECT body, status, impact FROM {self._t} WHERE fingerprint = $1 "
                                          "AND status IN ('pending', 'approved')", request.fingerprint)
                if row is not None:
                    return await self._from_row(conn, row)
                raise ApprovalStoreUnavailable("approval store (postgres): concurrent create, retry")
            stored = await self._load(conn, request.id)
        assert stored is not None
        self.events.requested(stored)
        return stored

    async def get(self, approval_id: str) -> ApprovalRequest | None:
        async with self._tx() as conn:
            return await self._load(conn, approval_id)

    async def list(self, status: ApprovalStatus | None = None, limit: int = 100) -> list[ApprovalRequest]:
        async with self._tx() as conn:
            await self._expire(conn, self.clock())
            rows = await conn.fetch(f"SELECT body, status, impact FROM {self._t} "
                                    "WHERE $1::text IS NULL OR status = $1 ORDER BY created_at DESC, id LIMIT $2",
                                    status, int(limit))
            return [await self._from_row(conn, row) for row in rows]

    async def decide(self, approval_id: str, approver: str, approver_groups: Sequence[str], approve: bool,
                     reason: str | None) -> ApprovalRequest:
        now = self.clock()
        async with self._tx() as conn:
            request = await self._load(conn, approval_id, lock=True)  # serialises decisions on this request
            if request is None:
                raise ApprovalNotFound(f"no approval request {approval_id}")
            new_status = evaluate_decision(request, approver, approver_groups, approve, now)
            decision = ApprovalDecision(approver=approver, approve=approve, reason=reason, at=now)
            await conn.execute(f"INSERT INTO {self._d} (approval_id, approver, approver_groups, approve, reason, at) "
                               "VALUES ($1, $2, $3::jsonb, $4, $5, $6)",
                               approval_id, approver, json.dumps(list(approver_groups)), approve, reason, now)
            await conn.execute(f"UPDATE {self._t} SET status = $2, closed_at = $3 WHERE id = $1",
                               approval_id, new_status, now if new_status == "denied" else None)
            await self._notify(conn, approval_id)
            request.status = new_status
            request.decisions.append(decision)
        self.events.decided(request, decision, approver_groups)
        return request

    async def consume(self, fingerprint: str) -> ApprovalRequest | None:
        now = self.clock()
        async with self._tx() as conn:
            row = await conn.fetchrow(
                f"UPDATE {self._t} SET status = 'used', closed_at = $2 WHERE id = ("
                f"  SELECT id FROM {self._t} WHERE fingerprint = $1 AND status = 'approved' AND expires_at > $2 "
                "  ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED) AND status = 'approved' "
                "RETURNING body, status, impact", fingerprint, now)
            if row is None:
                return None
            request = await self._from_row(conn, row)
            await self._notify(conn, request.id)
        self.events.used(request)
        return request

    async def wait(self, approval_id: str, timeout: float) -> ApprovalRequest:
        deadline = self.monotonic() + max(0.0, timeout)
        event = asyncio.Event()
        self._wakeups.setdefault(approval_id, set()).add(event)
        try:
            await self._ensure_listener()
            while True:
                event.clear()
                request = await self.get(approval_id)
                if request is None:
                    raise ApprovalNotFound(f"no approval request {approval_id}")
                remaining = deadline - self.monotonic()
                if request.status != "pending" or remaining <= 0:
                    return request
                pause = min(remaining, WAIT_FALLBACK_SECONDS, max(0.01, request.expires_at - self.clock()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), pause)
                if self._listener is None:
                    await self._ensure_listener()
        finally:
            waiters = self._wakeups.get(approval_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._wakeups[approval_id]

    async def set_impact(self, approval_id: str, impact: dict[str, Any]) -> None:
        async with self._tx() as conn:
            status = await conn.execute(f"UPDATE {self._t} SET impact = $2::jsonb WHERE id = $1",
                                        approval_id, json.dumps(impact, default=str))
        if status.endswith(" 0"):
            raise ApprovalNotFound(f"no approval request {approval_id}")

    async def close(self) -> None:
        await self.events.drain()
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(*_UNAVAILABLE):
                await listener.close(timeout=2)
        pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(*_UNAVAILABLE):
                await asyncio.wait_for(pool.close(), 5)

"""The default approval store: one SQLite file (aiosqlite), shared by the proxy and the CLI on one host.

Every change runs in a ``BEGIN IMMEDIATE`` transaction, so two processes using the same file (the proxy
and ``pgproxy approvals approve``) serialise their writes: a decision sees the decisions before it, and
``consume`` marks a request used exactly once. ``wait`` is woken at once by decisions made through the
same store object, and polls the file twice a second for decisions made by another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

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

_SCHEMA = """
CREATE TABLE IF NOT EXISTS approval_requests (
    id          TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    status      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL NOT NULL,
    body        TEXT NOT NULL,
    impact      TEXT,
    closed_at   REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS approval_requests_open_fingerprint
    ON approval_requests (fingerprint) WHERE status IN ('pending', 'approved');
CREATE INDEX IF NOT EXISTS approval_requests_status ON approval_requests (status, created_at);
CREATE TABLE IF NOT EXISTS approval_decisions (
    approval_id     TEXT NOT NULL REFERENCES approval_requests (id),
    approver        TEXT NOT NULL,
    approver_groups TEXT NOT NULL,
    approve         INTEGER NOT NULL,
    reason          TEXT,
    at              REAL NOT NULL,
    PRIMARY KEY (approval_id, approver)
);
"""

WAIT_POLL_SECONDS = 0.5


class SQLiteApprovalStore:
    """ApprovalStore on a SQLite file; the file and its tables are created on first use."""

    def __init__(self, path: Path, *, audit: AuditSink | None = None, notify: Notifier | None = None,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self.clock = clock  # wall time: creation, expiry
        self.monotonic = monotonic  # the deadline of wait()
        self.events = StoreEvents(audit, notify, clock)
        self._busy_timeout_ms = busy_timeout_ms
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._wakeups: dict[str, set[asyncio.Event]] = {}

    # ------------------------------------------------------------------------------------------
    # Connection and transactions

    async def _connect(self) -> aiosqlite.Connection:
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = await aiosqlite.connect(self.path, isolation_level=None)
                try:
                    await db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
                    await db.execute("PRAGMA journal_mode = WAL")
                    await db.execute("PRAGMA foreign_keys = ON")
                    await db.executescript(_SCHEMA)
                except BaseException:
                    await db.close()
                    raise
            except (sqlite3.Error, OSError) as exc:
                raise ApprovalStoreUnavailable(f"approval store {self.path}: {exc}") from None
            self._db = db
        return self._db

    @contextlib.asynccontextmanager
    async def _tx(self, *, write: bool = True) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            db = await self._connect()
            try:
                await db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield db
                except BaseException:
                    await db.execute("ROLLBACK")
                    raise
                await db.execute("COMMIT")
            except (sqlite3.Error, OSError) as exc:
                raise ApprovalStoreUnavailable(f"approval store {self.path}: {exc}") from None

    async def _load(self, db: aiosqlite.Connection, approval_id: str) -> ApprovalRequest | None:
        async with db.execute("SELECT body, status, impact FROM approval_requests WHERE id = ?",
                              (approval_id,)) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return await self._from_row(db, row)

    async def _from_row(self, db: aiosqlite.Connection, row: Any) -> ApprovalRequest:
        body = json.loads(row[0])
        async with db.execute("SELECT approver, approve, reason, at FROM approval_decisions "
                              "WHERE approval_id = ? ORDER BY at, approver", (body["id"],)) as cur:
            decisions = [ApprovalDecision(approver=r[0], approve=bool(r[1]), reason=r[2], at=float(r[3]))
                         async for r in cur]
        request = request_from_parts(body, row[1], json.loads(row[2]) if row[2] else None, decisions)
        request.status = effective_status(request, self.clock())
        return request

    async def _expire(self, db: aiosqlite.Connection, now: float) -> None:
        await db.execute("UPDATE approval_requests SET status = 'expired', closed_at = ? "
                         "WHERE status IN ('pending', 'approved') AND expires_at <= ?", (now, now))

    def _wake(self, approval_id: str) -> None:
        for event in self._wakeups.get(approval_id, ()):
            event.set()

    # ------------------------------------------------------------------------------------------
    # ApprovalStore

    async def create(self, request: ApprovalRequest) -> ApprovalRequest:
        now = self.clock()
        async with self._tx() as db:
            await self._expire(db, now)
            async with db.execute("SELECT body, status, impact FROM approval_requests WHERE fingerprint = ? "
                                  "AND status IN ('pending', 'approved')", (request.fingerprint,)) as cur:
                row = await cur.fetchone()
            if row is not None:
                return await self._from_row(db, row)
            await db.execute(
                "INSERT INTO approval_requests (id, fingerprint, status, created_at, expires_at, body, impact) "
                "VALUES (?, ?, 'pending', ?, ?, ?, ?)",
                (request.id, request.fingerprint, request.created_at, request.expires_at,
                 json.dumps(request_body(request)), json.dumps(request.impact) if request.impact else None))
            stored = await self._load(db, request.id)
        assert stored is not None
        self.events.requested(stored)
        return stored

    async def get(self, approval_id: str) -> ApprovalRequest | None:
        async with self._tx(write=False) as db:
            return await self._load(db, approval_id)

    async def list(self, status: ApprovalStatus | None = None, limit: int = 100) -> list[ApprovalRequest]:
        async with self._tx() as db:
            await self._expire(db, self.clock())
            async with db.execute("SELECT body, status, impact FROM approval_requests WHERE ? IS NULL OR status = ? "
                                  "ORDER BY created_at DESC, id LIMIT ?", (status, status, int(limit))) as cur:
                rows = list(await cur.fetchall())
            return [await self._from_row(db, row) for row in rows]

    async def decide(self, approval_id: str, approver: str, approver_groups: Sequence[str], approve: bool,
                     reason: str | None) -> ApprovalRequest:
        now = self.clock()
        async with self._tx() as db:
            await self._expire(db, now)
            request = await self._load(db, approval_id)
            if request is None:
                raise ApprovalNotFound(f"no approval request {approval_id}")
            new_status = evaluate_decision(request, approver, approver_groups, approve, now)
            decision = ApprovalDecision(approver=approver, approve=approve, reason=reason, at=now)
            await db.execute("INSERT INTO approval_decisions (approval_id, approver, approver_groups, approve, "
                             "reason, at) VALUES (?, ?, ?, ?, ?, ?)",
                             (approval_id, approver, json.dumps(list(approver_groups)), int(approve), reason, now))
            await db.execute("UPDATE approval_requests SET status = ?, closed_at = ? WHERE id = ?",
                             (new_status, now if new_status == "denied" else None, approval_id))
            request.status = new_status
            request.decisions.append(decision)
        self.events.decided(request, decision, approver_groups)
        self._wake(approval_id)
        return request

    async def consume(self, fingerprint: str) -> ApprovalRequest | None:
        now = self.clock()
        async with self._tx() as db:
            async with db.execute(
                    "UPDATE approval_requests SET status = 'used', closed_at = ? WHERE id = ("
                    "  SELECT id FROM approval_requests WHERE fingerprint = ? AND status = 'approved' "
                    "  AND expires_at > ? ORDER BY created_at LIMIT 1) AND status = 'approved' "
                    "RETURNING body, status, impact", (now, fingerprint, now)) as cur:
                row = await cur.fetchone()
            if row is None:
                return None
            request = await self._from_row(db, row)
        self.events.used(request)
        self._wake(request.id)
        return request

    async def wait(self, approval_id: str, timeout: float) -> ApprovalRequest:
        deadline = self.monotonic() + max(0.0, timeout)
        event = asyncio.Event()
        self._wakeups.setdefault(approval_id, set()).add(event)
        try:
            while True:
                event.clear()
                request = await self.get(approval_id)
                if request is None:
                    raise ApprovalNotFound(f"no approval request {approval_id}")
                remaining = deadline - self.monotonic()
                if request.status != "pending" or remaining <= 0:
                    return request
                pause = min(remaining, WAIT_POLL_SECONDS, max(0.01, request.expires_at - self.clock()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), pause)
        finally:
            waiters = self._wakeups.get(approval_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._wakeups[approval_id]

    async def set_impact(self, approval_id: str, impact: dict[str, Any]) -> None:
        async with self._tx() as db:
            cur = await db.execute("UPDATE approval_requests SET impact = ? WHERE id = ?",
                                   (json.dumps(impact, default=str), approval_id))
            if cur.rowcount == 0:
                raise ApprovalNotFound(f"no approval request {approval_id}")

    async def close(self) -> None:
        await self.events.drain()
        if self._db is not None:
            db, self._db = self._db, None
            with contextlib.suppress(sqlite3.Error):
                await db.close()

"""Idle upstream connections kept between clients (``upstream.pool``), reset with ``DISCARD ALL``.

A connection is kept only for a client whose login is identical: same upstream target, role, database,
credential and every startup parameter the proxy sends (``PoolKey``). The session core decides when a
connection may be given back (``SessionCore.upstream_reusable``); here it is reset, parked, watched and
handed out again. A parked connection that hears anything from its server (a FATAL from
``pg_terminate_backend``, a shutdown) is closed, as are those that stay idle too long, grow too old, exceed
the limits, or belong to a configuration a reload replaced.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..config import UpstreamConfig, UpstreamPoolConfig
from ..metrics import ProxyMetrics
from ..protocol.codec import ProtocolViolation, frame
from ..protocol.messages import BackendKeyData, Query, Terminate, parameter_status, parameter_status_fields
from ..protocol.types import Backend
from .link import Link, LinkClosed

log = logging.getLogger(__name__)

RESET_SQL = "DISCARD ALL"
_RESET_TAG = b"DISCARD ALL\0"
_READY_IDLE = frame(Backend.READY_FOR_QUERY, b"I")
# Messages the server may send at any time, also while it resets (a notification still in flight).
_ASYNC = (Backend.NOTICE_RESPONSE, Backend.NOTIFICATION_RESPONSE)
_RESET_MESSAGE_LIMIT = 64 * 1024

PoolKey = tuple[object, ...]


@dataclass(eq=False)
class PooledUpstream:
    """An authenticated upstream connection with what its server told the last client about it."""

    key: PoolKey
    link: Link
    born: float  # loop time of its login: max_lifetime_seconds counts from here
    parameters: dict[bytes, bytes] = field(default_factory=dict)  # ParameterStatus values, current
    process_id: int = 0
    secret_key: int = 0
    _expiry: asyncio.TimerHandle | None = None

    def startup_tail(self) -> bytes:
        """What a fresh login sends after AuthenticationOk: ParameterStatus*, BackendKeyData, ReadyForQuery 'I'."""
        out = [parameter_status(name, value) for name, value in self.parameters.items()]
        out.append(BackendKeyData(self.process_id, self.secret_key).encode())
        out.append(_READY_IDLE)
        return b"".join(out)


class UpstreamPool:
    """The parked connections of one proxy, per login; settings from ``upstream.pool`` (replaced by ``drain``)."""

    def __init__(self, settings: UpstreamPoolConfig, metrics: ProxyMetrics) -> None:
        self.settings = settings
        self._metrics = metrics
        self._generation = 0  # part of every key: a reload that changes the upstream drops earlier logins
        self._idle: dict[PoolKey, list[PooledUpstream]] = {}
        self._count = 0
        self._resets: set[asyncio.Task[None]] = set()
        self._closed = False

    def __len__(self) -> int:
        """Idle connections parked now."""
        return self._count

    def holds(self, process_id: int) -> bool:
        """Whether the backend with this process id is parked now."""
        return any(conn.process_id == process_id for stack in self._idle.values() for conn in stack)

    def key(self, cfg: UpstreamConfig, params: Mapping[str, str], password: str | None) -> PoolKey:
        """Everything that makes the upstream session what it is at login (the password only as a digest)."""
        secret = hashlib.sha256(password.encode()).digest() if password is not None else None
        return (self._generation, cfg.host, cfg.port, cfg.sslmode, cfg.sslrootcert, secret,
                tuple(sorted(params.items())))

    def take(self, key: PoolKey) -> PooledUpstream | None:
        """A parked connection for ``key`` (the most recently parked), or None: connect as usual."""
        stack = self._idle.get(key, [])
        now = asyncio.get_running_loop().time()
        taken = None
        while stack and taken is None:
            conn = stack.pop()
            self._unpark(conn)
            if conn.link.closed or now - conn.born > self.settings.max_lifetime_seconds:
                self._discard(conn, "too old" if not conn.link.closed else "closed")
            else:
                taken = conn
        if not stack:
            self._idle.pop(key, None)
        if taken is None:
            self._metrics.upstream_pool("miss")
            return None
        taken.link.on_data = taken.link.on_lost = None  # buffered until the session's pump takes over
        self._metrics.upstream_pool("hit")
        return taken

    def release(self, conn: PooledUpstream) -> None:
        """Reset ``conn`` (``DISCARD ALL``) in the background, then park it; closed if anything goes wrong."""
        link = conn.link
        link.on_data = link.on_lost = link.on_pause_writing = link.on_resume_writing = None  # now buffers for reads
        for reason in ("flow", "slice"):  # the session's reasons to stop reading this server
            link.resume_reading(reason)
        if not self._keeps(conn):
            return
        task = asyncio.get_running_loop().create_task(self._reset_and_park(conn))
        self._resets.add(task)
        task.add_done_callback(self._resets.discard)

    def _keeps(self, conn: PooledUpstream) -> bool:
        """Whether ``conn`` may be kept at all (else it is closed now)."""
        reason = ("pool disabled" if not self.settings.enabled or self._closed else
                  "closed" if conn.link.closed else
                  "older configuration" if conn.key[0] != self._generation else
                  "too old" if asyncio.get_running_loop().time() - conn.born > self.settings.max_lifetime_seconds
                  else None)
        if reason is not None:
            self._discard(conn, reason)
            return False
        return True

    async def _reset_and_park(self, conn: PooledUpstream) -> None:
        link = conn.link
        link.write(Query(RESET_SQL).encode())
        try:
            async with asyncio.timeout(self.settings.reset_timeout_seconds):
                reset = await self._read_reset(conn)
        except (TimeoutError, LinkClosed, OSError, ProtocolViolation):
            reset = False
        except BaseException:  # cancelled: the proxy shuts down
            self._discard(conn, "shutdown")
            raise
        if not reset or link.buffer:
            self._discard(conn, "reset failed")
        elif self._keeps(conn):
            self._park(conn)

    async def _read_reset(self, conn: PooledUpstream) -> bool:
        """Read the reset's answer: CommandComplete, ReadyForQuery 'I'; ParameterStatus updates ``conn``."""
        completed = False
        while True:
            msg_type, body = await conn.link.read_message(_RESET_MESSAGE_LIMIT)
            if msg_type == Backend.PARAMETER_STATUS:
                name, value = parameter_status_fields(body)
                conn.parameters[name] = value
            elif msg_type == Backend.COMMAND_COMPLETE and body == _RESET_TAG and not completed:
                completed = True
            elif msg_type == Backend.READY_FOR_QUERY:
                return completed and body == b"I"
            elif msg_type not in _ASYNC:
                return False  # an ErrorResponse, or anything the reset does not answer

    def _park(self, conn: PooledUpstream) -> None:
        stack = self._idle.setdefault(conn.key, [])
        if len(stack) >= self.settings.max_idle_per_key or self._count >= self.settings.max_idle_total:
            self._discard(conn, "pool full")
            return
        stack.append(conn)
        self._count += 1
        link = conn.link
        link.on_data = lambda data: self._evict(conn, "server spoke while idle")
        link.on_lost = lambda: self._evict(conn, "server closed")
        conn._expiry = asyncio.get_running_loop().call_later(self.settings.idle_timeout_seconds,
                                                             self._evict, conn, "idle timeout")
        self._metrics.upstream_pool("parked")

    def _unpark(self, conn: PooledUpstream) -> None:
        self._count -= 1
        if conn._expiry is not None:
            conn._expiry.cancel()
            conn._expiry = None

    def _evict(self, conn: PooledUpstream, reason: str) -> None:
        """Close a parked connection (if it still is parked)."""
        stack = self._idle.get(conn.key)
        if stack is None or conn not in stack:
            return
        stack.remove(conn)
        if not stack:
            del self._idle[conn.key]
        self._unpark(conn)
        self._discard(conn, reason)

    def _discard(self, conn: PooledUpstream, reason: str) -> None:
        log.debug("upstream connection of pid %d closed: %s", conn.process_id, reason)
        link = conn.link
        link.on_data = link.on_lost = None
        link.write(Terminate().encode())  # a goodbye, not a broken connection, in the server's log
        link.close()
        self._metrics.upstream_pool("discarded")

    def drain(self, settings: UpstreamPoolConfig | None = None) -> None:
        """Close every parked connection; those being reset are closed when done. New settings apply from now."""
        if settings is not None:
            self.settings = settings
        self._generation += 1
        for stack in list(self._idle.values()):
            for conn in list(stack):
                self._evict(conn, "drained")

    async def close(self) -> None:
        """Close everything, parked or being reset, and keep nothing from now on (the proxy shuts down)."""
        self._closed = True
        self.drain()
        for task in list(self._resets):
            task.cancel()
        if self._resets:
            await asyncio.wait(list(self._resets), timeout=5)

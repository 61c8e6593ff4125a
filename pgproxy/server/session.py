"""The asyncio driver of one client session: reads the links, feeds ``SessionCore``, performs its actions.

Every decision is made in ``pgproxy.core.session``; this module only moves bytes and waits: it reads
startup packets, upgrades TLS, calls the token verifier and the upstream connector, writes what the core
returns, relays a large upstream chunk in slices (one per loop turn), awaits held requests' decisions and
runs the token-expiry timer. It never logs or stores the caller's token or the upstream password.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..config import ListenerConfig, UpstreamConfig
from ..core.plugins import Hold
from ..core.session import (
    Action,
    CheckMaskedRole,
    ClientGone,
    Clock,
    ConnectUpstream,
    End,
    ForwardCancel,
    HoldClient,
    ReadMessage,
    ReadPacket,
    ReleaseClient,
    ReleaseUpstream,
    ReuseUpstream,
    SendClient,
    SendUpstream,
    SessionCore,
    SetTimer,
    StartTls,
    StartupTimeout,
    State,
    TokenRefused,
    TokenVerified,
    UpstreamConnected,
    UpstreamLoginRefused,
    UpstreamUnreachable,
    VerifyToken,
)
from ..identity import Identity, TokenError
from .link import Link, LinkClosed
from .pool import PooledUpstream, PoolKey
from .upstream import UpstreamRefused, UpstreamUnavailable, connect_upstream

if TYPE_CHECKING:
    from .listener import ProxyServer

# Requests a client may have outstanding before we stop reading it until the server catches up.
MAX_OUTSTANDING_REQUESTS = 10_000
# Upstream bytes relayed per event-loop turn. A read brings up to 256 KiB (thousands of rows or CopyData
# messages); relayed in one go it would make every other connection on the loop (a cancel request among
# them) wait behind it. Slices of this size keep that wait around a millisecond.
UPSTREAM_SLICE_BYTES = 16 * 1024
# The states whose waits count against limits.startup_timeout_seconds.
_TIMED_STATES = (State.NEGOTIATING, State.AUTHENTICATING)

Connector = Callable[[UpstreamConfig, Mapping[str, str], str | None], Awaitable[tuple[Link, list[bytes]]]]


class Session:
    """One client connection, from its first byte to its close: the links and the waits around a core."""

    def __init__(self, server: ProxyServer, client: Link, listener: ListenerConfig, *,
                 connect: Connector = connect_upstream, clock: Clock = time) -> None:
        self.server = server
        self.client = client
        self.listener = listener
        self.core = SessionCore(server, listener, clock, peer=client.peer())
        self.upstream: Link | None = None
        self._connect = connect
        self._pool_key: PoolKey | None = None  # the login, as the pool names it (upstream.pool.enabled)
        self._pooled: PooledUpstream | None = None  # the upstream as the pool knows it
        self._reused = False  # self.upstream came from the pool: it already said its startup tail
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hold_task: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._upstream_rest = b""  # a large upstream chunk relayed in slices (UPSTREAM_SLICE_BYTES) ...
        self._upstream_at = 0  # ... from this offset on

    @property
    def id(self) -> str:
        return self.core.id

    @property
    def identity(self) -> Identity | None:
        return self.core.identity

    @property
    def started(self) -> bool:
        """Sent its startup packet: counts against limits.max_connections."""
        return self.core.started

    # ----------------------------------------------------------------------------------------- startup

    async def run(self) -> None:
        try:
            if await self._start():
                self._start_pumping()
                await self._closed
        finally:
            self._cleanup()

    async def _start(self) -> bool:
        """Run the core's startup conversation; True once it pumps."""
        core = self.core
        steps = core.run()
        deadline = asyncio.get_running_loop().time() + self.server.config.limits.startup_timeout_seconds
        answer: Any = None
        error: BaseException | None = None
        while True:
            try:
                action = steps.send(answer) if error is None else steps.throw(error)
            except StopIteration as stop:
                return bool(stop.value)
            answer, error = None, None
            try:
                if core.state in _TIMED_STATES:
                    async with asyncio.timeout_at(deadline):
                        answer = await self._perform(action)
                else:
                    answer = await self._perform(action)
            except TimeoutError:
                error = StartupTimeout() if asyncio.get_running_loop().time() >= deadline else TimeoutError()
            except LinkClosed:
                error = ClientGone()
            except Exception as exc:  # the core ends the session with the right FATAL
                error = exc
            if core.ended:  # terminated meanwhile (e.g. the proxy shuts down)
                steps.close()
                return False

    async def _perform(self, action: Action) -> Any:
        client = self.client
        match action:
            case ReadPacket(limit):
                body = await client.read_startup_packet(limit)
                return body, bool(client.buffer)
            case ReadMessage(limit):
                return await client.read_message(limit)
            case StartTls(context):
                await client.start_tls(context, server_side=True)
            case ForwardCancel(request, timeout):
                await self.server.cancels.cancel(request, timeout)
            case VerifyToken(token):
                try:
                    return TokenVerified(await self.server.verifier.verify(token))
                except TokenError as exc:
                    return TokenRefused(exc.reason)
            case CheckMaskedRole(identity, role, database):
                assert self.server.masking is not None
                return await self.server.masking.refuse_role(identity, role, database)
            case ReuseUpstream(params, password):
                pool = self.server.pool
                self._pool_key = pool.key(self.server.config.upstream, params, password)
                self._pooled = pool.take(self._pool_key)
                if self._pooled is None:
                    return False
                self.upstream, self._reused = self._pooled.link, True
                return True
            case ConnectUpstream(params, password):
                try:
                    self.upstream, notices = await self._connect(self.server.config.upstream, params, password)
                except UpstreamUnavailable as exc:
                    return UpstreamUnreachable(exc.public, str(exc))
                except UpstreamRefused as exc:
                    return UpstreamLoginRefused(exc.error)
                if self._pool_key is not None:
                    self._pooled = PooledUpstream(self._pool_key, self.upstream, asyncio.get_running_loop().time())
                return UpstreamConnected(notices)
            case _:
                self._apply(action)
        return None

    # -------------------------------------------------------------------------------------------- pump

    def _start_pumping(self) -> None:
        assert self.upstream is not None
        client, upstream = self.client, self.upstream
        client.on_lost = self._on_client_lost
        upstream.on_lost = self._on_upstream_lost
        client.on_pause_writing, client.on_resume_writing = upstream.pause_reading, upstream.resume_reading
        upstream.on_pause_writing, upstream.on_resume_writing = client.pause_reading, client.resume_reading
        if client.closed:
            self._on_client_lost()
            return
        if self._reused:  # what the server said after its login, long ago: as the session core expects it
            assert self._pooled is not None
            upstream.buffer[:0] = self._pooled.startup_tail()
        upstream.start_pump(self._on_upstream_data)
        client.start_pump(self._on_client_data)

    def _apply(self, action: Action) -> None:
        """Perform one of the core's pump-phase actions."""
        match action:
            case SendClient(data):
                self.client.write(data)
            case SendUpstream(data):
                if self.upstream is not None:
                    self.upstream.write(data)
            case HoldClient(hold):
                self.client.pause_reading("hold")  # bytes after a held request wait in the relay, bounded
                if hold is not None:
                    self._hold_task = asyncio.ensure_future(self._await_decision(hold))
            case ReleaseClient():
                self.client.resume_reading("hold")
            case ReleaseUpstream(parameters, process_id, secret_key):
                upstream, pooled, self.upstream = self.upstream, self._pooled, None
                self.client.on_pause_writing = self.client.on_resume_writing = None  # they steered its reading
                if upstream is None or pooled is None or self._upstream_at < len(self._upstream_rest):
                    if upstream is not None:  # bytes of it still to relay: not idle after all
                        upstream.close()
                else:
                    pooled.parameters, pooled.process_id, pooled.secret_key = parameters, process_id, secret_key
                    self.server.pool.release(pooled)
            case SetTimer(name, delay):
                self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer, name)
            case End():
                self.client.close()
                if self.upstream is not None:
                    self.upstream.close()
                if not self._closed.done():
                    self._closed.set_result(None)
            case _:
                raise TypeError(f"not a pump-phase action: {action!r}")

    def _apply_actions(self) -> None:
        for action in self.core.take_actions():
            self._apply(action)

    def _on_client_data(self, data: bytes) -> None:
        core = self.core
        out = core.client_data(data)
        if out and self.upstream is not None:
            self.upstream.write(out)
        if core.actions:
            self._apply_actions()
        if len(core.tracker.queue) > MAX_OUTSTANDING_REQUESTS:
            self.client.pause_reading("backlog")  # a client that sends without reading: wait for answers

    async def _await_decision(self, hold: Hold) -> None:
        try:
            decision = await hold.decision
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            out = self.core.decision_failed(exc)
        else:
            out = self.core.decide(decision)
        if out and self.upstream is not None:
            self.upstream.write(out)
        self._apply_actions()

    def _on_upstream_data(self, data: bytes) -> None:
        """Relay a chunk from the server: a large one in slices, one per loop turn, reading paused meanwhile."""
        if self._upstream_at < len(self._upstream_rest):  # still relaying an earlier chunk: keep the order
            self._upstream_rest = self._upstream_rest[self._upstream_at:] + data
            self._upstream_at = 0
        elif len(data) <= UPSTREAM_SLICE_BYTES:
            self._relay_upstream(data)
        else:
            self._upstream_rest, self._upstream_at = data, 0
            assert self.upstream is not None
            self.upstream.pause_reading("slice")
            self._relay_upstream_slice()

    def _relay_upstream_slice(self) -> None:
        start = self._upstream_at
        rest = self._upstream_rest
        if start >= len(rest):  # relayed already (the upstream closed) or dropped (the session ended)
            return
        self._upstream_at = end = start + UPSTREAM_SLICE_BYTES
        self._relay_upstream(rest[start:end])
        if self.core.ended:
            self._upstream_rest = b""
        elif end < len(rest):
            asyncio.get_running_loop().call_soon(self._relay_upstream_slice)
        else:
            self._upstream_rest = b""
            if self.upstream is not None:
                self.upstream.resume_reading("slice")

    def _relay_upstream(self, data: bytes) -> None:
        core = self.core
        out = core.upstream_data(data)
        if out:
            self.client.write(out)
        if core.actions:
            self._apply_actions()
        if len(core.tracker.queue) < MAX_OUTSTANDING_REQUESTS // 2:
            self.client.resume_reading("backlog")

    # ------------------------------------------------------------------------------------- termination

    def _on_timer(self, name: str) -> None:
        self.core.timer_fired(name)
        self._apply_actions()

    def idle_check(self) -> None:
        """End the session if it sat idle (or idle in a transaction) longer than the configured limits
        (on the core's clock, the one its last activity was read from)."""
        self.core.idle_check(self.core.clock.monotonic())
        self._apply_actions()

    def terminate(self, sqlstate: str, message: str, *, hint: str | None = None) -> None:
        """End the session now with a FATAL to the client; safe to call more than once."""
        self.core.terminate(sqlstate, message, hint=hint)
        self._apply_actions()

    def _on_client_lost(self) -> None:
        self.core.client_lost()
        self._apply_actions()

    def _on_upstream_lost(self) -> None:
        if self._upstream_at < len(self._upstream_rest) and not self.core.ended:
            rest, self._upstream_rest = self._upstream_rest[self._upstream_at:], b""  # what the server sent first
            self._relay_upstream(rest)
        self.core.upstream_lost()
        self._apply_actions()
        self.client.close()
        if not self._closed.done():
            self._closed.set_result(None)

    def _cleanup(self) -> None:
        if self._hold_task is not None:
            self._hold_task.cancel()
        if self._timer is not None:
            self._timer.cancel()
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()
        self.core.finish()

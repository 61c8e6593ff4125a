"""The asyncio driver around the core, on in-memory links: it performs the core's actions and nothing else."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from sessionfakes import core_config, fake_server, make_identity

from pgproxy.core.plugins import Hold
from pgproxy.core.session import State
from pgproxy.core.statement import Statement
from pgproxy.identity import Identity
from pgproxy.protocol import errors
from pgproxy.protocol import messages as m
from pgproxy.protocol.codec import frame
from pgproxy.protocol.startup import PROTOCOL_3_0, StartupMessage
from pgproxy.protocol.types import Backend
from pgproxy.server.link import Link
from pgproxy.server.session import Session

RFQ_IDLE = frame(Backend.READY_FOR_QUERY, b"I")


class MemoryTransport:
    """Records writes and reading pauses; closing reports the loss to the link, as asyncio does."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.data = bytearray()
        self.closed = False
        self.paused = False
        link.connection_made(self)  # type: ignore[arg-type]

    def write(self, data: bytes) -> None:
        self.data += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.link.connection_lost, None)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def _session(server: Any, identity: Identity) -> tuple[Session, MemoryTransport, MemoryTransport]:
    client, upstream = Link(), Link()
    client_t, upstream_t = MemoryTransport(client), MemoryTransport(upstream)

    async def verify(token: str) -> Identity:
        assert token == "the-token"
        return identity

    async def connect(cfg: Any, params: Any, password: str | None) -> tuple[Link, list[bytes]]:
        return upstream, []

    server.verifier = SimpleNamespace(verify=verify)
    return Session(server, client, server.config.listeners[0], connect=connect), client_t, upstream_t


async def _until(condition: Any) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def test_driver_logs_in_pumps_holds_and_terminates() -> None:
    decision: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    hold = Hold(decision, m.NoticeResponse.build("NOTICE", "00000", "waiting for approval"))

    class HoldingGate:
        def inspect(self, session: Any, request: Statement) -> Any:
            return hold if request.sql.startswith("update") else None

    server = fake_server(gates=(HoldingGate(),))
    session, client_t, upstream_t = _session(server, make_identity(expires_at=10**10))
    session.client.data_received(StartupMessage(PROTOCOL_3_0, {"user": "app_reader"}).encode()
                                 + m.PasswordMessage("the-token").encode())
    running = asyncio.ensure_future(session.run())
    await _until(lambda: session.core.state is State.PUMPING)
    assert bytes(client_t.data) == m.AuthenticationCleartextPassword().encode() + m.AuthenticationOk().encode()
    session.upstream.data_received(RFQ_IDLE)  # type: ignore[union-attr]
    assert client_t.data.endswith(RFQ_IDLE)

    update = m.Query("update t set x = 1").encode()
    session.client.data_received(update)
    assert client_t.paused and bytes(upstream_t.data) == b""  # held: nothing forwarded, the client not read
    assert client_t.data.endswith(hold.notice.encode())  # type: ignore[union-attr]
    decision.set_result(None)
    await _until(lambda: bytes(upstream_t.data) == update)
    assert not client_t.paused

    session.terminate(errors.ADMIN_SHUTDOWN, "terminating connection due to administrator command")
    await asyncio.wait_for(running, 5)
    assert client_t.data.endswith(errors.fatal("57P01", "terminating connection due to administrator command"))
    assert upstream_t.data.endswith(m.Terminate().encode()) and client_t.closed and upstream_t.closed
    assert server.audit.sink.events[-1]["event"] == "session_end"


async def test_driver_ends_a_silent_client_at_the_startup_timeout() -> None:
    server = fake_server(core_config(startup_timeout_seconds=0.1))
    session, client_t, _ = _session(server, make_identity())
    await asyncio.wait_for(session.run(), 5)
    assert bytes(client_t.data) == errors.fatal("08006", "canceling authentication due to timeout")
    assert client_t.closed and session.core.state is State.ENDED

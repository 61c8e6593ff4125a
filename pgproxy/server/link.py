"""One socket of a session (client or upstream), read by awaiting during startup, by callback after.

Startup is a conversation (read a packet, answer, read again), which reads best as a coroutine; the
established session is a byte pump, which is fastest as protocol callbacks. ``Link`` does both: until
``start_pump`` it buffers incoming bytes for the ``read_*`` coroutines, afterwards it hands every
chunk straight to the pump callback. It knows nothing of the PostgreSQL protocol beyond lengths.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from ..protocol.framing import HEADER_SIZE, length_violation, startup_packet_length

# Bytes a peer may send ahead during startup before we stop reading it (startup packet, password
# message and some slack): a flood while we verify a token or log in upstream cannot grow memory.
STARTUP_BUFFER_LIMIT = 256 * 1024


class LinkClosed(Exception):
    """The peer closed the connection (or it broke) while we waited for data."""


class Link(asyncio.Protocol):
    """An asyncio protocol with an awaitable read side for startup and a callback side for pumping."""

    def __init__(self, on_made: Callable[[Link], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self._on_made = on_made
        self._waiter: asyncio.Future[None] | None = None
        self.on_data: Callable[[bytes], None] | None = None
        self.on_lost: Callable[[], None] | None = None
        self.on_pause_writing: Callable[[], None] | None = None
        self.on_resume_writing: Callable[[], None] | None = None
        # Reading stops while any reason holds (flow control, a held request, a backlog, startup bytes).
        self._pause_reasons: set[str] = set()

    # -------------------------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        if self._on_made is not None:
            self._on_made(self)

    def data_received(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data(data)
            return
        self.buffer += data
        if len(self.buffer) > STARTUP_BUFFER_LIMIT:  # nobody reads this fast during startup: stop
            self.pause_reading("startup")
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        if self.on_lost is not None:
            self.on_lost()

    def pause_writing(self) -> None:
        if self.on_pause_writing is not None:
            self.on_pause_writing()

    def resume_writing(self) -> None:
        if self.on_resume_writing is not None:
            self.on_resume_writing()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ----------------------------------------------------------------------------------------- startup

    async def _fill(self, n: int) -> None:
        while len(self.buffer) < n:
            if self.closed:
                raise LinkClosed()
            self.resume_reading("startup")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def read_exactly(self, n: int) -> bytes:
        await self._fill(n)
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def read_startup_packet(self, max_size: int) -> bytes:
        """Read an untyped startup packet; returns its body (after the length)."""
        await self._fill(4)
        length = startup_packet_length(self.buffer, max_size)
        return (await self.read_exactly(length))[4:]

    async def read_message(self, max_size: int) -> tuple[int, bytes]:
        """Read one typed message; returns (type byte, body)."""
        await self._fill(HEADER_SIZE)
        msg_type = self.buffer[0]
        length = int.from_bytes(self.buffer[1:5], "big", signed=True)
        if length < 4 or length > max_size:
            raise length_violation(msg_type, length, max_size)
        data = await self.read_exactly(1 + length)
        return msg_type, data[5:]

    async def start_tls(self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None,
                        timeout: float = 10.0) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            new_transport = await loop.start_tls(self.transport, self, context, server_side=server_side,
                                                 server_hostname=server_hostname, ssl_handshake_timeout=timeout)
        except (ssl.SSLError, ConnectionError) as exc:
            if not server_side:
                raise  # the upstream's certificate problems are reported as such
            self.closed = True
            raise LinkClosed(f"TLS handshake failed: {exc}") from None
        if new_transport is None:
            raise LinkClosed()
        self.transport = new_transport

    # ------------------------------------------------------------------------------------------ output

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed and not self.transport.is_closing():
            self.transport.write(data)

    def start_pump(self, on_data: Callable[[bytes], None]) -> None:
        """From now on hand every chunk to ``on_data``, starting with whatever is already buffered."""
        self.on_data = on_data
        self.resume_reading("startup")
        if self.buffer:
            data = bytes(self.buffer)
            self.buffer.clear()
            on_data(data)

    def pause_reading(self, reason: str = "flow") -> None:
        if reason in self._pause_reasons:
            return
        self._pause_reasons.add(reason)
        if len(self._pause_reasons) == 1 and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self, reason: str = "flow") -> None:
        if reason not in self._pause_reasons:
            return
        self._pause_reasons.discard(reason)
        if not self._pause_reasons and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    @property
    def tls(self) -> bool:
        return self.transport is not None and self.transport.get_extra_info("ssl_object") is not None

    def peer(self) -> str:
        info = self.transport.get_extra_info("peername") if self.transport is not None else None
        if isinstance(info, tuple) and len(info) >= 2:
            return f"{info[0]}:{info[1]}"
        return str(info) if info else "unknown"

"""A server message that answers no outstanding request ends the session, and is logged and counted.

A real PostgreSQL never sends one, so this test alone uses a fake upstream server: it logs the proxy in
as PostgreSQL does, then answers the client's first Query with a ParseComplete. The proxy in front of it
is the real one, reached by a real client socket.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from harness import ProxyUnderTest, config_edit
from rawwire import errors_in, login, message, query, read_message, read_until_closed, recv_exact, split_messages

SSL_REQUEST_CODE = 80877103


class FakeUpstream:
    """A one-connection TCP server speaking just enough of the server side of the protocol."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.received: list[str] = []  # the type bytes of the messages the proxy sent after the login
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(10)
            packet = self._startup(conn)
            if struct.unpack_from("!i", packet)[0] == SSL_REQUEST_CODE:
                conn.sendall(b"N")
                self._startup(conn)
            conn.sendall(message("R", struct.pack("!i", 0))
                         + message("S", b"client_encoding\x00UTF8\x00")
                         + message("S", b"standard_conforming_strings\x00on\x00")
                         + message("S", b"server_version\x0015.0\x00")
                         + message("K", struct.pack("!iI", 4242, 99))
                         + message("Z", b"I"))
            try:
                while True:
                    type_char, _ = read_message(conn)
                    self.received.append(type_char)
                    if type_char == "Q":
                        conn.sendall(message("1", b""))  # ParseComplete: there was no Parse
            except (EOFError, OSError):
                return

    @staticmethod
    def _startup(conn: socket.socket) -> bytes:
        length = struct.unpack("!i", recv_exact(conn, 4))[0]
        return recv_exact(conn, length - 4)

    def close(self) -> None:
        self.listener.close()
        self._thread.join(10)


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream()
    try:
        yield server
    finally:
        server.close()


def test_a_desync_ends_the_session_with_a_fatal_is_logged_and_counted(
        make_proxy: Callable[..., ProxyUnderTest], fake_upstream: FakeUpstream,
        caplog: pytest.LogCaptureFixture) -> None:
    def to_fake(data: dict[str, Any]) -> None:
        config_edit("upstream.host", "127.0.0.1")(data)
        config_edit("upstream.port", fake_upstream.port)(data)

    p = make_proxy(to_fake)
    assert p.running.server is not None
    registry = p.running.server.metrics.registry
    assert registry.get_sample_value("pgproxy_protocol_desyncs_total") == 0
    caplog.set_level(logging.ERROR, logger="pgproxy")

    sock = login(p.plain_port, "agent_reader", p.database.database, p.token())
    with sock:
        sock.sendall(query("SELECT 1"))
        answer = read_until_closed(sock)

    assert "1" not in [t for t, _ in split_messages(answer)]  # the stray message never reached the client
    (fatal,) = errors_in(answer)
    assert fatal["S"] == "FATAL" and fatal["C"] == "08P01"
    assert registry.get_sample_value("pgproxy_protocol_desyncs_total") == 1
    logged = [r.getMessage() for r in caplog.records if "protocol desync" in r.getMessage()]
    assert len(logged) == 1
    assert "PARSE_COMPLETE" in logged[0] and "QUERY" in logged[0] and "transaction status I" in logged[0]
    assert logged[0].startswith("session ")
    fake_upstream.close()
    assert fake_upstream.received == ["Q", "X"]  # the proxy ended the upstream connection too

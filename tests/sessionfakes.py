"""A ``SessionCore`` without sockets: a fake clock, the proxy objects it consults, a scripted login.

The core is sans-I/O, so tests drive it with bytes and events and assert on the actions it returns;
these helpers give it real collaborators (config, audit emitter, metrics, cancel registry) in memory.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pgproxy.audit.events import AuditEmitter
from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.config import ProxyConfig, parse_config
from pgproxy.core.session import (
    Action,
    ConnectUpstream,
    ReadMessage,
    ReadPacket,
    ReuseUpstream,
    SendClient,
    SessionCore,
    TokenVerified,
    UpstreamConnected,
    VerifyToken,
)
from pgproxy.identity import Identity
from pgproxy.metrics import ProxyMetrics
from pgproxy.protocol.startup import PROTOCOL_3_0, StartupMessage
from pgproxy.server.cancel import CancelRegistry

EPOCH = 1_700_000_000.0


class FakeClock:
    """Wall and monotonic time that move only when a test says so."""

    def __init__(self) -> None:
        self.wall = EPOCH
        self.mono = 1_000.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def core_config(*, password_env: str | None = None, pool: bool = False, **limits: Any) -> ProxyConfig:
    """A proxy config for one plaintext listener; ``password_env`` holds the upstream password, ``pool`` turns
    on upstream.pool."""
    credential = {"role": "*"} if password_env is None else {"role": "*", "password_env": password_env}
    return parse_config({
        "listeners": [{"host": "127.0.0.1", "port": 0, "insecure_plaintext": True}],
        "identity": {"issuer": "i", "audience": "a", "algorithms": ["HS256"], "hs256_secret_env": "UNUSED"},
        "upstream": {"credentials": [credential], "pool": {"enabled": pool}},
        "limits": limits,
    }, Path("."))


def fake_server(config: ProxyConfig | None = None, *, gates: tuple[Any, ...] = (), tls: Any = None,
                sink: Any = None) -> Any:
    """The parts of ``ProxyServer`` a session consults, in memory (``audit.sink.events`` holds the log)."""
    return SimpleNamespace(config=config or core_config(), gates=gates, audit=AuditEmitter(sink or MemoryAuditSink()),
                           cancels=CancelRegistry(), metrics=ProxyMetrics(), masking=None, sessions=[],
                           tls_context=lambda listener: tls, over_connection_limit=lambda: False)


def make_identity(subject: str = "agent-1", roles: tuple[str, ...] = ("app_reader",),
                  expires_at: float = EPOCH + 3600) -> Identity:
    return Identity(subject=subject, groups=("agents",), db_roles=roles, agent_id=None, session_id=None,
                    tool_call_id=None, token_id="jti-1", issuer="i", expires_at=expires_at, claims={})


def startup_body(user: str = "app_reader", version: int = PROTOCOL_3_0, **params: str) -> bytes:
    """A StartupMessage as the driver hands it over: the bytes after the length word."""
    return StartupMessage(version, {"user": user, "database": "app", **params}).encode()[4:]


def new_core(server: Any = None, clock: FakeClock | None = None) -> SessionCore:
    server = server or fake_server()
    return SessionCore(server, server.config.listeners[0], clock or FakeClock(), session_id="s1")


def login(core: SessionCore, identity: Identity | None = None, *, user: str = "app_reader",
          notices: tuple[bytes, ...] = ()) -> list[Action]:
    """Answer the startup conversation as a well-behaved client, verifier and upstream would; returns
    what the core asked for. The core is then pumping."""
    answers: dict[type, Any] = {
        ReadPacket: (startup_body(user), False),
        ReadMessage: (ord("p"), b"the-token\x00"),
        VerifyToken: TokenVerified(identity or make_identity()),
        ReuseUpstream: False,  # (asked with upstream.pool on) nothing to reuse: a fresh login
        ConnectUpstream: UpstreamConnected(list(notices)),
    }
    steps = core.run()
    seen: list[Action] = []
    answer: Any = None
    while True:
        try:
            action = steps.send(answer)
        except StopIteration as stop:
            assert stop.value is True, seen
            return seen
        seen.append(action)
        answer = answers.get(type(action))


def sent_to_client(actions: list[Action]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, SendClient))

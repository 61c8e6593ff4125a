"""Python CPU per transaction spent in a live Session's pump, without sockets or a database.

Feeds the exact bytes pgbench exchanges per transaction (simple, extended, prepared) through a real
``Session`` wired to in-memory transports, and reports microseconds per transaction. It isolates the
proxy's own per-message work (framing, request tracking, audit records) from syscalls and scheduling,
so it is stable enough to compare changes on a noisy 2-core machine. Run:

    .venv/bin/python bench/session_overhead.py [--transactions 50000] [--repeat 5] [--signed] [--policy FILE]

Each figure is the best of ``--repeat`` runs (the least disturbed by other processes on the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pgproxy.audit.events import AuditEmitter
from pgproxy.audit.sink import JsonLinesAuditSink
from pgproxy.config import parse_config
from pgproxy.core.session import State
from pgproxy.identity import Identity
from pgproxy.metrics import ProxyMetrics
from pgproxy.protocol.codec import frame
from pgproxy.protocol.messages import (
    Bind,
    CommandComplete,
    DataRow,
    Execute,
    FieldDescription,
    Parse,
    PasswordMessage,
    Query,
    RowDescription,
    Sync,
)
from pgproxy.protocol.startup import PROTOCOL_3_0, StartupMessage
from pgproxy.protocol.types import Backend, Frontend
from pgproxy.server.link import Link
from pgproxy.server.session import Session

SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
ROW_DESCRIPTION = RowDescription((FieldDescription("abalance", 16384, 3, 23, 4, -1, 0),)).encode()
ROW = DataRow((b"0",)).encode()
DONE = CommandComplete("SELECT 1").encode() + frame(Backend.READY_FOR_QUERY, b"I")
DESCRIBE_PORTAL = frame(Frontend.DESCRIBE, b"P\x00")
PARSE_COMPLETE, BIND_COMPLETE = frame(Backend.PARSE_COMPLETE, b""), frame(Backend.BIND_COMPLETE, b"")

# (client bytes, server bytes) for one transaction in each pgbench mode.
PATTERNS: dict[str, tuple[bytes, bytes]] = {
    "simple": (Query(SQL.replace("$1", "12345")).encode(), ROW_DESCRIPTION + ROW + DONE),
    "extended": (
        Parse("", SQL).encode() + Bind("", "", (0,), (b"12345",), (0,)).encode() + DESCRIBE_PORTAL
        + Execute("", 0).encode() + Sync().encode(),
        PARSE_COMPLETE + BIND_COMPLETE + ROW_DESCRIPTION + ROW + DONE,
    ),
    "prepared": (
        Bind("", "P0_1", (0,), (b"12345",), (0,)).encode() + Execute("", 0).encode() + Sync().encode(),
        BIND_COMPLETE + ROW + DONE,
    ),
}


class NullTransport:
    """Accepts writes and discards them, like a socket whose peer reads instantly."""

    def write(self, data: bytes) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def measure(mode: str, transactions: int, audit_dir: Path, policy: Path | None = None,
                  signed: bool = False) -> float:
    config = parse_config({
        "listeners": [{"host": "127.0.0.1", "port": 0, "insecure_plaintext": True}],
        "identity": {"issuer": "i", "audience": "a", "algorithms": ["HS256"], "hs256_secret_env": "UNUSED"},
        "upstream": {"credentials": [{"role": "*"}]},
    }, audit_dir)
    audit_dir = Path(tempfile.mkdtemp(dir=audit_dir))  # a fresh log per run
    audit: Any = JsonLinesAuditSink(audit_dir / f"{mode}.jsonl")
    if signed:  # the signed, hash-chained log with result capture, as `audit: {dir: ...}` installs it
        from pgproxy.audit.keys import generate_key, load_private_key
        from pgproxy.audit.signed import SignedAuditLog

        key_file = audit_dir / "signing.key"
        generate_key(key_file)
        audit = SignedAuditLog(audit_dir / "signed", load_private_key(key_file))
    metrics = ProxyMetrics()  # as pgproxy.app.build_server makes it
    metrics.watch_audit(audit)
    gates: tuple[Any, ...] = ()
    if policy is not None:  # the policy gate, as `policy: {file: ...}` installs it (no approvals needed here)
        from pgproxy.policy.gate import PolicyGate
        from pgproxy.policy.rules import load_policy

        gates = (PolicyGate(load_policy(policy), None, metrics=metrics),)
    client, upstream = Link(), Link()
    client.connection_made(NullTransport())  # type: ignore[arg-type]
    upstream.connection_made(NullTransport())  # type: ignore[arg-type]
    identity = Identity(subject="bench", groups=("agents",), db_roles=("bench",), agent_id=None, session_id=None,
                        tool_call_id=None, token_id="bench", issuer="i", expires_at=time.time() + 3600, claims={})

    async def verify(token: str) -> Identity:
        return identity

    async def connect(cfg: Any, params: Any, password: str | None) -> tuple[Link, list[bytes]]:
        return upstream, []

    server = SimpleNamespace(config=config, gates=gates, audit=AuditEmitter(audit), cancels=None, metrics=metrics,
                             masking=None, sessions=(), verifier=SimpleNamespace(verify=verify),
                             over_connection_limit=lambda: False, tls_context=lambda listener: None)
    session = Session(server, client, config.listeners[0], connect=connect)  # type: ignore[arg-type]
    # The real startup, answered in memory: startup packet, token, upstream login.
    client.data_received(StartupMessage(PROTOCOL_3_0, {"user": "bench", "database": "bench"}).encode()
                         + PasswordMessage("token").encode())
    running = asyncio.ensure_future(session.run())
    while session.core.state is not State.PUMPING:
        await asyncio.sleep(0)
    upstream.data_received(frame(Backend.READY_FOR_QUERY, b"I"))  # the startup's ReadyForQuery
    front, back = PATTERNS[mode]
    start = time.process_time()
    for _ in range(transactions):
        client.data_received(front)
        upstream.data_received(back)
    elapsed = time.process_time() - start
    assert session.core.statements == transactions, (mode, session.core.statements)
    session.terminate("57P01", "benchmark done")
    await running
    audit.close()
    return elapsed / transactions * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transactions", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3, help="Runs per figure; the best is shown.")
    parser.add_argument("--signed", action="store_true", help="Use the signed audit log (with result capture).")
    parser.add_argument("--policy", type=Path, default=None,
                        help="Also run each mode with a PolicyGate enforcing this policy file "
                             "(e.g. pgproxy/policy/default_policy.yaml).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for mode in PATTERNS:
            us = min(asyncio.run(measure(mode, args.transactions, Path(tmp), signed=args.signed))
                     for _ in range(args.repeat))
            print(f"{mode:9s} {us:6.2f} us of proxy CPU per transaction (framing + tracking + audit)")
            if args.policy is not None:
                gated = min(asyncio.run(measure(mode, args.transactions, Path(tmp), args.policy, args.signed))
                            for _ in range(args.repeat))
                print(f"{mode:9s} {gated:6.2f} us with the policy gate ({gated - us:+.2f} us)")


if __name__ == "__main__":
    main()

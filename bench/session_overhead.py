"""Python CPU per transaction spent in a live Session's pump, without sockets or a database.

Feeds the bytes pgbench exchanges per transaction through a real ``Session`` (built by
``pgproxy.app.build_server`` from a config, as ``pgproxy serve`` builds it) wired to in-memory transports,
and reports microseconds per transaction. It isolates the proxy's own per-message work (framing, request
tracking, gates, audit records) from syscalls and scheduling, so it is stable enough to compare changes
on a noisy 2-core machine. Run:

    .venv/bin/python bench/session_overhead.py [--transactions 50000] [--repeat 3] [--full] [--no-fresh]
        [--modes simple,extended,prepared,extended-text]

Modes, as pgbench ``-S`` sends them (``--fresh``, the default: a new aid in every transaction, the bytes
built before the timed loop; ``--no-fresh`` repeats the first transaction's bytes):

- ``simple``: one Query with the aid in its text (every text is new, as LLM-written SQL is);
- ``extended``: Parse (unnamed, the same text), Bind (the aid as a parameter), Describe portal, Execute, Sync;
- ``prepared``: ``P0_1`` parsed once before the loop, then Bind, Describe portal, Execute, Sync;
- ``extended-text``: the extended protocol with the aid in the Parse's text (a new text per transaction).

``--full`` also runs each mode with every control on, the configuration bench/pgbench_compare.py calls
"proxy-full": the signed audit log (result capture, flushed every 2,000 transactions as the proxy's 0.2 s
flusher would at ~10,000 tps), the shipped default policy plus an allow rule for the bench role, and masking
rules for a table the statements do not read (over a catalog snapshot built in memory, as if read from the
database). Each figure is the best of ``--repeat`` runs (the least disturbed by other processes).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pgbench_compare import BENCH_DB, BENCH_ROLE, MASKED_TABLE, ProxyProcess

from pgproxy.app import build_server
from pgproxy.config import parse_config
from pgproxy.core.session import State
from pgproxy.identity import Identity
from pgproxy.masking.catalog import CatalogSnapshot, Column, Relation
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

SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = {};"  # pgbench's -S script
PREPARED = "P0_1"  # the name pgbench -M prepared gives it
ROW_DESCRIPTION = RowDescription((FieldDescription("abalance", 16384, 3, 23, 4, -1, 0),)).encode()
DONE = CommandComplete("SELECT 1").encode() + frame(Backend.READY_FOR_QUERY, b"I")
READY = frame(Backend.READY_FOR_QUERY, b"I")
DESCRIBE_PORTAL = frame(Frontend.DESCRIBE, b"P\x00")
PARSE_COMPLETE, BIND_COMPLETE = frame(Backend.PARSE_COMPLETE, b""), frame(Backend.BIND_COMPLETE, b"")
EXTENDED_TAIL = DESCRIBE_PORTAL + Execute("", 0).encode() + Sync().encode()
MODES = ("simple", "extended", "prepared", "extended-text")
FLUSH_EVERY = 2000  # transactions between audit flushes (the proxy flushes every 0.2 s)


def transaction(mode: str, aid: int, balance: int) -> tuple[bytes, bytes]:
    """(client bytes, server bytes) of one pgbench -S transaction, as libpq frames them."""
    rows = ROW_DESCRIPTION + DataRow((str(balance).encode(),)).encode() + DONE
    if mode == "simple":
        return Query(SQL.format(aid)).encode(), rows
    param = (str(aid).encode(),)
    if mode == "extended":  # PQsendQueryParams: no parameter types or formats, one result format
        return (Parse("", SQL.format("$1")).encode() + Bind("", "", (), param, (0,)).encode() + EXTENDED_TAIL,
                PARSE_COMPLETE + BIND_COMPLETE + rows)
    if mode == "prepared":  # PQsendQueryPrepared
        return Bind("", PREPARED, (), param, (0,)).encode() + EXTENDED_TAIL, BIND_COMPLETE + rows
    if mode == "extended-text":
        return (Parse("", SQL.format(aid)).encode() + Bind("", "", (), (), (0,)).encode() + EXTENDED_TAIL,
                PARSE_COMPLETE + BIND_COMPLETE + rows)
    raise ValueError(f"unknown mode {mode!r}")


def workload(mode: str, transactions: int, fresh: bool) -> list[tuple[bytes, bytes]]:
    rng = random.Random(14)
    if not fresh:
        return [transaction(mode, 12345, 0)] * transactions
    return [transaction(mode, rng.randint(1, 1_000_000), rng.randint(-5000, 5000)) for _ in range(transactions)]


def catalog() -> CatalogSnapshot:
    """The schema masking reads at login, as the database would report it: pgbench's table and the masked one."""
    relations = {
        1: Relation(1, "public", "pgbench_accounts", "r", (
            Column("aid", 1, "integer", "int4", "N"), Column("bid", 2, "integer", "int4", "N"),
            Column("abalance", 3, "integer", "int4", "N"), Column("filler", 4, "character(84)", "bpchar", "S"))),
        2: Relation(2, "public", MASKED_TABLE, "r", (
            Column("id", 1, "integer", "int4", "N"), Column("email", 2, "text", "text", "S"),
            Column("ssn", 3, "text", "text", "S"))),
    }
    names = frozenset((r.schema, r.name) for r in relations.values())
    return CatalogSnapshot(1, relations, {}, {}, {}, frozenset(), {(r.schema, r.name): o for o, r in relations.items()},
                           frozenset(), names, frozenset(n for _, n in names))


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


async def measure(mode: str, work: list[tuple[bytes, bytes]], workdir: Path, full: bool) -> float:
    """Microseconds of CPU per transaction for ``work`` through one session."""
    workdir = Path(tempfile.mkdtemp(dir=workdir))  # a fresh log per run
    raw: dict[str, Any] = {
        "listeners": [{"host": "127.0.0.1", "port": 0, "insecure_plaintext": True}],
        "identity": {"issuer": "i", "audience": "a", "algorithms": ["HS256"], "hs256_secret_env": "UNUSED"},
        "upstream": {"credentials": [{"role": "*"}]},
        "audit": {"jsonl_path": str(workdir / "audit.jsonl")},
    }
    if full:
        raw.update(ProxyProcess.full_controls(workdir))
    config = parse_config(raw, workdir)
    identity = Identity(subject="pgbench", groups=(), db_roles=(BENCH_ROLE,), agent_id=None, session_id=None,
                        tool_call_id=None, token_id="bench", issuer="i", expires_at=time.time() + 3600, claims={})

    async def verify(token: str) -> Identity:
        return identity

    server = build_server(config, verifier=SimpleNamespace(verify=verify))  # type: ignore[arg-type]
    if server.masking is not None:  # what the proxy reads from the database at the first login
        now = time.monotonic()
        server.masking.catalogs._snapshots[BENCH_DB] = (catalog(), now, now)
        server.masking.roles._known[(BENCH_DB, BENCH_ROLE)] = ((), now)
    client, upstream = Link(), Link()
    client.connection_made(NullTransport())  # type: ignore[arg-type]
    upstream.connection_made(NullTransport())  # type: ignore[arg-type]

    async def connect(cfg: Any, params: Any, password: str | None) -> tuple[Link, list[bytes]]:
        return upstream, []

    session = Session(server, client, config.listeners[0], connect=connect)
    # The real startup, answered in memory: startup packet, token, upstream login.
    client.data_received(StartupMessage(PROTOCOL_3_0, {"user": BENCH_ROLE, "database": BENCH_DB}).encode()
                         + PasswordMessage("token").encode())
    running = asyncio.ensure_future(session.run())
    while session.core.state is not State.PUMPING:
        await asyncio.sleep(0)
    upstream.data_received(READY)  # the startup's ReadyForQuery
    if mode == "prepared":  # PQprepare, once per connection
        client.data_received(Parse(PREPARED, SQL.format("$1")).encode() + Sync().encode())
        upstream.data_received(PARSE_COMPLETE + READY)
    await asyncio.sleep(0)  # let masking's catalog preload finish
    assert not full or (len(server.gates) == 2 and session.core.masking is not None), "not every control is on"
    audit = server.audit
    before = session.core.statements
    start = time.process_time()
    for i, (front, back) in enumerate(work, 1):
        client.data_received(front)
        upstream.data_received(back)
        if i % FLUSH_EVERY == 0:
            audit.flush()
    audit.flush()
    elapsed = time.process_time() - start
    assert session.core.statements - before == len(work), (mode, session.core.statements, session.core.end_reason)
    session.terminate("57P01", "benchmark done")
    await running
    audit.close()
    return elapsed / len(work) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--transactions", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3, help="Runs per figure; the best is shown.")
    parser.add_argument("--fresh", action=argparse.BooleanOptionalAction, default=True,
                        help="A new aid in every transaction (default), as pgbench sends.")
    parser.add_argument("--full", action="store_true",
                        help="Also run each mode with the signed log, the default policy and masking rules.")
    parser.add_argument("--modes", default=",".join(MODES), help=f"Comma-separated, of {', '.join(MODES)}.")
    args = parser.parse_args()
    configs = ("bare", "full") if args.full else ("bare",)
    print(f"us of proxy CPU per transaction ({'fresh' if args.fresh else 'repeated'} statements, "
          f"best of {args.repeat} x {args.transactions})")
    print(f"{'mode':14s}" + "".join(f"{c:>9s}" for c in configs))
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            work = workload(mode, args.transactions, args.fresh)
            figures = [min(asyncio.run(measure(mode, work, Path(tmp), config == "full"))
                           for _ in range(args.repeat)) for config in configs]
            print(f"{mode:14s}" + "".join(f"{us:9.2f}" for us in figures), flush=True)


if __name__ == "__main__":
    main()

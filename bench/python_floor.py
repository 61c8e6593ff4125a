#!/usr/bin/env python3
"""The least a Python proxy can do per transaction: two reference middles for bench/pgbench_compare.py.

Not pgproxy and not a proxy anyone should deploy: no identity, no policy, no masking, no protocol state
beyond a FIFO of open statements, no error handling beyond closing both sides. They measure what the
interpreter costs on this machine, so that the ratios of pgproxy itself can be read against a floor
measured in the same run:

- ``pump``: uvloop + ``asyncio.Protocol``, bytes copied from one socket to the other.
- ``floor``: the pump, plus reading every message header in both directions and, per statement, the
  fields an audit record needs (the SQL of Query/Parse, the parameters of Bind, rows and a SHA-256
  digest of the DataRows, the CommandComplete tag or the error's SQLSTATE), encoded as canonical JSON
  (orjson, sorted keys) and hash-chained (SHA-256 of the previous hash and the record) into a buffered
  file: the work of a hash-chained statement log and nothing else.

Run: ``python bench/python_floor.py {pump,floor} --port P --upstream-host H --upstream-port Q
[--record-file F]``; prints ``listening on PORT`` when ready (``--port 0``: a free one); SIGINT/SIGTERM
stop it. Each record line is the JSON, a space and the chain hash (hex) after it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import signal
import struct
import sys
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

import orjson

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency of pgproxy
    uvloop = None  # type: ignore[assignment]

_HEADER = struct.Struct(">cI").unpack_from
_I16 = struct.Struct(">H").unpack_from
_I32 = struct.Struct(">i").unpack_from


class Chain:
    """The hash-chained record file every session of the process appends to."""

    def __init__(self, out: IO[bytes] | None) -> None:
        self.out = out
        self.prev = hashlib.sha256(b"floor").digest()
        self.records = 0

    def append(self, record: dict[str, Any]) -> None:
        encoded = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
        self.prev = digest = hashlib.sha256(self.prev + encoded).digest()
        self.records += 1
        if self.out is not None:
            self.out.write(encoded + b" " + digest.hex().encode() + b"\n")


class Statements:
    """Per session: the statements sent and not yet answered, and the record of each when answered."""

    def __init__(self, chain: Chain, session: int) -> None:
        self.chain = chain
        self.session = session
        self.prepared: dict[bytes, str] = {}
        self.bound: tuple[str, list[str | None]] = ("", [])
        self.open: deque[tuple[str, list[str | None], float]] = deque()
        self.rows = 0
        self.digest: Any = None

    def client(self, kind: bytes, body: bytes) -> None:
        if kind == b"Q":
            self.open.append((body[:-1].decode(), [], time.time()))
        elif kind == b"P":
            end = body.index(0)
            self.prepared[body[:end]] = body[end + 1:body.index(0, end + 1)].decode()
        elif kind == b"B":
            portal_end = body.index(0)
            name_end = body.index(0, portal_end + 1)
            pos = name_end + 1
            n_formats = _I16(body, pos)[0]
            formats = body[pos + 3:pos + 2 + 2 * n_formats:2]  # each code's low byte: 0 text, 1 binary
            pos += 2 + 2 * n_formats
            count = _I16(body, pos)[0]
            pos += 2
            params: list[str | None] = []
            for i in range(count):
                length = _I32(body, pos)[0]
                pos += 4
                if length < 0:
                    params.append(None)
                    continue
                value = body[pos:pos + length]
                pos += length
                binary = formats[i if n_formats > 1 else 0] if n_formats else 0
                params.append("\\x" + value.hex() if binary else value.decode("utf-8", "replace"))
            self.bound = (self.prepared.get(body[portal_end + 1:name_end], ""), params)
        elif kind == b"E":
            sql, params = self.bound
            self.open.append((sql, params, time.time()))

    def server(self, kind: bytes, body: bytes) -> None:
        if kind == b"D":
            self.rows += 1
            if self.digest is None:
                self.digest = hashlib.sha256()
            self.digest.update(body)
        elif kind in (b"C", b"E") and self.open:
            sql, params, started = self.open.popleft()
            record: dict[str, Any] = {"event": "statement", "session": self.session, "sql": sql,
                                      "params": params, "started_at": started,
                                      "duration_ms": (time.time() - started) * 1000.0, "rows": self.rows,
                                      "row_digest": self.digest.hexdigest() if self.digest else None}
            if kind == b"C":
                record["tag"] = body[:-1].decode()
            else:
                record["sqlstate"] = _sqlstate(body)
            self.chain.append(record)
            self.rows, self.digest = 0, None


def _sqlstate(body: bytes) -> str:
    """The SQLSTATE field ('C') of an ErrorResponse body (fields: a type byte, then a C string)."""
    pos = 0
    while pos < len(body) and body[pos]:
        end = body.index(0, pos + 1)
        if body[pos] == ord("C"):
            return body[pos + 1:end].decode()
        pos = end + 1
    return ""


class Framer:
    """Splits one direction's bytes into messages and hands (type, body) of those of ``kinds`` to
    ``on_message``; the first client packet of a connection (the startup packet) has no type byte and
    is skipped."""

    def __init__(self, on_message: Any, kinds: bytes, untyped_first: bool) -> None:
        self.on_message = on_message
        self.kinds = frozenset(kinds[i:i + 1] for i in range(len(kinds)))  # the only types read
        self.pending = b""
        self.untyped = untyped_first

    def feed(self, data: bytes) -> None:
        buf = self.pending + data if self.pending else data
        pos, n = 0, len(buf)
        if self.untyped:
            if n < 4:
                self.pending = buf
                return
            pos = int.from_bytes(buf[:4], "big")
            if pos > n:
                self.pending = buf
                return
            self.untyped = False
        on_message, kinds = self.on_message, self.kinds
        while n - pos >= 5:
            kind, length = _HEADER(buf, pos)
            end = pos + 1 + length
            if end > n:
                break
            if kind in kinds:
                on_message(kind, buf[pos + 5:end])
            pos = end
        self.pending = buf[pos:]


class Side(asyncio.Protocol):
    """One socket; what it reads goes to ``peer`` (and to ``framer`` in floor mode)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.framer: Framer | None = None
        self.early = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:  # the upstream is still connecting
            self.early += data
            return
        peer.transport.write(data)
        if self.framer is not None:
            self.framer.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def serve(mode: str, port: int, upstream: tuple[str, int], chain: Chain) -> None:
    loop = asyncio.get_running_loop()
    sessions = 0
    connecting: set[asyncio.Task[None]] = set()

    def accept() -> Side:
        nonlocal sessions
        sessions += 1
        client = Side()
        task = loop.create_task(connect(client, sessions))
        connecting.add(task)
        task.add_done_callback(connecting.discard)
        return client

    async def connect(client: Side, session: int) -> None:
        try:
            _, server = await loop.create_connection(Side, *upstream)
        except OSError:
            if client.transport is not None:
                client.transport.close()
            return
        client.peer, server.peer = server, client
        if mode == "floor":
            statements = Statements(chain, session)
            client.framer = Framer(statements.client, b"QPBE", untyped_first=True)
            server.framer = Framer(statements.server, b"DCE", untyped_first=False)
        if client.early:
            data, client.early = bytes(client.early), bytearray()
            client.data_received(data)

    server = await loop.create_server(accept, "127.0.0.1", port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("mode", choices=("pump", "floor"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream-host", default="127.0.0.1")
    p.add_argument("--upstream-port", type=int, required=True)
    p.add_argument("--record-file", type=Path, default=None, help="where floor mode appends its records")
    args = p.parse_args(argv)
    out = args.record_file.open("ab", buffering=1 << 20) if args.record_file is not None else None
    chain = Chain(out)
    try:
        coro = serve(args.mode, args.port, (args.upstream_host, args.upstream_port), chain)
        if uvloop is not None:
            uvloop.run(coro)
        else:
            asyncio.run(coro)
    finally:
        if out is not None:
            out.close()
    print(f"records: {chain.records}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

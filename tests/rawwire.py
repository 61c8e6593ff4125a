"""Raw PostgreSQL wire-protocol helpers for the robustness tests (hostile input, faults, load).

Written from the protocol documentation, independently of pgproxy's own codec, so a codec bug cannot
hide itself. Also: start ``pgproxy serve`` as a subprocess (to measure its memory on its own and to
send it signals) and read a process's resident memory from /proc.
"""

from __future__ import annotations

import contextlib
import copy
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROTOCOL_3_0 = 196608


# ------------------------------------------------------------------------------------------------
# building messages


def message(type_char: str | bytes, body: bytes) -> bytes:
    t = type_char.encode() if isinstance(type_char, str) else type_char
    return t + struct.pack("!i", len(body) + 4) + body


def startup_packet(user: str, database: str, **params: str) -> bytes:
    body = struct.pack("!i", PROTOCOL_3_0)
    for key, value in {"user": user, "database": database, **params}.items():
        body += key.encode() + b"\x00" + value.encode() + b"\x00"
    body += b"\x00"
    return struct.pack("!i", len(body) + 4) + body


def password(token: str) -> bytes:
    return message("p", token.encode() + b"\x00")


def query(sql: str | bytes) -> bytes:
    raw = sql.encode() if isinstance(sql, str) else sql
    return message("Q", raw + b"\x00")


# ------------------------------------------------------------------------------------------------
# reading


def parse_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse fields by code."""
    fields = {}
    for part in body.split(b"\x00"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def split_messages(data: bytes) -> list[tuple[str, bytes]]:
    """Typed messages in ``data`` (a trailing partial message is dropped)."""
    out = []
    pos = 0
    while pos + 5 <= len(data):
        length = struct.unpack_from("!i", data, pos + 1)[0]
        if length < 4 or pos + 1 + length > len(data):
            break
        out.append((chr(data[pos]), data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


def errors_in(data: bytes) -> list[dict[str, str]]:
    return [parse_fields(body) for t, body in split_messages(data) if t == "E"]


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_message(sock: socket.socket) -> tuple[str, bytes]:
    header = recv_exact(sock, 5)
    length = struct.unpack("!i", header[1:])[0]
    return chr(header[0]), recv_exact(sock, length - 4)


def read_until_closed(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything the peer sends until it closes (a socket timeout propagates: that is a hang)."""
    data = bytearray()
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        while chunk := sock.recv(65536):
            data += chunk
            if len(data) > limit:
                raise AssertionError(f"peer sent more than {limit} bytes without closing")
    return bytes(data)


def read_until_ready(sock: socket.socket) -> list[tuple[str, bytes]]:
    """Messages up to and including ReadyForQuery."""
    out = []
    while True:
        t, body = read_message(sock)
        out.append((t, body))
        if t == "Z":
            return out
        if t == "E" and parse_fields(body).get("S") == "FATAL":
            return out


def login(port: int, user: str, database: str, token: str, *, timeout: float = 10, **params: str) -> socket.socket:
    """A plaintext session through the proxy, ready for queries (after the first ReadyForQuery)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(startup_packet(user, database, **params))
    t, body = read_message(sock)
    assert (t, body) == ("R", struct.pack("!i", 3)), (t, body)
    sock.sendall(password(token))
    messages = read_until_ready(sock)
    assert messages[-1][0] == "Z", messages
    return sock


def simple_query(sock: socket.socket, sql: str) -> list[tuple[str, bytes]]:
    sock.sendall(query(sql))
    return read_until_ready(sock)


def rows_of(messages: list[tuple[str, bytes]]) -> list[list[str | None]]:
    rows = []
    for t, body in messages:
        if t != "D":
            continue
        count = struct.unpack_from("!h", body)[0]
        pos, row = 2, []
        for _ in range(count):
            n = struct.unpack_from("!i", body, pos)[0]
            pos += 4
            if n < 0:
                row.append(None)
            else:
                row.append(body[pos:pos + n].decode())
                pos += n
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# process memory


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size (VmRSS) of a process in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def open_fds(pid: int | str = "self") -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


# ------------------------------------------------------------------------------------------------
# `pgproxy serve` as a subprocess


@dataclass
class ServeProcess:
    process: subprocess.Popen[str]
    ports: list[int]
    config_file: Path
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kib(self) -> int:
        return rss_kib(self.process.pid)

    def stop(self, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start_serve(config_data: dict[str, Any], workdir: Path, *, mutate: Callable[[dict[str, Any]], None] | None = None,
                log_level: str = "WARNING", executable: list[str] | None = None,
                env: dict[str, str] | None = None) -> ServeProcess:
    """Run ``pgproxy serve -c FILE`` with ``config_data`` (changed by ``mutate``); JSON-lines audit in
    ``workdir``. Returns once it listens; its stderr is drained in the background."""
    data = copy.deepcopy(config_data)
    data["audit"] = {"jsonl_path": str(workdir / "audit.jsonl")}
    if mutate is not None:
        mutate(data)
    config = workdir / "pgproxy.yaml"
    config.write_text(yaml.safe_dump(data))
    cmd = executable or [sys.executable, "-m", "pgproxy"]
    process = subprocess.Popen([*cmd, "--log-level", log_level, "serve", "-c", str(config)],
                               stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    ports: list[int] = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            process.wait(5)
            raise RuntimeError(f"pgproxy serve exited ({process.returncode}): {''.join(lines)}")
        lines.append(line)
        if "listening on ports" in line:
            ports = [int(p) for p in line.rsplit("ports", 1)[1].replace(",", " ").split()]
            break
    else:
        process.kill()
        raise RuntimeError("pgproxy serve did not start listening in 30 s")

    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            if len(lines) < 10_000:
                lines.append(line)

    threading.Thread(target=drain, daemon=True).start()
    return ServeProcess(process, ports, config, lines)


@contextlib.contextmanager
def serving(config_data: dict[str, Any], workdir: Path, **kwargs: Any) -> Iterator[ServeProcess]:
    proc = start_serve(config_data, workdir, **kwargs)
    try:
        yield proc
    finally:
        proc.stop()


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()

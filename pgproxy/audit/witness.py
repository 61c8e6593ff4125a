"""Witnesses: copies of every signed checkpoint kept outside the proxy host's control.

A directory witness appends each checkpoint (canonical JSON, one per line) to
``<dir>/<log id>.checkpoints.jsonl``; a PostgreSQL witness inserts it into the table
``pgproxy_audit_checkpoints``. Publishing never blocks the event loop for long: the directory witness
is one small append, the PostgreSQL witness runs on its own thread and retries until it succeeds.
A witness that cannot be reached is logged, not fatal: the log itself stays fail-closed.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any, Protocol

import orjson

from .keys import Checkpoint
from .logformat import canonical

log = logging.getLogger(__name__)

TABLE = "pgproxy_audit_checkpoints"
CREATE_TABLE = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    log_id text NOT NULL, tree_size bigint NOT NULL, root text NOT NULL, timestamp_ms bigint NOT NULL,
    key_id text NOT NULL, signature text NOT NULL, PRIMARY KEY (log_id, tree_size, root))"""


class Witness(Protocol):
    def publish(self, checkpoint: Checkpoint) -> None: ...

    def close(self) -> None: ...


class DirectoryWitness:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def publish(self, checkpoint: Checkpoint) -> None:
        path = self.directory / f"{checkpoint.log_id}.checkpoints.jsonl"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, canonical(checkpoint.to_json()) + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("audit witness %s: cannot publish checkpoint %d: %s", self.directory,
                      checkpoint.tree_size, exc.strerror)

    def close(self) -> None:
        pass


class PostgresWitness:
    """Inserts checkpoints from a background thread (psycopg), retrying every few seconds."""

    def __init__(self, dsn: str, retry_seconds: float = 5.0) -> None:
        self.dsn = dsn
        self._retry = retry_seconds
        self._queue: queue.Queue[Checkpoint | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="pgproxy-audit-witness", daemon=True)
        self._thread.start()

    def publish(self, checkpoint: Checkpoint) -> None:
        self._queue.put(checkpoint)

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        import psycopg

        conn: Any = None
        backlog: list[Checkpoint] = []
        stopping = False
        while not (stopping and not backlog):
            try:
                item = self._queue.get(timeout=self._retry if backlog else None)
                if item is None:
                    stopping = True
                else:
                    backlog.append(item)
            except queue.Empty:
                pass
            if not backlog:
                continue
            try:
                if conn is None:
                    conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
                    # Create the table only if missing: the witness role may (and should) only INSERT.
                    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (TABLE,)).fetchone()
                    if not (exists and exists[0]):
                        conn.execute(CREATE_TABLE)
                for cp in backlog:
                    conn.execute(f"INSERT INTO {TABLE} VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                                 (cp.log_id, cp.tree_size, cp.root, cp.timestamp_ms, cp.key_id, cp.signature))
                backlog.clear()
            except Exception as exc:
                log.error("audit witness (PostgreSQL): cannot publish %d checkpoint(s): %s", len(backlog), exc)
                if conn is not None:
                    conn.close()
                conn = None
                if stopping:
                    break
        if conn is not None:
            conn.close()


def open_witness(witness_dir: Path | None, witness_dsn: str | None) -> Witness | None:
    if witness_dir is not None:
        return DirectoryWitness(witness_dir)
    if witness_dsn is not None:
        return PostgresWitness(witness_dsn)
    return None


def read_witness(target: str, log_id: str) -> tuple[str, list[tuple[str, Any]]]:
    """(description, [(location, checkpoint json)]) from a witness directory or a PostgreSQL DSN."""
    path = Path(target)
    if path.is_dir():
        file = path / f"{log_id}.checkpoints.jsonl"
        out: list[tuple[str, Any]] = []
        if file.exists():
            for i, line in enumerate(file.read_bytes().split(b"\n")):
                if line.strip():
                    try:
                        out.append((f"{file}:{i + 1}", orjson.loads(line)))
                    except orjson.JSONDecodeError:
                        out.append((f"{file}:{i + 1}", None))
        return str(file), out
    import psycopg

    with psycopg.connect(target, connect_timeout=10) as conn:
        rows = conn.execute(f"SELECT log_id, tree_size, root, timestamp_ms, key_id, signature FROM {TABLE} "
                            "WHERE log_id = %s ORDER BY tree_size", (log_id,)).fetchall()
    keys = ("log_id", "tree_size", "root", "timestamp_ms", "key_id", "signature")
    return f"table {TABLE}", [(f"{TABLE} tree_size={r[1]}", dict(zip(keys, r, strict=True))) for r in rows]

"""The central audit store: every replica's signed log shipped to one PostgreSQL database, searchable.

``StoreShipper`` runs on its own thread and tails the log directory (the segments and
``checkpoints.jsonl`` as written), so sessions never wait for it. Each pass asks the store for the
next record number it lacks for this log (``max(seq) + 1``) and ships complete records from there, in
order, in one transaction with the checkpoints: an outage of the store (or of the proxy) only delays
shipping, and the next pass catches up without a gap. Rows keep each record's exact line, so
``check_store`` can recompute the hash chain and the Merkle roots and check them against the signed
checkpoints: a row changed in the store, or whose searchable columns no longer match its record, is
reported. ``search`` serves `pgproxy audit search` and the admin UI.
"""

from __future__ import annotations

import datetime
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .keys import Checkpoint
from .logformat import (
    CHECKPOINTS_FILE,
    genesis_hash,
    iter_lines,
    list_segments,
    read_meta,
    segment_first,
)
from .merkle import CompactTree, leaf_hash
from .verify import TrustAnchor, note_problem

log = logging.getLogger(__name__)

BATCH = 5000  # records per transaction


def schema_sql(schema: str) -> list[str]:
    """Tables and indexes of the store (idempotent). ``schema`` is a validated identifier."""
    r = f"{schema}.records"
    return [
        f"CREATE SCHEMA IF NOT EXISTS {schema}",
        f"""CREATE TABLE IF NOT EXISTS {r} (
            log_id text NOT NULL, seq bigint NOT NULL, ts double precision, session text, kind text NOT NULL,
            subject text, agent_id text, tool_call_id text, decision text, classes text[], tables text[],
            sql text, record text NOT NULL,
            doc tsvector GENERATED ALWAYS AS (to_tsvector('simple', coalesce(sql, ''))) STORED,
            PRIMARY KEY (log_id, seq))""",
        f"CREATE INDEX IF NOT EXISTS records_ts ON {r} (ts)",
        f"CREATE INDEX IF NOT EXISTS records_session ON {r} (session, log_id, seq)",
        f"CREATE INDEX IF NOT EXISTS records_subject ON {r} (subject) WHERE subject IS NOT NULL",
        f"CREATE INDEX IF NOT EXISTS records_agent ON {r} (agent_id) WHERE agent_id IS NOT NULL",
        f"CREATE INDEX IF NOT EXISTS records_tool_call ON {r} (tool_call_id) WHERE tool_call_id IS NOT NULL",
        f"CREATE INDEX IF NOT EXISTS records_kind ON {r} (kind, ts)",
        f"CREATE INDEX IF NOT EXISTS records_decision ON {r} (decision, ts) WHERE decision IS NOT NULL",
        f"CREATE INDEX IF NOT EXISTS records_classes ON {r} USING gin (classes)",
        f"CREATE INDEX IF NOT EXISTS records_tables ON {r} USING gin (tables)",
        f"CREATE INDEX IF NOT EXISTS records_doc ON {r} USING gin (doc)",
        f"""CREATE TABLE IF NOT EXISTS {schema}.checkpoints (
            log_id text NOT NULL, tree_size bigint NOT NULL, root text NOT NULL, timestamp_ms bigint NOT NULL,
            key_id text NOT NULL, signature text NOT NULL, PRIMARY KEY (log_id, tree_size, root))""",
    ]


COLUMNS = ("log_id", "seq", "ts", "session", "kind", "subject", "agent_id", "tool_call_id", "decision", "classes",
           "tables", "sql", "record")


def row_of(log_id: str, seq: int, line: bytes, event: dict[str, Any]) -> tuple[Any, ...]:
    """The store row of one record: its searchable columns, all derived from ``line``, and ``line`` itself."""
    identity = event.get("identity") if isinstance(event.get("identity"), dict) else {}
    assert isinstance(identity, dict)

    def text(value: Any) -> str | None:
        return value if isinstance(value, str) else None

    def texts(value: Any) -> list[str] | None:
        return [str(v) for v in value] if isinstance(value, list) else None

    ts = event.get("ts")
    return (log_id, seq, float(ts) if isinstance(ts, (int, float)) else None, text(event.get("session")),
            str(event.get("event")), text(identity.get("subject")), text(identity.get("agent_id")),
            text(identity.get("tool_call_id")), text(event.get("decision")), texts(event.get("classes")),
            texts(event.get("tables")), text(event.get("sql")), line.decode("utf-8"))


# ------------------------------------------------------------------------------------------ shipping


class StoreShipper:
    """Ships one log directory to the store from a background thread (see the module docstring)."""

    def __init__(self, directory: Path, dsn: str, schema: str, *, interval: float = 1.0) -> None:
        self.directory = directory
        self.dsn = dsn
        self.schema = schema
        self.interval = interval
        self.shipped = 0  # records in the store for this log, as of the last pass
        self.error: str | None = None  # why the last pass failed, if it did
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._cursor: tuple[int, int, int] | None = None  # (segment's first record, offset, next seq)
        self._cp_offset = 0  # bytes of checkpoints.jsonl shipped (or known to be in the store)
        self._cp_shipped = 0  # the store's largest checkpointed tree size for this log
        self._thread = threading.Thread(target=self._run, name="pgproxy-audit-store", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop after one last pass (bounded by ``timeout``): what is not shipped now is shipped at the
        next start, from where the store stops."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        import psycopg

        conn: Any = None
        while True:
            stopping = self._stop.is_set()
            try:
                if conn is None:
                    conn = psycopg.connect(self.dsn, connect_timeout=5, autocommit=True)
                    with conn.transaction():
                        for statement in schema_sql(self.schema):
                            conn.execute(statement)
                    self._cursor, self._cp_offset = None, 0
                while self.ship_once(conn) >= BATCH and not self._stop.is_set():
                    pass
                self.error = None
            except Exception as exc:  # the store is down: retry later, from where it stops
                if self.error is None:
                    log.error("audit store: cannot ship %s: %s", self.directory, exc)
                self.error = str(exc)
                if conn is not None:
                    conn.close()
                conn = None
            if stopping:
                break
            self._wake.wait(self.interval)
            self._wake.clear()
        if conn is not None:
            conn.close()

    def ship_once(self, conn: Any) -> int:
        """Ship up to ``BATCH`` records after the store's last one (and new checkpoints); returns how many."""
        log_id = read_meta(self.directory)["log_id"]
        if self._cursor is None:
            row = conn.execute(f"SELECT coalesce(max(seq) + 1, 0) FROM {self.schema}.records WHERE log_id = %s",
                               (log_id,)).fetchone()
            self._cursor = _locate(self.directory, int(row[0]))
            row = conn.execute(f"SELECT coalesce(max(tree_size), 0) FROM {self.schema}.checkpoints "
                               "WHERE log_id = %s", (log_id,)).fetchone()
            self._cp_shipped = int(row[0])
        first, offset, next_seq = self._cursor
        rows = []
        for line in iter_lines(self.directory, (first, offset)):
            if not line.complete:
                break  # being written, or a torn tail: shipped once whole
            rec = orjson.loads(line.data)
            if rec.get("seq") != next_seq:
                raise RuntimeError(f"{line.path.name}: record {rec.get('seq')} where {next_seq} belongs; "
                                   "run `pgproxy audit verify`")
            rows.append(row_of(log_id, next_seq, line.data, rec.get("event") or {}))
            next_seq += 1
            first, offset = segment_first(line.path), line.offset + len(line.data) + 1
            if len(rows) >= BATCH:
                break
        cp_offset, new_cps = self._new_checkpoints()
        with conn.transaction(), conn.cursor() as cur:
            if rows:  # COPY: the records after the store's last one, so none can be there already
                with cur.copy(f"COPY {self.schema}.records ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
            if new_cps:
                cur.executemany(f"INSERT INTO {self.schema}.checkpoints VALUES (%s, %s, %s, %s, %s, %s) "
                                "ON CONFLICT DO NOTHING",
                                [(c.log_id, c.tree_size, c.root, c.timestamp_ms, c.key_id, c.signature)
                                 for c in new_cps])
        self._cursor = (first, offset, next_seq)
        self._cp_offset = cp_offset
        if new_cps:
            self._cp_shipped = max(self._cp_shipped, max(c.tree_size for c in new_cps))
        self.shipped = next_seq
        return len(rows)


    def _new_checkpoints(self) -> tuple[int, list[Checkpoint]]:
        """Complete checkpoint lines after the shipped offset (those the store lacks); the new offset."""
        try:
            with (self.directory / CHECKPOINTS_FILE).open("rb") as f:
                f.seek(self._cp_offset)
                data = f.read()
        except FileNotFoundError:
            return self._cp_offset, []
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next pass
        cps = [Checkpoint.from_json(orjson.loads(line)) for line in data[:end].split(b"\n") if line]
        return self._cp_offset + end, [c for c in cps if c.tree_size > self._cp_shipped]


def _locate(directory: Path, seq: int) -> tuple[int, int, int]:
    """(segment's first record, byte offset, seq) where record ``seq`` starts, or will be written."""
    firsts = [first for first, _ in list_segments(directory) if first <= seq]
    if not firsts:
        return (seq, 0, seq)
    n = firsts[-1]
    end = (firsts[-1], 0)
    for line in iter_lines(directory, end):
        if n == seq:
            return (segment_first(line.path), line.offset, seq)
        n += 1
        end = (segment_first(line.path), line.offset + len(line.data) + 1)
    return (*end, seq)


# ------------------------------------------------------------------------------------------- search


@dataclass(frozen=True)
class SearchFilters:
    subject: str | None = None
    agent_id: str | None = None
    tool_call_id: str | None = None
    table: str | None = None
    statement_class: str | None = None
    decision: str | None = None
    kind: str | None = None
    session: str | None = None
    since: float | None = None
    until: float | None = None
    text: str | None = None
    limit: int = 100


def parse_time(value: str) -> float:
    """Seconds since the epoch from a number or an ISO 8601 time (UTC when no zone is given)."""
    try:
        return float(value)
    except ValueError:
        pass
    when = datetime.datetime.fromisoformat(value)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def search_sql(schema: str, f: SearchFilters) -> tuple[str, list[Any]]:
    """The query for ``f`` (every value a bind parameter). Identity filters match the records of every
    session whose start (or the record itself) names that subject, agent or tool call."""
    r = f"{schema}.records"
    where: list[str] = []
    params: list[Any] = []
    for column, value in (("subject", f.subject), ("agent_id", f.agent_id), ("tool_call_id", f.tool_call_id)):
        if value is not None:
            where.append(f"(r.{column} = %s OR (r.log_id, r.session) IN "
                         f"(SELECT log_id, session FROM {r} WHERE {column} = %s AND session IS NOT NULL))")
            params += [value, value]
    if f.table is not None:
        where.append("r.tables @> ARRAY[%s]::text[]")
        params.append(f.table)
    if f.statement_class is not None:
        where.append("r.classes @> ARRAY[%s]::text[]")
        params.append(f.statement_class)
    for column, value in (("decision", f.decision), ("kind", f.kind), ("session", f.session)):
        if value is not None:
            where.append(f"r.{column} = %s")
            params.append(value)
    if f.since is not None:
        where.append("r.ts >= %s")
        params.append(f.since)
    if f.until is not None:
        where.append("r.ts < %s")
        params.append(f.until)
    if f.text is not None:
        where.append("r.doc @@ plainto_tsquery('simple', %s)")
        params.append(f.text)
    sql = (f"SELECT r.log_id, r.seq, r.ts, r.session, r.kind, r.subject, r.decision, r.sql FROM {r} r"
           + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY r.ts, r.log_id, r.seq LIMIT %s")
    params.append(f.limit)
    return sql, params


@dataclass(frozen=True)
class Hit:
    log_id: str
    seq: int
    ts: float | None
    session: str | None
    kind: str
    subject: str | None
    decision: str | None
    sql: str | None

    def to_json(self) -> dict[str, Any]:
        return {"log_id": self.log_id, "seq": self.seq, "ts": self.ts, "session": self.session, "kind": self.kind,
                "subject": self.subject, "decision": self.decision, "sql": self.sql}


def search(dsn: str, schema: str, filters: SearchFilters) -> list[Hit]:
    import psycopg

    sql, params = search_sql(schema, filters)
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        return [Hit(*row) for row in conn.execute(sql, params).fetchall()]


# -------------------------------------------------------------------------------------------- check


@dataclass
class StoreReport:
    logs: dict[str, int] = field(default_factory=dict)  # log id -> rows checked
    checkpoints: int = 0
    problems: list[str] = field(default_factory=list)
    anchor: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        note_problem(self.problems, text)


def check_store(dsn: str, schema: str, anchor: TrustAnchor, *, log_id: str | None = None,
                progress: Callable[[int], None] | None = None) -> StoreReport:
    """Recompute every shipped log's chain and Merkle roots from the rows' records and check them against
    the store's checkpoints, whose signatures must verify with ``anchor``."""
    import psycopg

    report = StoreReport(anchor=anchor.source)
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        ids = [log_id] if log_id is not None else [
            r[0] for r in conn.execute(f"SELECT DISTINCT log_id FROM {schema}.records ORDER BY 1").fetchall()]
        for lid in ids:
            by_size: dict[int, list[Checkpoint]] = {}
            for row in conn.execute(f"SELECT log_id, tree_size, root, timestamp_ms, key_id, signature FROM "
                                    f"{schema}.checkpoints WHERE log_id = %s ORDER BY tree_size", (lid,)):
                cp = Checkpoint(*row)
                bad = cp.verify(anchor.keys)
                if bad is not None:
                    report.problem(f"log {lid}: checkpoint for {cp.tree_size} records is {bad}")
                    continue
                report.checkpoints += 1
                by_size.setdefault(cp.tree_size, []).append(cp)
            with conn.cursor(name="pgproxy_check_store") as cur:
                cur.itersize = 10000
                cur.execute(f"SELECT {', '.join(COLUMNS)} FROM {schema}.records WHERE log_id = %s ORDER BY seq",
                            (lid,))
                report.logs[lid] = _check_rows(report, lid, cur, by_size, progress)
            top = max(by_size, default=0)
            if top > report.logs[lid]:
                report.problem(f"log {lid}: a checkpoint signs {top} records but the store holds "
                               f"{report.logs[lid]} (rows deleted, or not shipped yet)")
    return report


def _check_rows(report: StoreReport, lid: str, rows: Iterator[tuple[Any, ...]],
                by_size: dict[int, list[Checkpoint]], progress: Callable[[int], None] | None) -> int:
    tree = CompactTree()
    prev = genesis_hash(lid)
    for row in rows:
        seq, line = int(row[1]), str(row[12]).encode("utf-8")
        where = f"log {lid} record {seq}"
        if seq != tree.size:
            report.problem(f"{where}: found where record {tree.size} belongs (rows deleted)")
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or rec.get("seq") != seq:
            report.problem(f"{where}: the row's record is not record {seq} (row modified)")
        elif rec.get("prev") != prev:
            report.problem(f"{where}: hash chain broken (this row or the one before it was modified)")
        elif row_of(lid, seq, line, rec.get("event") or {}) != tuple(row):
            report.problem(f"{where}: the row's searchable columns differ from its signed record (row modified)")
        h = leaf_hash(line)
        prev = h.hex()
        tree.append(h)
        for cp in by_size.get(tree.size, ()):
            if cp.root != tree.root().hex():
                report.problem(f"log {lid}: the checkpoint for {tree.size} records signs root {cp.root[:16]}..., "
                               f"but the store's rows hash to {tree.root().hex()[:16]}... (rows modified)")
        if progress is not None and tree.size % 100_000 == 0:
            progress(tree.size)
    return tree.size

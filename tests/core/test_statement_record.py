"""The statement record the core writes: every string in it redacted, the row digest over every DataRow.

The session lists the strings it puts in a statement event so the audit emitter keyword-checks those
instead of the whole encoding, and the result capture computes the digest of a short result from its
sample rows: each field that can carry a secret is tried alone here, and the digest against the wire.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sessionfakes import fake_server, login, new_core

from pgproxy.audit.keys import generate_key, load_private_key
from pgproxy.audit.logformat import iter_records
from pgproxy.audit.signed import SignedAuditLog
from pgproxy.core.session import SessionCore
from pgproxy.protocol import messages as m
from pgproxy.protocol.codec import frame
from pgproxy.protocol.types import Backend, Frontend

RFQ_IDLE = frame(Backend.READY_FOR_QUERY, b"I")
SECRET = "AKIAABCDEFGHIJKLMNOP"  # what the aws_access_key detector replaces
REDACTED = "[redacted:aws_access_key]"
MAX_ROWS = 3


def _column(name: str) -> bytes:
    return m.RowDescription((m.FieldDescription(name, 0, 0, 25, -1, -1, 0),)).encode()


def _row(value: bytes) -> bytes:
    return m.DataRow((value,)).encode()


def _done(tag: str = "SELECT 1") -> bytes:
    return m.CommandComplete(tag).encode() + RFQ_IDLE


def _extended(sql: str, name: str = "", params: tuple[bytes, ...] = ()) -> bytes:
    return (m.Parse(name, sql).encode() + m.Bind("", name, (), params, ()).encode() + m.Execute("", 0).encode()
            + m.Sync().encode())


PARSED = frame(Backend.PARSE_COMPLETE, b"") + frame(Backend.BIND_COMPLETE, b"")

# field -> (client bytes, server bytes): the secret only in that field of the statement's record.
ALONE = {
    "sql": (m.Query(f"select '{SECRET}'").encode(), _column("x") + _row(b"1") + _done()),
    "param": (_extended("select $1", params=(SECRET.encode(),)), PARSED + _row(b"1") + _done()),
    "statement_name": (_extended("select 1", name=SECRET), PARSED + _row(b"1") + _done()),
    "column": (m.Query("select 1").encode(), _column(SECRET) + _row(b"1") + _done()),
    "cell": (m.Query("select k from t").encode(), _column("k") + _row(SECRET.encode()) + _done()),
    "notice": (m.Query("do $$ begin end $$").encode(),
               m.NoticeResponse.build("NOTICE", "00000", f"found {SECRET}").encode() + _done("DO")),
    "error": (m.Query("select k::int from t").encode(),
              m.ErrorResponse.build("ERROR", "22P02", f'invalid input syntax for type integer: "{SECRET}"').encode()
              + RFQ_IDLE),
}


@pytest.fixture
def signed(tmp_path: Path) -> Iterator[SignedAuditLog]:
    key = tmp_path / "audit.key"
    generate_key(key)
    log = SignedAuditLog(tmp_path / "log", load_private_key(key), max_result_rows=MAX_ROWS)
    yield log
    log.close()


def _pumping(sink: Any) -> SessionCore:
    core = new_core(fake_server(sink=sink))
    login(core)
    core.upstream_data(RFQ_IDLE)  # the startup's ReadyForQuery
    return core


def _run(core: SessionCore, client: bytes, server: bytes) -> None:
    assert core.client_data(client) == client
    assert core.upstream_data(server) == server
    assert core.actions == []


def _statement_lines(log: SignedAuditLog) -> list[bytes]:
    log.flush()
    return [line.data for line, rec in iter_records(log.directory) if rec["event"]["event"] == "statement"]


def _results(log: SignedAuditLog) -> list[dict[str, Any]]:
    return [orjson.loads(line)["event"]["result"] for line in _statement_lines(log)]


@pytest.mark.parametrize("field", sorted(ALONE))
def test_a_secret_in_any_one_field_of_a_statement_record_is_redacted(field: str, signed: SignedAuditLog) -> None:
    core = _pumping(signed)
    _run(core, *ALONE[field])
    [line] = _statement_lines(signed)
    assert SECRET.encode() not in line and REDACTED.encode() in line


@pytest.mark.parametrize("field", ["sql", "param", "statement_name", "error"])
def test_a_sink_that_keeps_events_gets_them_redacted_too(field: str) -> None:
    core = _pumping(None)  # a MemoryAuditSink: no result capture, events kept as dicts
    _run(core, *ALONE[field])
    event = core.server.audit.sink.events[-1]
    assert event["event"] == "statement" and SECRET not in repr(event) and REDACTED in repr(event)


def test_fields_masking_adds_are_checked_as_well(signed: SignedAuditLog) -> None:
    class Annotating:
        """Adds a field to every statement event, as masking does with the relations it masked."""

        def annotate(self, event: dict[str, Any], result: Any) -> None:
            event["masked_relations"] = [f"public.{SECRET}"]

    core = _pumping(signed)
    core.masking = Annotating()  # type: ignore[assignment]
    _run(core, m.Query("select 1").encode(), _column("x") + _row(b"1") + _done())
    [line] = _statement_lines(signed)
    assert SECRET.encode() not in line and f"public.{REDACTED}".encode() in line


@pytest.mark.parametrize("rows", [0, 1, MAX_ROWS, MAX_ROWS + 1, 2 * MAX_ROWS + 1])
def test_the_row_digest_covers_every_data_row_as_sent(rows: int, signed: SignedAuditLog) -> None:
    data_rows = [_row(b"value %d" % i) for i in range(rows)]
    core = _pumping(signed)
    _run(core, m.Query("select v from t").encode(), _column("v") + b"".join(data_rows) + _done(f"SELECT {rows}"))
    [result] = _results(signed)
    assert result["row_digest"] == hashlib.sha256(b"".join(data_rows)).hexdigest()
    assert result["rows_sent"] == rows
    assert result.get("sample_rows", []) == [[f"value {i}"] for i in range(min(rows, MAX_ROWS))]
    assert result.get("rows_truncated", False) is (rows > MAX_ROWS)


def test_each_prepared_execution_gets_its_own_digest(signed: SignedAuditLog) -> None:
    """Results follow each other on one session: no digest or sample row carries over."""
    core = _pumping(signed)
    describe = frame(Frontend.DESCRIBE, b"Sp\x00")
    _run(core, m.Parse("p", "select v from t").encode() + describe + m.Sync().encode(),
         frame(Backend.PARSE_COMPLETE, b"") + frame(Backend.PARAMETER_DESCRIPTION, b"\x00\x00") + _column("v")
         + RFQ_IDLE)
    runs = [[_row(b"a")], [_row(b"%d" % i) for i in range(MAX_ROWS + 2)], []]
    for data_rows in runs:
        execute = m.Bind("", "p", (), (), ()).encode() + m.Execute("", 0).encode() + m.Sync().encode()
        _run(core, execute, frame(Backend.BIND_COMPLETE, b"") + b"".join(data_rows) + _done(f"SELECT {len(data_rows)}"))
    results = _results(signed)
    assert [r["row_digest"] for r in results] == [hashlib.sha256(b"".join(rows)).hexdigest() for rows in runs]
    assert [r["rows_sent"] for r in results] == [1, MAX_ROWS + 2, 0]
    assert [r["sample_rows"] for r in results[:2]] == [[["a"]], [["0"], ["1"], ["2"]]]
    assert "sample_rows" not in results[2]

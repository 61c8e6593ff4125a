"""ExchangeTracker: pairing server responses with the requests that caused them.

Each test plays a realistic conversation: frontend messages are recorded with ``on_frontend`` as the
session does before forwarding them, backend messages of the tracked types are fed to ``on_backend``
(DataRow, ParameterStatus, notices and the like bypass the tracker, as in the session), all built
with the message classes' ``encode()`` (or ``frame()`` for the ones the proxy never decodes) and passed
as memoryviews of the body.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from pgproxy.protocol.codec import ProtocolViolation, cstr, frame, nullable
from pgproxy.protocol.errors import error
from pgproxy.protocol.framing import MessageRelay
from pgproxy.protocol.messages import (
    AuthenticationOk,
    BackendKeyData,
    Bind,
    Close,
    CommandComplete,
    DataRow,
    Describe,
    ErrorResponse,
    Execute,
    FieldDescription,
    FunctionCall,
    NoticeResponse,
    Parse,
    Query,
    RowDescription,
    Sync,
)
from pgproxy.protocol.tracker import (
    TRACKED_BACKEND_TYPES,
    TRACKED_FRONTEND_TYPES,
    Desync,
    ExchangeTracker,
    Kind,
    Pending,
    StatementResult,
)
from pgproxy.protocol.types import Backend, Frontend

INT4 = 23

# Messages the proxy forwards without decoding, built straight from their wire formats.
PARSE_COMPLETE = frame(Backend.PARSE_COMPLETE, b"")
BIND_COMPLETE = frame(Backend.BIND_COMPLETE, b"")
CLOSE_COMPLETE = frame(Backend.CLOSE_COMPLETE, b"")
NO_DATA = frame(Backend.NO_DATA, b"")
PORTAL_SUSPENDED = frame(Backend.PORTAL_SUSPENDED, b"")
EMPTY_QUERY = frame(Backend.EMPTY_QUERY_RESPONSE, b"")
FLUSH = frame(Frontend.FLUSH, b"")
COPY_DONE = frame(Frontend.COPY_DONE, b"")  # the same byte in both directions


def ready(status: str) -> bytes:
    return frame(Backend.READY_FOR_QUERY, status.encode())


def copy_data(data: bytes) -> bytes:
    return frame(Frontend.COPY_DATA, data)  # the same byte in both directions


def copy_in(overall: int, columns: tuple[int, ...]) -> bytes:
    return frame(Backend.COPY_IN_RESPONSE, struct.pack(f">BH{len(columns)}h", overall, len(columns), *columns))


def copy_out(overall: int, columns: tuple[int, ...]) -> bytes:
    return frame(Backend.COPY_OUT_RESPONSE, struct.pack(f">BH{len(columns)}h", overall, len(columns), *columns))


def parameter_status(name: str, value: str) -> bytes:
    return frame(Backend.PARAMETER_STATUS, cstr(name) + cstr(value))


def parameter_description(oids: tuple[int, ...]) -> bytes:
    return frame(Backend.PARAMETER_DESCRIPTION, struct.pack(f">H{len(oids)}I", len(oids), *oids))


def function_result(value: bytes | None) -> bytes:
    return frame(Backend.FUNCTION_CALL_RESPONSE, nullable(value))


def rowdesc(*names: str) -> RowDescription:
    return RowDescription(tuple(FieldDescription(n, 0, 0, INT4, 4, -1, 0) for n in names))


def err(sqlstate: str = "42P01", message: str = 'relation "nope" does not exist') -> ErrorResponse:
    return ErrorResponse.build("ERROR", sqlstate, message)


class Conversation:
    """A tracker plus helpers to play the client and the server."""

    def __init__(self, *, startup: bool = True) -> None:
        self.t = ExchangeTracker()
        if startup:
            # As the session does: the ReadyForQuery that ends the startup phase is expected.
            self.t.queue.append(Pending(Kind.SYNC))
            self.server(AuthenticationOk(), parameter_status("server_version", "16.0"),
                        BackendKeyData(42, 7), ready("I"))
            assert self.t.idle

    def client(self, *messages: Any) -> list[Pending | None]:
        out = []
        for m in messages:
            data = m if isinstance(m, bytes) else m.encode()
            if data[0] in TRACKED_FRONTEND_TYPES:
                out.append(self.t.on_frontend(data[0], memoryview(data)[5:]))
        return out

    def server(self, *messages: Any) -> list[bytes | None]:
        """Feed the tracked messages; return on_backend's answers (one per tracked message)."""
        out = []
        for m in messages:
            data = m if isinstance(m, bytes) else m.encode()
            if data[0] in TRACKED_BACKEND_TYPES:
                out.append(self.t.on_backend(data[0], memoryview(data)[5:]))
        return out

    def done(self) -> list[StatementResult]:
        return self.t.drain()


# --------------------------------------------------------------------------------------------------
# Startup


def test_startup_ready_for_query_consumes_the_seeded_sync() -> None:
    c = Conversation(startup=False)
    c.t.queue.append(Pending(Kind.SYNC))
    assert not c.t.idle
    c.server(AuthenticationOk(), parameter_status("client_encoding", "UTF8"), BackendKeyData(1, 2),
             ready("I"))
    assert c.t.idle
    assert c.t.transaction_status == "I"
    assert c.done() == []


def test_tracked_type_sets() -> None:
    # DataRow and CopyData are deliberately absent: the per-row path must not call into Python.
    assert ord("D") not in TRACKED_BACKEND_TYPES
    assert ord("d") not in TRACKED_BACKEND_TYPES
    assert ord("d") not in TRACKED_FRONTEND_TYPES
    # CopyDone/CopyFail are seen (not queued): they end the stretch in which the server ignores Sync.
    assert set(b"QPBDECSFcf") == set(TRACKED_FRONTEND_TYPES)


def test_untracked_frontend_types_are_ignored() -> None:
    t = ExchangeTracker()
    assert t.on_frontend(ord("H"), memoryview(b"")) is None
    assert t.on_frontend(ord("d"), memoryview(b"data")) is None
    assert t.idle


# --------------------------------------------------------------------------------------------------
# Simple query protocol


def test_simple_query_with_several_statements() -> None:
    c = Conversation()
    sql = "SELECT * FROM a; INSERT INTO b VALUES (1), (2), (3); CREATE TABLE c (x int)"
    (p,) = c.client(Query(sql))
    assert p is not None and p.kind is Kind.QUERY
    assert not c.t.idle
    c.server(
        rowdesc("x"), DataRow((b"1",)), DataRow((b"2",)), CommandComplete("SELECT 2"),
        CommandComplete("INSERT 0 3"),
        NoticeResponse.build("NOTICE", "00000", "hello"),
        CommandComplete("CREATE TABLE"),
    )
    assert c.done() == []  # not finished before ReadyForQuery
    assert not c.t.idle
    c.server(ready("I"))
    (res,) = c.done()
    assert res.protocol == "simple"
    assert res.sql == sql
    assert res.tags == ["SELECT 2", "INSERT 0 3", "CREATE TABLE"]
    assert res.rows == 5
    assert res.error is None
    assert not res.refused
    assert res.duration_ms >= 0
    assert res.started_at > 0
    assert c.t.idle


def test_simple_query_without_row_counts() -> None:
    c = Conversation()
    c.client(Query("CREATE TABLE t (x int)"))
    c.server(CommandComplete("CREATE TABLE"), ready("I"))
    (res,) = c.done()
    assert res.tags == ["CREATE TABLE"]
    assert res.rows is None


def test_simple_query_with_error() -> None:
    c = Conversation()
    c.client(Query("SELECT 1; SELECT * FROM nope; SELECT 3"))
    answers = c.server(rowdesc("?column?"), DataRow((b"1",)), CommandComplete("SELECT 1"), err())
    assert answers == [None, None, None]  # RowDescription, CommandComplete, ErrorResponse (DataRow bypasses)
    assert c.done() == []
    c.server(ready("I"))
    (res,) = c.done()
    assert res.tags == ["SELECT 1"]
    assert res.rows == 1
    assert res.error is not None
    assert res.error.sqlstate == "42P01"
    assert not res.refused
    assert c.t.idle


def test_consecutive_simple_queries() -> None:
    c = Conversation()
    c.client(Query("SELECT 1"))
    c.server(rowdesc("a"), CommandComplete("SELECT 1"), ready("I"))
    c.client(Query("SELECT 2"))
    c.server(rowdesc("a"), CommandComplete("SELECT 1"), ready("I"))
    assert [r.sql for r in c.done()] == ["SELECT 1", "SELECT 2"]


def test_pipelined_simple_queries() -> None:
    c = Conversation()
    c.client(Query("SELECT 1"), Query("SELECT 2"))
    c.server(rowdesc("a"), CommandComplete("SELECT 1"), ready("I"))
    assert [r.sql for r in c.done()] == ["SELECT 1"]
    assert not c.t.idle
    c.server(rowdesc("a"), CommandComplete("SELECT 1"), ready("I"))
    assert [r.sql for r in c.done()] == ["SELECT 2"]
    assert c.t.idle


def test_empty_query_response_in_simple_query() -> None:
    c = Conversation()
    c.client(Query(""))
    c.server(EMPTY_QUERY, ready("I"))
    (res,) = c.done()
    assert res.sql == ""
    assert res.tags == []
    assert res.rows is None
    assert res.error is None
    assert c.t.idle


def test_copy_from_stdin_in_a_simple_query() -> None:
    c = Conversation()
    c.client(Query("COPY t FROM STDIN"))
    c.server(copy_in(0, (0,)))
    assert not c.t.idle
    # The client's CopyData and CopyDone are not queued requests.
    assert c.client(copy_data(b"1\n"), copy_data(b"2\n"), copy_data(b"3\n"), COPY_DONE) == [None]
    c.server(CommandComplete("COPY 3"), ready("I"))
    (res,) = c.done()
    assert res.sql == "COPY t FROM STDIN"
    assert res.tags == ["COPY 3"]
    assert res.rows == 3
    assert c.t.idle


def test_copy_to_stdout_in_a_simple_query() -> None:
    c = Conversation()
    c.client(Query("COPY t TO STDOUT"))
    c.server(copy_out(0, (0,)), copy_data(b"1\n"), COPY_DONE, CommandComplete("COPY 1"),
             ready("I"))
    (res,) = c.done()
    assert res.tags == ["COPY 1"]
    assert res.rows == 1


def test_transaction_status_tracking() -> None:
    c = Conversation()
    assert c.t.transaction_status == "I"
    c.client(Query("BEGIN"))
    c.server(CommandComplete("BEGIN"), ready("T"))
    assert c.t.transaction_status == "T"
    c.client(Query("SELECT * FROM nope"))
    c.server(err(), ready("E"))
    assert c.t.transaction_status == "E"
    c.client(Query("SELECT 1"))
    c.server(err("25P02", "current transaction is aborted"), ready("E"))
    assert c.t.transaction_status == "E"
    c.client(Query("ROLLBACK"))
    c.server(CommandComplete("ROLLBACK"), ready("I"))
    assert c.t.transaction_status == "I"
    assert [r.error.sqlstate if r.error else None for r in c.done()] == [None, "42P01", "25P02", None]


# --------------------------------------------------------------------------------------------------
# Extended query protocol


def test_extended_query_with_parameters() -> None:
    c = Conversation()
    sql = "SELECT * FROM t WHERE a = $1 AND b = $2"
    pendings = c.client(Parse("", sql, (INT4, 0)), Bind("", "", (0, 1), (b"42", None), (0,)),
                        Describe("P", ""), Execute("", 0), Sync())
    assert [p.kind for p in pendings if p is not None] == [Kind.PARSE, Kind.BIND, Kind.DESCRIBE, Kind.EXECUTE,
                                                           Kind.SYNC]
    c.server(PARSE_COMPLETE, BIND_COMPLETE, rowdesc("a", "b"))
    assert c.done() == []  # Parse and Bind succeeded: they are not statements of their own
    c.server(DataRow((b"42", b"x")), DataRow((b"42", b"y")), CommandComplete("SELECT 2"))
    (res,) = c.done()
    assert res.protocol == "extended"
    assert res.sql == sql
    assert res.params == (b"42", None)
    assert res.param_formats == (0, 1)
    assert res.statement_name == ""
    assert res.tags == ["SELECT 2"]
    assert res.rows == 2
    assert res.error is None
    assert not c.t.idle  # the Sync is still outstanding
    c.server(ready("I"))
    assert c.t.idle
    assert c.done() == []


def test_pipelined_executes_before_one_sync() -> None:
    c = Conversation()
    c.client(
        Parse("ins", "INSERT INTO t VALUES ($1)"),
        Bind("", "ins", (), (b"1",)), Execute(""),
        Bind("", "ins", (), (b"2",)), Execute(""),
        Parse("", "UPDATE t SET x = x + 1"), Bind("", ""), Execute(""),
        Sync(),
    )
    c.server(
        PARSE_COMPLETE,
        BIND_COMPLETE, CommandComplete("INSERT 0 1"),
        BIND_COMPLETE, CommandComplete("INSERT 0 1"),
        PARSE_COMPLETE, BIND_COMPLETE, CommandComplete("UPDATE 7"),
    )
    results = c.done()
    assert [(r.sql, r.params, r.rows, r.statement_name) for r in results] == [
        ("INSERT INTO t VALUES ($1)", (b"1",), 1, "ins"),
        ("INSERT INTO t VALUES ($1)", (b"2",), 1, "ins"),
        ("UPDATE t SET x = x + 1", (), 7, ""),
    ]
    assert [r.tags for r in results] == [["INSERT 0 1"], ["INSERT 0 1"], ["UPDATE 7"]]
    c.server(ready("I"))
    assert c.t.idle


def test_several_batches_pipelined() -> None:
    c = Conversation()
    c.client(Parse("", "SELECT 1"), Bind("", ""), Execute(""), Sync(),
             Parse("", "SELECT 2"), Bind("", ""), Execute(""), Sync())
    c.server(PARSE_COMPLETE, BIND_COMPLETE, CommandComplete("SELECT 1"), ready("I"))
    assert not c.t.idle
    c.server(PARSE_COMPLETE, BIND_COMPLETE, CommandComplete("SELECT 1"), ready("I"))
    assert [r.sql for r in c.done()] == ["SELECT 1", "SELECT 2"]
    assert c.t.idle


def test_error_in_the_middle_of_an_extended_pipeline() -> None:
    c = Conversation()
    c.client(
        Parse("", "INSERT INTO t VALUES (1)"), Bind("", ""), Execute(""),
        Parse("", "INSERT INTO nope VALUES (2)"), Bind("", ""), Execute(""),
        Parse("", "INSERT INTO t VALUES (3)"), Bind("", ""), Execute(""),
        Sync(),
    )
    c.server(PARSE_COMPLETE, BIND_COMPLETE, CommandComplete("INSERT 0 1"))
    answers = c.server(err())  # the second Parse fails; the server skips everything up to the Sync
    assert answers == [None]
    results = c.done()
    assert [(r.sql, r.error.sqlstate if r.error else None) for r in results] == [
        ("INSERT INTO t VALUES (1)", None),
        ("INSERT INTO nope VALUES (2)", "42P01"),
    ]
    assert [p.kind for p in c.t.queue] == [Kind.SYNC]
    c.server(ready("E"))
    assert c.t.idle
    assert c.t.transaction_status == "E"
    assert c.done() == []  # the skipped requests produce nothing

    # The next batch works normally.
    c.client(Parse("", "SELECT 4"), Bind("", ""), Execute(""), Sync())
    c.server(PARSE_COMPLETE, BIND_COMPLETE, CommandComplete("SELECT 1"), ready("I"))
    (res,) = c.done()
    assert res.sql == "SELECT 4" and res.error is None and res.tags == ["SELECT 1"]
    assert c.t.idle


def test_error_on_execute_finishes_the_execute() -> None:
    c = Conversation()
    c.client(Parse("", "SELECT 1/$1"), Bind("", "", (), (b"0",)), Execute(""), Execute(""), Sync())
    c.server(PARSE_COMPLETE, BIND_COMPLETE, err("22012", "division by zero"))
    (res,) = c.done()
    assert res.sql == "SELECT 1/$1"
    assert res.params == (b"0",)
    assert res.error is not None and res.error.sqlstate == "22012"
    assert res.tags == []
    c.server(ready("I"))
    assert c.t.idle
    assert c.done() == []


def test_error_on_bind_is_reported_with_its_parameters() -> None:
    c = Conversation()
    c.client(Parse("s", "SELECT $1::int"), Bind("", "s", (), (b"abc",)), Execute(""), Sync())
    c.server(PARSE_COMPLETE, err("22P02", 'invalid input syntax for type integer: "abc"'))
    (res,) = c.done()
    assert res.sql == "SELECT $1::int"
    assert res.params == (b"abc",)
    assert res.error is not None and res.error.sqlstate == "22P02"
    c.server(ready("I"))
    assert c.t.idle


def test_requests_sent_after_an_error_but_before_the_sync_are_skipped_too() -> None:
    # The server discards every message up to the next Sync, including those that reach the proxy only
    # after it has seen the ErrorResponse (e.g. a pipelining client that flushed before its Sync).
    c = Conversation()
    c.client(Parse("", "SELECT * FROM nope"), Bind("", ""), Execute(""), FLUSH)
    c.server(err())
    assert len(c.done()) == 1
    c.client(Parse("", "SELECT 2"), Bind("", ""), Execute(""), Sync())
    c.server(ready("I"))  # the only answer the server gives to these four messages
    assert c.t.idle
    assert c.done() == []
    c.client(Query("SELECT 3"))
    c.server(rowdesc("a"), CommandComplete("SELECT 1"), ready("I"))
    assert [r.sql for r in c.done()] == ["SELECT 3"]


def test_failed_bind_result_keeps_its_bind_message() -> None:
    c = Conversation()
    c.client(Parse("s", "SELECT $1::int, $2::text"), Sync())
    c.server(PARSE_COMPLETE, ready("I"))
    c.client(Bind("p", "s", (0, 1), (b"x", b"\x00\x01"), (1,)), Execute("p"), Sync())
    c.server(err("22P02", "invalid input syntax"))
    (res,) = c.done()
    assert res.bind == Bind("p", "s", (0, 1), (b"x", b"\x00\x01"), (1,))
    assert res.params == (b"x", b"\x00\x01")
    assert res.param_formats == (0, 1)
    assert res.statement_name == "s"
    assert res.sql == "SELECT $1::int, $2::text"


def test_malformed_bind_is_rejected_or_harmless() -> None:
    # A Bind whose names are fine but whose parameter section is truncated. PostgreSQL answers it with an
    # ERROR (08P01 "insufficient data left in message") and the session goes on. The tracker must either
    # refuse the message itself or record it so that reading the result (as the audit does) cannot raise.
    c = Conversation()
    c.client(Parse("s", "SELECT $1"), Sync())
    c.server(PARSE_COMPLETE, ready("I"))
    bad = Bind("", "s", (), (b"abcdef",)).encode()[5:-6]
    try:
        c.t.on_frontend(ord("B"), memoryview(bad))
    except ProtocolViolation:
        return
    c.client(Execute(""), Sync())
    c.server(err("08P01", "insufficient data left in message"), ready("I"))
    for res in c.done():
        res.params  # noqa: B018 - must not raise
        res.param_formats  # noqa: B018
        res.bind  # noqa: B018
    assert c.t.idle


def test_repeated_parse_bodies_decode_consistently() -> None:
    c = Conversation()
    for sql in ("SELECT 1", "SELECT 2", "SELECT 1", "SELECT 2"):
        c.client(Parse("", sql), Bind("", ""), Execute(""), Sync())
        c.server(PARSE_COMPLETE, BIND_COMPLETE, CommandComplete("SELECT 1"), ready("I"))
    assert [r.sql for r in c.done()] == ["SELECT 1", "SELECT 2", "SELECT 1", "SELECT 2"]
    # Same text under another name is another statement.
    c.client(Parse("a", "SELECT 1"), Parse("b", "SELECT 1"), Sync())
    c.server(PARSE_COMPLETE, PARSE_COMPLETE, ready("I"))
    assert c.t.statements["a"] == c.t.statements["b"] == "SELECT 1"


def test_invalid_parse_raises_protocol_violation() -> None:
    t = ExchangeTracker()
    with pytest.raises(ProtocolViolation):
        t.on_frontend(ord("P"), memoryview(b"name-without-terminator"))


def test_named_prepared_statement_reused_and_closed() -> None:
    c = Conversation()
    c.client(Parse("get_user", "SELECT name FROM users WHERE id = $1", (INT4,)), Sync())
    c.server(PARSE_COMPLETE, ready("I"))
    assert c.done() == []
    assert c.t.statements["get_user"] == "SELECT name FROM users WHERE id = $1"

    for uid in (b"1", b"2"):
        c.client(Bind("p1", "get_user", (), (uid,)), Execute("p1"), Sync())
        c.server(BIND_COMPLETE, CommandComplete("SELECT 1"), ready("I"))
    results = c.done()
    assert [(r.sql, r.params, r.statement_name) for r in results] == [
        ("SELECT name FROM users WHERE id = $1", (b"1",), "get_user"),
        ("SELECT name FROM users WHERE id = $1", (b"2",), "get_user"),
    ]

    c.client(Close("S", "get_user"), Close("P", "p1"), Sync())
    assert "get_user" not in c.t.statements
    assert "p1" not in c.t.portals
    c.server(CLOSE_COMPLETE, CLOSE_COMPLETE, ready("I"))
    assert c.t.idle
    assert c.done() == []


def test_failed_parse_does_not_replace_an_existing_prepared_statement() -> None:
    # Parse with the name of an existing statement fails (42P05 duplicate_prepared_statement) and the
    # server keeps the original: an Execute of that statement must be audited with the original text.
    c = Conversation()
    c.client(Parse("s1", "DELETE FROM audit_log"), Sync())
    c.server(PARSE_COMPLETE, ready("I"))
    c.client(Parse("s1", "SELECT 1"), Sync())
    c.server(err("42P05", 'prepared statement "s1" already exists'), ready("I"))
    (failed,) = c.done()
    assert failed.sql == "SELECT 1" and failed.error is not None
    c.client(Bind("", "s1"), Execute(""), Sync())
    c.server(BIND_COMPLETE, CommandComplete("DELETE 10"), ready("I"))
    (res,) = c.done()
    assert res.sql == "DELETE FROM audit_log"
    assert res.statement_name == "s1"


def test_describe_statement_with_rows() -> None:
    c = Conversation()
    c.client(Parse("s", "SELECT a, b FROM t WHERE a = $1"), Describe("S", "s"), Sync())
    c.server(PARSE_COMPLETE, parameter_description((INT4,)))
    assert not c.t.idle
    assert [p.kind for p in c.t.queue] == [Kind.DESCRIBE, Kind.SYNC]
    c.server(rowdesc("a", "b"))
    assert [p.kind for p in c.t.queue] == [Kind.SYNC]
    c.server(ready("I"))
    assert c.t.idle
    assert c.done() == []


def test_describe_statement_without_rows() -> None:
    c = Conversation()
    c.client(Parse("s", "UPDATE t SET a = $1"), Describe("S", "s"), Sync())
    c.server(PARSE_COMPLETE, parameter_description((INT4,)), NO_DATA, ready("I"))
    assert c.t.idle


def test_describe_portal_then_execute() -> None:
    c = Conversation()
    c.client(Parse("", "DELETE FROM t"), Bind("", ""), Describe("P", ""), Execute(""), Sync())
    c.server(PARSE_COMPLETE, BIND_COMPLETE, NO_DATA, CommandComplete("DELETE 4"), ready("I"))
    (res,) = c.done()
    assert res.sql == "DELETE FROM t" and res.rows == 4
    assert c.t.idle


def test_describe_of_unknown_statement_fails_and_skips_to_sync() -> None:
    c = Conversation()
    c.client(Describe("S", "missing"), Bind("", "missing"), Execute(""), Sync())
    c.server(err("26000", 'prepared statement "missing" does not exist'))
    assert [p.kind for p in c.t.queue] == [Kind.SYNC]
    c.server(ready("I"))
    assert c.t.idle


def test_portal_suspended_with_max_rows() -> None:
    c = Conversation()
    c.client(Parse("", "SELECT * FROM generate_series(1, 5)"), Bind("cur", ""),
             Execute("cur", 2), Execute("cur", 2), Execute("cur", 2), Sync())
    c.server(PARSE_COMPLETE, BIND_COMPLETE, DataRow((b"1",)), DataRow((b"2",)), PORTAL_SUSPENDED)
    (first,) = c.done()
    assert first.sql == "SELECT * FROM generate_series(1, 5)"
    assert first.error is None and first.tags == []
    c.server(DataRow((b"3",)), DataRow((b"4",)), PORTAL_SUSPENDED)
    assert len(c.done()) == 1
    c.server(DataRow((b"5",)), CommandComplete("SELECT 1"))
    (last,) = c.done()
    assert last.tags == ["SELECT 1"] and last.rows == 1
    c.server(ready("T"))
    assert c.t.idle
    assert c.t.transaction_status == "T"


def test_empty_query_in_extended_protocol() -> None:
    c = Conversation()
    c.client(Parse("", ""), Bind("", ""), Execute(""), Sync())
    c.server(PARSE_COMPLETE, BIND_COMPLETE, EMPTY_QUERY)
    (res,) = c.done()
    assert res.sql == "" and res.tags == [] and res.error is None
    c.server(ready("I"))
    assert c.t.idle


def test_copy_from_stdin_in_extended_protocol() -> None:
    c = Conversation()
    c.client(Parse("", "COPY t FROM STDIN"), Bind("", ""), Execute(""), FLUSH)
    c.server(PARSE_COMPLETE, BIND_COMPLETE, copy_in(0, ()))
    c.client(copy_data(b"1\n"), COPY_DONE, Sync())
    c.server(CommandComplete("COPY 1"), ready("I"))
    (res,) = c.done()
    assert res.sql == "COPY t FROM STDIN" and res.rows == 1
    assert c.t.idle


def test_copy_from_stdin_in_extended_protocol_libpq_style() -> None:
    # libpq (PQexecParams) sends Parse/Bind/Execute/Sync at once; the server reads that Sync while in
    # copy-in mode and ignores it ("Flush and Sync messages received during copy-in mode are ignored"),
    # so libpq sends a second Sync after CopyDone. The server answers the two Syncs with ONE ReadyForQuery.
    c = Conversation()
    c.client(Parse("", "COPY t FROM STDIN"), Bind("", ""), Execute(""), Sync())
    c.server(PARSE_COMPLETE, BIND_COMPLETE, copy_in(0, ()))
    c.client(copy_data(b"1\n"), copy_data(b"2\n"), COPY_DONE, Sync())
    c.server(CommandComplete("COPY 2"), ready("I"))
    (res,) = c.done()
    assert res.sql == "COPY t FROM STDIN" and res.rows == 2
    assert c.t.idle
    # The following statement is still paired with its own response.
    c.client(Query("SELECT 1"))
    c.server(rowdesc("a"), CommandComplete("SELECT 1"), ready("I"))
    (nxt,) = c.done()
    assert nxt.sql == "SELECT 1" and nxt.tags == ["SELECT 1"]
    assert c.t.idle


def test_execute_of_unknown_portal_has_empty_sql() -> None:
    c = Conversation()
    c.client(Execute("nope"), Sync())
    c.server(err("34000", 'portal "nope" does not exist'), ready("I"))
    (res,) = c.done()
    assert res.sql == "" and res.error is not None and res.error.sqlstate == "34000"
    assert c.t.idle


def test_sync_alone() -> None:
    c = Conversation()
    c.client(Sync())
    assert not c.t.idle
    c.server(ready("I"))
    assert c.t.idle and c.done() == []


def test_error_at_sync_commit_is_absorbed() -> None:
    # A deferred constraint fails when the implicit transaction commits at Sync.
    c = Conversation()
    c.client(Parse("", "INSERT INTO t VALUES (1)"), Bind("", ""), Execute(""), Sync())
    c.server(PARSE_COMPLETE, BIND_COMPLETE, CommandComplete("INSERT 0 1"))
    assert len(c.done()) == 1
    c.server(err("23503", "violates foreign key constraint"), ready("I"))
    assert c.t.idle


# --------------------------------------------------------------------------------------------------
# FunctionCall


def test_function_call() -> None:
    c = Conversation()
    (p,) = c.client(FunctionCall(1598, (0,), (b"x",), 0))
    assert p is not None and p.kind is Kind.FUNCTION
    c.server(function_result(b"42"))
    assert not c.t.idle
    c.server(ready("I"))
    (res,) = c.done()
    assert res.protocol == "function"
    assert "1598" in res.sql
    assert res.error is None
    assert c.t.idle


def test_function_call_error() -> None:
    c = Conversation()
    c.client(FunctionCall(99999))
    c.server(err("42883", "function 99999 does not exist"), ready("I"))
    (res,) = c.done()
    assert res.error is not None and res.error.sqlstate == "42883"
    assert c.t.idle


# --------------------------------------------------------------------------------------------------
# Robustness


@pytest.mark.parametrize("response", [ready("I"), PARSE_COMPLETE, BIND_COMPLETE, CLOSE_COMPLETE, NO_DATA,
                                      CommandComplete("SELECT 1").encode()], ids=["Z", "1", "2", "3", "n", "C"])
def test_a_response_to_no_request_is_a_desync(response: Any) -> None:
    counted: list[None] = []
    c = Conversation()
    c.t.on_desync = lambda: counted.append(None)
    with pytest.raises(Desync) as info:
        c.server(response)
    assert info.value.sqlstate == "08P01" and info.value.expected is None and info.value.outstanding == 0
    assert "no answer was due" in str(info.value)
    assert counted == [None]


def test_messages_with_nothing_to_attach_to_are_ignored() -> None:
    c = Conversation()
    assert c.server(EMPTY_QUERY, PORTAL_SUSPENDED, rowdesc("a"), parameter_description(()), function_result(None),
                    copy_in(0, ()), err()) == [None] * 7
    assert c.t.idle
    assert c.done() == []


def test_wrong_kind_at_head_is_a_desync() -> None:
    c = Conversation()
    c.client(Execute(""), Sync())
    with pytest.raises(Desync, match="PARSE_COMPLETE") as info:
        c.server(PARSE_COMPLETE)  # an Execute cannot be answered by ParseComplete
    assert info.value.expected is Kind.EXECUTE and info.value.outstanding == 2
    assert len(c.t.queue) == 2  # nothing was popped
    with pytest.raises(Desync, match="READY_FOR_QUERY"):
        c.server(ready("I"))  # the Execute is not a sync point
    with pytest.raises(Desync, match="NO_DATA"):
        c.server(NO_DATA)


def test_command_complete_for_a_request_that_runs_nothing_is_a_desync() -> None:
    c = Conversation()
    c.client(Parse("s", "SELECT 1"), Sync())
    with pytest.raises(Desync, match="COMMAND_COMPLETE") as info:
        c.server(CommandComplete("SELECT 1"))
    assert info.value.expected is Kind.PARSE


def test_invalid_ready_for_query_is_a_protocol_violation() -> None:
    c = Conversation()
    c.client(Query("SELECT 1"))
    for bad in (b"X", b"", b"II"):
        with pytest.raises(ProtocolViolation):
            c.t.on_backend(ord("Z"), memoryview(bad))


def test_fatal_error_with_empty_queue() -> None:
    c = Conversation()
    assert c.server(ErrorResponse.build("FATAL", "57P01", "terminating connection")) == [None]
    assert c.t.idle


def test_drain_forgets() -> None:
    c = Conversation()
    c.client(Query("SELECT 1"))
    c.server(CommandComplete("SELECT 1"), ready("I"))
    assert len(c.done()) == 1
    assert c.done() == []


# --------------------------------------------------------------------------------------------------
# Refusal substitution


def test_refusal_replaces_the_expected_error_of_a_simple_query() -> None:
    c = Conversation()
    (p,) = c.client(Query("SELECT 1/0 -- stands in for a refused statement"))
    assert p is not None
    refusal = error("42501", "permission denied by the proxy's policy")
    p.refusal = refusal
    p.refusal_expected_sqlstate = "22012"
    answers = c.server(err("22012", "division by zero"))
    assert answers == [refusal.encode()]
    c.server(ready("I"))
    (res,) = c.done()
    assert res.refused
    assert res.error == refusal
    assert c.t.idle


def test_refusal_with_a_different_sqlstate_passes_the_server_error_through() -> None:
    c = Conversation()
    (p,) = c.client(Query("SELECT 1/0"))
    assert p is not None
    p.refusal = error("42501", "refused")
    p.refusal_expected_sqlstate = "22012"
    answers = c.server(err("57014", "canceling statement due to user request"))
    assert answers == [None]
    c.server(ready("I"))
    (res,) = c.done()
    assert not res.refused
    assert res.error is not None and res.error.sqlstate == "57014"


def test_refusal_only_applies_to_its_own_request() -> None:
    c = Conversation()
    first, second = c.client(Query("SELECT 1"), Query("SELECT 1/0"))
    assert first is not None and second is not None
    second.refusal = error("42501", "refused")
    second.refusal_expected_sqlstate = "22012"
    # The first query fails with the same SQLSTATE: it is the server's own error, forwarded as is.
    assert c.server(err("22012", "division by zero"), ready("I")) == [None, None]
    refused = error("42501", "refused").encode()
    assert c.server(err("22012", "division by zero"), ready("I")) == [refused, None]
    a, b = c.done()
    assert not a.refused and a.error is not None and a.error.sqlstate == "22012"
    assert b.refused and b.error is not None and b.error.sqlstate == "42501"


def test_refusal_in_extended_protocol() -> None:
    c = Conversation()
    parse, *_ = c.client(Parse("", "SELECT 1/0"), Bind("", ""), Execute(""), Sync())
    assert parse is not None
    parse.refusal = error("42501", "refused")
    parse.refusal_expected_sqlstate = "22012"
    assert c.server(err("22012", "division by zero")) == [error("42501", "refused").encode()]
    (res,) = c.done()
    assert res.refused and res.sql == "SELECT 1/0"
    c.server(ready("I"))
    assert c.t.idle


def test_refusal_of_a_bind() -> None:
    c = Conversation()
    _, bind, *_ = c.client(Parse("", "SELECT $1::int"), Bind("", "", (), (b"secret-id",)), Execute(""), Sync())
    assert bind is not None and bind.kind is Kind.BIND
    bind.refusal = error("42501", "refused")
    bind.refusal_expected_sqlstate = "22P02"
    assert c.server(PARSE_COMPLETE, err("22P02", "invalid input")) == [None, error("42501", "refused").encode()]
    (res,) = c.done()
    assert res.refused
    assert res.sql == "SELECT $1::int"
    assert res.params == (b"secret-id",)
    assert res.error is not None and res.error.sqlstate == "42501"
    c.server(ready("I"))
    assert c.t.idle


def test_refusal_spliced_into_the_backend_stream_by_the_relay() -> None:
    c = Conversation()
    (p,) = c.client(Query("SELECT 1/0"))
    assert p is not None
    refusal = error("42501", "refused by policy")
    p.refusal, p.refusal_expected_sqlstate = refusal, "22012"
    relay = MessageRelay(1 << 20, c.t.backend_handlers)
    notice = NoticeResponse.build("NOTICE", "00000", "before").encode()
    server_error = err("22012", "division by zero").encode()
    idle = ready("I")
    out = relay.feed(notice + server_error + idle)
    assert out == notice + refusal.encode() + idle
    (res,) = c.done()
    assert res.refused


def test_parse_cache_keeps_the_most_recent_bodies_within_its_bound() -> None:
    c = Conversation()
    for i in range(1100):
        c.client(Parse(f"s{i}", f"SELECT {i}"))
    cache = c.t._parse_cache
    assert len(cache) == cache.maxsize == 1024
    assert Parse("s1099", "SELECT 1099").encode()[5:] in cache
    assert Parse("s0", "SELECT 0").encode()[5:] not in cache  # the oldest went first
    big = Parse("big", "SELECT '" + "x" * 5000 + "'")
    assert c.t.peek(Frontend.PARSE, memoryview(big.encode())[5:])[1] == "big"
    assert big.encode()[5:] not in cache  # one-off big statements are not kept


def test_a_parse_body_read_again_after_client_encoding_changes_reads_in_the_new_encoding() -> None:
    """The parse cache holds decoded text: bytes read under one client_encoding must not keep that reading."""
    c = Conversation()
    body = b"s\0" + "SELECT 'é'".encode() + b"\0\0\0"
    c.server(parameter_status("client_encoding", "UTF8"))
    assert c.t.peek(Frontend.PARSE, memoryview(body))[0] == "SELECT 'é'"
    c.server(parameter_status("client_encoding", "LATIN1"))
    assert c.t.peek(Frontend.PARSE, memoryview(body))[0] == "SELECT 'Ã©'"  # the server reads these bytes so


def test_names_read_in_the_client_encoding_and_params_recorded_whatever_it_is() -> None:
    """Bind, Describe, Execute and Close name statements and portals in the client's encoding; the audit
    reads a Bind's values whatever encoding its names are in."""
    c = Conversation()
    c.server(parameter_status("client_encoding", "LATIN1"))
    parse = frame(Frontend.PARSE, b"n\xe9\0SELECT $1\0\0\0")
    bind = frame(Frontend.BIND, b"p\xe9\0n\xe9\0" + Bind("", "", (), (b"1",)).encode()[7:])
    c.client(parse, bind, frame(Frontend.DESCRIBE, b"Pp\xe9\0"), frame(Frontend.EXECUTE, b"p\xe9\0\0\0\0\0"), Sync())
    c.server(PARSE_COMPLETE, BIND_COMPLETE, RowDescription(()), CommandComplete("SELECT 1"), ready("I"))
    [res] = c.done()
    assert (res.sql, res.statement_name, res.params) == ("SELECT $1", "né", (b"1",))
    assert "pé" in c.t.portals and c.t.statements == {"né": "SELECT $1"}
    c.client(frame(Frontend.CLOSE, b"Sn\xe9\0"), frame(Frontend.CLOSE, b"Pp\xe9\0"), Sync())
    assert c.t.portals == {} and c.t.statements == {}


def test_a_close_of_neither_statement_nor_portal_is_refused_and_a_describe_left_to_the_server() -> None:
    c = Conversation()
    with pytest.raises(ProtocolViolation, match="invalid Close message"):
        c.client(frame(Frontend.CLOSE, b"X\0"))
    [pending] = c.client(frame(Frontend.DESCRIBE, b"X\0"), Sync())[:1]
    assert pending is not None and pending.kind is Kind.DESCRIBE
    c.server(err("08P01", "invalid DESCRIBE message subtype 88"), ready("I"))
    assert c.t.idle


def test_unnamed_statements_and_portals_are_refused_in_an_unsupported_client_encoding() -> None:
    """The tracker reads the unnamed statement and portal (most requests) without building a message view;
    like the views, it must refuse them when the proxy cannot read the client's encoding, or it would
    track requests whose other strings it could not judge."""
    c = Conversation()
    c.server(parameter_status("client_encoding", "MULE_INTERNAL"))
    assert c.t.codec is None
    for request in (Bind("", "", (), (b"1",), (0,)), Describe("P", ""), Execute("", 0)):
        with pytest.raises(ProtocolViolation) as refused:
            c.client(request)
        assert refused.value.sqlstate == "0A000"
        if not isinstance(request, Describe):  # what the gates read: peek refuses the same
            with pytest.raises(ProtocolViolation) as peeked:
                c.t.peek(request.TYPE, memoryview(request.encode())[5:])
            assert peeked.value.sqlstate == "0A000"
    assert c.t.idle

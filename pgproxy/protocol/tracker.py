"""Pair every server response with the client request that caused it.

The PostgreSQL protocol answers requests strictly in order, so a FIFO of outstanding requests is enough
to know, for each response, which Query, Parse, Bind, Describe, Execute, Close, Sync or FunctionCall it
belongs to — even when a client pipelines many of them. From that pairing the tracker produces one
``StatementResult`` per executed statement (text, bound parameters, command tags, error) for the audit
sink, knows when the session is idle, and lets a refused request be answered with the proxy's own error
in exactly the place where the server would have answered it.

Sans-I/O: fed message types and bodies, it never touches a socket.
"""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from cachebox import FIFOCache

from .codec import ProtocolViolation, invalid_utf8
from .messages import Bind, Close, Describe, ErrorResponse, Execute, FunctionCall, Parse, Query, bind_names, tag_rows
from .types import Backend as B
from .types import Frontend as F
from .types import backend_name


class Kind(Enum):
    QUERY = "Q"
    PARSE = "P"
    BIND = "B"
    DESCRIBE = "D"
    EXECUTE = "E"
    CLOSE = "C"
    SYNC = "S"
    FUNCTION = "F"


# Members as module constants: looking one up on the Enum class costs several times more, per message.
_QUERY, _PARSE, _BIND, _DESCRIBE = Kind.QUERY, Kind.PARSE, Kind.BIND, Kind.DESCRIBE
_EXECUTE, _CLOSE, _SYNC, _FUNCTION = Kind.EXECUTE, Kind.CLOSE, Kind.SYNC, Kind.FUNCTION

# Requests that end with ReadyForQuery.
_SYNC_POINTS = (_QUERY, _SYNC, _FUNCTION)  # tuples, not sets: membership by identity, no Enum.__hash__
_PARSE_OR_BIND = (_PARSE, _BIND)
_BIND_OR_CLOSE = (_BIND, _CLOSE)  # BindComplete and CloseComplete are accepted for either
_DESCRIBE_ONLY = (_DESCRIBE,)

# Backend message types the tracker must see; every other type (DataRow, CopyData, notices, ...)
# can bypass it, which keeps the per-row path free of Python calls.
TRACKED_BACKEND_TYPES = frozenset({
    B.PARSE_COMPLETE, B.BIND_COMPLETE, B.CLOSE_COMPLETE, B.PARAMETER_DESCRIPTION, B.ROW_DESCRIPTION, B.NO_DATA,
    B.COMMAND_COMPLETE, B.EMPTY_QUERY_RESPONSE, B.PORTAL_SUSPENDED, B.ERROR_RESPONSE, B.READY_FOR_QUERY,
    B.FUNCTION_CALL_RESPONSE, B.COPY_IN_RESPONSE, B.COPY_OUT_RESPONSE, B.COPY_BOTH_RESPONSE, B.PARAMETER_STATUS,
})
TRACKED_FRONTEND_TYPES = frozenset({
    F.QUERY, F.PARSE, F.BIND, F.DESCRIBE, F.EXECUTE, F.CLOSE, F.SYNC, F.FUNCTION_CALL, F.COPY_DONE, F.COPY_FAIL,
})
# Bound once: looking a member up on its enum class costs several times an int comparison.
_QUERY_MSG, _PARSE_MSG, _BIND_MSG, _EXECUTE_MSG, _FUNCTION_MSG = F.QUERY, F.PARSE, F.BIND, F.EXECUTE, F.FUNCTION_CALL
_SYNC_TYPE = F.SYNC
_PARSE_COMPLETE, _BIND_COMPLETE, _CLOSE_COMPLETE, _NO_DATA = (
    B.PARSE_COMPLETE, B.BIND_COMPLETE, B.CLOSE_COMPLETE, B.NO_DATA)
_query_view, _execute_view, _describe_view = Query.view, Execute.view, Describe.view
_DESCRIBE_UNNAMED_PORTAL = b"P\x00"
_TRANSACTION_STATES = {ord(status): status for status in "ITE"}  # ReadyForQuery's byte -> transaction status


class StatementText(Protocol):
    """A request's statement as its caller read it (pgproxy.core.statement.Statement): its text, decoded."""

    @property
    def sql(self) -> str: ...


_PARSE_CACHE_LIMIT = 1024
_PARSE_CACHE_MAX_BODY = 4096  # bytes: the cache holds at most ~4 MiB per session


class Desync(ProtocolViolation):
    """The server sent a response that no outstanding request accounts for.

    From then on the proxy cannot tell which statement an answer belongs to -- and the audit record,
    masking plan and refusal of each statement depend on that -- so the session must end.
    """

    def __init__(self, msg_type: int, expected: Kind | None, outstanding: int, transaction_status: str) -> None:
        awaited = f"an answer to {expected.name}" if expected is not None else "no answer"
        super().__init__(f"protocol desync: the server sent {backend_name(msg_type)} while {awaited} was due "
                         f"({outstanding} request(s) outstanding, transaction status {transaction_status})")
        self.msg_type = msg_type
        self.expected = expected
        self.outstanding = outstanding


@dataclass(slots=True)
class StatementResult:
    """One statement as it ran: what was asked and how the server answered. Never holds result rows.

    Bound parameters are kept as the raw Bind body and decoded only when read, so a statement nobody
    inspects costs no decoding.
    """

    # The fields set when a request is tracked come first: the tracker builds one per statement with
    # positional arguments, several times faster than with keywords.
    protocol: str  # "simple", "extended" or "function"
    sql: str
    started_at: float  # wall clock, seconds since the epoch
    bind_body: bytes | None = None
    statement_name: str | None = None
    param_types: tuple[int, ...] = ()  # type OIDs the Parse declared (0 = server infers), for replay
    statement: StatementText | None = None  # the request's Statement, when the caller read one (track_statement)
    duration_ms: float = 0.0
    tags: list[str] = field(default_factory=list)
    error: ErrorResponse | None = None
    refused: bool = False
    # Filled only when the signed audit log captures results (pgproxy.core.capture): the last
    # RowDescription body, a SHA-256 over every DataRow message as sent, rows seen, the first rows'
    # bodies (up to the configured cap), notices and CopyData bytes sent to the client.
    row_description: bytes | None = None
    row_digest: Any = None  # hashlib sha256 object; None while the sample rows hold every row (ResultCapture)
    rows_sent: int = 0
    sample_rows: list[bytes] | None = None
    notices: list[bytes] | None = None
    copy_out_bytes: int = 0

    @property
    def rows(self) -> int | None:
        """Rows reported by the command tags (summed over a multi-statement query), None if none did."""
        tags = self.tags
        if len(tags) == 1:  # nearly every statement
            return tag_rows(tags[0])
        counts = [n for n in map(tag_rows, tags) if n is not None]
        return sum(counts) if counts else None

    @property
    def bind(self) -> Bind | None:
        """The decoded Bind; None when there was none or it was malformed (the server rejected it too)."""
        return Bind.lenient(self.bind_body)

    @property
    def params(self) -> tuple[bytes | None, ...]:
        bind = self.bind
        return bind.params if bind is not None else ()

    @property
    def param_formats(self) -> tuple[int, ...]:
        bind = self.bind
        return bind.param_formats if bind is not None else ()


@dataclass(slots=True)
class Pending:
    """An outstanding request; ``refusal`` replaces the server's error for a request the proxy refused.

    ``result`` exists from the start for requests that run a statement (Query, Execute, FunctionCall);
    for Parse and Bind it is created only if they fail, since only then are they worth recording.
    The tracker builds one per request with positional arguments (keywords cost several times more).
    """

    kind: Kind
    result: StatementResult | None = None
    started: float = 0.0
    portal: _Portal | None = None
    sql: str | None = None
    statement_name: str | None = None
    seq: int = 0  # order in which requests were sent
    statement: StatementText | None = None  # the request's Statement, when the caller read one (track_statement)
    refusal: ErrorResponse | None = None
    # SQLSTATE the substituted request is expected to fail with; only that error is replaced.
    refusal_expected_sqlstate: str | None = None


@dataclass(slots=True)
class _Portal:
    sql: str
    statement_name: str
    bind_body: bytes


# PostgreSQL client encodings and the Python codecs that read them. The server interprets a client's
# bytes in its client_encoding, so the proxy must judge and record them the same way.
CLIENT_ENCODINGS = {
    "UTF8": "utf-8", "SQL_ASCII": "latin-1", "LATIN1": "iso8859-1", "LATIN2": "iso8859-2",
    "LATIN3": "iso8859-3", "LATIN4": "iso8859-4", "LATIN5": "iso8859-9", "LATIN6": "iso8859-10",
    "LATIN7": "iso8859-13", "LATIN8": "iso8859-14", "LATIN9": "iso8859-15", "LATIN10": "iso8859-16",
    "ISO_8859_5": "iso8859-5", "ISO_8859_6": "iso8859-6", "ISO_8859_7": "iso8859-7", "ISO_8859_8": "iso8859-8",
    "WIN866": "cp866", "WIN874": "cp874", "WIN1250": "cp1250", "WIN1251": "cp1251", "WIN1252": "cp1252",
    "WIN1253": "cp1253", "WIN1254": "cp1254", "WIN1255": "cp1255", "WIN1256": "cp1256", "WIN1257": "cp1257",
    "WIN1258": "cp1258", "KOI8R": "koi8-r", "KOI8U": "koi8-u", "EUC_JP": "euc_jp", "EUC_KR": "euc_kr",
    "EUC_CN": "gb2312", "EUC_JIS_2004": "euc_jis_2004", "SJIS": "shift_jis", "SHIFT_JIS_2004": "shift_jis_2004",
    "BIG5": "big5", "GBK": "gbk", "GB18030": "gb18030", "UHC": "cp949", "JOHAB": "johab",
}


class ExchangeTracker:
    """FIFO of outstanding requests for one session; produces finished StatementResults.

    ``frontend_handlers`` / ``backend_handlers`` map message types to the methods that account for
    them, so the relay calls straight into the right one; ``on_frontend`` / ``on_backend`` dispatch
    through the same maps for callers that have a type byte in hand.
    """

    def __init__(self, on_desync: Callable[[], None] | None = None) -> None:
        self.queue: deque[Pending] = deque()
        # Called (to count it) just before a Desync is raised.
        self.on_desync = on_desync
        self.statements: dict[str, str] = {}
        self.portals: dict[str, _Portal] = {}
        self.finished: list[StatementResult] = []
        self.transaction_status = "I"
        # The entry the last frontend message created (None when it created none).
        self.last_request: Pending | None = None
        # The statement whose Describe the last RowDescription/NoData answered (None: a portal or none).
        self.last_described: str | None = None
        self.codec: str | None = "utf-8"  # Python codec of the session's client_encoding (None: unsupported)
        self.standard_conforming_strings = True  # as the server last reported it
        # Prepared statements whose text the server reads differently from its default reading
        # (standard_conforming_strings was off at their Parse): name -> the server's reading.
        self.readings: dict[str, str] = {}
        # Statements and portals Described (in requests already sent): their rows' columns are known.
        self._described_statements: set[str] = set()
        self._described_portals: set[str] = set()
        self._ready_seq = 0  # the last request a ReadyForQuery answered (0: the startup)
        self._last_run_seq = -1  # the last request that ran a statement (note_run)
        # First in, first out: a hit costs one lookup (an LRU cache also reorders on every hit).
        self._parse_cache: FIFOCache[bytes, tuple[str, str, tuple[int, ...]]] = FIFOCache(_PARSE_CACHE_LIMIT)
        self._param_types: dict[str, tuple[int, ...]] = {}  # statement name -> declared parameter types
        # Parsed statements the server has not confirmed yet: a failed Parse must not rename anything.
        self._inflight: dict[str, str] = {}
        # After an extended-protocol error the server ignores everything up to the next Sync.
        self._skipping = False
        # During COPY FROM STDIN the server ignores Sync (and Flush); libpq sends one before and after.
        self._client_in_copy = False
        self._copy_end_seq = 0
        self._seq = 1  # 0: the startup exchange
        self._statement: StatementText | None = None  # handed in by track_statement for the request at hand
        self.frontend_handlers: dict[int, Callable[[memoryview], None]] = {
            F.BIND: self._bind, F.EXECUTE: self._execute, F.PARSE: self._parse_request, F.SYNC: self._sync,
            F.DESCRIBE: self._describe, F.QUERY: self._query, F.CLOSE: self._close,
            F.FUNCTION_CALL: self._function_call, F.COPY_DONE: self._copy_end, F.COPY_FAIL: self._copy_end,
        }
        self.backend_handlers: dict[int, Callable[[memoryview], bytes | None]] = {
            # Answers that only end the request at the head: one frame each (partial is not one).
            B.PARSE_COMPLETE: self._parse_complete,
            B.BIND_COMPLETE: functools.partial(self._pop_expected, _BIND_OR_CLOSE, _BIND_COMPLETE),
            B.CLOSE_COMPLETE: functools.partial(self._pop_expected, _BIND_OR_CLOSE, _CLOSE_COMPLETE),
            B.PARAMETER_DESCRIPTION: _ignore, B.ROW_DESCRIPTION: self._row_description,
            B.NO_DATA: functools.partial(self._pop_expected, _DESCRIBE_ONLY, _NO_DATA),
            B.COMMAND_COMPLETE: self._command_complete, B.EMPTY_QUERY_RESPONSE: self._execute_done,
            B.PORTAL_SUSPENDED: self._execute_done, B.ERROR_RESPONSE: self._error,
            B.READY_FOR_QUERY: self._ready_for_query, B.FUNCTION_CALL_RESPONSE: _ignore,
            B.COPY_IN_RESPONSE: self._copy_in_response, B.COPY_OUT_RESPONSE: _ignore,
            B.COPY_BOTH_RESPONSE: _ignore, B.PARAMETER_STATUS: self._parameter_status,
        }

    @property
    def idle(self) -> bool:
        """True when no request is waiting for its answer."""
        return not self.queue

    def on_frontend(self, msg_type: int, body: bytes | memoryview) -> Pending | None:
        """Record a request about to be forwarded; returns its queue entry (None when the server will
        not answer it: untracked types, requests it will skip after an error, Sync during COPY)."""
        self.last_request = None
        handler = self.frontend_handlers.get(msg_type)
        if handler is not None:
            handler(memoryview(body))
        return self.last_request

    def on_backend(self, msg_type: int, body: bytes | memoryview) -> bytes | None:
        """Account for one server message; returns replacement bytes for a refused request."""
        handler = self.backend_handlers.get(msg_type)
        return handler(memoryview(body)) if handler is not None else None

    def track_statement(self, msg_type: int, body: memoryview, statement: StatementText) -> None:
        """Record a statement-bearing request whose text the caller already read from this body (``peek``)
        into ``statement``: the text is not decoded again, and the request's entries carry ``statement``."""
        self._statement = statement
        try:
            self.frontend_handlers[msg_type](body)
        finally:
            self._statement = None

    def peek(self, msg_type: int, body: memoryview) -> tuple[str, str | None, bytes | None]:
        """(sql, statement name, raw Bind body) a Query/Parse/Bind/Execute/FunctionCall refers to,
        read without changing any state (gates look before the tracker records)."""
        if msg_type == _QUERY_MSG:
            return _query_view(body, self.codec).sql, None, None
        if msg_type == _PARSE_MSG:
            name, query, _ = self._parse(bytes(body))
            return query, name, None
        if msg_type == _BIND_MSG:
            raw = bytes(body)
            statement = bind_names(raw, self.codec)[1]
            sql = self._inflight.get(statement)
            return (sql if sql is not None else self.statements.get(statement, "")), statement, raw
        if msg_type == _EXECUTE_MSG:
            portal = self.portals.get(self._execute_portal(body))
            if portal is None:
                return "", None, None
            return portal.sql, portal.statement_name, portal.bind_body
        if msg_type == _FUNCTION_MSG:
            return f"<function call oid={FunctionCall.decode(body).function_oid}>", None, None
        raise ValueError(f"message type {chr(msg_type)!r} names no statement")

    @property
    def server_codec(self) -> str:
        """The codec of the texts the server sends this session (its client_encoding)."""
        return self.codec or "latin-1"  # an encoding pgproxy cannot read: keep going, byte for byte

    def portal_described(self, body: memoryview) -> bool:
        """Whether the server will have described the portal an Execute runs (its statement or the
        portal itself was Described since it was made): the shape of the rows that follow is known."""
        return self._execute_portal(body) in self._described_portals

    def _execute_portal(self, body: memoryview) -> str:
        """The portal an Execute names: the unnamed one (most of them) read as the view reads it, without one."""
        codec = self.codec
        return "" if body and body[0] == 0 and codec is not None else _execute_view(body, codec).portal

    def drain(self) -> list[StatementResult]:
        """Hand over (and forget) the statements finished since the last call."""
        done, self.finished = self.finished, []
        return done

    # ----------------------------------------------------------------------------------------- frontend

    def _push(self, kind: Kind, result: StatementResult | None = None, started: float = 0.0,
              portal: _Portal | None = None, sql: str | None = None, statement_name: str | None = None) -> None:
        seq = self._seq
        self._seq = seq + 1
        p = Pending(kind, result, started, portal, sql, statement_name, seq, self._statement)
        self.queue.append(p)
        self.last_request = p

    def _ignored_by_server(self, msg_type: int) -> bool:
        """While the server skips to Sync or copies in, decide whether it will ignore this request."""
        if self._client_in_copy or msg_type != _SYNC_TYPE:
            self.last_request = None
            return True
        self._skipping = False  # this Sync ends the skipping
        return False

    def _bind(self, body: memoryview) -> None:  # the hottest request: keep the raw body, decode names only
        if (self._skipping or self._client_in_copy) and self._ignored_by_server(F.BIND):
            return
        raw = bytes(body)
        portal_name, statement = bind_names(raw, self.codec)
        sql = self._inflight.get(statement)
        portal = _Portal(sql if sql is not None else self.statements.get(statement, ""), statement, raw)
        self.portals[portal_name] = portal
        if statement in self._described_statements:
            self._described_portals.add(portal_name)
        else:
            self._described_portals.discard(portal_name)
        self._push(_BIND, None, time.perf_counter(), portal)

    def _execute(self, body: memoryview) -> None:
        if (self._skipping or self._client_in_copy) and self._ignored_by_server(F.EXECUTE):
            return
        found = self.portals.get(self._execute_portal(body))
        if found is None:
            result = StatementResult("extended", "", time.time())
        else:
            name = found.statement_name
            result = StatementResult("extended", found.sql, time.time(), found.bind_body, name,
                                     self._param_types.get(name, ()) if self._param_types else (), self._statement)
        self._push(_EXECUTE, result, time.perf_counter())

    def _parse_request(self, body: memoryview) -> None:
        if (self._skipping or self._client_in_copy) and self._ignored_by_server(F.PARSE):
            return
        name, query, types = self._parse(bytes(body))
        self._inflight[name] = query
        self._described_statements.discard(name)
        if types or name in self._param_types:
            self._param_types[name] = types
        self._push(_PARSE, None, time.perf_counter(), None, query, name)

    def _parse(self, raw: bytes) -> tuple[str, str, tuple[int, ...]]:
        """(statement name, query text, parameter type OIDs) of a Parse body, decoded and checked in the
        client's encoding; once per body."""
        try:
            return self._parse_cache[raw]
        except KeyError:
            pass
        parse = Parse.decode(raw, self.codec)
        fields = (parse.name, parse.query, parse.param_types)
        if len(raw) <= _PARSE_CACHE_MAX_BODY:  # big one-off statements are not worth keeping
            self._parse_cache[raw] = fields
        return fields

    def _sync(self, body: memoryview) -> None:
        if (self._skipping or self._client_in_copy) and self._ignored_by_server(F.SYNC):
            return
        self._push(_SYNC)

    def _describe(self, body: memoryview) -> None:
        if (self._skipping or self._client_in_copy) and self._ignored_by_server(F.DESCRIBE):
            return
        if body == _DESCRIBE_UNNAMED_PORTAL and self.codec is not None:  # most Describes: read as the view would
            kind, name = "P", ""
        else:
            describe = _describe_view(body, self.codec)
            kind, name = describe.kind, describe.name
        if kind == "S":
            statement: str | None = name
            self._described_statements.add(name)
        else:
            portal = self.portals.get(name) if kind == "P" else None
            statement = portal.statement_name if portal is not None else None
            self._described_portals.add(name)
            if statement is not None:  # its rows have these columns in every later portal too (pgjdbc)
                self._described_statements.add(statement)
        self._push(_DESCRIBE, None, 0.0, None, None, statement)

    def _query(self, body: memoryview) -> None:
        if (self._skipping or self._client_in_copy) and self._ignored_by_server(F.QUERY):
            return
        statement = self._statement
        sql = _query_view(body, self.codec).sql if statement is None else statement.sql
        self._push(_QUERY, StatementResult("simple", sql, time.time(), None, None, (), statement), time.perf_counter())

    def _close(self, body: memoryview) -> None:
        if (self._skipping or self._client_in_copy) and self._ignored_by_server(F.CLOSE):
            return
        close = Close.view(body, self.codec)
        kind = close.kind  # refuses one other than 'S' or 'P'
        name = close.name
        if kind == "S":
            self.statements.pop(name, None)
            self._described_statements.discard(name)
        else:
            self.portals.pop(name, None)
            self._described_portals.discard(name)
        self._push(_CLOSE)

    def _function_call(self, body: memoryview) -> None:
        if (self._skipping or self._client_in_copy) and self._ignored_by_server(F.FUNCTION_CALL):
            return
        oid = FunctionCall.decode(body).function_oid
        self._push(_FUNCTION, StatementResult("function", f"<function call oid={oid}>", time.time(), None, None, (),
                                              self._statement), time.perf_counter())

    def _copy_end(self, body: memoryview) -> None:  # CopyDone / CopyFail
        self.last_request = None
        self._client_in_copy = False
        self._copy_end_seq = self._seq

    # ------------------------------------------------------------------------------------------ backend

    def _pop_expected(self, kinds: tuple[Kind, ...], msg_type: int, body: memoryview) -> None:
        queue = self.queue
        if not queue or queue[0].kind not in kinds:
            raise self._desync(msg_type)
        done = queue.popleft()
        if done.result is not None:  # a successful Parse, Bind or Close has nothing to record
            self._finish(done)

    def _desync(self, msg_type: int) -> Desync:
        """The error ending the session for an unaccounted response (counted through ``on_desync``)."""
        queue = self.queue
        if self.on_desync is not None:
            self.on_desync()
        return Desync(msg_type, queue[0].kind if queue else None, len(queue), self.transaction_status)

    def _parse_complete(self, body: memoryview) -> None:
        queue = self.queue
        if not queue or queue[0].kind is not _PARSE:
            raise self._desync(_PARSE_COMPLETE)
        head = queue.popleft()
        name, sql = head.statement_name or "", head.sql or ""
        self.statements[name] = sql
        if self._inflight.get(name) is sql:  # _forget_inflight
            del self._inflight[name]
        if head.result is not None:
            self._finish(head)

    def _row_description(self, body: memoryview) -> None:
        """Ends a Describe; for a Query or Execute it only announces the rows."""
        queue = self.queue
        if queue and queue[0].kind is _DESCRIBE:
            self.last_described = queue.popleft().statement_name

    def _command_complete(self, body: memoryview) -> None:
        queue = self.queue
        result = queue[0].result if queue else None
        if result is None:
            raise self._desync(B.COMMAND_COMPLETE)
        try:
            result.tags.append(str(body[:-1], self.codec or "latin-1"))  # server_codec
        except UnicodeDecodeError as exc:
            raise invalid_utf8(exc) from None
        if queue[0].kind is _EXECUTE:
            self._finish(queue.popleft())

    def _execute_done(self, body: memoryview) -> None:  # EmptyQueryResponse, PortalSuspended
        queue = self.queue
        if queue and queue[0].kind is _EXECUTE:
            self._finish(queue.popleft())

    def _ready_for_query(self, body: memoryview) -> None:
        status = _TRANSACTION_STATES.get(body[0]) if len(body) == 1 else None
        if status is None:
            raise ProtocolViolation("invalid ReadyForQuery message")
        self.transaction_status = status
        queue = self.queue
        if not queue or queue[0].kind not in _SYNC_POINTS:
            raise self._desync(B.READY_FOR_QUERY)
        ready = queue.popleft()
        self._ready_seq = ready.seq
        if ready.result is not None:  # a Sync's has none
            self._finish(ready)

    def note_run(self) -> None:
        """The request just tracked runs a statement (Bind plans it, Execute, Query and a fast-path call
        run it). Any statement may change a setting the server lexes with (SET, set_config(), and also a
        trigger or a function it calls), and PostgreSQL reports the change only at its next ReadyForQuery."""
        if self.last_request is not None:
            self._last_run_seq = self.last_request.seq

    @property
    def synced(self) -> bool:
        """Every request sent was answered up to a ReadyForQuery: the server waits for a new command, in no
        extended-protocol exchange (a Parse or Bind without its Sync opens one) and skipping nothing."""
        return not self.queue and not self._skipping and self._ready_seq == self._seq - 1

    @property
    def settings_known(self) -> bool:
        """No statement ran since the last ReadyForQuery: the standard_conforming_strings and
        client_encoding last reported are those the server applies to the next text."""
        return self._last_run_seq <= self._ready_seq

    @property
    def settings_will_be_known(self) -> bool:
        """A request already sent ends with a ReadyForQuery after the last statement that ran."""
        last = self._last_run_seq
        return any(p.kind in _SYNC_POINTS and p.seq >= last for p in self.queue)

    def _parameter_status(self, body: memoryview) -> None:
        """Follow the settings the server's lexer reads the client's bytes with: so must we."""
        raw = bytes(body)
        if raw.startswith(b"client_encoding\0"):
            value = raw[len(b"client_encoding\0"):].rstrip(b"\0").decode("ascii", "replace").upper()
            codec = CLIENT_ENCODINGS.get(value)
            if codec != self.codec:  # a Parse body read before now reads differently from now on
                self._parse_cache.clear()
            self.codec = codec
        elif raw.startswith(b"standard_conforming_strings\0"):
            self.standard_conforming_strings = raw[len(b"standard_conforming_strings\0"):].rstrip(b"\0") == b"on"

    def _copy_in_response(self, body: memoryview) -> None:
        """The server now ignores Sync until the client's CopyDone/CopyFail: drop Syncs it will ignore."""
        if not self.queue:
            return
        head = self.queue[0]
        already_ended = self._copy_end_seq > head.seq
        limit = self._copy_end_seq if already_ended else self._seq
        kept = [p for p in self.queue if not (p.kind is _SYNC and head.seq < p.seq < limit)]
        if len(kept) != len(self.queue):
            self.queue = deque(kept)
        if not already_ended:
            self._client_in_copy = True

    def _forget_inflight(self, p: Pending) -> None:
        name = p.statement_name or ""
        if self._inflight.get(name) is p.sql:
            del self._inflight[name]

    def _error(self, body: memoryview) -> bytes | None:
        error = ErrorResponse.decode(body, self.server_codec)
        if not self.queue:
            return None  # an asynchronous error, e.g. FATAL on termination
        head = self.queue[0]
        if head.result is None and head.kind in _PARSE_OR_BIND:
            head.result = self._request_result(head)
        replacement = None
        if head.refusal is not None and error.sqlstate == head.refusal_expected_sqlstate:
            error = head.refusal
            replacement = error.encode()
            if head.result is not None:
                head.result.refused = True
        if head.result is not None:
            head.result.error = error
        if head.kind in _SYNC_POINTS:
            return replacement  # ReadyForQuery will finish it
        # Extended protocol: the server now skips everything up to the next Sync.
        self._client_in_copy = False
        failed = self.queue.popleft()
        if failed.kind is _PARSE:
            self._forget_inflight(failed)
        if failed.result is not None:
            self._finish(failed)
        while self.queue and self.queue[0].kind is not _SYNC:
            skipped = self.queue.popleft()
            if skipped.kind is _PARSE:
                self._forget_inflight(skipped)
        if not self.queue:
            self._skipping = True  # the client has not sent its Sync yet
        return replacement

    @staticmethod
    def _request_result(p: Pending) -> StatementResult:
        """A record for a Parse or Bind that failed (successful ones are not statements)."""
        if p.portal is not None:
            return StatementResult("extended", p.portal.sql, time.time(), bind_body=p.portal.bind_body,
                                   statement_name=p.portal.statement_name, statement=p.statement)
        return StatementResult("extended", p.sql or "", time.time(), statement_name=p.statement_name,
                               statement=p.statement)

    def _finish(self, pending: Pending) -> None:
        result = pending.result
        if result is None:
            return
        if pending.kind in _PARSE_OR_BIND and result.error is None and not result.refused:
            return  # a successful Parse/Bind is not a statement; its Execute is
        result.duration_ms = (time.perf_counter() - pending.started) * 1000.0
        self.finished.append(result)


def _ignore(body: memoryview) -> None:
    """Responses that need no accounting (the request at the head goes on)."""

"""Result capture for the signed audit log: columns, rows sent, a digest over every DataRow, sample rows.

The session installs these backend hooks only when its sink asks for results (``capture_results``).
Per DataRow the cost is, under the cap, one list append and a counter; rows are decoded only when the
statement event is built. The digest is computed then from the sample rows, which hold every row of a
result no longer than the cap (most results); past the cap it is fed row by row, starting with them.

Row digest (docs/audit.md): SHA-256 over the concatenation, in order, of every DataRow message sent to
the client for the statement, each as its full wire bytes: ``'D'`` (0x44), the int32 big-endian length
(body length + 4), then the body.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from typing import Any

from ..protocol.codec import ProtocolViolation, header
from ..protocol.messages import Bind, NoticeResponse, RowDescription, param_formats, row_values
from ..protocol.tracker import ExchangeTracker, Kind, StatementResult
from ..protocol.types import Backend

MAX_VALUE_BYTES = 4096
_DATA_ROW = Backend.DATA_ROW
_EXECUTING = (Kind.QUERY, Kind.EXECUTE, Kind.FUNCTION)
_EMPTY_DIGEST = hashlib.sha256().hexdigest()


class ResultCapture:
    """Hooks for 'T', 'D', 'N' and 'd' backend messages; feeds the StatementResult at the queue's head.

    A result's ``row_digest`` stays None while its sample rows hold every row (see the module docstring).
    """

    __slots__ = ("_described", "max_rows", "tracker")

    def __init__(self, tracker: ExchangeTracker, max_rows: int) -> None:
        self.tracker = tracker
        self.max_rows = max_rows
        self._described: dict[str, bytes] = {}  # statement name -> its last RowDescription

    def on_row_description(self, body: memoryview) -> None:
        # The tracker ran first: a Describe answered by this message is already popped, so the head is
        # the Execute (or Query) whose rows follow.
        queue = self.tracker.queue
        if queue:
            head = queue[0]
            r = head.result
            if r is not None and head.kind in _EXECUTING:
                raw = bytes(body)
                r.row_description = raw
                if r.statement_name is not None:
                    self._described[r.statement_name] = raw

    def on_data_row(self, body: memoryview) -> None:
        queue = self.tracker.queue
        if not queue:
            return
        r = queue[0].result
        if r is None:
            return
        n = r.rows_sent
        r.rows_sent = n + 1
        if n == 0:
            r.sample_rows = []
            if r.row_description is None and r.statement_name is not None:
                r.row_description = self._described.get(r.statement_name)
        if n < self.max_rows:
            r.sample_rows.append(bytes(body))  # type: ignore[union-attr]
            return
        digest = r.row_digest
        if digest is None:  # the first row past the cap: the digest starts with the sample rows
            digest = r.row_digest = hashlib.sha256(_as_sent(r.sample_rows))  # type: ignore[arg-type]
        digest.update(header(_DATA_ROW, len(body)))
        digest.update(body)

    def on_notice(self, body: memoryview) -> None:
        queue = self.tracker.queue
        if queue and queue[0].result is not None:
            r = queue[0].result
            if r.notices is None:
                r.notices = []
            if len(r.notices) < 20:
                r.notices.append(bytes(body))

    def on_copy_data(self, body: memoryview) -> None:
        queue = self.tracker.queue
        if queue and queue[0].result is not None:
            queue[0].result.copy_out_bytes += len(body)


@functools.lru_cache(maxsize=1024)
def _columns(row_description: bytes, encoding: str) -> tuple[tuple[dict[str, Any], ...], tuple[int, ...],
                                                             tuple[str, ...]]:
    """Column names, types and formats of a RowDescription (as recorded, the formats, the names);
    repeated statements decode it once.

    The dicts are shared between records: never mutate them.
    """
    try:
        fields = RowDescription.decode(row_description, encoding).fields
    except ProtocolViolation:
        return (), (), ()
    return (tuple({"name": f.name, "type_oid": f.type_oid, "format": f.format_code} for f in fields),
            tuple(f.format_code for f in fields), tuple(f.name for f in fields))


def audit_value(value: bytes | None, fmt: int, encoding: str = "utf-8") -> str | None:
    """A parameter or cell as recorded: text as text (in the session's encoding), binary as hex, both
    capped in size."""
    if value is None:
        return None
    if len(value) <= MAX_VALUE_BYTES:  # the usual case: no clipping
        return value.decode(encoding, "replace") if fmt == 0 else "\\x" + value.hex()
    clipped = value[:MAX_VALUE_BYTES]
    suffix = f"...({len(value)} bytes)"
    if fmt == 0:
        return clipped.decode(encoding, "replace") + suffix
    return "\\x" + clipped.hex() + suffix


def audit_values(values: Sequence[bytes | None], formats: tuple[int, ...], encoding: str) -> list[str | None]:
    """Parameters or a row's cells as recorded (``audit_value``), ``formats`` giving each one's format
    (a missing one: text)."""
    if not any(formats):  # all text, the usual case: audit_value's text branch, inline
        return [v if v is None else v.decode(encoding, "replace") if len(v) <= MAX_VALUE_BYTES
                else audit_value(v, 0, encoding) for v in values]
    return [audit_value(v, formats[i] if i < len(formats) else 0, encoding) for i, v in enumerate(values)]


def _as_sent(rows: list[bytes]) -> bytes:
    """DataRow bodies as the messages sent: what the row digest covers."""
    return b"".join([header(_DATA_ROW, len(raw)) + raw for raw in rows])


def _row_digest(r: StatementResult) -> str:
    """The hex row digest: fed row by row past the cap, else over the sample rows (every row)."""
    digest = r.row_digest
    if digest is None:
        return hashlib.sha256(_as_sent(r.sample_rows)).hexdigest() if r.sample_rows else _EMPTY_DIGEST
    return str(digest.hexdigest())


def add_result_fields(event: dict[str, Any], r: StatementResult, bind: Bind | None, encoding: str,
                      texts: list[str | None]) -> None:
    """Add the signed log's extra statement fields to ``event``: ``result``, ``notices``, formats for
    replay; every string added (bar the hex digest) also goes to ``texts``, which the audit emitter
    screens for secrets instead of the whole record.

    ``bind`` is the statement's Bind (``Bind.lenient``, read once by the caller), if any.
    """
    if bind is not None:
        codes, params, result_formats = bind.values
        if codes:
            event["param_formats"] = list(param_formats(codes, len(params)))
        if result_formats:
            event["result_formats"] = list(result_formats)
    if r.param_types and any(r.param_types):
        event["param_types"] = list(r.param_types)
    result: dict[str, Any] = {"rows_sent": r.rows_sent, "row_digest": _row_digest(r)}
    formats: tuple[int, ...] = ()
    if r.row_description is not None:
        columns, formats, names = _columns(r.row_description, encoding)
        if columns:
            result["columns"] = list(columns)
            texts += names
    if r.sample_rows:
        rows = []
        for raw in r.sample_rows:
            try:
                row = audit_values(row_values(raw), formats, encoding)
            except ProtocolViolation:
                continue
            texts += row
            rows.append(row)
        result["sample_rows"] = rows
        result["rows_truncated"] = r.rows_sent > len(rows)
    if r.copy_out_bytes:
        result["copy_out_bytes"] = r.copy_out_bytes
    event["result"] = result
    if r.notices:
        notices = []
        for raw in r.notices:
            try:
                n = NoticeResponse.decode(raw, encoding)
            except ProtocolViolation:
                continue
            texts += (n.severity, n.sqlstate, n.message)
            notices.append({"severity": n.severity, "sqlstate": n.sqlstate, "message": n.message})
        event["notices"] = notices

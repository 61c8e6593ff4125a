"""The wire backstop of masking: what leaves the server for a masked identity is checked once more.

- RowDescription names each column's table OID and column number. A column that is a raw masked column
  (which the statement rewrite should have made impossible) is masked in every DataRow that follows:
  text-format string values with the Python form of the mask, everything else as NULL.
- ErrorResponse and NoticeResponse details that quote row values ("Failing row contains (...)",
  "Key (col)=(...)") are replaced: the write path of the server sees raw rows.
- NotificationResponse payloads are emptied unless the channel is listed in
  ``masking.notification_channels`` (a trigger may NOTIFY raw values).

Sans-I/O: functions of message bodies; the session installs them as backend hooks, before result capture,
so the audit log only ever sees what the client sees.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from cachebox import FIFOCache
from cachetools import LRUCache, cached
from pglast import ast

from ..core.statement import SqlSyntaxError, parse
from ..protocol.codec import frame
from ..protocol.messages import NotificationResponse, RowDescription, row_values, values_body
from ..protocol.tracker import ExchangeTracker, Kind
from ..protocol.types import Backend
from .masks import Mask, MaskKey

if TYPE_CHECKING:
    from .catalog import MaskedSchema

_DATA_ROW = Backend.DATA_ROW  # bound once: an enum attribute lookup costs more than the framing
_HIDDEN = "values hidden by pgproxy masking"
_VALUE_DETAILS = (
    (re.compile(r"^(Failing row contains )\(.*\)(\.?)$", re.S), rf"\1({_HIDDEN})\2"),
    (re.compile(r"^(Key \([^)]*\))=\(.*?\)( .*)?$", re.S), rf"\1=({_HIDDEN})\2"),
    (re.compile(r"^(Key \([^)]*\))=\(.*$", re.S), rf"\1=({_HIDDEN})"),
)
# A plan: per column index, the mask and whether the values come in text format (None: unknown).
Plan = tuple[tuple[int, Mask, bool], ...]
DESCRIPTIONS_KEPT = 32  # per session: the plans of the row descriptions it saw last


_ROW_STATEMENTS = (ast.SelectStmt, ast.VariableShowStmt, ast.FetchStmt, ast.ExplainStmt, ast.ExecuteStmt,
                   ast.CallStmt)
_RETURNING_STATEMENTS = (ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt, ast.MergeStmt)


@cached(LRUCache(maxsize=4096))
def may_return_rows(sql: str) -> bool:
    """Whether running ``sql`` may send DataRows (a query, SHOW, FETCH, EXPLAIN, EXECUTE, CALL, RETURNING);
    a text that does not parse may."""
    try:
        statements = parse(sql)
    except SqlSyntaxError:
        return True
    for raw in statements:
        stmt = raw.stmt
        if isinstance(stmt, _ROW_STATEMENTS):
            return True
        if isinstance(stmt, _RETURNING_STATEMENTS) and getattr(stmt, "returningClause", None):
            return True
    return False


def hide_value_detail(detail: str) -> str | None:
    """The detail with quoted row values replaced, or None when it quotes none."""
    for pattern, replacement in _VALUE_DETAILS:
        hidden, n = pattern.subn(replacement, detail)
        if n:
            return hidden
    return None


def scrub_fields(body: bytes, encoding: str = "utf-8") -> bytes | None:
    """An ErrorResponse/NoticeResponse body with value-quoting DETAIL replaced; None if unchanged."""
    fields = body.split(b"\x00")
    changed = False
    for i, field in enumerate(fields):
        if field[:1] == b"D":
            hidden = hide_value_detail(field[1:].decode(encoding, "replace"))
            if hidden is not None:
                fields[i] = b"D" + hidden.encode(encoding, "replace")
                changed = True
    return b"\x00".join(fields) if changed else None


class WireMasker:
    """Backend hooks for one masked session."""

    def __init__(self, tracker: ExchangeTracker, schema: Callable[[], MaskedSchema | None],
                 channels: frozenset[str], hook_rows: Callable[[], None],
                 on_masked: Callable[[int], None] | None = None) -> None:
        self.tracker = tracker
        # Installs ``on_data_row``: only once a raw masked column is seen, so the per-row path of
        # a masked session costs nothing while the statement rewrite does its job.
        self._hook_rows: Callable[[], None] | None = hook_rows
        self._schema = schema  # the session's current MaskedSchema (None until the catalog is read)
        self.channels = channels
        self.on_masked = on_masked
        self._plans: dict[str, Plan] = {}  # statement name -> plan from its Describe
        # RowDescription body -> its plan under ``_described_wire`` (a statement's repeats describe the same rows)
        self._by_description: FIFOCache[bytes, Plan] = FIFOCache(DESCRIPTIONS_KEPT)
        self._described_wire: Mapping[tuple[int, int], Mask] | None = None
        self._result: object = None
        self._plan: Plan = ()

    def forget(self, statement: str) -> None:
        """A statement name was re-parsed: its old description no longer applies."""
        self._plans.pop(statement, None)

    def _wire_masks(self) -> Mapping[tuple[int, int], Mask]:
        schema = self._schema()
        return schema.wire if schema is not None else {}

    def on_row_description(self, body: memoryview) -> None:
        wire = self._wire_masks()
        if not wire:
            return
        if wire is not self._described_wire:  # another catalog: its masks apply from now on
            self._by_description.clear()
            self._described_wire = wire
        raw = bytes(body)
        plan = self._by_description.get(raw)
        if plan is None:
            description = RowDescription.decode(raw, self.tracker.server_codec)
            plan = self._by_description[raw] = tuple(
                (i, wire[(f.table_oid, f.column_number)], f.format_code == 0)
                for i, f in enumerate(description.fields) if (f.table_oid, f.column_number) in wire)
        if plan and self._hook_rows is not None:
            self._hook_rows()
            self._hook_rows = None
        queue = self.tracker.queue
        head = queue[0] if queue else None
        if head is not None and head.kind in (Kind.QUERY, Kind.EXECUTE) and head.result is not None:
            self._result, self._plan = head.result, plan
            if head.result.statement_name is not None:
                self._plans[head.result.statement_name] = plan
        elif self.tracker.last_described is not None:
            # A statement Describe: formats are chosen later by Bind, so values are treated as unknown.
            self._plans[self.tracker.last_described] = tuple((i, m, False) for i, m, _ in plan)

    def on_data_row(self, body: memoryview) -> bytes | None:
        queue = self.tracker.queue
        result = queue[0].result if queue else None
        if result is not self._result:
            self._result = result
            name = getattr(result, "statement_name", None)
            self._plan = self._plans.get(name, ()) if name is not None else ()
        if not self._plan:
            return None
        schema = self._schema()
        return mask_row(bytes(body), self._plan, schema.key if schema else None, self.on_masked,
                        self.tracker.server_codec)

    def on_error_or_notice(self, msg_type: int, body: memoryview) -> bytes | None:
        scrubbed = scrub_fields(bytes(body), self.tracker.server_codec)
        return frame(msg_type, scrubbed) if scrubbed is not None else None

    def on_notification(self, body: memoryview) -> bytes | None:
        note = NotificationResponse.decode(body, self.tracker.server_codec)
        if note.channel in self.channels or not note.payload:
            return None
        emptied = bytes(body[:4]) + bytes(body[4:]).split(b"\x00", 1)[0] + b"\x00\x00"
        return frame(Backend.NOTIFICATION_RESPONSE, emptied)


def mask_row(body: bytes, plan: Plan, key: MaskKey | None, on_masked: Callable[[int], None] | None,
             encoding: str = "utf-8") -> bytes:
    """The DataRow message (header included) of ``body`` with the planned columns masked."""
    values = row_values(body)
    masked = 0
    for index, mask, text in plan:
        raw = values[index] if index < len(values) else None
        if raw is None:
            continue
        replacement = None
        if text and mask.kind in ("redact", "partial", "email", "keyed_hash"):
            replacement = mask.mask_text(raw.decode(encoding, "replace"), key)
        values[index] = replacement.encode(encoding, "replace") if replacement is not None else None
        masked += 1
    if on_masked is not None and masked:
        on_masked(masked)
    return frame(_DATA_ROW, values_body(values))

"""Audit event kinds and the one emitter every event passes through on its way to a sink.

Producers (sessions, the policy gate, approval stores, the HTTP proxy) build an event as a dict whose
``event`` is one of ``EventKind``; ``AuditEmitter.emit`` then, for every kind and every sink:

- stamps ``ts`` (the time the event was recorded);
- redacts secrets in every string the event holds (``redact.redact_event``, once a keyword check over
  its encoding, or in the strings its producer lists, found one), so an
  ``ALTER ROLE ... PASSWORD '...'`` is never stored, whether it reaches the log as a ``statement``,
  a ``policy_decision`` or an ``approval_requested``;
- numbers the records of each session (``session_seq``, from 0) and gives the session's terminal
  record (``session_end``, or ``auth_failed`` for a refused login) ``session_records``, the session's
  record count: an evidence bundle proves with them that it holds every record of a session, in order;
- encodes it once (canonical JSON: the bytes both file sinks store, through their ``emit_encoded``);
- keeps the failure state: after a sink failed, ``check`` raises ``AuditUnavailable`` until a write
  succeeds again, so callers can refuse work before it runs rather than after.

Readers map stored records back to a kind with ``event_kind``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any

import orjson

from .logformat import canonical
from .redact import may_hold_secret_encoded, may_need_redaction, redact_event
from .sink import AuditSink, AuditUnavailable


class EventKind(StrEnum):
    SESSION_START = "session_start"
    AUTH_FAILED = "auth_failed"
    STATEMENT = "statement"
    SESSION_END = "session_end"
    POLICY_DECISION = "policy_decision"
    POLICY_APPROVAL = "policy_approval"
    APPROVAL_REQUESTED = "approval_requested"
    APPROVAL_DECIDED = "approval_decided"
    APPROVAL_USED = "approval_used"
    HTTP_EXCHANGE = "http_exchange"
    HTTP_AUTH_FAILED = "http_auth_failed"
    GRPC_CALL = "grpc_call"  # the gRPC companion proxy's records
    GRPC_AUTH_FAILED = "grpc_auth_failed"
    LOG_RECOVERED = "log_recovered"


# Sessions numbered at once. Beyond it the least recently active one's numbering restarts at 0, which
# a bundle of an HTTP caller accepts as a new run (and a proxy session's bundle reports as incomplete).
MAX_OPEN_SESSIONS = 200_000

_KINDS = {k.value: k for k in EventKind}  # faster than EventKind(value) on the per-statement path

# The last record of a proxy session: nothing of the session follows it.
TERMINAL_KINDS = frozenset({EventKind.SESSION_END, EventKind.AUTH_FAILED})


def event_kind(event: Any) -> EventKind | None:
    """The kind of a decoded event (a record's ``event`` object); None for anything unknown."""
    return _KINDS.get(str(event.get("event"))) if isinstance(event, dict) else None


class AuditEmitter:
    """The proxy's view of its audit sink (an ``AuditSink`` itself): see the module docstring."""

    def __init__(self, sink: AuditSink, *, clock: Callable[[], float] = time.time) -> None:
        self.sink = sink
        self.clock = clock
        self._emit_encoded: Callable[[dict[str, Any], bytes], None] | None = getattr(sink, "emit_encoded", None)
        self._session_counts: dict[str, int] = {}
        self.problem: str | None = None  # why events cannot be recorded now (the sink's last failure), or None

    # Result capture settings of the signed log, read by sessions.
    @property
    def capture_results(self) -> bool:
        return bool(getattr(self.sink, "capture_results", False))

    @property
    def max_result_rows(self) -> int:
        return int(getattr(self.sink, "max_result_rows", 20))

    def emit(self, event: dict[str, Any], *, texts: Sequence[str | None] | None = None) -> None:
        """Stamp, number, redact and encode ``event``, then hand it to the sink; ``AuditUnavailable``
        when the sink cannot record it.

        ``texts``: every string of ``event`` that redaction reads (its producer's list), keyword-checked
        instead of the whole encoding: a statement record's strings are a small part of it."""
        kind = _KINDS.get(event["event"])
        if kind is None:  # a programming error
            raise ValueError(f"unknown audit event kind {event['event']!r}")
        event["ts"] = self.clock()
        session = event.get("session")
        if isinstance(session, str):
            n = self._session_counts.pop(session, 0)
            event["session_seq"] = n
            if kind in TERMINAL_KINDS:
                event["session_records"] = n + 1
            else:
                counts = self._session_counts
                counts[session] = n + 1  # re-inserted: the dict is ordered by last activity
                if len(counts) > MAX_OPEN_SESSIONS:  # HTTP callers' sessions never end: forget the stalest
                    del counts[next(iter(counts))]
        if texts is not None and may_need_redaction(texts):
            redact_event(event)
        encoded = b""
        if self._emit_encoded is not None:
            try:
                encoded = canonical(event)
                # Most events hold no secret: one keyword check over the encoding spares redacting each string.
                if texts is None and may_hold_secret_encoded(encoded):
                    redact_event(event)
                    encoded = canonical(event)
            except (TypeError, orjson.JSONEncodeError) as exc:
                raise AuditUnavailable(f"cannot encode audit event: {exc}") from None
        elif texts is None:
            redact_event(event)
        try:
            if self._emit_encoded is not None:
                self._emit_encoded(event, encoded)
            else:
                self.sink.emit(event)
        except AuditUnavailable as exc:
            self.problem = str(exc)
            raise
        self.problem = None

    def check(self) -> None:
        """Raise ``AuditUnavailable`` while the sink is failing (retrying a flush first)."""
        if self.problem is None:
            return
        self.flush()

    def flush(self) -> None:
        try:
            self.sink.flush()
        except AuditUnavailable as exc:
            self.problem = str(exc)
            raise
        self.problem = None

    def close(self) -> None:
        self.sink.close()


def as_emitter(sink: AuditSink) -> AuditEmitter:
    """``sink`` behind an emitter (itself when it already is one)."""
    return sink if isinstance(sink, AuditEmitter) else AuditEmitter(sink)

"""`pgproxy audit sessions` / `show`: what sessions a log holds, and one session as a readable timeline.

Read-only and tolerant: these tools show what the records say; `pgproxy audit verify` says whether to
believe them. Unknown event kinds (approvals, policy decisions, ...) are shown with their fields.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from .events import EventKind, event_kind
from .logformat import iter_records

_BASE_KEYS = {"event", "ts", "session", "session_seq"}


def format_when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "?"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def session_records(directory: Path, session: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(record number, event) of every record of ``session``."""
    for _, rec in iter_records(directory):
        event = rec.get("event")
        if isinstance(event, dict) and event.get("session") == session:
            yield int(rec.get("seq", -1)), event


def list_sessions(directory: Path) -> list[dict[str, Any]]:
    sessions: dict[str, dict[str, Any]] = {}
    for _, rec in iter_records(directory):
        event = rec.get("event")
        if not isinstance(event, dict) or not isinstance(event.get("session"), str):
            continue
        s = sessions.setdefault(event["session"], {"session": event["session"], "start": event.get("ts"),
                                                   "end": None, "subject": None, "role": None, "client": None,
                                                   "statements": 0, "events": 0, "reason": None})
        s["events"] += 1
        kind = event_kind(event)
        if kind in (EventKind.SESSION_START, EventKind.AUTH_FAILED):
            ident = event.get("identity") or {}
            s["subject"] = ident.get("subject") if isinstance(ident, dict) else None
            s["role"] = event.get("upstream_role") or event.get("user")
            s["client"] = event.get("client")
            if kind is EventKind.AUTH_FAILED:
                s["reason"] = f"auth failed: {event.get('reason')}"
        elif kind is EventKind.STATEMENT:
            s["statements"] += 1
        elif kind is EventKind.SESSION_END:
            s["end"] = event.get("ts")
            s["reason"] = event.get("reason")
    return sorted(sessions.values(), key=lambda s: s["start"] or 0)


def format_sessions(sessions: Iterable[dict[str, Any]]) -> list[str]:
    lines = [f"{'SESSION':16}  {'STARTED (UTC)':23}  {'SUBJECT':20}  {'ROLE':14}  {'STMTS':>5}  END"]
    for s in sessions:
        lines.append(f"{s['session']:16}  {format_when(s['start']):23}  {s['subject'] or '-':20}  "
                     f"{s['role'] or '-':14}  {s['statements']:>5}  {s['reason'] or '(open)'}")
    return lines


def format_duration(seconds: Any) -> str:
    """``0.4 ms``, ``12 ms``, ``3.2 s``, ``4 min 05 s``: a duration as a person reads it."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "?"
    if seconds < 0.01:
        return f"{seconds * 1000:.2g} ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {rest:02d} s"


def _readable(key: str, value: Any) -> str:
    """A field of an event as text: times and durations spelt out, lists and mappings without JSON."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and (key == "ts" or key.endswith("_at")):
        return format_when(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key.endswith("_s"):
        return format_duration(value)
    if isinstance(value, dict):
        return ", ".join(f"{k} {_readable(k, v)}" for k, v in value.items() if v not in (None, "", [], {})) or "-"
    if isinstance(value, list):
        return ", ".join(_readable(key, v) for v in value) or "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
    return text if len(text) <= limit else text[:limit] + "..."


def format_event(seq: int, event: dict[str, Any]) -> list[str]:
    kind = event.get("event")
    head = f"#{seq:<6} {format_when(event.get('ts'))}  {kind}"
    out: list[str] = []
    if kind == "session_start":
        ident = event.get("identity") or {}
        out.append(f"{head}: {ident.get('subject')} (groups {', '.join(ident.get('groups') or []) or '-'}) as "
                   f"{event.get('upstream_role')} on {event.get('database')} from {event.get('client')}"
                   f"{' tls' if event.get('tls') else ''}")
        extras = {k: ident.get(k) for k in ("agent_id", "session_id", "tool_call_id", "token_id") if ident.get(k)}
        if extras:
            out.append("         " + ", ".join(f"{k}={v}" for k, v in extras.items()))
        if event.get("application_name"):
            out.append(f"         application_name={event['application_name']}")
        return out
    if kind == "statement":
        took = event.get("duration_ms")
        took_s = took / 1000 if isinstance(took, (int, float)) else None
        out.append(f"{head} [{event.get('protocol')}, {format_duration(took_s)}]: {_short(event.get('sql'))}")
        if "params" in event:
            out.append(f"         params: {_short(event['params'])}")
        if event.get("tags"):
            out.append(f"         -> {', '.join(event['tags'])}")
        result = event.get("result")
        if isinstance(result, dict):
            cols = ", ".join(f"{c.get('name')}" for c in result.get("columns", []))
            out.append(f"         rows sent {result.get('rows_sent')}, digest {str(result.get('row_digest'))[:16]}..."
                       + (f", columns ({cols})" if cols else ""))
            for row in result.get("sample_rows", [])[:5]:
                out.append(f"           {_short(row, 160)}")
            if result.get("rows_truncated") or len(result.get("sample_rows", [])) > 5:
                out.append("           ...")
        if "error" in event:
            err = event["error"]
            out.append(f"         ERROR {err.get('sqlstate')}: {err.get('message')}")
        for note in event.get("notices") or []:
            out.append(f"         {note.get('severity')}: {note.get('message')}")
        for key in sorted(set(event) - _BASE_KEYS - {"protocol", "sql", "params", "tags", "result", "error",
                                                      "notices", "duration_ms", "started_at", "rows",
                                                      "param_formats", "result_formats", "statement_name"}):
            out.append(f"         {key}: {_short(_readable(key, event[key]))}")
        return out
    if kind == "session_end":
        return [f"{head}: {event.get('reason')} ({event.get('statements')} statements in "
                f"{format_duration(event.get('duration_s'))})"]
    rest = [f"{k} {_short(_readable(k, v))}" for k, v in event.items() if k not in _BASE_KEYS and v not in (None, "")]
    return [f"{head}: {'; '.join(rest)}"]


def session_events(directory: Path, session: str) -> list[dict[str, Any]]:
    """The session's events as recorded, each with its record number (``seq``): for ``--json``."""
    return [{"seq": seq, **event} for seq, event in session_records(directory, session)]


def show_session(directory: Path, session: str) -> list[str]:
    lines: list[str] = []
    for seq, event in session_records(directory, session):
        lines.extend(format_event(seq, event))
    return lines

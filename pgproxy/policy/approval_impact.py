"""Estimate what a statement waiting for approval would do, for the approver's view.

``estimate_impact(dsn, sql, params)`` returns the plan from ``EXPLAIN (FORMAT JSON)`` and, for UPDATE and
DELETE, the number of rows the statement would touch: it runs the statement inside a transaction that is
always rolled back (never committed), with a statement timeout and a lock timeout. Parameters are the
text values the client bound; they are passed as untyped literals to a prepared statement so PostgreSQL
infers their types exactly as it did for the client.

Caveat: counting rows executes the statement (then rolls it back), so functions it calls do run. Use a
DSN with the requester's own role (never a superuser) so the estimate can do no more than the agent could.
The gate calls this fire-and-forget and stores the result with ``store.set_impact``; failures come back
as ``{"error": ...}`` rather than exceptions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import asyncpg

STATEMENT_TIMEOUT_MS = 5000
LOCK_TIMEOUT_MS = 1000
_COMMENTS = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.S)
_FIRST_WORD = re.compile(r"[A-Za-z]+")


def statement_kind(sql: str) -> str:
    """The first keyword after leading whitespace and comments, upper-cased ('' when none)."""
    rest = sql[_COMMENTS.match(sql).end():]  # type: ignore[union-attr]
    m = _FIRST_WORD.match(rest)
    return m.group(0).upper() if m else ""


def _literal(value: str | None) -> str:
    if value is None:
        return "NULL"
    if "\x00" in value:
        raise ValueError("parameter contains a NUL byte")
    return "'" + value.replace("'", "''") + "'"  # standard_conforming_strings is forced on below


async def estimate_impact(dsn: str, sql: str, params: Sequence[str | None] = (), *,
                          timeout_ms: int = STATEMENT_TIMEOUT_MS, count_rows: bool = True) -> dict[str, Any]:
    """``{"plan": [...], "estimated_rows": N, "rows": N (UPDATE/DELETE only)}`` or ``{"error": "..."}``."""
    kind = statement_kind(sql)
    impact: dict[str, Any] = {"statement": kind}
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout_ms / 1000)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return {**impact, "error": f"cannot connect: {exc}"}
    try:
        tr = conn.transaction()
        await tr.start()
        try:
            await conn.execute(f"SET LOCAL statement_timeout = {int(timeout_ms)}; "
                               f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}; "
                               "SET LOCAL standard_conforming_strings = on")
            await conn.execute(f"PREPARE pgproxy_impact AS {sql}")
            args = f"({', '.join(_literal(p) for p in params)})" if params else ""
            raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE pgproxy_impact{args}")
            plan = json.loads(raw) if isinstance(raw, str) else raw
            impact["plan"] = plan
            impact["estimated_rows"] = plan[0]["Plan"].get("Plan Rows")
            if kind in ("UPDATE", "DELETE") and not count_rows:
                impact["rows_not_counted"] = "the statement calls functions: it is not run before approval"
            elif kind in ("UPDATE", "DELETE"):
                status = await conn.execute(f"EXECUTE pgproxy_impact{args}")
                count = status.rpartition(" ")[2]
                impact["rows"] = int(count) if count.isdigit() else None
        finally:
            await tr.rollback()  # never commit: the statement has not been approved
    except (asyncpg.PostgresError, asyncpg.InterfaceError, ValueError, TimeoutError) as exc:
        impact["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        await conn.close()
    return impact

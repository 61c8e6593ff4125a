"""`pgproxy audit replay`: re-run a verified bundle's statements against a sandbox and compare digests.

Runs on pgproxy's own wire protocol layer (``connect_upstream`` + the message classes), so the DataRow
bytes hashed here are exactly what PostgreSQL sends, as they were when recorded. Everything runs in
one transaction (each statement inside a savepoint, so an error does not end the replay) that is
rolled back unless ``commit``. Statements that cannot be replayed faithfully are skipped and say why:
transaction control, redacted or truncated text/parameters, refused statements, function calls, and
statements that read masked relations when no masking config is given (``masking``: the proxy's rules
rewrite every statement of a masked identity again, as the proxy did).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
from pydantic import ValidationError

from ..config import UpstreamConfig
from ..masking.rewrite import Rewritten
from ..protocol.codec import header
from ..protocol.messages import Bind, CommandComplete, ErrorResponse, Execute, Parse, Query, Sync, Terminate
from ..protocol.types import Backend
from ..schema import error_lines
from ..server.link import Link
from ..server.upstream import UpstreamRefused, UpstreamUnavailable, connect_upstream
from .bundle import BundleError, verify_bundle
from .verify import TrustAnchor

if TYPE_CHECKING:
    from ..masking.replay import ReplayMasking

Rewrite = Callable[[str], Rewritten]

MESSAGE_LIMIT = 1 << 30
_TXN_CONTROL = re.compile(r"^\s*(begin|commit|rollback|end|abort|start\s+transaction|savepoint|release|"
                          r"prepare\s+transaction|commit\s+prepared|rollback\s+prepared)\b", re.IGNORECASE)
_TRUNCATED = re.compile(r"\.\.\.\(\d+ bytes\)$")


@dataclass
class ReplayOutcome:
    index: int
    sql: str
    status: str  # "match", "differ", "skipped"
    detail: str = ""


@dataclass
class ReplayReport:
    outcomes: list[ReplayOutcome] = field(default_factory=list)
    committed: bool = False

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def ok(self) -> bool:
        return self.count("differ") == 0


class ReplayError(Exception):
    pass


def _skip_reason(event: dict[str, Any]) -> str | None:
    sql = event.get("sql")
    if not isinstance(sql, str):
        return "no statement text"
    if event.get("protocol") == "function":
        return "function call"
    if event.get("refused"):
        return "refused by the proxy when recorded"
    if "[redacted:" in sql or any(isinstance(p, str) and "[redacted:" in p for p in event.get("params") or []):
        return "contains redacted secrets"
    if any(isinstance(p, str) and _TRUNCATED.search(p) for p in event.get("params") or []):
        return "a parameter was truncated when recorded"
    if _TXN_CONTROL.match(sql):
        return "transaction control (the replay runs in its own transaction)"
    if "result" not in event:
        return "no recorded result digest"
    return None


@dataclass
class _Ran:
    """What the target answered to one request, up to ReadyForQuery."""

    digest: str  # SHA-256 over the DataRow messages, as the audit log's row_digest
    rows: int  # DataRow messages
    error: ErrorResponse | None  # the first error
    tags: list[str]  # command tags, e.g. ["DELETE 0"]


class _Conn:
    def __init__(self, link: Link) -> None:
        self.link = link

    async def until_ready(self) -> _Ran:
        digest = hashlib.sha256()
        rows = 0
        error: ErrorResponse | None = None
        tags: list[str] = []
        while True:
            msg_type, body = await self.link.read_message(MESSAGE_LIMIT)
            if msg_type == Backend.DATA_ROW:
                digest.update(header(Backend.DATA_ROW, len(body)))
                digest.update(body)
                rows += 1
            elif msg_type == Backend.COMMAND_COMPLETE:
                tags.append(CommandComplete.decode(body).tag)
            elif msg_type == Backend.ERROR_RESPONSE and error is None:
                error = ErrorResponse.decode(body)
            elif msg_type == Backend.READY_FOR_QUERY:
                return _Ran(digest.hexdigest(), rows, error, tags)

    async def simple(self, sql: str) -> _Ran:
        self.link.write(Query(sql).encode())
        return await self.until_ready()

    async def extended(self, sql: str, params: list[bytes | None], param_formats: list[int],
                       result_formats: list[int], param_types: list[int]) -> _Ran:
        self.link.write(Parse("", sql, tuple(param_types)).encode()
                        + Bind("", "", tuple(param_formats), tuple(params), tuple(result_formats)).encode()
                        + Execute("", 0).encode() + Sync().encode())
        return await self.until_ready()


def _params(event: dict[str, Any]) -> tuple[list[bytes | None], list[int]]:
    raw = event.get("params") or []
    formats = event.get("param_formats") or [0] * len(raw)
    values: list[bytes | None] = []
    for i, p in enumerate(raw):
        if p is None:
            values.append(None)
        elif formats[i] == 1:
            values.append(bytes.fromhex(p[2:]))
        else:
            values.append(p.encode("utf-8"))
    return values, [int(f) for f in formats] if event.get("param_formats") else []


def _target(dsn: str) -> tuple[UpstreamConfig, dict[str, str], str | None]:
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    except Exception as exc:
        raise ReplayError(f"invalid --target: {exc}") from None
    sslmode = info.get("sslmode", "disable")
    if sslmode in ("prefer", "allow"):
        sslmode = "disable"
    user = info.get("user", "postgres")
    try:
        cfg = UpstreamConfig.model_validate({  # its credential's password comes from the DSN
            "host": info.get("host", "127.0.0.1"), "port": int(info.get("port", "5432")), "sslmode": sslmode,
            "sslrootcert": info.get("sslrootcert"), "credentials": [{"role": user}]})
    except ValidationError as exc:
        raise ReplayError(f"invalid --target: {'; '.join(error_lines(exc))}") from None
    params = {"user": user, "database": info.get("dbname", user), "application_name": "pgproxy-audit-replay"}
    return cfg, params, info.get("password")


async def replay_bundle(path: Path, dsn: str, *, commit: bool = False, pubkeys: tuple[Path, ...] = (),
                        progress: Callable[[ReplayOutcome, int, int], None] | None = None,
                        masking: ReplayMasking | None = None, anchor: TrustAnchor | None = None) -> ReplayReport:
    checked = verify_bundle(path, pubkeys=pubkeys, anchor=anchor)
    if not checked.ok:
        raise ReplayError(f"the bundle does not verify: {checked.problems[0]}")
    statements = [e for e in checked.events if e.get("event") == "statement"]
    rewrite = await _masking_rewrite(masking, checked.events, dsn) if masking is not None else None
    cfg, params, password = _target(dsn)
    try:
        link, _ = await connect_upstream(cfg, params, password)
    except (UpstreamRefused, UpstreamUnavailable) as exc:
        raise ReplayError(f"cannot connect to the target: {exc}") from None
    conn = _Conn(link)
    report = ReplayReport()
    try:
        await conn.until_ready()  # ParameterStatus, BackendKeyData, ReadyForQuery after the login
        err = (await conn.simple("BEGIN")).error
        if err is not None:
            raise ReplayError(f"cannot start the replay transaction: {err.message}")
        for n, event in enumerate(statements, 1):
            outcome = await _replay_one(conn, event, rewrite, masking is not None)
            report.outcomes.append(outcome)
            if progress is not None:
                progress(outcome, n, len(statements))
        err = (await conn.simple("COMMIT" if commit else "ROLLBACK")).error
        report.committed = commit and err is None
    finally:
        link.write(Terminate().encode())
        link.close()
    return report


async def _masking_rewrite(masking: ReplayMasking, events: list[dict[str, Any]], dsn: str) -> Rewrite | None:
    from ..masking.replay import RecordedIdentity

    start = next((e for e in events if e.get("event") == "session_start"), None)
    if start is None:
        raise ReplayError("the bundle has no session_start event: the masked identity is unknown")
    identity = RecordedIdentity.from_event(start.get("identity") or {})
    try:
        return await masking.for_session(dsn, identity, str(start.get("upstream_role") or ""))
    except (OSError, asyncpg.PostgresError) as exc:
        raise ReplayError(f"cannot read the target's catalog for masking: {exc}") from None


async def _replay_one(conn: _Conn, event: dict[str, Any], rewrite: Rewrite | None = None,
                      masking: bool = False) -> ReplayOutcome:
    index, sql = int(event["index"]), str(event.get("sql"))
    reason = _skip_reason(event)
    if reason is None and event.get("masked_relations") and not masking:
        reason = "read masked relations: replay with the proxy's config (--config) to apply its masks"
    if reason is not None:
        return ReplayOutcome(index, sql, "skipped", reason)
    run_sql = sql  # what the target runs; the report always shows the recorded text
    if rewrite is not None:
        rewritten = rewrite(sql)
        if rewritten.refusal is not None:
            return ReplayOutcome(index, sql, "differ", f"masking refuses it against the target: {rewritten.refusal}")
        run_sql = rewritten.sql or sql
    await conn.simple("SAVEPOINT pgproxy_replay")
    if event.get("protocol") == "extended":
        values, formats = _params(event)
        ran = await conn.extended(run_sql, values, formats, list(event.get("result_formats") or []),
                                  [int(t) for t in event.get("param_types") or []])
    else:
        ran = await conn.simple(run_sql)
    digest, rows, error = ran.digest, ran.rows, ran.error
    await conn.simple(("ROLLBACK TO" if error is not None else "RELEASE") + " SAVEPOINT pgproxy_replay")
    recorded = event.get("result") or {}
    recorded_error = (event.get("error") or {}).get("sqlstate")
    differences = []
    recorded_tags = event.get("tags")
    if isinstance(recorded_tags, list) and ran.tags != recorded_tags:  # e.g. DELETE 0 where DELETE 1000 ran
        differences.append(f"command tags {', '.join(ran.tags) or 'none'} (recorded "
                           f"{', '.join(map(str, recorded_tags)) or 'none'})")
    if digest != recorded.get("row_digest"):
        differences.append(f"rows differ: {rows} rows, digest {digest[:16]}... (recorded {recorded.get('rows_sent')} "
                           f"rows, {str(recorded.get('row_digest'))[:16]}...)")
    replay_error = error.sqlstate if error is not None else None
    if replay_error != recorded_error:
        differences.append(f"error {replay_error or 'none'} (recorded {recorded_error or 'none'})"
                           + (f": {error.message}" if error is not None else ""))
    if differences:
        return ReplayOutcome(index, sql, "differ", "; ".join(differences))
    return ReplayOutcome(index, sql, "match", (", ".join(ran.tags) or f"{rows} rows")
                         + (f", error {replay_error}" if replay_error else ""))


def run_replay(path: Path, dsn: str, *, commit: bool = False, pubkeys: tuple[Path, ...] = (),
               progress: Callable[[ReplayOutcome, int, int], None] | None = None,
               masking: ReplayMasking | None = None, anchor: TrustAnchor | None = None) -> ReplayReport:
    try:
        return asyncio.run(replay_bundle(path, dsn, commit=commit, pubkeys=pubkeys, progress=progress,
                                         masking=masking, anchor=anchor))
    except BundleError as exc:
        raise ReplayError(str(exc)) from None

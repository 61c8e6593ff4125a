"""What the admin UI shows of the signed audit log: its sessions, and one session's records with the
verification status of each against the signed checkpoints.

Built on the same pieces as `pgproxy audit sessions/show/verify/export`: ``timeline.list_sessions`` for
the session list, ``verify.verify_log`` for the log's chain, Merkle roots and checkpoint signatures
(pinned to the operator's key), and RFC 9162 inclusion proofs (as in evidence bundles) binding each
displayed record to the latest signed checkpoint. Blocking file I/O: callers run it in a thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pgproxy.audit.logformat import CHECKPOINTS_FILE, iter_records, list_segments
from pgproxy.audit.merkle import TreeView, leaf_hash, verify_inclusion
from pgproxy.audit.timeline import list_sessions
from pgproxy.audit.verify import VerifyReport, verify_log

RecordStatus = Literal["verified", "uncovered", "failed"]


@dataclass(frozen=True)
class LogStatus:
    """The whole log's verification, as a summary for the pages."""

    ok: bool
    records: int
    checkpoint_size: int  # records covered by the latest valid signed checkpoint (0: none)
    checkpoint_ms: int | None
    problems: tuple[str, ...]
    warnings: tuple[str, ...]


@dataclass
class SessionRecord:
    seq: int
    event: dict[str, Any]
    status: RecordStatus


@dataclass
class SessionView:
    session: str
    log: LogStatus
    records: list[SessionRecord] = field(default_factory=list)

    @property
    def status(self) -> RecordStatus:
        """Failed if any record failed, else uncovered if any is not under a checkpoint yet."""
        statuses = {r.status for r in self.records}
        for worst in ("failed", "uncovered"):
            if worst in statuses:
                return worst
        return "verified"


def record_status(report: VerifyReport, tree: TreeView | None, seq: int, line: bytes) -> RecordStatus:
    """One record's status: its inclusion proof against the latest checkpoint of a log that verifies."""
    cp = report.latest_checkpoint
    if not report.ok:
        return "failed"
    if cp is None or tree is None or seq >= cp.tree_size:
        return "uncovered"
    proof = tree.inclusion(seq, cp.tree_size)
    return "verified" if verify_inclusion(leaf_hash(line), seq, cp.tree_size, proof, bytes.fromhex(cp.root)) \
        else "failed"


def count_errors(records: Iterable[tuple[Any, dict[str, Any]]]) -> dict[str, int]:
    """Failed statements per session (statement events carrying an ``error``)."""
    errors: dict[str, int] = {}
    for _, rec in records:
        event = rec.get("event")
        if isinstance(event, dict) and event.get("event") == "statement" and "error" in event:
            session = str(event.get("session"))
            errors[session] = errors.get(session, 0) + 1
    return errors


class AuditLogView:
    """Read-only views of one signed log directory, verified against ``pubkeys`` (the operator's key)."""

    def __init__(self, directory: Path, pubkeys: tuple[Path, ...]) -> None:
        self.directory = directory
        self.pubkeys = pubkeys
        self._lock = threading.Lock()
        self._cached: tuple[tuple[Any, ...], VerifyReport] | None = None

    def _signature(self) -> tuple[Any, ...]:
        """Changes whenever a segment or the checkpoints file is written (inode, size, mtime, ctime)."""
        files = [p for _, p in list_segments(self.directory)] + [self.directory / CHECKPOINTS_FILE]
        out = []
        for p in files:
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((p.name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(out)

    def verify(self) -> VerifyReport:
        """``verify_log`` with leaves kept, re-run only when the log changed since the last call."""
        with self._lock:
            signature = self._signature()
            if self._cached is None or self._cached[0] != signature:
                self._cached = (signature, verify_log(self.directory, pubkeys=self.pubkeys, keep_leaves=True))
            return self._cached[1]

    def log_status(self) -> LogStatus:
        return _log_status(self.verify())

    def sessions(self) -> list[dict[str, Any]]:
        """``list_sessions`` plus each session's number of failed statements, newest first."""
        if not self.directory.is_dir():
            return []
        errors = count_errors(iter_records(self.directory))
        sessions = list_sessions(self.directory)
        for s in sessions:
            s["errors"] = errors.get(s["session"], 0)
        sessions.reverse()
        return sessions

    def session(self, session: str) -> SessionView | None:
        """The session's records in order, each with its status; None when the log holds none."""
        report = self.verify()
        cp = report.latest_checkpoint
        tree = TreeView(report.leaves[:cp.tree_size]) if cp is not None and report.ok else None
        view = SessionView(session, _log_status(report))
        for line, rec in iter_records(self.directory):
            event = rec.get("event")
            if isinstance(event, dict) and event.get("session") == session:
                seq = int(rec.get("seq", -1))
                view.records.append(SessionRecord(seq, event, record_status(report, tree, seq, line.data)))
        return view if view.records else None


def _log_status(report: VerifyReport) -> LogStatus:
    cp = report.latest_checkpoint
    return LogStatus(ok=report.ok, records=report.records, checkpoint_size=cp.tree_size if cp else 0,
                     checkpoint_ms=cp.timestamp_ms if cp else None, problems=tuple(report.problems),
                     warnings=tuple(report.warnings))

"""The signed, tamper-evident audit log: an ``AuditSink`` writing hash-chained Merkle-tree records.

Each ``emit`` turns the event into a record ``{"event": ..., "prev": <hash of the previous record>,
"seq": n}`` in canonical JSON, appends its leaf hash to the Merkle tree and queues the line. Lines are
written to the current segment (``fsync: always``: before ``emit`` returns; ``interval``/``never``:
at the next ``flush``, about every 0.2 s), segments rotate by size, and a signed checkpoint over
(log id, tree size, root, timestamp) is appended to ``checkpoints.jsonl`` (and published to the
witness) every N records, every T seconds and after each ``session_end``.

Fail closed: when a write fails, ``emit`` raises ``AuditUnavailable`` until a retry succeeds; queued
records are kept (never dropped, so the chain stays whole) and written when the log is writable again.
Used from the event loop's thread only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import socket
import time
from binascii import hexlify
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .keys import Checkpoint, key_id, public_pem, sign_checkpoint
from .logformat import (
    CHECKPOINTS_FILE,
    KEYS_DIR,
    LOCK_FILE,
    LOG_FORMAT,
    META_FILE,
    RESUME_FILE,
    canonical,
    genesis_hash,
    list_segments,
    segment_first,
    segment_name,
)
from .merkle import CompactTree, leaf_hash
from .sink import AuditUnavailable
from .verify import ResumePoint, TrustAnchor, final_tree, verify_log
from .witness import Witness

log = logging.getLogger(__name__)

FSYNC_POLICIES = ("always", "interval", "never")


RESUME_EVERY_RECORDS = 10_000  # save a resume point at the first checkpoint this many records after the last


def _lock_directory(directory: Path) -> int:
    """Take the log directory's exclusive lock (held until the fd closes): a second writer would fork
    the hash chain, so it is refused with who holds the lock."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise AuditUnavailable(f"audit log {directory} is in use by another writer ({holder}); two writers would "
                               "fork the log: give every proxy process its own audit.dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


class SignedAuditLog:
    """An AuditSink over a log directory (see ``logformat`` and docs/audit.md)."""

    capture_results = True  # the session installs its result-capture hooks for this sink

    def __init__(self, directory: Path, signing_key: Ed25519PrivateKey, *, checkpoint_every_records: int = 1000,
                 checkpoint_every_seconds: float = 60.0, fsync: str = "interval",
                 segment_max_bytes: int = 64 * 1024 * 1024, witness: Witness | None = None,
                 max_result_rows: int = 20, trusted_keys: Iterable[Path] = ()) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}")
        self.directory = directory
        self.max_result_rows = max_result_rows
        self._key = signing_key
        self._every_records = checkpoint_every_records
        self._every_seconds = checkpoint_every_seconds
        self._fsync = fsync
        self._segment_max = segment_max_bytes
        self._witness = witness
        # The keys whose checkpoints this process continues: its own and earlier (rotated) ones, never
        # whatever the directory's keys/ claims.
        own = signing_key.public_key()
        keys = TrustAnchor.from_files(trusted_keys, "audit.trusted_keys").keys
        keys[key_id(own)] = own
        self._anchor = TrustAnchor(keys, f"the proxy's signing key and audit.trusted_keys (key id {', '.join(keys)})")
        self._pending: list[bytes] = []
        self._broken: str | None = None
        self._fd: int | None = None
        self._segment: Path | None = None
        self._offset = 0
        self._checkpoint_due = False
        self._closed = False
        self._last_line: tuple[int, int, int] | None = None  # (segment's first record, offset, length)
        self._resume_size = 0  # records covered by the saved resume point
        self.on_write: Callable[[float], None] | None = None  # told each batch's write+fsync time (metrics)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = _lock_directory(directory)
        try:
            self._open(signing_key)
        except BaseException:
            os.close(self._lock_fd)
            raise

    # ------------------------------------------------------------------------------------ opening

    def _open(self, signing_key: Ed25519PrivateKey) -> None:
        directory = self.directory
        (directory / KEYS_DIR).mkdir(exist_ok=True)
        pub = directory / KEYS_DIR / f"{key_id(signing_key.public_key())}.pub"
        if not pub.exists():
            pub.write_bytes(public_pem(signing_key.public_key()))
        self._tree = CompactTree()
        self._cp_size = 0
        self._cp_time = time.monotonic()
        if (directory / META_FILE).exists():
            self._reopen()
        else:
            self.log_id = secrets.token_hex(16)
            self._write_file(directory / META_FILE, canonical(
                {"format": LOG_FORMAT, "log_id": self.log_id, "created_ms": int(time.time() * 1000)}) + b"\n")
            self._prev = genesis_hash(self.log_id).encode("ascii")
        self._written = self._tree.size
        self._cp_fd = os.open(directory / CHECKPOINTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    @staticmethod
    def _write_file(path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _reopen(self) -> None:
        """Continue an existing log: check every checkpoint's signature and the records after the resume
        point (all of them without one), set a torn tail aside, refuse a log that fails."""
        point = ResumePoint.load(self.directory / RESUME_FILE)
        started = time.perf_counter()
        report = verify_log(self.directory, anchor=self._anchor, keep_leaves=False, resume=point)
        if report.resumed:
            assert point is not None
            self._resume_size = point.tree_size
            log.info("audit log %s: resumed at record %d, verified the %d record(s) after it in %.3f s",
                     self.directory, point.tree_size, report.records - point.tree_size,
                     time.perf_counter() - started)
        elif point is not None:
            log.warning("audit log %s: %s does not match the signed log; verified all %d records", self.directory,
                        RESUME_FILE, report.records)
        self.log_id = report.log_id
        torn = report.torn_tail
        problems = report.problems
        if problems:
            raise AuditUnavailable(f"audit log {self.directory} fails verification, refusing to append: "
                                   f"{problems[0]} (run `pgproxy audit verify {self.directory}`)")
        if report.records and report.latest_checkpoint is None:  # e.g. a rewritten log, checkpoints removed
            raise AuditUnavailable(f"audit log {self.directory} holds {report.records} records but no checkpoint "
                                   "signed by this proxy's keys: refusing to sign a history it cannot vouch for "
                                   "(after a crash before the first checkpoint: check the records, then move "
                                   "the directory aside)")
        self._tree = final_tree(report)
        self._prev = (report.last_hash or genesis_hash(self.log_id)).encode("ascii")
        if report.last_line is not None:
            line = report.last_line
            self._last_line = (segment_first(line.path), line.offset, len(line.data))
        if report.latest_checkpoint is not None:
            self._cp_size = report.latest_checkpoint.tree_size
        segments = list_segments(self.directory)
        if segments:
            self._segment = segments[-1][1]
            self._offset = self._segment.stat().st_size
        recovered: dict[str, Any] | None = None
        if torn is not None and self._segment is not None:
            data = self._segment.read_bytes()
            cut = data.rfind(b"\n") + 1
            tail = data[cut:]
            aside = self._segment.with_name(f"{self._segment.name}.{int(time.time())}.torn")
            aside.write_bytes(tail)
            with open(self._segment, "r+b") as f:
                f.truncate(cut)
                os.fsync(f.fileno())
            self._offset = cut
            recovered = {"event": "log_recovered", "ts": time.time(), "truncated_bytes": len(tail),
                         "truncated_sha256": hashlib.sha256(tail).hexdigest(), "set_aside": aside.name,
                         "segment": self._segment.name}
            log.warning("audit log %s: set aside an incomplete final record (%d bytes) in %s", self.directory,
                        len(tail), aside)
        self._written = self._tree.size
        if self._offset >= self._segment_max:
            self._segment, self._offset = None, 0  # full: the next write starts a new segment
        if recovered is not None:
            self.emit(recovered)
            self._write_pending()

    # -------------------------------------------------------------------------------------- sink

    def emit(self, event: dict[str, Any]) -> None:
        try:
            encoded = canonical(event)
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise AuditUnavailable(f"cannot encode audit event: {exc}") from None
        self.emit_encoded(event, encoded)

    def emit_encoded(self, event: dict[str, Any], encoded: bytes) -> None:
        """``emit`` with the event already encoded (canonical JSON)."""
        if self._closed:
            raise AuditUnavailable("audit log is closed")
        # Canonical JSON sorts "event" < "prev" < "seq": these are the bytes of canonical(record), built
        # around the event's encoding (never encoded again) and hashed once.
        tree = self._tree
        seq = tree.size
        line = b'{"event":%b,"prev":"%b","seq":%d}' % (encoded, self._prev, seq)
        h = leaf_hash(line)
        tree.append(h)
        self._prev = hexlify(h)  # the record's hash as the next record's "prev" (hex, ASCII bytes)
        self._pending.append(line)
        if seq + 1 - self._cp_size >= self._every_records or event.get("event") == "session_end":
            self._checkpoint_due = True
        if self._fsync == "always" or self._broken is not None:
            self._write_pending()
            if self._checkpoint_due:
                self._checkpoint()

    def flush(self) -> None:
        self._write_pending()
        if self._checkpoint_due or (self._tree.size > self._cp_size
                                    and time.monotonic() - self._cp_time >= self._every_seconds):
            self._checkpoint()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._write_pending()
            self._checkpoint()
            self._save_resume()
        finally:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            os.close(self._cp_fd)
            if self._witness is not None:
                self._witness.close()
            os.close(self._lock_fd)  # releases the directory's lock

    # ------------------------------------------------------------------------------------ writing

    def _fail(self, what: str, exc: OSError) -> AuditUnavailable:
        self._broken = f"audit log {self.directory} is not writable: {what}: {exc.strerror or exc}"
        log.error("%s", self._broken)
        return AuditUnavailable(self._broken)

    def _write_pending(self) -> None:
        pending = self._pending
        if not pending:
            return
        data = b"\n".join(pending) + b"\n"
        started = time.perf_counter()
        try:
            if self._fd is None:
                if self._segment is None:
                    self._segment = self.directory / segment_name(self._written)
                self._fd = os.open(self._segment, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                self._offset = os.fstat(self._fd).st_size
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            if self._fsync != "never":
                os.fsync(self._fd)
        except OSError as exc:
            if self._fd is not None:
                with contextlib.suppress(OSError):  # remove a partial write: end with a whole record
                    os.ftruncate(self._fd, self._offset)
                os.close(self._fd)
                self._fd = None
            raise self._fail("writing records", exc) from None
        self._offset += len(data)
        self._written += len(pending)
        assert self._segment is not None
        self._last_line = (segment_first(self._segment), self._offset - len(pending[-1]) - 1, len(pending[-1]))
        pending.clear()
        if self.on_write is not None:
            self.on_write(time.perf_counter() - started)
        if self._broken is not None:
            log.warning("audit log %s is writable again", self.directory)
            self._broken = None
        if self._offset >= self._segment_max:
            os.close(self._fd)
            self._fd, self._segment, self._offset = None, None, 0

    def _checkpoint(self) -> None:
        """Sign and store a checkpoint over everything written (nothing may be pending)."""
        if self._pending or self._written == self._cp_size:
            self._checkpoint_due = False
            return
        cp = sign_checkpoint(self._key, self.log_id, self._written, self._tree.root().hex(),
                             int(time.time() * 1000))
        try:
            os.write(self._cp_fd, canonical(cp.to_json()) + b"\n")
            if self._fsync != "never":
                os.fsync(self._cp_fd)
        except OSError as exc:
            raise self._fail("writing a checkpoint", exc) from None
        self._cp_size, self._cp_time, self._checkpoint_due = cp.tree_size, time.monotonic(), False
        if self._witness is not None:
            self._witness.publish(cp)
        if self._written - self._resume_size >= RESUME_EVERY_RECORDS:
            self._save_resume()

    def _save_resume(self) -> None:
        """Note where a reopening writer may resume: at the checkpoint just signed over every written
        record. Best effort (no fsync): a missing or stale point only means reading more on reopen."""
        if self._last_line is None or self._pending or self._cp_size != self._written:
            return
        first, offset, length = self._last_line
        point = ResumePoint(self._written, tuple(self._tree.frontier), first, offset, length)
        tmp = self.directory / f"{RESUME_FILE}.tmp"
        try:
            tmp.write_bytes(canonical(point.to_json()) + b"\n")
            os.replace(tmp, self.directory / RESUME_FILE)
        except OSError as exc:
            log.warning("audit log %s: cannot save the resume point: %s", self.directory, exc.strerror)
            return
        self._resume_size = self._written

    @property
    def size(self) -> int:
        return self._tree.size

    @property
    def pending_records(self) -> int:
        """Records in the chain but not written to a segment yet (the audit lag)."""
        return len(self._pending)

    @property
    def problem(self) -> str | None:
        """Why the log cannot be written now, or None when it can."""
        return self._broken


def open_signed_log(directory: Path, key_file: Path, **kwargs: Any) -> SignedAuditLog:
    from .keys import load_private_key

    return SignedAuditLog(directory, load_private_key(key_file), **kwargs)


__all__ = ["Checkpoint", "SignedAuditLog", "open_signed_log"]

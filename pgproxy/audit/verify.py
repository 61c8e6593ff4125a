"""`pgproxy audit verify`: check a signed audit log end to end and say exactly what is wrong, and where.

Checks, in order: every checkpoint's signature (against ``--pubkey`` keys, else the log's own keyring),
every record's numbering and hash chain, the Merkle root at every checkpointed size, checkpoints that
the log is shorter than (truncation), and, with a witness, the witness's checkpoints the same way.
An incomplete final line after the last checkpoint is reported as a torn tail (a crash), not as
tampering.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..config import AuditConfig
from .keys import Checkpoint, KeyError_, key_id, load_public_key
from .logformat import (
    CHECKPOINTS_FILE,
    KEYS_DIR,
    RawLine,
    genesis_hash,
    iter_lines,
    read_checkpoint_lines,
    read_meta,
    segment_first,
    segment_name,
)
from .merkle import CompactTree, leaf_hash

MAX_PROBLEMS = 20


@dataclass
class VerifyReport:
    directory: Path
    log_id: str = ""
    records: int = 0  # complete records read
    checkpoints: int = 0  # valid signed checkpoints checked
    latest_checkpoint: Checkpoint | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    torn_tail: str | None = None
    leaves: list[bytes] = field(default_factory=list)
    roots: dict[int, bytes] = field(default_factory=dict)  # root at each checkpointed size
    last_hash: str = ""
    anchor: str = ""  # where the trusted keys came from
    resumed: bool = False  # only the records after a resume point were read
    last_line: RawLine | None = None  # the last complete record's line
    keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)  # the keys checkpoints were checked with

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        note_problem(self.problems, text)


def note_problem(problems: list[str], text: str) -> None:
    """Add ``text`` to a report's problems, up to MAX_PROBLEMS (then one line saying more were found)."""
    if len(problems) < MAX_PROBLEMS:
        problems.append(text)
    elif len(problems) == MAX_PROBLEMS:
        problems.append("... further problems not shown")


@dataclass(frozen=True)
class TrustAnchor:
    """The public keys a verification trusts and where they came from (reported with every result)."""

    keys: dict[str, Ed25519PublicKey]
    source: str

    @classmethod
    def from_files(cls, files: Iterable[Path], source: str) -> TrustAnchor:
        keys = {}
        for f in files:
            k = load_public_key(f)
            keys[key_id(k)] = k
        return cls(keys, f"{source} (key id {', '.join(keys)})")


def config_anchor(cfg: AuditConfig, where: str) -> TrustAnchor:
    """The keys the proxy's config pins: its signing key and ``trusted_keys`` (earlier, rotated keys)."""
    files = ([cfg.signing_key_file] if cfg.signing_key_file is not None else []) + list(cfg.trusted_keys)
    if not files:
        raise KeyError_(f"{where}: audit.signing_key_file is not set: the config pins no key")
    return TrustAnchor.from_files(files, f"{where} (audit.signing_key_file, audit.trusted_keys)")


def log_keyring(directory: Path) -> dict[str, Ed25519PublicKey]:
    """The keys in the log's own ``keys/`` directory: self-asserted, never a trust anchor by themselves."""
    keys = {}
    for f in sorted((directory / KEYS_DIR).glob("*.pub")):
        k = load_public_key(f)
        keys[key_id(k)] = k
    return keys


def _witness_anchor(report: VerifyReport, desc: str, entries: list[tuple[str, Any]]) -> TrustAnchor | None:
    """Keys of ``keys/`` whose ids sign the witness's checkpoints: the witness, kept off the proxy host,
    pins them. None (with a problem) when the witness holds nothing to pin a key with."""
    ids = sorted({str(data.get("key_id")) for _, data in entries if isinstance(data, dict)})
    if not ids:
        report.problem(f"witness {desc}: holds no checkpoint of this log, so it pins no key")
        return None
    try:
        own = log_keyring(report.directory)
    except KeyError_ as exc:
        report.problem(str(exc))
        return None
    unknown = [i for i in ids if i not in own]
    if unknown:
        report.problem(f"witness {desc}: checkpoints signed by key id {', '.join(unknown)}, whose public key is not "
                       "in the log's keys/ (pass --pubkey)")
    return TrustAnchor({i: own[i] for i in ids if i in own}, f"witness {desc} (key id {', '.join(ids)})")


def _load_checkpoints(report: VerifyReport, source: str, entries: Iterable[tuple[str, Any]],
                      keys: dict[str, Ed25519PublicKey]) -> list[tuple[str, Checkpoint]]:
    good = []
    for where, data in entries:
        try:
            cp = Checkpoint.from_json(data)
        except ValueError as exc:
            report.problem(f"{where}: {exc}")
            continue
        if cp.log_id != report.log_id:
            report.problem(f"{where}: checkpoint of another log ({cp.log_id}, this log is {report.log_id})")
            continue
        bad = cp.verify(keys)
        if bad is not None:
            report.problem(f"{where}: checkpoint for {cp.tree_size} records is {bad}")
            continue
        good.append((where, cp))
    return good


def verify_log(directory: Path, *, pubkeys: Iterable[Path] = (), anchor: TrustAnchor | None = None,
               witness: str | None = None, progress: Callable[[int], None] | None = None,
               keep_leaves: bool = False, resume: ResumePoint | None = None) -> VerifyReport:
    """Check a log against pinned keys: ``anchor`` (e.g. the config's), else ``pubkeys``, else the witness.

    Without any of them the log's own ``keys/`` are used to report everything else, and the missing
    pin is itself a problem: whoever rewrote the log could have put their key there.

    With ``resume`` (a writer reopening its log), every checkpoint's signature is still checked, but only
    the records after the resume point are read; a resume point that does not match a signed checkpoint
    and the bytes on disk is ignored (``report.resumed`` is then False) and the whole log is read.
    """
    report = VerifyReport(directory)
    try:
        report.log_id = read_meta(directory)["log_id"]
    except (OSError, ValueError) as exc:
        report.problem(f"{directory}: cannot read the log's metadata: {exc}")
        return report
    files = list(pubkeys)
    witnessed_entries: list[tuple[str, Any]] = []
    desc = ""
    if witness is not None:
        from .witness import read_witness

        try:
            desc, witnessed_entries = read_witness(witness, report.log_id)
        except Exception as exc:
            report.problem(f"witness {witness}: cannot read checkpoints: {exc}")
            witness = None
    try:
        if anchor is None and files:
            anchor = TrustAnchor.from_files(files, "--pubkey " + ", ".join(map(str, files)))
        if anchor is None and witness is not None:
            anchor = _witness_anchor(report, desc, witnessed_entries)
        if anchor is None:
            report.problem("the signing key is not pinned: the log's own keys/ prove nothing (whoever rewrote the "
                           "log could have put their key there); pass --pubkey, --config or --witness")
            anchor = TrustAnchor(log_keyring(directory), "none: the log's own keys/ (self-asserted)")
    except KeyError_ as exc:
        report.problem(str(exc))
        return report
    keys = anchor.keys
    report.anchor, report.keys = anchor.source, keys
    cp_entries: list[tuple[str, Any]] = []
    cp_path = directory / CHECKPOINTS_FILE
    for line_no, data, complete in read_checkpoint_lines(cp_path):
        where = f"{cp_path.name}:{line_no}"
        if not complete:
            report.warnings.append(f"{where}: incomplete final checkpoint line ignored (crash while writing it)")
            continue
        try:
            cp_entries.append((where, orjson.loads(data)))
        except orjson.JSONDecodeError:
            report.problem(f"{where}: checkpoint is not valid JSON")
    checkpoints = _load_checkpoints(report, "log", cp_entries, keys)
    if witness is not None:
        witnessed = _load_checkpoints(report, desc, witnessed_entries, keys)
        if not witnessed:
            report.warnings.append(f"witness {desc}: holds no checkpoint of this log")
        checkpoints += witnessed
    report.checkpoints = len(checkpoints)
    by_size: dict[int, list[tuple[str, Checkpoint]]] = {}
    for where, cp in checkpoints:
        by_size.setdefault(cp.tree_size, []).append((where, cp))
    resumed = _resumable(report, resume, by_size) if resume is not None and not keep_leaves else None
    report.resumed = resumed is not None
    _scan_records(report, by_size, progress, keep_leaves, resumed)
    total = report.records
    for where, cp in checkpoints:
        if cp.tree_size > total:
            report.problem(f"log truncated: {where} signs {cp.tree_size} records but the log holds only {total} "
                           f"(records {total}..{cp.tree_size - 1} are missing)")
    if checkpoints:
        latest = max((cp for _, cp in checkpoints), key=lambda c: (c.tree_size, c.timestamp_ms))
        report.latest_checkpoint = latest
        uncovered = total - latest.tree_size
        if uncovered > 0:
            report.warnings.append(f"{uncovered} record(s) after the last checkpoint are chain-checked only "
                                   "(no signed checkpoint covers them yet)")
    elif total:
        report.warnings.append("no signed checkpoint: records are chain-checked only")
    if report.torn_tail is not None:
        cp_max = max((cp.tree_size for _, cp in checkpoints), default=0)
        if cp_max > total:
            report.problem(f"{report.torn_tail}: incomplete record before the last checkpoint")
        else:
            report.warnings.append(f"truncated tail: {report.torn_tail} is an incomplete final record after the "
                                   f"last checkpoint (a crash while writing); the log is intact up to record "
                                   f"{total - 1}")
    return report


def _scan_records(report: VerifyReport, by_size: dict[int, list[tuple[str, Checkpoint]]],
                  progress: Callable[[int], None] | None, keep_leaves: bool, resume: _Resumed | None = None) -> None:
    if resume is None:
        tree, prev, lines = CompactTree(), genesis_hash(report.log_id), iter_lines(report.directory)
    else:
        tree, prev = resume.tree, resume.last_hash
        lines = iter_lines(report.directory, (resume.point.segment_first, resume.next_offset))
    start = expected = tree.size
    seen: set[int] = set()
    in_order = True
    for line in lines:
        where = f"{line.path.name}:{line.line_no}"
        if not line.complete:
            if line.last_in_log:
                report.torn_tail = f"{where} (offset {line.offset}, {len(line.data)} bytes)"
            else:
                report.problem(f"{where}: incomplete line inside the log")
            break
        if line.offset == 0:
            first = segment_first(line.path)
            if first != expected:
                report.problem(f"{line.path.name}: segment should start at record {first} but follows record "
                               f"{expected - 1} (missing or extra segment)")
        try:
            rec = orjson.loads(line.data)
        except orjson.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("seq"), int) or not isinstance(rec.get("prev"), str):
            report.problem(f"{where} (record {expected}): not a valid record (modified?)")
            seq, in_order = expected, False
            seen.add(seq)
        else:
            seq = rec["seq"]
            if seq in seen:
                report.problem(f"{where}: record {seq} appears twice (duplicated or reordered)")
            elif seq > expected:
                report.problem(f"{where}: found record {seq} where record {expected} belongs "
                               "(records deleted or reordered)")
            elif seq < expected:
                report.problem(f"{where}: record {seq} is out of order (reordered records)")
            elif in_order and rec["prev"] != prev:
                report.problem(f"{where} (record {seq}): hash chain broken: its prev does not match the hash of "
                               + (f"record {seq - 1} (record {seq - 1} or this record was modified)" if seq
                                  else "the log's genesis (wrong log id, or this record was modified)"))
            in_order = seq == expected
            seen.add(seq)
        h = leaf_hash(line.data)
        prev = h.hex()
        report.last_line = line
        tree.append(h)
        if keep_leaves:
            report.leaves.append(h)
        if seq >= expected:
            expected = seq + 1
        size = tree.size
        if size in by_size:
            root = tree.root()
            report.roots[size] = root
            for where_cp, cp in by_size[size]:
                if cp.root != root.hex():
                    report.problem(f"fork: {where_cp} signs root {cp.root[:16]}... for {size} records, but the "
                                   f"log's records 0..{size - 1} hash to {root.hex()[:16]}... (records modified, "
                                   "or two inconsistent histories were signed)")
        if progress is not None and size % 10000 == 0:
            progress(size)
    report.records = tree.size
    missing = [i for i in range(start, expected) if i not in seen]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        report.problem(f"record(s) {shown} missing from the log (deleted)")
    report.last_hash = prev
    report.__dict__["_tree"] = tree


@dataclass(frozen=True)
class ResumePoint:
    """Where a writer stopped at a checkpoint: the tree's frontier and where its last record lies.

    Stored in ``resume.json`` (a cache: nothing in it is trusted before it matches a signed checkpoint's
    root and the record bytes on disk).
    """

    tree_size: int
    frontier: tuple[bytes, ...]
    segment_first: int  # first record number of the segment holding record tree_size - 1
    offset: int  # byte offset of that record's line in the segment
    length: int  # its length, without the newline

    def to_json(self) -> dict[str, Any]:
        return {"tree_size": self.tree_size, "frontier": [h.hex() for h in self.frontier],
                "segment_first": self.segment_first, "offset": self.offset, "length": self.length}

    @classmethod
    def load(cls, path: Path) -> ResumePoint | None:
        """The resume point in ``path``; None when missing or unreadable (the log is then read in full)."""
        try:
            data = orjson.loads(path.read_bytes())
            return cls(int(data["tree_size"]), tuple(bytes.fromhex(h) for h in data["frontier"]),
                       int(data["segment_first"]), int(data["offset"]), int(data["length"]))
        except (OSError, ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            return None


@dataclass
class _Resumed:
    point: ResumePoint
    tree: CompactTree
    last_hash: str

    @property
    def next_offset(self) -> int:
        return self.point.offset + self.point.length + 1


def _resumable(report: VerifyReport, point: ResumePoint,
               by_size: dict[int, list[tuple[str, Checkpoint]]]) -> _Resumed | None:
    """``point`` when its frontier hashes to a signed checkpoint's root and its last record is on disk
    where it says, as a whole record with the right number; else None."""
    try:
        tree = CompactTree.restore(point.tree_size, point.frontier)
    except ValueError:
        return None
    signed = by_size.get(point.tree_size, [])
    if not signed or any(cp.root != tree.root().hex() for _, cp in signed):
        return None
    path = report.directory / segment_name(point.segment_first)
    try:
        with path.open("rb") as f:
            f.seek(max(point.offset - 1, 0))
            data = f.read(point.length + 2 if point.offset else point.length + 1)
    except OSError:
        return None
    line = data[1:] if point.offset else data
    if (point.offset and data[:1] != b"\n") or line[-1:] != b"\n":
        return None
    line = line[:-1]
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(rec, dict) or rec.get("seq") != point.tree_size - 1:
        return None
    return _Resumed(point, tree, leaf_hash(line).hex())


def final_tree(report: VerifyReport) -> CompactTree:
    tree = report.__dict__.get("_tree")
    assert isinstance(tree, CompactTree)
    return tree

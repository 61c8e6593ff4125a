"""Evidence bundles: one session's records with Merkle inclusion proofs against a signed checkpoint.

`pgproxy audit export` writes one JSON file (format ``pgproxy-audit-bundle/v1``, see docs/audit.md);
`pgproxy audit verify-bundle` checks it offline: that the bundled public key is pinned (``--pubkey`` or
the proxy's config), the checkpoint's Ed25519 signature, every record's inclusion proof against the
checkpoint's root, and completeness: the session's records carry ``session_seq`` 0, 1, 2, ... (set by
``events.AuditEmitter``) and its terminal record counts them (``session_records``), so a bundle with a
record removed, reordered or duplicated, or cut before its end, fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .events import TERMINAL_KINDS, EventKind, event_kind
from .keys import Checkpoint, KeyError_, key_id, public_from_raw_hex, raw_public
from .logformat import BUNDLE_FORMAT, iter_records
from .merkle import TreeView, leaf_hash, verify_inclusion
from .verify import TrustAnchor, verify_log


class BundleError(Exception):
    pass


def export_session(directory: Path, session: str, out: Path, *, pubkeys: Iterable[Path] = (),
                   anchor: TrustAnchor | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the bundle for ``session``; returns a summary. Refuses a log that fails verification
    (which includes a log whose key is not pinned by ``anchor`` or ``pubkeys``)."""
    say = progress or (lambda _: None)
    say("verifying the log ...")
    report = verify_log(directory, pubkeys=pubkeys, anchor=anchor, keep_leaves=True,
                        progress=lambda n: say(f"  {n} records checked"))
    if not report.ok:
        raise BundleError(f"the log fails verification: {report.problems[0]}")
    cp = report.latest_checkpoint
    if cp is None:
        raise BundleError("the log has no signed checkpoint yet")
    picked = [(line, rec) for line, rec in iter_records(directory)
              if isinstance(rec.get("event"), dict) and rec["event"].get("session") == session]
    if not picked:
        raise BundleError(f"no records of session {session}")
    if (event_kind(picked[0][1]["event"]) is EventKind.SESSION_START
            and event_kind(picked[-1][1]["event"]) not in TERMINAL_KINDS):
        raise BundleError(f"session {session} has not ended yet: a bundle could not prove it holds every record; "
                          "export it once the session has ended")
    last = max(int(rec["seq"]) for _, rec in picked)
    if last >= cp.tree_size:
        raise BundleError(f"session {session} has records after the last checkpoint ({cp.tree_size} records); "
                          "export again once a checkpoint covers them")
    key = report.keys[cp.key_id]
    view = TreeView(report.leaves[:cp.tree_size])
    records = []
    for i, (line, rec) in enumerate(picked):
        seq = int(rec["seq"])
        records.append({"index": seq, "record": line.data.decode("utf-8"),
                        "inclusion_proof": [h.hex() for h in view.inclusion(seq, cp.tree_size)]})
        if (i + 1) % 1000 == 0:
            say(f"  {i + 1}/{len(picked)} records proved")
    bundle = {"format": BUNDLE_FORMAT, "log_id": report.log_id, "session": session,
              "exported_ms": int(time.time() * 1000), "checkpoint": cp.to_json(),
              "public_key": {"key_id": cp.key_id, "ed25519": raw_public(key).hex()}, "records": records}
    out.write_bytes(orjson.dumps(bundle, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")
    return {"records": len(records), "tree_size": cp.tree_size, "key_id": cp.key_id}


@dataclass
class BundleReport:
    session: str = ""
    records: int = 0
    key_id: str = ""
    anchor: str = ""  # what pinned the bundle's key
    events: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def load_bundle(path: Path) -> dict[str, Any]:
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise BundleError(f"{path}: cannot read bundle: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not a {BUNDLE_FORMAT} bundle")
    return data


def verify_bundle(path: Path, *, pubkeys: Iterable[Path] = (), anchor: TrustAnchor | None = None) -> BundleReport:
    """Check a bundle against a pinned key (``anchor``, else ``pubkeys``): signature, inclusion, completeness."""
    report = BundleReport()
    try:
        data = load_bundle(path)
        cp = Checkpoint.from_json(data.get("checkpoint"))
        pk = data.get("public_key") or {}
        key = public_from_raw_hex(str(pk.get("ed25519")))
        files = list(pubkeys)
        if anchor is None and files:
            anchor = TrustAnchor.from_files(files, "--pubkey " + ", ".join(map(str, files)))
    except (BundleError, ValueError, KeyError_) as exc:
        report.problems.append(str(exc))
        return report
    report.session = str(data.get("session"))
    report.key_id = key_id(key)
    if cp.log_id != data.get("log_id"):
        report.problems.append("checkpoint belongs to another log than the bundle names")
    if anchor is None:
        report.anchor = "none: the bundle's own public key (self-asserted)"
        report.problems.append(f"the bundle's key (key id {report.key_id}) is not pinned: whoever forged the bundle "
                               "could have put their key in it; pass --pubkey or --config")
    else:
        report.anchor = anchor.source
        if report.key_id not in anchor.keys:
            report.problems.append(f"bundle is signed by key id {report.key_id}, which is not pinned by "
                                   f"{anchor.source}")
    bad = cp.verify({report.key_id: key})
    if bad is not None:
        report.problems.append(f"checkpoint for {cp.tree_size} records is {bad}")
        return report
    root = bytes.fromhex(cp.root)
    prev_index, prev_hash = -1, ""
    for entry in data.get("records") or []:
        try:
            index = int(entry["index"])
            raw = str(entry["record"]).encode("utf-8")
            proof = [bytes.fromhex(h) for h in entry["inclusion_proof"]]
        except (KeyError, TypeError, ValueError):
            report.problems.append("malformed record entry")
            continue
        h = leaf_hash(raw)
        if not verify_inclusion(h, index, cp.tree_size, proof, root):
            report.problems.append(f"record {index}: not included in the signed tree (modified or forged)")
            continue
        rec = orjson.loads(raw)
        if rec.get("seq") != index:
            report.problems.append(f"record {index}: carries record number {rec.get('seq')}")
        if index <= prev_index:
            report.problems.append(f"record {index}: follows record {prev_index} (records reordered or duplicated)")
        elif prev_hash and index == prev_index + 1 and rec.get("prev") != prev_hash:
            report.problems.append(f"record {index}: hash chain does not link to record {prev_index}")
        event = rec.get("event") or {}
        if event.get("session") != report.session:
            report.problems.append(f"record {index}: belongs to session {event.get('session')}")
        report.events.append({"index": index, **event})
        prev_index, prev_hash = max(prev_index, index), h.hex()
        report.records += 1
    if report.records == 0 and not report.problems:
        report.problems.append("bundle holds no records")
    elif report.events:
        _check_complete(report)
    return report


def _check_complete(report: BundleReport) -> None:
    """Every record of the session, in order: session_seq 0..n-1, and a terminal record counting n.

    An HTTP or gRPC caller's "session" (all exchanges of one token) has no terminal record, and its
    numbering starts again at 0 when the proxy restarts: each run must be contiguous, and the tail cannot
    be proven.
    """
    events = report.events
    http = event_kind(events[0]) not in (EventKind.SESSION_START, EventKind.AUTH_FAILED)
    expected = 0
    for e in events:
        n = e.get("session_seq")
        if not isinstance(n, int):
            report.problems.append(f"record {e['index']}: carries no session_seq: the bundle cannot prove it holds "
                                   "every record of the session")
            return
        if n == 0 and http and expected:
            expected = 0  # a proxy restart: a new run of this caller's records
        if n != expected:
            what = (f"record(s) with session_seq {expected}..{n - 1} missing (removed)" if n > expected
                    else f"session_seq {n} where {expected} belongs (records reordered or duplicated)")
            report.problems.append(f"record {e['index']}: incomplete session: {what}")
            return
        expected = n + 1
    last = events[-1]
    if event_kind(last) in TERMINAL_KINDS:
        if last.get("session_records") != expected:
            report.problems.append(f"record {last['index']}: the session's {last.get('event')} counts "
                                   f"{last.get('session_records')} records, the bundle holds {expected}")
    elif http:
        report.warnings.append(f"an HTTP or gRPC caller's records have no end record: the bundle proves its "
                               f"{expected} records are complete and in order, not that none followed")
    else:
        report.problems.append(f"the bundle ends at record {last['index']} ({last.get('event')}), not at the session's "
                               "end: records after it may have been removed")

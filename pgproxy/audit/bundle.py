"""Evidence bundles: one session's records with Merkle inclusion proofs against a signed checkpoint.

`pgproxy audit export` writes one JSON file (format ``pgproxy-audit-bundle/v1``, see docs/audit.md);
`pgproxy audit verify-bundle` checks it offline: the checkpoint's Ed25519 signature, that the bundled
public key has the named key id (and is one of ``--pubkey`` when given), and every record's inclusion
proof against the checkpoint's root.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .keys import Checkpoint, key_id, load_public_key, public_from_raw_hex, raw_public
from .logformat import BUNDLE_FORMAT, iter_records
from .merkle import TreeView, leaf_hash, verify_inclusion
from .verify import load_keyring, verify_log


class BundleError(Exception):
    pass


def export_session(directory: Path, session: str, out: Path, *, pubkeys: Iterable[Path] = (),
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the bundle for ``session``; returns a summary. Refuses a log that fails verification."""
    say = progress or (lambda _: None)
    say("verifying the log ...")
    report = verify_log(directory, pubkeys=pubkeys, keep_leaves=True,
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
    last = max(int(rec["seq"]) for _, rec in picked)
    if last >= cp.tree_size:
        raise BundleError(f"session {session} has records after the last checkpoint ({cp.tree_size} records); "
                          "export again once a checkpoint covers them")
    keys, _ = load_keyring(directory, pubkeys)
    key = keys[cp.key_id]
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
    trusted: bool = False
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


def verify_bundle(path: Path, *, pubkeys: Iterable[Path] = ()) -> BundleReport:
    report = BundleReport()
    try:
        data = load_bundle(path)
        cp = Checkpoint.from_json(data.get("checkpoint"))
        pk = data.get("public_key") or {}
        key = public_from_raw_hex(str(pk.get("ed25519")))
    except (BundleError, ValueError) as exc:
        report.problems.append(str(exc))
        return report
    report.session = str(data.get("session"))
    report.key_id = key_id(key)
    if cp.log_id != data.get("log_id"):
        report.problems.append("checkpoint belongs to another log than the bundle names")
    trusted = {key_id(k): k for k in (load_public_key(p) for p in pubkeys)}
    if trusted:
        if report.key_id not in trusted:
            report.problems.append(f"bundle is signed by key id {report.key_id}, which is not one of --pubkey")
        report.trusted = True
    else:
        report.warnings.append(f"the bundle's own public key (key id {report.key_id}) was used; pass --pubkey "
                               "to check it is the operator's key")
    bad = cp.verify({report.key_id: key})
    if bad is not None:
        report.problems.append(f"checkpoint for {cp.tree_size} records is {bad}")
        return report
    root = bytes.fromhex(cp.root)
    prev_index, prev_hash = -2, ""
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
        if index == prev_index + 1 and rec.get("prev") != prev_hash:
            report.problems.append(f"record {index}: hash chain does not link to record {prev_index}")
        event = rec.get("event") or {}
        if event.get("session") != report.session:
            report.problems.append(f"record {index}: belongs to session {event.get('session')}")
        report.events.append({"index": index, **event})
        prev_index, prev_hash = index, h.hex()
        report.records += 1
    if report.records == 0 and not report.problems:
        report.problems.append("bundle holds no records")
    return report

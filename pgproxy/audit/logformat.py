"""The on-disk layout of the signed audit log, shared by the writer, the verifier and the tools.

A log directory holds:

- ``log.json``: ``{"format": "pgproxy-audit-log/v1", "log_id": <32 hex>, "created_ms": <int>}``;
- ``segment-<first record number, 12 digits>.jsonl``: records, one canonical JSON object per line;
- ``checkpoints.jsonl``: signed checkpoints, one canonical JSON object per line;
- ``keys/<key id>.pub``: the public keys that signed checkpoints (PEM);
- ``resume.json``: the Merkle frontier at a checkpoint and where its last record lies, so that a writer
  reopening the log verifies only what follows (see ``verify.ResumePoint``);
- ``lock``: locked by the writing process (its pid and host inside), so a second writer is refused;
- ``*.torn`` files: bytes of an incomplete final record set aside when the log was reopened after a crash.

See docs/audit.md for the exact encoding.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

LOG_FORMAT = "pgproxy-audit-log/v1"
BUNDLE_FORMAT = "pgproxy-audit-bundle/v1"
META_FILE = "log.json"
CHECKPOINTS_FILE = "checkpoints.jsonl"
KEYS_DIR = "keys"
RESUME_FILE = "resume.json"  # where a reopening writer resumes (a cache, checked against the signed roots)
LOCK_FILE = "lock"  # held (flock) by the one process writing the log
SEGMENT_RE = re.compile(r"^segment-(\d{12})\.jsonl$")


def segment_name(first_seq: int) -> str:
    return f"segment-{first_seq:012d}.jsonl"


def canonical(obj: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8 (orjson); non-JSON values become their ``str()``."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS, default=str)


def genesis_hash(log_id: str) -> str:
    """The ``prev`` of record 0: binds the chain to the log id."""
    return hashlib.sha256(b"pgproxy-audit-genesis\n" + log_id.encode("ascii")).hexdigest()


def read_meta(directory: Path) -> dict[str, Any]:
    data = orjson.loads((directory / META_FILE).read_bytes())
    if not isinstance(data, dict) or data.get("format") != LOG_FORMAT or not isinstance(data.get("log_id"), str):
        raise ValueError(f"{directory / META_FILE}: not a {LOG_FORMAT} log")
    return data


def segment_first(segment: Path) -> int:
    """The number of a segment's first record, from its name."""
    return int(segment.name.split("-")[1].split(".")[0])


def list_segments(directory: Path) -> list[tuple[int, Path]]:
    """(first record number, path) of every segment, in order."""
    found = []
    for p in directory.iterdir():
        m = SEGMENT_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


@dataclass(frozen=True, slots=True)
class RawLine:
    path: Path
    line_no: int  # 1-based within its file
    offset: int  # byte offset of the line within its file
    data: bytes  # without the newline
    complete: bool  # False for a final line with no newline (a torn write)
    last_in_log: bool  # the final line of the last segment


def iter_lines(directory: Path, start: tuple[int, int] = (0, 0)) -> Iterator[RawLine]:
    """Every line of every segment, in log order; from ``start`` = (a segment's first record number,
    byte offset in it) on, when given (line numbers then count from there)."""
    segments = [(first, path) for first, path in list_segments(directory) if first >= start[0]]
    for i, (first, path) in enumerate(segments):
        skip = start[1] if first == start[0] else 0
        with path.open("rb") as f:
            f.seek(skip)
            data = f.read()
        pos, line_no = 0, 0
        n = len(data)
        while pos < n:
            end = data.find(b"\n", pos)
            line_no += 1
            complete = end >= 0
            if not complete:
                end = n
            last = i == len(segments) - 1 and end >= n - 1
            yield RawLine(path, line_no, skip + pos, data[pos:end], complete, last)
            pos = end + 1


def iter_records(directory: Path) -> Iterator[tuple[RawLine, dict[str, Any]]]:
    """Complete, parseable records in order (for the read-only tools; ``verify`` checks everything)."""
    for line in iter_lines(directory):
        if not line.complete:
            continue
        try:
            rec = orjson.loads(line.data)
        except orjson.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            yield line, rec


def read_checkpoint_lines(path: Path) -> list[tuple[int, bytes, bool]]:
    """(line number, bytes, complete) of a checkpoints file; empty when it does not exist."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    out = [(i + 1, line, True) for i, line in enumerate(lines[:-1])]
    if lines[-1]:
        out.append((len(lines), lines[-1], False))
    return out

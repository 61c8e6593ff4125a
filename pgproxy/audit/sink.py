"""Where session and statement events go: the seam between the proxy and the audit log.

The proxy reaches its sink through ``events.AuditEmitter``, which stamps, redacts and numbers every
event (no tokens, no upstream credentials; masking applies before this point). ``emit`` never blocks
the event loop: the JSON-lines sink buffers in memory and writes in batches. A sink that cannot
write raises ``AuditUnavailable`` so the caller can refuse to run statements it could not record (fail closed).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..core.plugins import AuditUnavailable as AuditUnavailable  # raised by every sink
from .logformat import canonical


class AuditSink(Protocol):
    """Sinks that store bytes also offer ``emit_encoded(event, encoded)``: the emitter then hands them
    the event's canonical JSON, encoded once."""

    def emit(self, event: dict[str, Any]) -> None:
        """Accept one event; raise AuditUnavailable when it cannot be recorded."""

    def flush(self) -> None:
        """Make every accepted event durable as far as the sink's policy says."""

    def close(self) -> None: ...


class MemoryAuditSink:
    """Keeps events in a list: for embedding the proxy in tests and tools."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class JsonLinesAuditSink:
    """Appends one JSON object per line to a file, written in batches of ``batch_size`` events.

    Used from the event loop's thread only (no locking on the per-statement path).
    """

    def __init__(self, path: Path, *, batch_size: int = 256) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "ab")
        self._lines: list[bytes] = []
        self._batch_size = batch_size
        self._broken: str | None = None
        self.on_write: Callable[[float], None] | None = None  # told each batch's write time (metrics)

    @property
    def pending_records(self) -> int:
        """Events accepted but not written yet."""
        return len(self._lines)

    @property
    def problem(self) -> str | None:
        """Why the log cannot be written now (events are refused), or None when it can."""
        return self._broken

    def emit(self, event: dict[str, Any]) -> None:
        self.emit_encoded(event, canonical(event))

    def emit_encoded(self, event: dict[str, Any], encoded: bytes) -> None:
        """``emit`` with the event already encoded (canonical JSON)."""
        if self._broken is not None:
            raise AuditUnavailable(self._broken)
        lines = self._lines
        lines.append(encoded)
        if len(lines) >= self._batch_size:
            self.flush()

    def flush(self) -> None:
        if self._broken is not None:
            raise AuditUnavailable(self._broken)
        lines, self._lines = self._lines, []
        if not lines:
            return
        started = time.perf_counter()
        try:
            self._file.write(b"\n".join(lines) + b"\n")
            self._file.flush()
        except OSError as exc:
            self._broken = f"audit log {self.path} is not writable: {exc.strerror}"
            raise AuditUnavailable(self._broken) from None
        if self.on_write is not None:
            self.on_write(time.perf_counter() - started)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._file.close()

"""Audit writes of the companion proxies (HTTP, gRPC): a record that cannot be written stops what follows.

A request's record is written when it ends. If the sink refuses it (``AuditUnavailable``), that request
has already run, but no further one starts until the sink accepts writes again: ``writable`` tries a
flush before each.
"""

from __future__ import annotations

import logging
from typing import Any

from .sink import AuditSink, AuditUnavailable

log = logging.getLogger(__name__)


class AuditGuard:
    def __init__(self, sink: AuditSink, what: str) -> None:
        self.sink = sink
        self.what = what  # "http exchange", "grpc call": for the log line
        self.broken = False

    def emit(self, event: dict[str, Any], ref: object) -> None:
        """Write ``event`` (the record of ``ref``); on failure, refuse what follows until ``writable``."""
        try:
            self.sink.emit(event)
        except AuditUnavailable as exc:
            self.broken = True
            log.error("cannot record %s %s: %s", self.what, ref, exc)

    def writable(self) -> bool:
        """False while the sink still refuses writes after a failed one."""
        if self.broken:
            try:
                self.sink.flush()
            except Exception:
                return False
            self.broken = False
        return True

"""How `pgproxy serve` writes its own log to stderr: text lines, or one JSON object per line.

A JSON line has ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger`` and ``message``, the
``session`` id and token ``subject`` when the line was logged inside a session's task (see
``session_context``) or names a session the usual way (``"session %s: ..."``), and ``exc`` with the
traceback of a logged exception. It adds nothing the proxy does not already log: never a token.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Protocol

import orjson

from .config import LOG_FORMATS

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Subject(Protocol):
    @property
    def subject(self) -> str: ...


class LogSession(Protocol):
    """What a log line may name of the session it was logged in (a ``Session`` fits)."""

    @property
    def id(self) -> str: ...

    @property
    def identity(self) -> _Subject | None: ...


# Set by the listener in each session's task, so every line logged there names the session.
session_context: ContextVar[LogSession | None] = ContextVar("pgproxy_log_session", default=None)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, encoded with orjson."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        session = session_context.get()
        if session is not None:
            entry["session"] = session.id
            identity = session.identity
            if identity is not None:
                entry["subject"] = identity.subject
        elif isinstance(record.msg, str) and record.msg.startswith("session %s") and isinstance(record.args, tuple) \
                and record.args:
            entry["session"] = str(record.args[0])
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


def use_log_format(log_format: str) -> None:
    """Switch the root logger's handlers to ``log_format`` (one of LOG_FORMATS)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)


def status_line(message: str, log_format: str, logger: str = "pgproxy") -> str:
    """``message`` as a line of the log format, for lines printed whatever the log level."""
    if log_format != "json":
        return message
    return JsonFormatter().format(logging.makeLogRecord({"msg": message, "levelname": "INFO", "levelno": 20,
                                                         "name": logger}))

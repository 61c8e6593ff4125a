"""SQLSTATE codes the proxy itself raises, and builders for its own ErrorResponses.

Clients branch on SQLSTATE, so every error the proxy originates uses the code PostgreSQL would use for
the same situation (see the "PostgreSQL Error Codes" appendix).
"""

from __future__ import annotations

from .messages import ErrorResponse

PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"
UNABLE_TO_CONNECT = "08001"
INVALID_AUTHORIZATION = "28000"
INVALID_PASSWORD = "28P01"
FEATURE_NOT_SUPPORTED = "0A000"
PROGRAM_LIMIT_EXCEEDED = "54000"
CANNOT_CONNECT_NOW = "57P03"
ADMIN_SHUTDOWN = "57P01"
INSUFFICIENT_PRIVILEGE = "42501"
CHARACTER_NOT_IN_REPERTOIRE = "22021"
INTERNAL_ERROR = "XX000"
SYNTAX_ERROR = "42601"
# The proxy's own class PX (approvals): not a PostgreSQL code, so clients can tell them apart.
APPROVAL_REQUIRED = "PXA01"  # refuse mode: ask an approver, then run the same statement again
APPROVAL_DENIED = "PXA02"  # denied, timed out, expired or already used
TOO_MANY_CONNECTIONS = "53300"
IDLE_SESSION_TIMEOUT = "57P05"
IDLE_IN_TRANSACTION_TIMEOUT = "25P03"


def fatal(sqlstate: str, message: str, *, detail: str | None = None, hint: str | None = None) -> bytes:
    """An encoded FATAL ErrorResponse: the session ends after it is sent."""
    return ErrorResponse.build("FATAL", sqlstate, message, detail=detail, hint=hint).encode()


def error(sqlstate: str, message: str, *, detail: str | None = None, hint: str | None = None) -> ErrorResponse:
    """An ERROR-level response: the statement fails, the session goes on."""
    return ErrorResponse.build("ERROR", sqlstate, message, detail=detail, hint=hint)

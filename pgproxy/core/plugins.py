"""The types features plug into a live session with (policy, approvals, masking, result capture).

A ``FrontendGate`` sees every statement-bearing request (Query, Parse, Bind, Execute, FunctionCall) as a
``Statement`` before it goes upstream and answers None (let it through), ``Refuse``, ``Hold`` or
``Rewrite``. A ``BackendHook`` sees (and may replace) every backend message of the types it was added for.

A refused request is not dropped: the session replaces it by a request that makes the server itself
fail at exactly that point, and the server's error then by the gate's. So ordering, pipelining, "skip
until Sync" and the transaction's aborted state all stay exactly as PostgreSQL would have them.

A rewritten request (``Rewrite``, e.g. a statement of a masked identity) is forwarded with the gate's
text; the session tracks and audits the original.

A held request (e.g. waiting for a human approval) stops the client's stream at that message: nothing
after it is forwarded and the client socket is not read until ``Hold.decision`` resolves to None
(go on), a ``Refuse`` or a ``Rewrite``. Responses to earlier requests keep flowing meanwhile.

Gates and hooks see the session only through ``SessionContext``: who is connected, where, the
exchange tracker, the audit log, and the hook registry; never the sockets or the server.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..protocol.framing import MessageHandler
from ..protocol.messages import ErrorResponse, NoticeResponse
from ..protocol.tracker import ExchangeTracker

if TYPE_CHECKING:  # leaves, imported only for their types
    from ..config import UpstreamConfig
    from ..metrics import ProxyMetrics
    from .statement import Statement

IdentityT = TypeVar("IdentityT", covariant=True)

# A backend message hook: the message body in, replacement message bytes (or None: keep it) out.
BackendHook = MessageHandler


@dataclass(frozen=True, slots=True)
class Refuse:
    """Fail this request with ``error`` (an ERROR-level ErrorResponse); the session goes on."""

    error: ErrorResponse


@dataclass(frozen=True, slots=True)
class Hold:
    """Suspend this request until ``decision`` gives None (forward it), a Refuse or a Rewrite.

    ``notice`` (e.g. "waiting for approval 42") is sent to the client at once.
    """

    decision: Awaitable[Refuse | Rewrite | None]
    notice: NoticeResponse | None = None


@dataclass(frozen=True, slots=True)
class Rewrite:
    """Forward the request (a Query or Parse) with ``sql`` as its statement text."""

    sql: str


Verdict = Refuse | Hold | Rewrite | None


class SessionContext(Protocol[IdentityT]):
    """What a gate or hook may know of and do with the session it serves (the identity's type is the
    caller's: pgproxy.identity.Identity in a running proxy)."""

    @property
    def id(self) -> str:
        """The session's id, as the audit log names it."""

    @property
    def identity(self) -> IdentityT | None:
        """Who connected (None before login)."""

    @property
    def database(self) -> str:
        """The upstream database the session logged in to."""

    @property
    def db_role(self) -> str:
        """The upstream role the session logged in as."""

    @property
    def tracker(self) -> ExchangeTracker:
        """The session's request/response pairing (transaction status, outstanding requests, encoding)."""

    @property
    def upstream_config(self) -> UpstreamConfig:
        """Where the upstream database is (for a feature's own connection as the session's role)."""

    @property
    def metrics(self) -> ProxyMetrics:
        """The proxy's metrics."""

    def emit_audit(self, event: dict[str, Any]) -> None:
        """Write ``event`` to the proxy's audit log as it is; raises when the log cannot take it."""

    def add_backend_hook(self, msg_type: int, hook: BackendHook, *, first: bool = False) -> None:
        """Let ``hook`` rewrite every backend message of ``msg_type`` from the next one on."""


class FrontendGate(Protocol):
    def inspect(self, session: SessionContext[Any], statement: Statement) -> Verdict:
        """None lets the request through; Refuse fails it in place; Hold suspends the stream; Rewrite
        forwards other text."""


class AuditUnavailable(Exception):
    """The audit log cannot be written: statements must not run unrecorded."""

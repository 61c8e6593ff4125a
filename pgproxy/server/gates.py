"""Seams where later layers (policy, approvals, masking) plug into a live session.

A ``FrontendGate`` sees every statement-bearing request (Query, Parse, Bind, Execute, FunctionCall)
before it goes upstream and may refuse it. A refused request is not dropped: it is replaced by a
request that makes the server itself fail at exactly that point (see ``substitute_for_refusal``), and
the server's error is then replaced by the gate's. So ordering, pipelining, "skip until Sync" and the
transaction's aborted state all stay exactly as PostgreSQL would have them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..protocol.messages import Bind, ErrorResponse, Execute, FunctionCall, Parse, Query

if TYPE_CHECKING:
    from ..protocol.tracker import Pending
    from .session import Session

# Text that fails in the server's parser with a syntax error, whatever the session's state.
_REFUSED_SQL = "pgproxy refused this statement"
_MISSING = "\x01pgproxy refused"


@dataclass(frozen=True, slots=True)
class Refuse:
    """Fail this request with ``error`` (an ERROR-level ErrorResponse); the session goes on."""

    error: ErrorResponse


class FrontendGate(Protocol):
    def inspect(self, session: Session, request: Pending, msg_type: int, body: memoryview) -> Refuse | None:
        """Return Refuse to fail the request, None to let it through.

        ``request`` is the tracker's entry: ``request.result.sql`` (and ``.bind``) for Query, Execute
        and FunctionCall, ``request.sql`` for Parse, ``request.portal`` for Bind.
        """


def substitute_for_refusal(msg_type: int, body: memoryview) -> tuple[bytes, str]:
    """A request that fails upstream where ``msg_type`` would have run, and the SQLSTATE it fails with."""
    if msg_type == 0x51:  # Query
        return Query(_REFUSED_SQL).encode(), "42601"
    if msg_type == 0x50:  # Parse: keep the statement name so later Binds fail as they would
        return Parse(Parse.decode(body).name, _REFUSED_SQL).encode(), "42601"
    if msg_type == 0x42:  # Bind: a prepared statement that cannot exist
        return Bind(Bind.decode(body).portal, _MISSING).encode(), "26000"
    if msg_type == 0x45:  # Execute: a portal that cannot exist
        return Execute(_MISSING, 0).encode(), "34000"
    if msg_type == 0x46:  # FunctionCall: OID 0 is never a function
        return FunctionCall(0, (), (), 0).encode(), "42883"
    raise ValueError(f"message type {chr(msg_type)!r} cannot be refused")

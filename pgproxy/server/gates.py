"""Seams where later layers (policy, approvals, masking) plug into a live session.

A ``FrontendGate`` sees every statement-bearing request (Query, Parse, Bind, Execute, FunctionCall)
before it goes upstream and answers None (let it through), ``Refuse`` or ``Hold``.

A refused request is not dropped: it is replaced by a request that makes the server itself fail at
exactly that point (see ``substitute_for_refusal``), and the server's error is then replaced by the
gate's. So ordering, pipelining, "skip until Sync" and the transaction's aborted state all stay exactly
as PostgreSQL would have them.

A rewritten request (``Rewrite``, e.g. a statement of a masked identity) is forwarded as the gate's
replacement message; the session tracks and audits the original.

A held request (e.g. waiting for a human approval) stops the client's stream at that message: nothing
after it is forwarded and the client socket is not read until ``Hold.decision`` resolves to None
(go on) or a ``Refuse``. Responses to earlier requests keep flowing meanwhile.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..protocol.messages import Bind, ErrorResponse, Execute, FunctionCall, NoticeResponse, Parse, Query
from ..protocol.tracker import decode_bind_leniently

if TYPE_CHECKING:
    from ..core.session import SessionCore as Session

REQUEST_KINDS = {0x51: "query", 0x50: "parse", 0x42: "bind", 0x45: "execute", 0x46: "function"}

# Text that fails in the server's parser with a syntax error, whatever the session's state.
_REFUSED_SQL = "pgproxy refused this statement"
_MISSING = "\x01pgproxy refused"


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


@dataclass(slots=True)  # not frozen: built for every statement-bearing message, frozen init costs more
class Request:
    """A statement-bearing request as a gate sees it, before the server does (gates only read it)."""

    msg_type: int
    sql: str  # as the client sent it; for a FunctionCall: "<function call oid=N>"
    statement_name: str | None = None  # Parse, Bind, Execute
    bind_body: bytes | None = None  # Bind and Execute: the raw Bind message body
    # ``sql`` as the server reads it under the session's lexer settings (pgproxy.policy.reading), when
    # that differs from its default reading; or why the proxy could not read it that way.
    reading: str | None = None
    reading_error: Exception | None = None
    described: bool = True  # Execute: the server describes the portal's rows before they come

    def server_text(self) -> str:
        """The text to judge: what the server will parse; raises when the proxy cannot read it so."""
        if self.reading_error is not None:
            raise self.reading_error
        return self.sql if self.reading is None else self.reading

    @property
    def kind(self) -> str:
        """"query", "parse", "bind", "execute" or "function"."""
        return REQUEST_KINDS[self.msg_type]

    @property
    def bind(self) -> Bind | None:
        """The bound parameters (Bind, Execute); None when absent or malformed."""
        return decode_bind_leniently(self.bind_body)


class FrontendGate(Protocol):
    def inspect(self, session: Session, request: Request) -> Verdict:
        """None lets the request through; Refuse fails it in place; Hold suspends the stream."""


def rewritten_message(msg_type: int, body: memoryview, sql: str, codec: str) -> bytes:
    """The Query or Parse in ``body`` with its text replaced, encoded in the client's encoding."""
    text = sql.encode(codec) + b"\x00"
    if msg_type == 0x51:
        payload = text
    elif msg_type == 0x50:
        raw = bytes(body)
        name_end = raw.index(b"\x00") + 1
        query_end = raw.index(b"\x00", name_end) + 1
        payload = raw[:name_end] + text + raw[query_end:]  # the name and parameter types as sent
    else:
        raise ValueError(f"message type {chr(msg_type)!r} cannot be rewritten")
    return bytes([msg_type]) + (len(payload) + 4).to_bytes(4, "big") + payload


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

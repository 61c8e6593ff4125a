"""Wire bytes for the gates' verdicts (pgproxy.core.plugins): a rewritten request, and the request that
stands in for a refused one.

A refused request is not dropped: it is replaced by a request that makes the server itself fail at
exactly that point (``substitute_for_refusal``), and the server's error is then replaced by the gate's,
so ordering, pipelining, "skip until Sync" and the transaction's aborted state stay as PostgreSQL has them.
"""

from __future__ import annotations

from .codec import frame
from .messages import Bind, Execute, FunctionCall, Parse, Query
from .types import Frontend

# Text that fails in the server's parser with a syntax error, whatever the session's state.
_REFUSED_SQL = "pgproxy refused this statement"
_MISSING = "\x01pgproxy refused"


def rewritten_message(msg_type: int, body: memoryview, sql: str, codec: str) -> bytes:
    """The Query or Parse in ``body`` with its text replaced, encoded in the client's encoding."""
    text = sql.encode(codec)
    if msg_type == Frontend.QUERY:
        return frame(msg_type, text + b"\x00")
    if msg_type == Frontend.PARSE:  # the name and parameter types as sent
        return Parse.view(body, codec).with_query(text)
    raise ValueError(f"message type {chr(msg_type)!r} cannot be rewritten")


def substitute_for_refusal(msg_type: int, body: memoryview, codec: str | None = "utf-8") -> tuple[bytes, str]:
    """A request that fails upstream where ``msg_type`` would have run, and the SQLSTATE it fails with."""
    if msg_type == Frontend.QUERY:  # Query
        return Query(_REFUSED_SQL).encode(), "42601"
    if msg_type == Frontend.PARSE:  # Parse: keep the statement name so later Binds fail as they would
        return Parse(Parse.decode(body, codec).name, _REFUSED_SQL).encode(), "42601"
    if msg_type == Frontend.BIND:  # Bind: a prepared statement that cannot exist
        return Bind(Bind.decode(body, codec).portal, _MISSING).encode(), "26000"
    if msg_type == Frontend.EXECUTE:  # Execute: a portal that cannot exist
        return Execute(_MISSING, 0).encode(), "34000"
    if msg_type == Frontend.FUNCTION_CALL:  # FunctionCall: OID 0 is never a function
        return FunctionCall(0, (), (), 0).encode(), "42883"
    raise ValueError(f"message type {chr(msg_type)!r} cannot be refused")

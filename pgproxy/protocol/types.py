"""The message-type bytes of the PostgreSQL v3 protocol, one enum per direction.

The same byte means different messages in the two directions (``D`` is Describe from a client and
DataRow from a server; likewise ``C``, ``E``, ``S``, ``H``), so each direction has its own enum. Members
are ``IntEnum`` values: they compare and hash like the ``int`` the relay reads from a header, so a handler
map keyed by members is looked up with the raw type byte. On the per-message path bind the members to
module constants once (a class attribute lookup costs several times an int comparison).
"""

from __future__ import annotations

from enum import IntEnum


class Frontend(IntEnum):
    """Messages a client sends after the startup packet."""

    BIND = ord("B")
    CLOSE = ord("C")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_FAIL = ord("f")
    DESCRIBE = ord("D")
    EXECUTE = ord("E")
    FLUSH = ord("H")
    FUNCTION_CALL = ord("F")
    PARSE = ord("P")
    PASSWORD = ord("p")  # PasswordMessage, SASLInitialResponse and SASLResponse share this byte
    QUERY = ord("Q")
    SYNC = ord("S")
    TERMINATE = ord("X")


class Backend(IntEnum):
    """Messages a server sends."""

    AUTHENTICATION = ord("R")
    BACKEND_KEY_DATA = ord("K")
    BIND_COMPLETE = ord("2")
    CLOSE_COMPLETE = ord("3")
    COMMAND_COMPLETE = ord("C")
    COPY_BOTH_RESPONSE = ord("W")
    COPY_DATA = ord("d")
    COPY_DONE = ord("c")
    COPY_IN_RESPONSE = ord("G")
    COPY_OUT_RESPONSE = ord("H")
    DATA_ROW = ord("D")
    EMPTY_QUERY_RESPONSE = ord("I")
    ERROR_RESPONSE = ord("E")
    FUNCTION_CALL_RESPONSE = ord("V")
    NEGOTIATE_PROTOCOL_VERSION = ord("v")
    NO_DATA = ord("n")
    NOTICE_RESPONSE = ord("N")
    NOTIFICATION_RESPONSE = ord("A")
    PARAMETER_DESCRIPTION = ord("t")
    PARAMETER_STATUS = ord("S")
    PARSE_COMPLETE = ord("1")
    PORTAL_SUSPENDED = ord("s")
    READY_FOR_QUERY = ord("Z")
    ROW_DESCRIPTION = ord("T")


def backend_name(msg_type: int) -> str:
    """``DATA_ROW``-style name of a server message type, or its printable byte when it is not one."""
    try:
        return Backend(msg_type).name
    except ValueError:
        return repr(chr(msg_type))

"""Read a statement's text the way the server will: under the session's lexer settings.

PostgreSQL's lexer depends on two session settings that a client can change at any time:
``standard_conforming_strings`` (off: a backslash escapes inside '...' literals, so ``'x\\' AS a, '`` is
one string to the proxy's default reading and a string, a column and another string to the server) and
``client_encoding`` (in SJIS, BIG5, GBK, UHC, JOHAB and GB18030 a multibyte character may end in the
byte of a quote or a backslash). Judging a text under other settings than the server's is a full bypass
of policy and masking, so:

* :func:`is_lexer_neutral` says whether a text reads the same under every setting (ASCII, no
  backslash): nearly every statement. Those are judged at once, even in a pipeline.
* Any other text is judged only once the settings that apply to it are known: any statement may change
  them (SET, set_config(), a trigger or a function it calls), and the server reports a change with
  ParameterStatus at its next ReadyForQuery, so the session waits for the ReadyForQuery after the last
  statement that ran before the text. Then
  :func:`server_reading` gives the text as the server reads it, in the default (standard) form that
  pglast parses: with ``standard_conforming_strings`` off, libpg_query (the server's own lexer and
  grammar, in pglast) parses it with that setting and deparses the tree; E'' literals are written out
  wherever a backslash remains, so the reading means the same under either setting.

Never guesses: a text libpg_query cannot read under the session's settings raises ``SqlSyntaxError``.
"""

from __future__ import annotations

import ctypes
import functools

import pglast.parser
from cachetools import LRUCache, cached

from ..protocol import errors
from ..protocol.messages import ErrorResponse
from .statement import SqlSyntaxError

# libpg_query parser option: parse as if standard_conforming_strings = off (pg_query.h).
_DISABLE_STANDARD_CONFORMING_STRINGS = 32
_BACKSLASH = 0x5C


def is_lexer_neutral(raw: bytes) -> bool:
    """True when ``raw`` (a statement's bytes as sent) lexes identically under every client_encoding
    and both values of standard_conforming_strings: all of it ASCII, and no backslash."""
    return raw.isascii() and _BACKSLASH not in raw


class _ParseError(ctypes.Structure):
    _fields_ = [("message", ctypes.c_char_p), ("funcname", ctypes.c_char_p), ("filename", ctypes.c_char_p),
                ("lineno", ctypes.c_int), ("cursorpos", ctypes.c_int), ("context", ctypes.c_char_p)]


class _Protobuf(ctypes.Structure):
    _fields_ = [("len", ctypes.c_size_t), ("data", ctypes.c_void_p)]


class _ProtobufParseResult(ctypes.Structure):
    _fields_ = [("parse_tree", _Protobuf), ("stderr_buffer", ctypes.c_char_p),
                ("error", ctypes.POINTER(_ParseError))]


@functools.cache
def _libpg_query() -> ctypes.CDLL:
    """The libpg_query linked into pglast's extension module (its C API is exported there)."""
    lib = ctypes.CDLL(pglast.parser.__file__)
    lib.pg_query_parse_protobuf_opts.restype = _ProtobufParseResult
    lib.pg_query_parse_protobuf_opts.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.pg_query_free_protobuf_parse_result.restype = None
    lib.pg_query_free_protobuf_parse_result.argtypes = [_ProtobufParseResult]
    return lib


def server_reading(sql: str, *, standard_conforming_strings: bool) -> str:
    """``sql`` as the server reads it under ``standard_conforming_strings``, in standard form."""
    if standard_conforming_strings or "\\" not in sql:
        return sql
    return _read_without_standard_strings(sql)


@cached(LRUCache(maxsize=1024))
def _read_without_standard_strings(sql: str) -> str:
    lib = _libpg_query()
    utf8 = sql.encode("utf-8")
    result = lib.pg_query_parse_protobuf_opts(utf8, _DISABLE_STANDARD_CONFORMING_STRINGS)
    try:
        if result.error:
            error = result.error.contents
            message = (error.message or b"syntax error").decode("utf-8", "replace")
            # cursorpos is a 1-based byte offset: report characters, as PostgreSQL does
            position = len(utf8[:max(error.cursorpos - 1, 0)].decode("utf-8", "replace")) + 1
            raise SqlSyntaxError(message, position)
        tree = ctypes.string_at(result.parse_tree.data, result.parse_tree.len)
    finally:
        lib.pg_query_free_protobuf_parse_result(result)
    reading: str = pglast.parser.deparse_protobuf(tree)
    return reading


def unparsed_error(exc: SqlSyntaxError, why: str) -> ErrorResponse:
    """The proxy's refusal of a statement its parser could not read (position as the server reports it)."""
    fields = (("S", "ERROR"), ("V", "ERROR"), ("C", errors.SYNTAX_ERROR),
              ("M", f"pgproxy could not parse this statement: {exc.message}"),
              ("D", f"The statement was not sent to the server: {why}."),
              ("H", "Check the syntax; statements the proxy's parser (PostgreSQL's grammar) cannot read are "
                    "refused where a policy or masking rule applies."),
              ("P", str(exc.position)))
    return ErrorResponse(fields)

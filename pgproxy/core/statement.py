"""The one ``Statement`` object per statement-bearing request, shared by policy, masking and audit.

The session builds it from the tracker's decoding of the client's bytes (in the client's encoding) and
the text as the server will read it (``reading``: pgproxy.core.reading); gates judge it, the tracker's
StatementResult carries it to the audit event. Its pglast parse is done lazily and at most once
(``tree``); analyses of it are memoized on it (``derive``), so each consumer reads the same parse.

The tree is shared: consumers only read it. One that must change a tree (the masking rewrite) takes it
over with ``take_tree`` instead, and a later reader then gets a parse of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pglast import parse_sql
from pglast.parser import ParseError

from ..protocol.messages import Bind
from ..protocol.types import Frontend

T = TypeVar("T")
Tree = tuple[Any, ...]  # pglast RawStmt nodes, one per statement of the text

REQUEST_KINDS: dict[int, str] = {Frontend.QUERY: "query", Frontend.PARSE: "parse", Frontend.BIND: "bind",
                                  Frontend.EXECUTE: "execute", Frontend.FUNCTION_CALL: "function"}
_FUNCTION = Frontend.FUNCTION_CALL


class SqlSyntaxError(Exception):
    """The text does not parse; ``position`` is 1-based in characters, as PostgreSQL reports it."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.message = message
        self.position = position


def parse(sql: str) -> Tree:
    """``sql`` parsed by pglast (libpg_query: PostgreSQL's grammar): the one place statement text is parsed."""
    try:
        return tuple(parse_sql(sql))
    except ParseError as exc:
        message = str(exc.args[0]) if exc.args else str(exc)
        location = exc.args[1] if len(exc.args) > 1 else None
        # pglast gives a 0-based character offset; "at end of input" has none: PostgreSQL reports the end.
        raise SqlSyntaxError(message, (location + 1) if isinstance(location, int) else len(sql) + 1) from None


class Statement:
    """A statement-bearing request (Query, Parse, Bind, Execute, FunctionCall) as gates and the audit see it."""

    __slots__ = ("_memo", "_tree", "bind_body", "described", "msg_type", "reading", "reading_error", "sql",
                 "statement_name")

    def __init__(self, msg_type: int, sql: str, statement_name: str | None = None, bind_body: bytes | None = None,
                 reading: str | None = None, reading_error: Exception | None = None, *,
                 described: bool = True) -> None:
        self.msg_type = msg_type
        self.sql = sql  # as the client sent it, decoded; for a FunctionCall: "<function call oid=N>"
        self.statement_name = statement_name  # Parse, Bind, Execute
        self.bind_body = bind_body  # Bind and Execute: the raw Bind message body
        # ``sql`` as the server reads it under the session's lexer settings (pgproxy.core.reading), when
        # that differs from its default reading; or why the proxy could not read it that way.
        self.reading = reading
        self.reading_error = reading_error
        self.described = described  # Execute: the server describes the portal's rows before they come
        self._tree: Tree | SqlSyntaxError | None = None
        self._memo: dict[Callable[[Statement], Any], Any] | None = None

    def __repr__(self) -> str:
        return f"Statement({self.kind}, {self.sql!r})"

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
        return Bind.lenient(self.bind_body)

    @property
    def tree(self) -> Tree:
        """The parse of ``server_text()``, done on first use (read it, never change it); raises
        SqlSyntaxError (also on later uses) when it does not parse."""
        tree = self._tree
        if tree is None:
            tree = self._tree = self._parse()
        if isinstance(tree, SqlSyntaxError):
            raise tree
        return tree

    def take_tree(self) -> Tree:
        """The parse for a consumer that changes it: this one's, handed over (a later ``tree`` parses again)."""
        tree = self.tree
        self._tree = None
        return tree

    def derive(self, analysis: Callable[[Statement], T]) -> T:
        """``analysis(self)``, computed once per statement (an exception is not kept: it is raised again)."""
        memo = self._memo
        if memo is not None and analysis in memo:
            value: T = memo[analysis]
            return value
        value = analysis(self)
        self.remember(analysis, value)
        return value

    def remember(self, key: Callable[[Statement], T], value: T) -> None:
        """Keep ``value`` for ``recall(key)``: a result a consumer computed with more than the statement."""
        if self._memo is None:
            self._memo = {key: value}
        else:
            self._memo[key] = value

    def recall(self, key: Callable[[Statement], T]) -> T | None:
        """What ``derive(key)`` or ``remember(key, ...)`` kept, None when nothing is kept."""
        memo = self._memo
        return memo.get(key) if memo is not None else None

    def _parse(self) -> Tree | SqlSyntaxError:
        if self.msg_type == _FUNCTION:
            raise ValueError("a fast-path function call has no SQL text to parse")
        try:
            return parse(self.server_text())
        except SqlSyntaxError as exc:
            return exc

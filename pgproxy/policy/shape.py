"""A statement's shape: its text with the constants taken out, the key of the caches that must hit on new literals.

LLM-written SQL and the simple query protocol put fresh literals in nearly every statement, so caches keyed
by the text miss. :func:`statement_shape` gives libpg_query's normalized text (PostgreSQL's own lexer and
grammar, in C: each constant becomes ``$n``, everything else stays as written), which is the same for two
statements that differ only in their constants. Analyses that never read a constant's value (the masking
rewrite check) or that say when they did (``classify``) cache their result by it.

No shape (None) for a text holding ``$`` (a parameter ``$1`` would read like a replaced constant; dollar
quotes are rare), a NUL (the C parser would stop there) or one libpg_query cannot parse: those texts are
analysed in full. Only a text that parses has a shape, so a cached analysis is never reused for a text
the proxy's parser would refuse.

Cached by text: the consumers of one statement (policy, masking) compute it once. Used from the proxy's
event loop only (the caches are not locked).
"""

from __future__ import annotations

from cachetools import LRUCache
from pglast.parser import ParseError, normalize

SHAPES_CACHED = 512  # by text: only the statements in flight need it
_NO_SHAPE = ""  # cached for texts without a shape (a real shape is never empty)

_shapes: LRUCache[str, str] = LRUCache(maxsize=SHAPES_CACHED)


def statement_shape(sql: str) -> str | None:
    """``sql`` with its constants replaced by ``$n`` (libpg_query's normalize); None when it has none."""
    shape = _shapes.get(sql)
    if shape is None:
        shape = _normalized(sql)
        _shapes[sql] = shape
    return shape or None


def _normalized(sql: str) -> str:
    if "$" in sql or "\x00" in sql:
        return _NO_SHAPE
    try:
        shape: str = normalize(sql)
    except ParseError:
        return _NO_SHAPE
    return shape

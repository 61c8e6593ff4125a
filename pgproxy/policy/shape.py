"""A statement's shape: its text with the constants taken out, the key of the caches that must hit on new literals.

LLM-written SQL and the simple query protocol put fresh literals in nearly every statement, so caches keyed
by the text miss. :func:`statement_shape` gives libpg_query's normalized text (PostgreSQL's own lexer and
grammar, in C: each constant becomes ``$n``, everything else stays as written), which is the same for two
statements that differ only in their constants. Analyses that never read a constant's value (the masking
rewrite check) or that say when they did (``classify``) cache their result by it.

No shape (None) for a text holding ``$`` (a parameter ``$1`` would read like a replaced constant; dollar
quotes are rare), a NUL (the C parser would stop there) or one libpg_query cannot parse: those texts are
analysed in full. Only a text that parses has a shape, so a cached analysis is never reused for a text
the proxy's parser would refuse. ``classify.analyse`` computes it once per text.
"""

from __future__ import annotations

from pglast.parser import ParseError, normalize


def statement_shape(sql: str) -> str | None:
    """``sql`` with its constants replaced by ``$n`` (libpg_query's normalize); None when it has none."""
    if "$" in sql or "\x00" in sql:
        return None
    try:
        shape: str = normalize(sql)
    except ParseError:
        return None
    return shape

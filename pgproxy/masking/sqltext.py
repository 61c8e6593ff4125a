"""Write rewritten statements as text that every supported server reads as the proxy meant it.

pglast's printer follows PostgreSQL 17 and assumes ``standard_conforming_strings = on``. A rewritten
statement goes to the session's server under the session's settings, so :class:`ServerStream`:

* writes every string constant that holds a backslash as an E'' literal (backslashes doubled), which
  reads the same whatever ``standard_conforming_strings`` is (the masks' own literals included);
* writes MERGE's ``WHEN NOT MATCHED`` without PostgreSQL 17's ``BY TARGET`` (the same clause; older
  servers know only the short form).

Must never print text whose meaning depends on a session setting.
"""

from __future__ import annotations

from typing import Any

from pglast.printers import dml
from pglast.stream import RawStream


class ServerStream(RawStream):
    """A RawStream whose string literals mean the same under either standard_conforming_strings."""

    def write_quoted_string(self, s: str) -> None:
        if "\\" in s:
            self.write("E'" + s.replace("\\", "\\\\").replace("'", "''") + "'")
        else:
            super().write_quoted_string(s)


def server_sql(node: Any) -> str:
    """``node`` (a statement or a RawStmt) as text for the server."""
    text: str = ServerStream()(node)
    return text


def _not_matched(node: Any, output: Any) -> None:
    output.write("NOT MATCHED")


# The printer is a module-level singleton that merge_stmt calls by the enum member's name.
dml.merge_match_kind_printer.MERGE_WHEN_NOT_MATCHED_BY_TARGET = _not_matched  # type: ignore[method-assign]

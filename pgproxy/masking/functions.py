"""Which server functions and system relations a masked identity may use: a fail-closed classification.

A masked identity's statement may call a function only when its name is classified *safe*: it operates
only on its arguments, reads catalog metadata only, or reads this session's own state. Everything else is
refused with the category that says why -- functions that run SQL text or read relations by name
(``ts_rewrite``, ``query_to_xml``), that show statement text or activity (``pg_stat_get_backend_activity``,
``pg_get_backend_memory_contexts``: a rewritten statement carries the keyed-hash pads), that read server
files, large objects or raw storage, that control the server, and any function the classification does not
know: user-defined functions in any language, extension functions, and built-ins of a newer server.

The names are the PostgreSQL 15 built-ins listed in pgproxy/masking/pg15_builtins.py plus the rules below;
tests/masking/test_function_classes.py checks that every function of the live server is covered. Name
patterns only ever refuse, so a function added by a newer server is refused until it is classified.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence

from . import pg15_builtins as pg15


class Category(enum.Enum):
    PURE = "operates only on its arguments"
    CATALOG = "reads catalog metadata only"
    SESSION = "reads or changes only this session's own state"
    UNCALLABLE = "takes an internal argument, so SQL cannot call it"
    RUNS_SQL = "runs SQL text or reads relations by name, past the rewrite"
    ACTIVITY = "shows statement text (with the mask expressions), statistics or other sessions' activity"
    FILES = "reads server files, large objects or raw storage"
    CONTROL = "controls other backends, replication or the server"
    INVOKED = "is a trigger function, handler or validator that only the server calls"


SAFE = frozenset({Category.PURE, Category.CATALOG, Category.SESSION})

_EXPLICIT: dict[str, Category] = {}
for _category, _names in ((Category.PURE, pg15.PURE), (Category.CATALOG, pg15.CATALOG),
                          (Category.SESSION, pg15.SESSION), (Category.RUNS_SQL, pg15.RUNS_SQL),
                          (Category.ACTIVITY, pg15.ACTIVITY), (Category.FILES, pg15.FILES),
                          (Category.CONTROL, pg15.CONTROL), (Category.INVOKED, pg15.INVOKED)):
    for _name in _names:
        assert _name not in _EXPLICIT, f"{_name} is classified twice"
        _EXPLICIT[_name] = _category

# Refusing families, by name (they apply to names the explicit lists do not hold, e.g. of a newer server).
FUNCTION_PATTERNS: tuple[tuple[re.Pattern[str], Category], ...] = (
    (re.compile(r"^pg_stat_"), Category.ACTIVITY),  # the statistics collector: counters, other sessions
    (re.compile(r"^pg_ls_"), Category.FILES),  # directory listings of the data directory
    (re.compile(r"^lo_"), Category.FILES),  # large objects, server-side lo_import / lo_export
    (re.compile(r"^pg_(replication_origin|logical)_|replication_slot"), Category.CONTROL),  # raw WAL changes
    (re.compile(r"^binary_upgrade_"), Category.CONTROL),
    (re.compile(r"^RI_FKey_"), Category.INVOKED),  # foreign-key trigger functions
    (re.compile(r"^dblink"), Category.RUNS_SQL),  # the dblink extension runs SQL on another connection
)
# Every relation named pg_stat* (pg_stat_*, pg_statio_*, pg_stats*, pg_statistic*): statistics or activity.
_STATISTICS_RELATION = re.compile(r"^pg_stat")
_REFUSED_RELATIONS: dict[str, Category] = {
    **{n: Category.ACTIVITY for n in pg15.ACTIVITY_RELATIONS},
    **{n: Category.FILES for n in pg15.FILE_RELATIONS},
    **{n: Category.CONTROL for n in pg15.CONTROL_RELATIONS},
}
SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")


def classify(name: str, *, internal_arguments: bool = False) -> Category | None:
    """The category of the pg_catalog function ``name``; None when nobody classified it.

    ``internal_arguments``: every overload of the name takes an ``internal`` argument (known from pg_proc,
    not at run time): such functions serve the planner and executor and cannot be called from SQL.
    """
    category = _EXPLICIT.get(name)
    if category is not None:
        return category
    for pattern, refused in FUNCTION_PATTERNS:
        if pattern.search(name):
            return refused
    return Category.UNCALLABLE if internal_arguments else None


def function_refusal(name: Sequence[str], user_functions: frozenset[str]) -> str | None:
    """Why a masked identity may not call the function ``name`` (its dotted parts); None if it may.

    ``user_functions``: names of the functions outside the system schemas in the catalog snapshot. An
    unqualified call of such a name may resolve to it (overloading, search_path), so it is refused too.
    """
    base = name[-1]
    schema = name[-2] if len(name) > 1 else None
    shown = ".".join(name)
    if schema == "information_schema":
        return None if base in pg15.INFORMATION_SCHEMA else f"{shown}() is not a known built-in function"
    if schema is None and base in user_functions:
        return (f"{shown}() may be a user-defined function: the proxy cannot see what it reads "
                f"(call pg_catalog.{base}() for the built-in)")
    if schema not in (None, "pg_catalog"):
        return f"{shown}() is a user-defined function: the proxy cannot see what it reads"
    category = classify(base)
    if category is None:
        return (f"{shown}() is not a known built-in function (user-defined, from an extension or a newer "
                "server): the proxy cannot see what it reads")
    if category in SAFE:
        return None
    return f"{shown}() {category.value}"


def relation_refusal(schema: str | None, name: str) -> str | None:
    """Why a masked identity may not read the system relation ``schema.name``; None if it may (or it is
    not a system relation: unqualified names are judged only when they name a refused one)."""
    shown = f"{schema}.{name}" if schema else name
    category = _REFUSED_RELATIONS.get(name)
    if schema in (None, "pg_catalog") and (category is not None or _STATISTICS_RELATION.match(name)):
        return f"{shown} {(category or Category.ACTIVITY).value}"
    if schema == "pg_catalog" and name not in pg15.CATALOG_RELATIONS:
        return f"{shown} is not a known system relation"
    if schema == "information_schema" and name not in pg15.INFORMATION_SCHEMA_RELATIONS:
        return f"{shown} is not a known system relation"
    return None

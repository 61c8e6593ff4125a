"""The function classification covers every function and system relation of the live server.

pgproxy/masking/functions.py refuses, for masked identities, every function it does not classify safe. This
suite enumerates pg_proc, pg_operator and the system relations of the test server and fails on anything
nobody classified, on stale names, and on a "safe" system view whose definition reads something refused.
"""

from __future__ import annotations

from collections import defaultdict

import psycopg
import pytest
from pglast import ast, parse_sql

from pgproxy.devdb import Database
from pgproxy.masking import pg15_builtins as pg15
from pgproxy.masking.functions import SAFE, Category, classify, function_refusal, relation_refusal
from pgproxy.policy.classify import iter_nodes


@pytest.fixture(scope="module")
def server(database: Database) -> psycopg.Connection:
    conn = psycopg.connect(database.dsn(), autocommit=True)
    conn.execute("SET search_path = pg_catalog")  # view definitions then name every relation's schema
    major = conn.execute("SHOW server_version_num").fetchone()
    assert major is not None and int(major[0]) // 10000 == 15, "the classification is of PostgreSQL 15"
    return conn


def _functions(server: psycopg.Connection) -> dict[tuple[str, str], list[bool]]:
    """(schema, name) -> for each overload: does it take an ``internal`` argument?"""
    rows = server.execute("""
        SELECT n.nspname, p.proname, 'internal'::regtype = ANY (p.proargtypes::oid[])
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname IN ('pg_catalog', 'information_schema')""").fetchall()
    out: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for schema, name, internal in rows:
        out[(schema, name)].append(internal)
    return out


def test_every_builtin_function_is_classified(server: psycopg.Connection) -> None:
    functions = _functions(server)
    assert len(functions) > 2500
    unclassified = sorted(f"{s}.{n}" for (s, n), internal in functions.items()
                          if (s == "pg_catalog" and classify(n, internal_arguments=all(internal)) is None)
                          or (s == "information_schema" and n not in pg15.INFORMATION_SCHEMA))
    assert not unclassified, f"functions nobody classified (see pgproxy/masking/functions.py): {unclassified}"


def test_classified_names_exist(server: psycopg.Connection) -> None:
    """No stale or misspelt name: each explicit name is a function of the server."""
    names = {n for s, n in _functions(server) if s == "pg_catalog"}
    listed = (pg15.PURE | pg15.CATALOG | pg15.SESSION | pg15.RUNS_SQL | pg15.ACTIVITY | pg15.FILES | pg15.CONTROL
              | pg15.INVOKED)
    assert sorted(listed - names) == []


def test_uncallable_functions_cannot_be_called(server: psycopg.Connection) -> None:
    """The rule behind UNCALLABLE: SQL has no value of type internal to pass."""
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="cannot accept a value of type internal"):
        server.execute("SELECT pg_catalog.eqsel(NULL, NULL, NULL, NULL)")


def test_builtin_operators_run_safe_functions(server: psycopg.Connection) -> None:
    rows = server.execute("""
        SELECT o.oprname, p.proname FROM pg_operator o JOIN pg_proc p ON p.oid = o.oprcode
        JOIN pg_namespace n ON n.oid = o.oprnamespace WHERE n.nspname = 'pg_catalog'""").fetchall()
    assert rows
    assert [(op, fn) for op, fn in rows if classify(fn) not in SAFE] == []


def test_every_system_relation_is_classified(server: psycopg.Connection) -> None:
    rows = server.execute("""
        SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname IN ('pg_catalog', 'information_schema')
          AND c.relkind IN ('r', 'v', 'm', 'p', 'f')""").fetchall()
    known = pg15.CATALOG_RELATIONS | pg15.ACTIVITY_RELATIONS | pg15.FILE_RELATIONS | pg15.CONTROL_RELATIONS
    unknown = [f"{s}.{n}" for s, n in rows if (s == "information_schema" and n not in pg15.INFORMATION_SCHEMA_RELATIONS)
               or (s == "pg_catalog" and n not in known and not n.startswith("pg_stat"))]
    assert unknown == []
    assert (pg15.CATALOG_RELATIONS | pg15.INFORMATION_SCHEMA_RELATIONS) - {n for _, n in rows} == set()


def test_safe_system_views_read_only_safe_things(server: psycopg.Connection) -> None:
    """A view classified safe calls only safe functions and reads only allowed relations; a refused one does not."""
    rows = server.execute("""
        SELECT n.nspname, c.relname, pg_get_viewdef(c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname IN ('pg_catalog', 'information_schema') AND c.relkind = 'v'""").fetchall()
    wrong = []
    for schema, name, definition in rows:
        reasons = []
        for node in iter_nodes(parse_sql(definition)[0].stmt):
            if isinstance(node, ast.FuncCall):
                parts = tuple(p.sval for p in node.funcname)
                reasons.append(function_refusal(parts if len(parts) > 1 else ("pg_catalog", *parts), frozenset()))
            elif isinstance(node, ast.RangeVar):  # unqualified: on the search_path, pg_catalog
                reasons.append(relation_refusal(node.schemaname or "pg_catalog", node.relname))
        refused = relation_refusal(schema, name) is not None
        if refused != any(r is not None for r in reasons):
            wrong.append((f"{schema}.{name}", refused, [r for r in reasons if r]))
    assert wrong == []


@pytest.mark.parametrize(("name", "category"), [
    ("ts_rewrite", Category.RUNS_SQL), ("query_to_xml", Category.RUNS_SQL), ("ts_stat", Category.RUNS_SQL),
    ("pg_stat_get_backend_activity", Category.ACTIVITY), ("pg_get_backend_memory_contexts", Category.ACTIVITY),
    ("current_query", Category.ACTIVITY), ("pg_prepared_statement", Category.ACTIVITY),
    ("pg_read_binary_file", Category.FILES), ("lo_import", Category.FILES), ("pg_ls_dir", Category.FILES),
    ("pg_logical_slot_peek_changes", Category.CONTROL), ("pg_terminate_backend", Category.CONTROL),
    ("dblink_exec", Category.RUNS_SQL), ("pg_stat_get_some_newer_counter", Category.ACTIVITY),
    ("lower", Category.PURE), ("pg_get_viewdef", Category.CATALOG), ("set_config", Category.SESSION),
    ("no_such_function", None),
])
def test_named_categories(name: str, category: Category | None) -> None:
    assert classify(name) == category


def test_call_rules() -> None:
    user = frozenset({"lower", "get_email"})
    assert function_refusal(("pg_catalog", "lower"), user) is None
    assert function_refusal(("now",), user) is None
    assert "may be a user-defined function" in (function_refusal(("lower",), user) or "")
    assert "is a user-defined function" in (function_refusal(("public", "now"), frozenset()) or "")
    assert "is a user-defined function" in (function_refusal(("pg_temp", "f"), frozenset()) or "")
    assert "not a known built-in" in (function_refusal(("pg_catalog", "pg_newer_thing"), frozenset()) or "")
    assert function_refusal(("information_schema", "_pg_truetypid"), frozenset()) is None
    assert relation_refusal(None, "pg_stat_user_tables") is not None
    assert relation_refusal(None, "pg_backend_memory_contexts") is not None
    assert relation_refusal("pg_catalog", "pg_newer_view") is not None
    assert relation_refusal("pg_catalog", "pg_class") is None
    assert relation_refusal(None, "customers") is None

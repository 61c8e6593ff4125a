"""Masking without sockets: rule loading errors, mask SQL vs their Python form, wire scrubbing, rewrites."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from harness import ProxyUnderTest

from pgproxy.config import ConfigError
from pgproxy.masking.catalog import CatalogSnapshot, Column, Relation, resolve
from pgproxy.masking.masks import MaskKey, build_mask
from pgproxy.masking.rewrite import rewrite
from pgproxy.masking.rules import load_rules
from pgproxy.masking.wire import hide_value_detail, mask_row
from pgproxy.protocol.messages import DataRow

KEY = MaskKey(b"k" * 32)


@pytest.mark.parametrize(("text", "message"), [
    ("tables: {customers: {columns: {email: email}}}", r"schema-qualified"),
    ("tables: {shop.c: {columns: {email: shout}}}", r"tables\.shop\.c\.columns\.email: unknown mask 'shout'"),
    ("tables: {shop.c: {columns: {ssn: {mask: partial, keep_last: -1}}}}", r"keep_last: expected a non-negative"),
    ("tables: {shop.c: {columns: {x: {mask: numeric, mode: bucket}}}}", r"needs a step"),
    ("tables: {shop.c: {columns: {x: {mask: sql, expression: 'upper(x)'}}}}", r"containing \{column\}"),
    ("tables: {shop.c: {columns: {x: {mask: sql, expression: 'upper({column}'}}}}", r"not a valid SQL expression"),
    ("tables: {shop.c: {exempt: {teams: [a]}, columns: {x: email}}}", r"exempt\.teams: unknown setting"),
    ("tables: {shop.c: {colums: {x: email}}}", r"colums: unknown setting"),
])
def test_rule_errors_name_file_and_path(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_rules(tmp_path)
    assert str(tmp_path / "r.yaml") in str(info.value)


def test_same_column_in_two_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("tables: {shop.c: {columns: {x: email}}}")
    (tmp_path / "b.yaml").write_text("tables: {shop.c: {columns: {x: 'null'}}}")
    with pytest.raises(ConfigError, match="already masked by"):
        load_rules(tmp_path)


@pytest.mark.parametrize(("spec", "value"), [
    ("email", "ann.smith@example.com"),
    ({"mask": "partial", "keep_first": 2, "keep_last": 3}, "4111111111111111"),
    ({"mask": "partial", "keep_last": 4}, "abc"),
    ({"mask": "redact", "value": "[x]"}, "secret"),
    ({"mask": "keyed_hash", "length": 24, "prefix": "p_"}, "Ann Smith é"),
    ("email", "no-at-sign"),
])
def test_python_form_equals_what_the_server_computes(database: object, spec: object, value: str) -> None:
    """The wire backstop must produce exactly what the rewritten SQL produces."""
    mask = build_mask(spec)
    from pgproxy.devdb import Database
    assert isinstance(database, Database)
    with psycopg.connect(database.dsn()) as conn:
        row = conn.execute(f"SELECT {mask.sql('v', 'text', KEY)} FROM (SELECT %s::text AS v) AS x", (value,)).fetchone()
    assert row is not None
    assert row[0] == mask.mask_text(value, KEY)


def test_value_details_are_hidden() -> None:
    assert hide_value_detail("Failing row contains (1, ann@x.com, -5).") == \
        "Failing row contains (values hidden by pgproxy masking)."
    assert hide_value_detail("Key (email)=(ann@x.com) already exists.") == \
        "Key (email)=(values hidden by pgproxy masking) already exists."
    assert hide_value_detail("Key (a, b)=(1, x) is not present in table \"t\".") == \
        'Key (a, b)=(values hidden by pgproxy masking) is not present in table "t".'
    assert hide_value_detail("Table has no rows.") is None


def test_mask_row_replaces_only_planned_columns() -> None:
    body = DataRow((b"1", b"ann@x.com", None, b"2020-01-01")).encode()[5:]
    out = mask_row(body, ((1, build_mask("email"), True), (3, build_mask("date"), True)), KEY, None)
    assert out[:1] == b"D" and int.from_bytes(out[1:5], "big") == len(out) - 1
    values = DataRow.decode(out[5:]).values
    assert values[0] == b"1" and values[2] is None
    assert values[1] == b"****@x.com"
    assert b"2020" not in (values[3] or b"")


def _schema() -> object:
    cols = (Column("id", 1, "integer", "int4", "N"), Column("email", 2, "text", "text", "S"))
    t = Relation(10, "s", "t", "r", cols)
    u = Relation(11, "other", "t", "r", cols)
    catalog = CatalogSnapshot(1, {10: t, 11: u}, {}, {}, {}, frozenset({"f"}), {("s", "t"): 10, ("other", "t"): 11})
    from pgproxy.masking.rules import NOBODY, Audience, ColumnRule
    rules = [ColumnRule("s", "t", "email", build_mask("email"), Audience(), NOBODY, "r"),
             ColumnRule("other", "t", "email", build_mask("null"), Audience(), NOBODY, "r2")]
    return resolve(catalog, rules, KEY)


@pytest.mark.parametrize(("sql", "refusal"), [
    ("SELECT * FROM t", "several masked relations"),
    ("SELECT f(1)", "user-defined function"),
    ("SELECT * FROM dblink('x', 'select 1') AS r(a int)", "dblink"),
    ("CREATE VIEW v AS SELECT * FROM s.t", "CREATE VIEW over masked"),
    ("CALL p()", "CALL"),
])
def test_refusals(sql: str, refusal: str) -> None:
    result = rewrite(sql, _schema())  # type: ignore[arg-type]
    assert result.refusal is not None and refusal in result.refusal


def test_dml_on_a_masked_table_reads_masked_values() -> None:
    result = rewrite("UPDATE s.t SET id = 2 WHERE email = 'raw' RETURNING *", _schema())  # type: ignore[arg-type]
    assert result.sql is not None and "strpos" in result.sql and result.sql.count("strpos") >= 2


def test_check_reports_missing_columns(proxy: ProxyUnderTest, tmp_path: Path) -> None:
    import yaml
    from click.testing import CliRunner

    from pgproxy.cli import main
    rules = tmp_path / "rules"
    rules.mkdir()
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS public.mask_check (n int, s text)")
    (rules / "r.yaml").write_text("tables: {public.nope: {columns: {x: email}}, public.mask_check: "
                                  "{columns: {s: email, n: email, gone: email}}}")
    data = dict(proxy.config_data)
    data["masking"] = {"rules_dir": str(rules)}
    data["audit"] = {"jsonl_path": str(tmp_path / "a.jsonl")}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["check", "-c", str(config), "--database", proxy.database.database])
    assert result.exit_code == 1
    assert "relation public.nope does not exist" in result.output
    assert "mask 'email' needs a text column, not int4" in result.output
    assert "column 'gone' does not exist in public.mask_check" in result.output
    assert "columns.s:" not in result.output


@pytest.mark.parametrize("sql", [
    "ALTER TABLE s.t RENAME COLUMN email TO e",
    "ALTER TABLE s.t ADD COLUMN copy text GENERATED ALWAYS AS (email) STORED",
    "ALTER TABLE s.t SET SCHEMA public",
    "CREATE TRIGGER tr BEFORE UPDATE ON s.t FOR EACH ROW EXECUTE FUNCTION tsvector_update_trigger(x, 'english', email)",
    "CREATE POLICY p ON s.t USING (email = 'x')",
    "CREATE TABLE probe (e text REFERENCES s.t (email))",
    "ALTER TABLE parent ATTACH PARTITION s.t FOR VALUES IN (1)",
])
def test_definition_changes_of_masked_relations_are_refused(sql: str) -> None:
    result = rewrite(sql, _schema())  # type: ignore[arg-type]
    assert result.refusal is not None and "masked relation s.t" in result.refusal


def test_masks_flow_to_children_and_parents() -> None:
    cols = (Column("id", 1, "integer", "int4", "N"), Column("email", 2, "text", "text", "S"))
    parent, child, other = (Relation(o, "s", n, "r", cols) for o, n in ((1, "parent"), (2, "child"), (3, "other")))
    catalog = CatalogSnapshot(1, {1: parent, 2: child, 3: other}, {2: (1,), 3: (1,)}, {}, {}, frozenset(),
                              {("s", "parent"): 1, ("s", "child"): 2, ("s", "other"): 3})
    from pgproxy.masking.rules import NOBODY, Audience, ColumnRule
    schema = resolve(catalog, [ColumnRule("s", "child", "email", build_mask("email"), Audience(), NOBODY, "r")], KEY)
    assert {oid for oid, m in schema.relations.items() if "email" in m.masks} == {1, 2, 3}


def test_the_wire_backstop_reads_a_row_description_again_under_a_new_catalog() -> None:
    """Plans are kept per RowDescription body, and only for the catalog (wire masks) they were made for."""
    from types import SimpleNamespace

    from pgproxy.masking.masks import build_mask
    from pgproxy.masking.wire import WireMasker
    from pgproxy.protocol.messages import FieldDescription, RowDescription
    from pgproxy.protocol.tracker import Kind

    email = build_mask("email")
    body = memoryview(RowDescription((FieldDescription("id", 7, 1, 23, 4, -1, 0),
                                      FieldDescription("email", 7, 2, 25, -1, -1, 0))).encode()[5:])
    result = SimpleNamespace(statement_name=None)
    tracker = SimpleNamespace(queue=[SimpleNamespace(kind=Kind.QUERY, result=result)], server_codec="utf-8",
                              last_described=None)
    schema = SimpleNamespace(wire={})
    hooked: list[bool] = []
    masker = WireMasker(tracker, lambda: schema, frozenset(), lambda: hooked.append(True))  # type: ignore[arg-type]
    masker.on_row_description(body)
    assert masker._plan == () and not hooked
    schema = SimpleNamespace(wire={(7, 2): email})  # the catalog was read again: email is now masked
    masker.on_row_description(body)
    assert masker._plan == ((1, email, True),) and hooked == [True]
    schema = SimpleNamespace(wire={(7, 1): email})
    masker.on_row_description(body)
    assert masker._plan == ((0, email, True),)

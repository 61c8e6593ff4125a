"""psql through the proxy: simple-query batches, COPY in every format, large objects (FunctionCall),
errors with SQLSTATE, notices, ParameterStatus and startup parameters reaching the upstream verbatim.

Tables: ``psqlt_*`` (temp tables where one psql run is enough).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

pytestmark = pytest.mark.timeout(60)

PSQL_TIMEOUT = 30


def psql(proxy: Any, *args: str, input: str | bytes | None = None, env_extra: dict[str, str] | None = None,
         merge_stderr: bool = False, text: bool = True, **conn: Any) -> subprocess.CompletedProcess[Any]:
    """Run psql (no psqlrc, unaligned, tuples only) through the proxy."""
    env = proxy.env(**conn)
    env.update(env_extra or {})
    return subprocess.run(["psql", "-X", "-A", "-t", *args], env=env, input=input, text=text,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                          timeout=PSQL_TIMEOUT)


@pytest.fixture
def upstream(proxy: Any) -> Iterator[psycopg.Connection[Any]]:
    """A direct superuser connection to the upstream (bypassing the proxy)."""
    with psycopg.connect(proxy.database.dsn(), autocommit=True, connect_timeout=10) as conn:
        yield conn


def test_multi_statement_simple_query(proxy: Any) -> None:
    # One Query message with several statements: every result comes back, in order.
    sql = "select 1 as a; select 'two' as b; select 3.5::numeric as c, null::int is null"
    out = psql(proxy, "-c", sql, env_extra={"PGAPPNAME": "psqlt_multi_ok"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "two", "3.5|t"]
    # The proxy audits the Query once, with the command tag of each statement in it.
    session = next(e["session"] for e in proxy.events("session_start")
                   if e.get("application_name") == "psqlt_multi_ok")
    events = [e for e in proxy.events("statement") if e["session"] == session]
    assert [(e["protocol"], e["sql"], e["tags"], e["rows"]) for e in events] == \
        [("simple", sql, ["SELECT 1", "SELECT 1", "SELECT 1"], 3)]


def test_multi_statement_error_stops_the_rest(proxy: Any) -> None:
    # In a multi-statement Query, an error aborts the rest of the string (implicit transaction).
    out = psql(proxy, "-c", "create temp table psqlt_multi(i int); insert into psqlt_multi values (1); "
                            "select 1/0; insert into psqlt_multi values (2)",
               "-c", "select to_regclass('pg_temp.psqlt_multi') is null")
    assert "division by zero" in out.stderr
    # Results before the error arrive; then the whole string's implicit transaction is rolled back.
    assert out.stdout.split("\n")[:3] == ["CREATE TABLE", "INSERT 0 1", "t"]


def test_copy_text_and_csv_in_and_out(proxy: Any) -> None:
    script = "\n".join([
        "\\set ON_ERROR_STOP 1",
        "create temp table psqlt_copy(id int primary key, name text, note text);",
        "\\copy psqlt_copy from stdin",
        "1\talice\t\\N",
        "2\tbob\tx y",
        "\\.",
        "\\copy psqlt_copy from stdin with (format csv)",
        '3,"carol, c",',
        '4,dave,"quoted ""q"""',
        "\\.",
        "select 'count=' || count(*) || ' nulls=' || count(*) filter (where note is null) from psqlt_copy;",
        "\\copy (select * from psqlt_copy order by id) to stdout",
        "\\copy (select * from psqlt_copy order by id) to stdout with (format csv, header)",
        "",
    ])
    out = psql(proxy, "-q", "-f", "-", input=script, user="agent_writer")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "count=4 nulls=2"  # csv: an unquoted empty field is NULL
    assert lines[1:5] == ["1\talice\t\\N", "2\tbob\tx y", "3\tcarol, c\t\\N", '4\tdave\tquoted "q"']
    assert lines[5:] == ["id,name,note", "1,alice,", "2,bob,x y", '3,"carol, c",', '4,dave,"quoted ""q"""']


def test_copy_binary_round_trip(proxy: Any, upstream: psycopg.Connection[Any]) -> None:
    upstream.execute("drop table if exists psqlt_bin_src, psqlt_bin_dst")
    upstream.execute("create table psqlt_bin_src(id int, b bytea, t timestamptz, a int[], j jsonb)")
    upstream.execute("create table psqlt_bin_dst (like psqlt_bin_src)")
    upstream.execute("grant all on psqlt_bin_src, psqlt_bin_dst to agent_writer")
    upstream.execute("insert into psqlt_bin_src select g, decode(repeat(to_hex(g % 256), 50), 'hex'), "
                     "'2024-01-01 00:00:00+00'::timestamptz + g * interval '1 minute', array[g, null, -g], "
                     "jsonb_build_object('g', g, 's', repeat('x', g % 7)) from generate_series(1, 2000) g")
    try:
        out = psql(proxy, "-c", "copy psqlt_bin_src to stdout (format binary)", text=False, user="agent_writer")
        assert out.returncode == 0, out.stderr
        data: bytes = out.stdout
        assert data.startswith(b"PGCOPY\n\xff\r\n\x00")
        assert data.endswith(b"\xff\xff")  # file trailer
        back = psql(proxy, "-c", "copy psqlt_bin_dst from stdin (format binary)", input=data, text=False,
                    user="agent_writer")
        assert back.returncode == 0, back.stderr
        assert back.stdout.strip() == b"COPY 2000"
        diff = upstream.execute("select count(*) from ((table psqlt_bin_src except all table psqlt_bin_dst) "
                                "union all (table psqlt_bin_dst except all table psqlt_bin_src)) d").fetchone()
        assert diff == (0,)
        assert upstream.execute("select count(*) from psqlt_bin_dst").fetchone() == (2000,)
    finally:
        upstream.execute("drop table if exists psqlt_bin_src, psqlt_bin_dst")


def test_large_object_import_export(proxy: Any, tmp_path: Path) -> None:
    # \lo_import / \lo_export go through libpq's lo_* API: FunctionCall ('F') messages.
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    payload = os.urandom(300_000)
    src.write_bytes(payload)
    superuser = proxy.database.superuser
    token = proxy.token(sub="psqlt-lo", roles=(superuser,))
    script = "\n".join([
        "\\set ON_ERROR_STOP 1",
        f"\\lo_import '{src}'",
        "select 'size=' || length(lo_get(:LASTOID));",
        f"\\lo_export :LASTOID '{dst}'",
        "select 'unlinked=' || lo_unlink(:LASTOID);",
        "",
    ])
    before = len(proxy.events("statement"))
    out = psql(proxy, "-q", "-f", "-", input=script, user=superuser, token=token)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"size={len(payload)}", "unlinked=1"]
    assert dst.read_bytes() == payload
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        calls = [e for e in proxy.events("statement")[before:] if e["protocol"] == "function"]
        if calls:
            break
        time.sleep(0.05)
    assert calls, "the proxy recorded no FunctionCall"
    assert all("error" not in e for e in calls)


def test_errors_carry_sqlstate(proxy: Any) -> None:
    script = "\n".join([
        "\\set VERBOSITY verbose",
        "select 1/0;",
        "select * from psqlt_no_such_table;",
        "selec 1;",
        "select 'still alive';",
        "",
    ])
    out = psql(proxy, "-f", "-", input=script)
    assert out.returncode == 0  # no ON_ERROR_STOP: the session survives every error
    assert "ERROR:  22012: division by zero" in out.stderr
    assert 'ERROR:  42P01: relation "psqlt_no_such_table" does not exist' in out.stderr
    assert "ERROR:  42601: syntax error at or near \"selec\"" in out.stderr
    assert out.stdout.strip() == "still alive"


def test_notices_arrive_in_order_with_results(proxy: Any) -> None:
    script = "\n".join([
        "select 'r1';",
        "do $$ begin raise notice 'n1'; raise notice 'n2'; end $$;",
        "select 'r2';",
        "do $$ begin raise notice 'n3'; raise warning 'w4'; end $$;",
        "select 'r3';",
        "",
    ])
    # Notices go to stderr, results to stdout; psql flushes after each result, so one pipe for both
    # shows the order in which the server's messages arrived.
    out = psql(proxy, "-q", "-f", "-", input=script, merge_stderr=True)
    assert out.returncode == 0, out.stdout
    lines = [line.split(":  ")[-1] for line in out.stdout.splitlines()]
    assert lines == ["r1", "n1", "n2", "r2", "n3", "w4", "r3"], out.stdout


def test_set_sends_parameter_status(proxy: Any) -> None:
    script = "\n".join([
        "set application_name = 'psqlt_renamed';",
        "show application_name;",
        "\\echo encoding=:ENCODING",
        "set client_encoding = 'LATIN1';",
        # psql reads the client encoding from libpq, which only learns it from ParameterStatus.
        "\\echo encoding=:ENCODING",
        "reset client_encoding;",
        "",
    ])
    out = psql(proxy, "-q", "-f", "-", input=script, env_extra={"PGCLIENTENCODING": "UTF8"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["psqlt_renamed", "encoding=UTF8", "encoding=LATIN1"]


def test_startup_parameters_reach_upstream_verbatim(proxy: Any, upstream: psycopg.Connection[Any]) -> None:
    upstream.execute("create schema if not exists psqlt_foo")
    env = {"PGAPPNAME": "psqlt_startup_app", "PGOPTIONS": "-c search_path=psqlt_foo -c work_mem=3MB",
           "PGTZ": "America/New_York", "PGDATESTYLE": "SQL, DMY"}
    out = psql(proxy, "-F", "|", "-c",
               "select current_setting('application_name'), current_setting('search_path'), "
               "current_setting('TimeZone'), current_setting('DateStyle'), current_setting('work_mem'), "
               "date '2024-02-29'", env_extra=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().split("|") == ["psqlt_startup_app", "psqlt_foo", "America/New_York", "SQL, DMY",
                                             "3MB", "29/02/2024"]
    event = next(e for e in reversed(proxy.events("session_start"))
                 if e.get("application_name") == "psqlt_startup_app")
    assert event["upstream_role"] == "agent_reader"


def read_line(stream: Any, timeout: float) -> str:
    """One line from a pipe, failing instead of hanging."""
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, "psql printed nothing in time"
    return stream.readline().strip()


def test_backend_pid_matches_upstream(proxy: Any, upstream: psycopg.Connection[Any]) -> None:
    app = f"psqlt_pid_{os.getpid()}"
    env = proxy.env()
    env["PGAPPNAME"] = app
    proc = subprocess.Popen(["psql", "-X", "-A", "-t", "-q", "-f", "-"], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("select pg_backend_pid();\n")
        proc.stdin.flush()
        pid = int(read_line(proc.stdout, 10))
        rows = upstream.execute("select pid, usename from pg_stat_activity where application_name = %s",
                                [app]).fetchall()
        assert rows == [(pid, "agent_reader")]
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(10)
    assert proc.returncode == 0


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
def test_ctrl_c_cancels_running_query(proxy: Any, tls: bool) -> None:
    # psql's SIGINT handler sends a CancelRequest (libpq PQcancel) on a new connection to the proxy.
    app = f"psqlt_sigint_{tls}"
    env = proxy.env(tls=tls)
    env["PGAPPNAME"] = app
    proc = subprocess.Popen(["psql", "-X", "-A", "-t", "-v", "VERBOSITY=verbose", "-c", "select pg_sleep(10)"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.7)  # connected and running the sleep by now
    proc.send_signal(signal.SIGINT)
    try:
        _stdout, stderr = proc.communicate(timeout=8)  # well before the 10 s sleep would end by itself
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("psql did not end after Ctrl-C: the cancel did not reach the upstream") from None
    assert "ERROR:  57014: canceling statement due to user request" in stderr
    session = next(e["session"] for e in proxy.events("session_start") if e.get("application_name") == app)
    sleeps = [e for e in proxy.events("statement") if e["session"] == session]
    assert [(e["sql"], e["error"]["sqlstate"]) for e in sleeps] == [("select pg_sleep(10)", "57014")]

"""pg8000 (pure-Python driver) through the proxy, over TLS and the plaintext loopback listener.

Tables: temp tables named ``p8kt_*``.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pg8000.native
import pytest
from pg8000.exceptions import DatabaseError

pytestmark = pytest.mark.timeout(30)


def connect(proxy: Any, *, user: str = "agent_writer", tls: bool = True, token: str | None = None,
            **kwargs: Any) -> pg8000.native.Connection:
    ctx = ssl.create_default_context(cafile=str(proxy.tls.ca_file)) if tls else None
    return pg8000.native.Connection(user=user, host="127.0.0.1", port=proxy.port if tls else proxy.plain_port,
                                    database=proxy.database.database,
                                    password=token if token is not None else proxy.token(sub="p8kt", roles=(user,)),
                                    ssl_context=ctx if tls else False, timeout=10, **kwargs)


@pytest.fixture(params=[True, False], ids=["tls", "plaintext"])
def conn(proxy: Any, request: pytest.FixtureRequest) -> Iterator[pg8000.native.Connection]:
    c = connect(proxy, tls=request.param)
    try:
        yield c
    finally:
        c.close()


def test_queries_with_parameters(conn: pg8000.native.Connection) -> None:
    assert conn.run("select :a::int + 1, :b::text || '!', :c::numeric * 2", a=41, b="héllo", c=Decimal("1.25")) == \
        [[42, "héllo!", Decimal("2.50")]]
    assert conn.run("select :n::int is null", n=None) == [[True]]
    when = dt.datetime(2024, 2, 29, 12, 0, tzinfo=dt.UTC)
    assert conn.run("select :t::timestamptz + interval '1 day'", t=when) == [[when + dt.timedelta(days=1)]]
    assert conn.run("select :b::bytea", b=b"\x00\x01\xff") == [[b"\x00\x01\xff"]]
    rows = conn.run("select g, g * g from generate_series(1, :n) g", n=500)
    assert len(rows) == 500 and rows[-1] == [500, 250000]
    assert [c["name"] for c in conn.columns] == ["g", "?column?"]  # type: ignore[union-attr]
    assert conn.run("select current_user") == [["agent_writer"]]


def test_prepared_statement(conn: pg8000.native.Connection) -> None:
    ps = conn.prepare("select :x::int * :y::int")
    try:
        assert [ps.run(x=i, y=3)[0][0] for i in range(50)] == [i * 3 for i in range(50)]
    finally:
        ps.close()


@pytest.mark.parametrize(("sql", "sqlstate", "message"), [
    ("select 1/0", "22012", "division by zero"),
    ("select * from p8kt_no_such_table", "42P01", 'relation "p8kt_no_such_table" does not exist'),
    ("selec 1", "42601", 'syntax error at or near "selec"'),
    ("select * from pg_authid", "42501", "permission denied"),
    ("select 'x'::int", "22P02", "invalid input syntax for type integer"),
])
def test_errors_carry_sqlstate(conn: pg8000.native.Connection, sql: str, sqlstate: str, message: str) -> None:
    with pytest.raises(DatabaseError) as info:
        conn.run(sql)
    fields = info.value.args[0]
    assert fields["S"] == "ERROR"
    assert fields["C"] == sqlstate
    assert message in fields["M"]
    assert conn.run("select 'still usable'") == [["still usable"]]


def test_transactions(conn: pg8000.native.Connection) -> None:
    conn.run("create temp table p8kt_tx(v int)")
    conn.run("begin")
    conn.run("insert into p8kt_tx values (:v)", v=1)
    assert conn.run("select count(*) from p8kt_tx") == [[1]]
    conn.run("rollback")
    assert conn.run("select count(*) from p8kt_tx") == [[0]]

    conn.run("begin")
    conn.run("insert into p8kt_tx values (:v)", v=2)
    with pytest.raises(DatabaseError) as info:
        conn.run("insert into p8kt_tx values (:v)", v="not a number")
    assert info.value.args[0]["C"] == "22P02"
    with pytest.raises(DatabaseError) as info:
        conn.run("select 1")
    assert info.value.args[0]["C"] == "25P02"  # in failed transaction
    conn.run("rollback")

    conn.run("start transaction")
    conn.run("insert into p8kt_tx values (:v)", v=3)
    conn.run("savepoint s1")
    conn.run("insert into p8kt_tx values (:v)", v=4)
    conn.run("rollback to savepoint s1")
    conn.run("commit")
    assert conn.run("select array_agg(v) from p8kt_tx") == [[[3]]]


def test_bad_token_is_refused_with_sqlstate(proxy: Any) -> None:
    with pytest.raises(DatabaseError) as info:
        connect(proxy, token=proxy.token(roles=("agent_writer",), aud="someone-else"))
    fields = info.value.args[0]
    assert (fields["S"], fields["C"]) == ("FATAL", "28P01")
    assert fields["M"] == 'password authentication failed for user "agent_writer": invalid audience'

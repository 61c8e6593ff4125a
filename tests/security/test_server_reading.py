"""The proxy reads every statement as the server will run it (issue 13, classes 1, 2 and 4; issue 20, cause 1).

A text whose meaning depends on ``standard_conforming_strings`` or ``client_encoding`` is judged under the
settings the server will apply to it, also when the setting changes in the same pipeline, whichever way it
was changed (SET, set_config(), the startup packet's options, ALTER ROLE ... SET). A statement the proxy's
parser cannot read is refused for masked identities and where a policy rule may apply, and otherwise
answered by the server itself. Rewritten text is valid for the connected server (PostgreSQL 15 here).
Objects created upstream behind the proxy's back are masked from the first statement that names them.

Every check runs through the real proxy against a table in ``public`` as ordinary non-superuser roles.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import rawwire
from harness import ProxyUnderTest

from pgproxy.devdb import create_role

CANARY = "987-65-4321"
REVERSED = CANARY[::-1]
SCHEMA = f"""
DROP TABLE IF EXISTS public.rd_customers, public.rd_victim, public.rd_copy, public.rd_later CASCADE;
CREATE TABLE public.rd_customers (id int PRIMARY KEY, ssn text);
INSERT INTO public.rd_customers VALUES (1, '{CANARY}');
CREATE TABLE public.rd_victim (id int);
CREATE TABLE public.rd_copy (id int, ssn text);
GRANT SELECT ON public.rd_customers TO PUBLIC;
GRANT ALL ON public.rd_victim, public.rd_copy TO PUBLIC;
"""
RULES = """
tables:
  public.rd_customers:
    columns:
      ssn: redact
  public.rd_later:  # created upstream while the proxy runs
    columns:
      ssn: redact
"""
POLICY = """
rules:
  - name: agents-no-destruction
    match: {groups: [agents], classes: [destructive]}
    action: deny
    message: agents may not destroy data
default: allow
"""
ALLOW_ALL = "default: allow\n"
KEY_ENV = "PGPROXY_TEST_MASKING_KEY"
SCS_ROLE = "rd_scs_off_role"
# Under standard_conforming_strings = off the server reads a string, then a real query over rd_customers;
# with it on (the proxy's default reading) the whole text is three string literals.
SCS_ATTACK = r"SELECT 'x\' AS a, ' AS b, reverse(ssn) AS c FROM rd_customers -- '"


@pytest.fixture(scope="module")
def proxies(proxy: ProxyUnderTest, upstream_roles: str,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyUnderTest, ProxyUnderTest]]:
    """(masking + a policy, allow-all policy without masking)."""
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as conn:
        conn.execute(SCHEMA)
    create_role(proxy.database, SCS_ROLE, upstream_roles)
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as conn:
        conn.execute(f"ALTER ROLE {SCS_ROLE} SET standard_conforming_strings = off")
    base = tmp_path_factory.mktemp("reading")
    (base / "rules").mkdir()
    (base / "rules" / "rd.yaml").write_text(RULES)
    (base / "policy.yaml").write_text(POLICY)
    (base / "allow.yaml").write_text(ALLOW_ALL)
    os.environ.setdefault(KEY_ENV, secrets.token_hex(32))
    guarded = proxy.variant(lambda d: d.update(
        masking={"rules_dir": str(base / "rules"), "key_env": KEY_ENV, "allow_schema_mismatch": True},  # rd_later
        policy={"file": str(base / "policy.yaml")}))
    open_ = proxy.variant(lambda d: d.update(policy={"file": str(base / "allow.yaml")}))
    yield guarded, open_
    guarded.running.stop()
    open_.running.stop()
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS public.rd_customers, public.rd_victim, public.rd_copy, public.rd_later "
                     "CASCADE")
        conn.execute('DROP TABLE IF EXISTS public."system_user"')


def _connect(p: ProxyUnderTest, user: str = "agent_reader", **extra: Any) -> psycopg.Connection[Any]:
    token = p.token(roles=(user,), groups=("agents",))
    return psycopg.connect(**p.conninfo(user=user, token=token), autocommit=True, **extra)


def _raw(p: ProxyUnderTest, user: str = "agent_reader", **params: str) -> socket.socket:
    token = p.token(roles=(user,), groups=("agents",))
    return rawwire.login(p.plain_port, user, p.database.database, token, **params)


def _two_queries_in_one_write(p: ProxyUnderTest, first: str | bytes,
                              second: str | bytes) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """Send two simple Queries in one write (a pipeline) and read both answers."""
    sock = _raw(p)
    try:
        sock.sendall(rawwire.query(first) + rawwire.query(second))
        return rawwire.read_until_ready(sock), rawwire.read_until_ready(sock)
    finally:
        sock.close()


def _assert_no_canary(data: Any) -> None:
    text = repr(data)
    assert CANARY not in text and REVERSED not in text, text


def _exec_simple(conn: psycopg.Connection[Any], sql: str) -> list[Any]:
    """Run ``sql`` with the simple protocol; the rows as text, or the error fields."""
    result = conn.pgconn.exec_(sql.encode())
    if result.error_message:
        return [("error", result.error_field(ord("C")), result.error_message)]
    return [tuple(result.get_value(r, c) for c in range(result.nfields)) for r in range(result.ntuples)]


# ------------------------------------------------------------------------------------------------
# class 1: standard_conforming_strings, however it is turned off


def test_scs_off_by_set_is_read_the_servers_way(proxies: tuple[ProxyUnderTest, ProxyUnderTest]) -> None:
    guarded, _ = proxies
    with _connect(guarded) as conn:
        conn.execute("SET standard_conforming_strings = off")
        rows = _exec_simple(conn, SCS_ATTACK)
    _assert_no_canary(rows)
    assert rows and rows[0][0] == b"x' AS a, ", rows  # the server's reading ran, with masked values
    _assert_no_canary(guarded.audit.events)


@pytest.mark.parametrize("how", ["set_config", "options", "alter_role", "reset_after_on"])
def test_scs_off_every_way(proxies: tuple[ProxyUnderTest, ProxyUnderTest], how: str) -> None:
    guarded, _ = proxies
    user = SCS_ROLE if how == "alter_role" else "agent_reader"
    extra = {"options": "-c standard_conforming_strings=off"} if how == "options" else {}
    with _connect(guarded, user, **extra) as conn:
        if how == "set_config":
            conn.execute("SELECT set_config('standard_conforming_strings', 'off', false)")
        if how == "reset_after_on":  # the role's default (off) comes back with RESET
            conn.close()
            conn = _connect(guarded, SCS_ROLE)
            conn.execute("SET standard_conforming_strings = on")
            conn.execute("RESET standard_conforming_strings")
        assert conn.execute("SHOW standard_conforming_strings").fetchone() == ("off",)
        rows = _exec_simple(conn, SCS_ATTACK)
        conn.close()
    _assert_no_canary(rows)


def test_scs_off_in_the_same_pipeline(proxies: tuple[ProxyUnderTest, ProxyUnderTest]) -> None:
    """The SET and the statement in one write: the statement is judged once the SET was answered."""
    guarded, _ = proxies
    first, second = _two_queries_in_one_write(guarded, "SET standard_conforming_strings = off", SCS_ATTACK)
    assert not rawwire.errors_in(b"".join(rawwire.message(t, b) for t, b in first))
    rows = rawwire.rows_of(second)
    _assert_no_canary(rows)
    assert rows and rows[0][0] == "x' AS a, "


def test_scs_off_by_a_trigger_in_the_same_pipeline(proxies: tuple[ProxyUnderTest, ProxyUnderTest],
                                                   proxy: ProxyUnderTest) -> None:
    """Any statement may change the setting: here a plain INSERT, through a trigger created upstream."""
    guarded, _ = proxies
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as direct:
        direct.execute("CREATE OR REPLACE FUNCTION public.rd_scs_off() RETURNS trigger LANGUAGE plpgsql AS "
                       "$$ BEGIN PERFORM set_config('standard_conforming_strings', 'off', false); RETURN NEW; END $$")
        direct.execute("CREATE TRIGGER rd_scs_off BEFORE INSERT ON public.rd_victim "
                       "FOR EACH ROW EXECUTE FUNCTION public.rd_scs_off()")
    try:
        first, second = _two_queries_in_one_write(guarded, "INSERT INTO rd_victim VALUES (2)", SCS_ATTACK)
    finally:
        with psycopg.connect(proxy.database.dsn(), autocommit=True) as direct:
            direct.execute("DROP TRIGGER rd_scs_off ON public.rd_victim")
            direct.execute("DROP FUNCTION public.rd_scs_off()")
    assert not rawwire.errors_in(b"".join(rawwire.message(t, b) for t, b in first)), first
    rows = rawwire.rows_of(second)
    _assert_no_canary(rows)
    assert rows and rows[0][0] == "x' AS a, "


def test_scs_off_extended_pipeline(proxies: tuple[ProxyUnderTest, ProxyUnderTest]) -> None:
    """psycopg 3 pipeline mode: SET and the statement as Parse/Bind/Execute. With no Sync between them the
    server reports the new setting only after the statement, so the proxy refuses it, saying why; with a
    Sync between them it waits for the report and masks."""
    guarded, _ = proxies
    with _connect(guarded) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="earlier statement in this pipeline"), \
                conn.pipeline():
            conn.execute("SET standard_conforming_strings = off")
            refused = conn.execute(SCS_ATTACK)
        # the refusal failed the pipeline's implicit transaction, the SET with it
        assert conn.execute("SHOW standard_conforming_strings").fetchone() == ("on",)
        with conn.pipeline() as pipeline:
            conn.execute("SET standard_conforming_strings = off")
            pipeline.sync()
            cur = conn.execute(SCS_ATTACK)
        rows = cur.fetchall()
    assert refused.pgresult is None or refused.pgresult.ntuples == 0
    _assert_no_canary(rows)
    assert rows and rows[0][0] == "x' AS a, "


def test_scs_off_cannot_hide_a_destructive_statement(proxies: tuple[ProxyUnderTest, ProxyUnderTest],
                                                     proxy: ProxyUnderTest) -> None:
    """Policy reads the same text: the TRUNCATE the server would run is seen and denied."""
    guarded, _ = proxies
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO public.rd_victim VALUES (1)")
        before = conn.execute("SELECT count(*) FROM public.rd_victim").fetchone()
    with _connect(guarded) as conn:
        conn.execute("SET standard_conforming_strings = off")
        result = _exec_simple(conn, r"SELECT 'x\' AS a, '; TRUNCATE rd_victim; -- '")
    assert result[0][0] == "error" and result[0][1] == b"42501", result
    assert b"agents-no-destruction" in result[0][2]
    with psycopg.connect(proxy.database.dsn()) as conn:
        assert conn.execute("SELECT count(*) FROM public.rd_victim").fetchone() == before


def test_prepared_statement_keeps_the_reading_of_its_parse(proxies: tuple[ProxyUnderTest, ProxyUnderTest]) -> None:
    """Prepared under scs=off, executed after scs=on: the masking judged the Parse's reading."""
    guarded, _ = proxies
    with _connect(guarded) as conn:
        conn.execute("SET standard_conforming_strings = off")
        cur = conn.cursor()
        rows = cur.execute(SCS_ATTACK, prepare=True).fetchall()
        conn.execute("SET standard_conforming_strings = on")
        rows += cur.execute(SCS_ATTACK, prepare=True).fetchall()
    _assert_no_canary(rows)
    assert len(rows) == 2


# ------------------------------------------------------------------------------------------------
# class 1: client_encoding changed in the same pipeline

# In SJIS, 0x9C 0x5C is one character: the backslash byte is its second half, so the quote after it
# ends the literal. Read as UTF-8, E3 81 9C is one character and the backslash escapes the quote.
SJIS_ATTACK = (b"SELECT E'\xe3\x81\x9c\\' AS a, reverse(ssn) AS c FROM rd_customers -- '")


def test_client_encoding_change_in_the_same_pipeline(proxies: tuple[ProxyUnderTest, ProxyUnderTest]) -> None:
    guarded, _ = proxies
    _, answer = _two_queries_in_one_write(guarded, "SET client_encoding = 'SJIS'", SJIS_ATTACK)
    data = b"".join(body for _, body in answer)
    assert CANARY.encode() not in data and REVERSED.encode() not in data, answer


# ------------------------------------------------------------------------------------------------
# class 2: statements the proxy's grammar cannot read; rewritten text valid on PostgreSQL 15

UNREADABLE = 'CREATE TABLE system_user (a int)'  # valid on PostgreSQL 15; a keyword in pglast's grammar


def test_unreadable_statement_is_refused_for_masked_identities(
        proxies: tuple[ProxyUnderTest, ProxyUnderTest]) -> None:
    guarded, _ = proxies
    with _connect(guarded) as conn:
        with pytest.raises(psycopg.errors.SyntaxError) as refused:
            conn.execute(UNREADABLE)
        assert "pgproxy could not parse this statement" in str(refused.value)
        assert "not sent to the server" in (refused.value.diag.message_detail or "")
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_unreadable_statement_is_answered_by_the_server_when_policy_allows_anything(
        proxies: tuple[ProxyUnderTest, ProxyUnderTest], proxy: ProxyUnderTest) -> None:
    _, open_ = proxies
    with _connect(open_, "agent_writer") as conn:
        conn.execute(UNREADABLE)
        conn.execute('DROP TABLE "system_user"')
        with pytest.raises(psycopg.errors.SyntaxError) as theirs:
            conn.execute("selec 1")
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as direct, pytest.raises(psycopg.Error) as want:
        direct.execute("selec 1")
    assert str(theirs.value) == str(want.value)  # the server's own message, not the proxy's


def test_scs_off_literal_is_valid_through_an_allow_all_policy(proxies: tuple[ProxyUnderTest, ProxyUnderTest]) -> None:
    _, open_ = proxies
    with _connect(open_) as conn:
        conn.execute("SET standard_conforming_strings = off")
        assert _exec_simple(conn, r"select 'a\\b\'cd'") == [(b"a\\b'cd",)]


def test_syntax_error_under_a_policy_that_may_apply_is_refused_by_the_proxy(
        proxies: tuple[ProxyUnderTest, ProxyUnderTest]) -> None:
    guarded, _ = proxies
    with _connect(guarded) as conn:
        result = _exec_simple(conn, "select 1; selec 2")
    assert result[0][:2] == ("error", b"42601")
    assert b"pgproxy could not parse this statement" in result[0][2]


def test_merge_over_a_masked_relation_runs_on_postgresql_15(proxies: tuple[ProxyUnderTest, ProxyUnderTest],
                                                            proxy: ProxyUnderTest) -> None:
    guarded, _ = proxies
    with _connect(guarded, "agent_writer") as conn:
        conn.execute("MERGE INTO rd_copy t USING rd_customers c ON t.id = c.id "
                     "WHEN MATCHED THEN UPDATE SET ssn = c.ssn WHEN NOT MATCHED THEN INSERT VALUES (c.id, c.ssn)")
    with psycopg.connect(proxy.database.dsn()) as conn:
        copied = conn.execute("SELECT id, ssn FROM public.rd_copy").fetchall()
    assert [r[0] for r in copied] == [1]
    _assert_no_canary(copied)


def test_rewritten_literals_keep_their_meaning_under_scs_off(proxies: tuple[ProxyUnderTest, ProxyUnderTest]) -> None:
    """A rewritten statement's own literals (here the client's E'' string) mean the same with scs off."""
    guarded, _ = proxies
    with _connect(guarded) as conn:
        conn.execute("SET standard_conforming_strings = off")
        rows = _exec_simple(conn, r"SELECT E'a\\b' AS lit, ssn FROM rd_customers")
    assert rows and rows[0][0] == b"a\\b", rows
    _assert_no_canary(rows)


# ------------------------------------------------------------------------------------------------
# class 4: objects created upstream, behind the proxy's back


@pytest.mark.parametrize("create", [
    "CREATE VIEW public.rd_new_view AS SELECT id, ssn, upper(ssn) AS loud FROM public.rd_customers",
    "CREATE MATERIALIZED VIEW public.rd_new_view AS SELECT id, ssn FROM public.rd_customers",
    "CREATE VIEW public.rd_new_view AS SELECT id, c::text AS whole FROM public.rd_customers c",
])
def test_view_created_upstream_is_masked_at_once(proxies: tuple[ProxyUnderTest, ProxyUnderTest],
                                                 proxy: ProxyUnderTest, create: str) -> None:
    guarded, _ = proxies
    with _connect(guarded) as conn:
        assert conn.execute("SELECT count(*) FROM rd_customers").fetchone() == (1,)  # the catalog is read
        with psycopg.connect(proxy.database.dsn(), autocommit=True) as direct:
            direct.execute(create)
            direct.execute("GRANT SELECT ON public.rd_new_view TO PUBLIC")
        try:
            rows = _exec_simple(conn, "SELECT * FROM rd_new_view")
            assert rows and rows[0][0] != "error", rows
            _assert_no_canary(rows)
        finally:
            with psycopg.connect(proxy.database.dsn(), autocommit=True) as direct:
                kind = "MATERIALIZED VIEW" if "MATERIALIZED" in create else "VIEW"
                direct.execute(f"DROP {kind} public.rd_new_view")


def test_ruled_table_created_upstream_is_masked_at_once(proxies: tuple[ProxyUnderTest, ProxyUnderTest],
                                                        proxy: ProxyUnderTest) -> None:
    guarded, _ = proxies
    with _connect(guarded) as conn:
        assert conn.execute("SELECT count(*) FROM rd_customers").fetchone() == (1,)
        with psycopg.connect(proxy.database.dsn(), autocommit=True) as direct:
            direct.execute(f"CREATE TABLE public.rd_later AS SELECT 7 AS id, '{CANARY}'::text AS ssn")
            direct.execute("GRANT SELECT ON public.rd_later TO PUBLIC")
        rows = conn.execute("SELECT id, ssn, reverse(ssn) FROM rd_later").fetchall()
    assert [r[0] for r in rows] == [7]
    _assert_no_canary(rows)


def test_view_replaced_upstream_is_judged_on_its_new_definition(proxies: tuple[ProxyUnderTest, ProxyUnderTest],
                                                                proxy: ProxyUnderTest) -> None:
    """CREATE OR REPLACE VIEW keeps the view's name and OID: the proxy notices the new definition."""
    guarded, _ = proxies
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as direct:
        direct.execute("CREATE VIEW public.rd_plain_view AS SELECT id FROM public.rd_customers")
        direct.execute("GRANT SELECT ON public.rd_plain_view TO PUBLIC")
    try:
        with _connect(guarded) as conn:
            assert conn.execute("SELECT * FROM rd_plain_view").fetchall() == [(1,)]
            with psycopg.connect(proxy.database.dsn(), autocommit=True) as direct:
                direct.execute("CREATE OR REPLACE VIEW public.rd_plain_view AS "
                               "SELECT id, ssn AS note FROM public.rd_customers")
            rows = conn.execute("SELECT * FROM rd_plain_view").fetchall()
            assert [r[0] for r in rows] == [1]
            _assert_no_canary(rows)
            with psycopg.connect(proxy.database.dsn(), autocommit=True) as direct:
                direct.execute("DROP VIEW public.rd_plain_view")
                direct.execute("CREATE VIEW public.rd_plain_view AS SELECT id, 'x' || ssn AS note, 0 AS n "
                               "FROM public.rd_customers")
                direct.execute("GRANT SELECT ON public.rd_plain_view TO PUBLIC")
            rows = conn.execute("SELECT * FROM rd_plain_view").fetchall()
            assert [r[0] for r in rows] == [1]
            _assert_no_canary(rows)
    finally:
        with psycopg.connect(proxy.database.dsn(), autocommit=True) as direct:
            direct.execute("DROP VIEW IF EXISTS public.rd_plain_view")


# ------------------------------------------------------------------------------------------------
# class 7: every result the wire backstop forwards has a known shape


def _parse(sql: str, name: str = "") -> bytes:
    return rawwire.message("P", name.encode() + b"\x00" + sql.encode() + b"\x00" + b"\x00\x00")


def _bind(statement: str = "", portal: str = "") -> bytes:
    return rawwire.message("B", portal.encode() + b"\x00" + statement.encode() + b"\x00" + b"\x00\x00" * 3)


def _execute(portal: str = "") -> bytes:
    return rawwire.message("E", portal.encode() + b"\x00" + b"\x00\x00\x00\x00")


def _describe(kind: str, name: str = "") -> bytes:
    return rawwire.message("D", kind.encode() + name.encode() + b"\x00")


SYNC = rawwire.message("S", b"")


@pytest.mark.parametrize("layer1", ["on", "off"])
def test_execute_without_describe_is_refused(proxies: tuple[ProxyUnderTest, ProxyUnderTest], layer1: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """No Describe: the rows would come with no RowDescription for the backstop, so the Execute is refused;
    with a Describe of the statement, even rows the rewrite missed are masked on the wire."""
    from pgproxy.masking.engine import Masking
    from pgproxy.masking.rewrite import Rewritten

    if layer1 == "off":  # simulate a statement the rewrite let through unchanged
        monkeypatch.setattr(Masking, "rewrite", lambda self, schema, rules_key, sql: Rewritten(None))
    guarded, _ = proxies
    sock = _raw(guarded)
    try:
        sock.sendall(_parse("SELECT id, ssn FROM rd_customers", "s1") + _bind("s1") + _execute() + SYNC)
        refused = rawwire.read_until_ready(sock)
        sock.sendall(_parse("SELECT id, ssn FROM rd_customers", "s2") + _describe("S", "s2") + SYNC)
        rawwire.read_until_ready(sock)
        sock.sendall(_bind("s2") + _execute() + SYNC)
        described = rawwire.read_until_ready(sock)
    finally:
        sock.close()
    errors = [rawwire.parse_fields(body) for t, body in refused if t == "E"]
    assert errors and errors[0]["C"] == "42501" and "never described" in errors[0]["M"], refused
    assert not [t for t, _ in refused if t == "D"]
    rows = rawwire.rows_of(described)
    assert [r[0] for r in rows] == ["1"]
    _assert_no_canary(rows)


# ------------------------------------------------------------------------------------------------
# issue 20, cause 2: what the server sends is read in the session's encoding


def test_non_utf8_session_errors_and_columns_pass_through(proxies: tuple[ProxyUnderTest, ProxyUnderTest]) -> None:
    """With client_encoding LATIN9 the server's errors and column names are LATIN9 bytes: relayed as they
    are, the session goes on (masked identities too)."""
    for p, masked in zip(proxies, (True, False), strict=True):
        with _connect(p) as conn:
            conn.execute("SET client_encoding = 'LATIN9'")
            with pytest.raises(psycopg.errors.UndefinedTable) as missing:
                conn.execute('SELECT * FROM "tablé_€_missing"')
            assert "tablé_€_missing" in str(missing.value)
            cur = conn.execute('SELECT id AS "númer€", ssn AS "sécu" FROM rd_customers')
            assert [d.name for d in cur.description] == ["númer€", "sécu"]
            rows = cur.fetchall()
            assert [r[0] for r in rows] == [1]
            if masked:
                _assert_no_canary(rows)
            else:
                assert rows == [(1, CANARY)]
            assert conn.execute("SELECT 'ça va'").fetchone() == ("ça va",)


def test_statement_described_through_a_portal_needs_no_describe_again(
        proxies: tuple[ProxyUnderTest, ProxyUnderTest]) -> None:
    """pgjdbc describes a named statement's first portal, then binds and executes it without Describe."""
    guarded, _ = proxies
    sock = _raw(guarded)
    try:
        sock.sendall(_parse("SELECT id, ssn FROM rd_customers", "s3") + _bind("s3") + _describe("P") + _execute()
                     + SYNC)
        first = rawwire.read_until_ready(sock)
        sock.sendall(_bind("s3") + _execute() + SYNC)
        again = rawwire.read_until_ready(sock)
    finally:
        sock.close()
    for answer in (first, again):
        assert not [body for t, body in answer if t == "E"], answer
        rows = rawwire.rows_of(answer)
        assert [r[0] for r in rows] == ["1"]
        _assert_no_canary(rows)

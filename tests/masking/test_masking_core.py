"""Masking through the real proxy: the shapes of each mask, exemptions, and the refusals."""

from __future__ import annotations

import asyncio
import copy
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import ProxyUnderTest

from pgproxy.config import parse_config
from pgproxy.testing import RunningProxy

SCHEMA = """
DROP SCHEMA IF EXISTS mcore CASCADE;
CREATE SCHEMA mcore;
CREATE TABLE mcore.people (id int PRIMARY KEY, name text, email varchar(80), ssn text, salary numeric(10,2),
                           born date, nick text);
INSERT INTO mcore.people VALUES
  (1, 'Ann', 'ann.canary@example.com', '123-45-6789', 123456.78, '1980-06-15', 'annie'),
  (2, 'Bob', 'bob@example.org', '987-65-4321', 55000.00, '1991-02-03', NULL);
CREATE VIEW mcore.people_view AS SELECT id, email, upper(email) AS shout, name FROM mcore.people;
GRANT USAGE ON SCHEMA mcore TO agent_reader, agent_writer;
GRANT CREATE ON SCHEMA mcore TO agent_writer;
GRANT SELECT ON ALL TABLES IN SCHEMA mcore TO agent_reader;
GRANT ALL ON ALL TABLES IN SCHEMA mcore TO agent_writer;
"""
RULES = """
tables:
  mcore.people:
    exempt: {groups: [dba]}
    columns:
      email: email
      ssn: {mask: partial, keep_last: 4}
      salary: {mask: numeric, mode: bucket, step: 10000}
      born: date
      nick: keyed_hash
  mcore.later:                      # created by a test through the proxy
    columns:
      secret: redact
"""
KEY_ENV = "PGPROXY_TEST_MASKING_KEY"


@pytest.fixture(scope="module")
def masked_proxy(proxy: ProxyUnderTest, tmp_path_factory: pytest.TempPathFactory,
                 request: pytest.FixtureRequest) -> Iterator[ProxyUnderTest]:
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as conn:
        conn.execute(SCHEMA)
    rules_dir = tmp_path_factory.mktemp("rules")
    (rules_dir / "people.yaml").write_text(RULES)
    os.environ[KEY_ENV] = secrets.token_hex(32)
    # mcore.later is created by a test after the proxy started: the mismatch is expected.
    masked = proxy.variant(lambda d: d.update(masking={"rules_dir": str(rules_dir), "key_env": KEY_ENV,
                                                       "allow_schema_mismatch": True}))
    yield masked
    masked.running.stop()


def _rows(p: ProxyUnderTest, sql: str, groups: tuple[str, ...] = ("agents",), role: str = "agent_reader") -> list[Any]:
    token = p.token(roles=(role,), groups=groups)
    with psycopg.connect(**p.conninfo(user=role, token=token)) as conn:
        return conn.execute(sql).fetchall()


def test_masks_have_their_documented_shapes(masked_proxy: ProxyUnderTest) -> None:
    rows = _rows(masked_proxy, "SELECT id, name, email, ssn, salary, born, nick FROM mcore.people ORDER BY id")
    ann = rows[0]
    assert ann[1] == "Ann"
    assert ann[2] == "****@example.com"
    assert ann[3] == "*******6789"
    assert str(ann[4]) == "120000.00"
    assert str(ann[5]) == "1980-01-01"
    assert ann[6] is not None and ann[6] != "annie" and len(ann[6]) == 16
    assert rows[1][6] is None


def test_exempt_group_sees_raw_values(masked_proxy: ProxyUnderTest) -> None:
    rows = _rows(masked_proxy, "SELECT email FROM mcore.people WHERE id = 1", groups=("dba",))
    assert rows == [("ann.canary@example.com",)]


@pytest.mark.parametrize("sql", [
    "SELECT upper(email) FROM mcore.people",
    "SELECT p FROM mcore.people p",
    "SELECT row_to_json(p) FROM mcore.people p",
    "SELECT string_agg(email, ',') FROM mcore.people",
    "TABLE mcore.people",
    "WITH x AS (SELECT * FROM mcore.people) SELECT email FROM x",
    "SELECT email FROM mcore.people UNION SELECT 'z'",
    "SELECT (SELECT email FROM mcore.people WHERE id = 1)",
    "SELECT * FROM mcore.people_view",
    "SELECT email FROM mcore.people WHERE email LIKE 'ann.canary%' OR true",
])
def test_derived_reads_see_masked_values(masked_proxy: ProxyUnderTest, sql: str) -> None:
    text = repr(_rows(masked_proxy, sql))
    assert "canary" not in text.lower() and "123-45" not in text


def test_predicate_on_raw_value_matches_nothing(masked_proxy: ProxyUnderTest) -> None:
    assert _rows(masked_proxy, "SELECT id FROM mcore.people WHERE email = 'ann.canary@example.com'") == []


def test_keyed_hash_is_stable_across_sessions(masked_proxy: ProxyUnderTest) -> None:
    a = _rows(masked_proxy, "SELECT nick FROM mcore.people WHERE id = 1")
    b = _rows(masked_proxy, "SELECT nick FROM mcore.people WHERE id = 1")
    assert a == b


@pytest.mark.parametrize("sql", [
    "DO $$ BEGIN RAISE NOTICE 'x'; END $$",
    "SELECT query_to_xml('select * from mcore.people', true, true, '')",
    "SELECT * FROM pg_stats",
    "EXPLAIN SELECT * FROM mcore.people",
])
def test_opaque_statements_are_refused(masked_proxy: ProxyUnderTest, sql: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgproxy masking"):
        _rows(masked_proxy, sql)


def test_copy_out_is_masked(masked_proxy: ProxyUnderTest) -> None:
    token = masked_proxy.token(roles=("agent_reader",), groups=("agents",))
    with (psycopg.connect(**masked_proxy.conninfo(token=token)) as conn, conn.cursor() as cur,
          cur.copy("COPY mcore.people TO STDOUT WITH (FORMAT csv)") as copy):
        data = b"".join(bytes(chunk) for chunk in copy)
    assert b"canary" not in data and b"****@example.com" in data


def test_asyncpg_binary_prepared(masked_proxy: ProxyUnderTest) -> None:
    async def go() -> list[Any]:
        conn = await masked_proxy.asyncpg_connect(token=masked_proxy.token(roles=("agent_reader",),
                                                                           groups=("agents",)))
        try:
            stmt = await conn.prepare("SELECT email, salary, born FROM mcore.people WHERE id = $1")
            return [tuple(await stmt.fetchrow(1)), tuple(await stmt.fetchrow(2))]
        finally:
            await conn.close()

    rows = asyncio.run(go())
    assert rows[0][0] == "****@example.com"
    assert str(rows[0][1]) == "120000.00"
    assert str(rows[0][2]) == "1980-01-01"


def test_audit_never_holds_raw_values(masked_proxy: ProxyUnderTest) -> None:
    _rows(masked_proxy, "SELECT * FROM mcore.people")
    events = [e for e in masked_proxy.audit.events if e.get("sql") == "SELECT * FROM mcore.people"]
    assert events and all(e["masked_relations"] == ["mcore.people"] for e in events)
    assert "canary" not in repr(events) and "mcore" in repr(events)


def test_wire_backstop_masks_raw_columns_the_rewrite_missed(masked_proxy: ProxyUnderTest,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate a statement the rewrite let through unchanged: the RowDescription names raw masked columns."""
    from pgproxy.masking.engine import Masking
    from pgproxy.masking.rewrite import Rewritten

    monkeypatch.setattr(Masking, "rewrite", lambda self, schema, rules_key, sql: Rewritten(None))
    rows = _rows(masked_proxy, "SELECT id, email, ssn, salary, nick FROM mcore.people ORDER BY id")
    assert rows[0][:4] == (1, "****@example.com", "*******6789", None)
    assert rows[0][4] is not None and rows[0][4] != "annie"

    async def binary() -> list[Any]:
        conn = await masked_proxy.asyncpg_connect(token=masked_proxy.token(roles=("agent_reader",),
                                                                           groups=("agents",)))
        try:
            return [tuple(r) for r in await conn.fetch("SELECT id, email, salary FROM mcore.people ORDER BY id")]
        finally:
            await conn.close()

    got = asyncio.run(binary())
    assert got[0][0] == 1 and "canary" not in repr(got) and "123456" not in repr(got)


def test_signed_log_records_only_masked_results(masked_proxy: ProxyUnderTest, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Result capture (sample rows, row digests) sees rows after masking, also those the wire backstop masked."""
    from pgproxy.audit.keys import generate_key
    from pgproxy.audit.logformat import iter_records
    from pgproxy.masking.engine import Masking
    from pgproxy.masking.rewrite import Rewritten

    key = tmp_path / "audit.key"
    generate_key(key)
    data = copy.deepcopy(masked_proxy.config_data)
    data["audit"] = {"dir": str(tmp_path / "log"), "signing_key_file": str(key), "fsync": "always"}
    running = RunningProxy(parse_config(data, Path.cwd())).start()
    try:
        signed = ProxyUnderTest(running, masked_proxy.audit, masked_proxy.keys, masked_proxy.tls,
                                masked_proxy.database, data)
        assert _rows(signed, "SELECT email, ssn FROM mcore.people ORDER BY id")[0] == ("****@example.com",
                                                                                        "*******6789")
        monkeypatch.setattr(Masking, "rewrite", lambda self, schema, rules_key, sql: Rewritten(None))
        assert _rows(signed, "SELECT email FROM mcore.people WHERE id = 1") == [("****@example.com",)]
    finally:
        running.stop()
    text = "\n".join(repr(record) for _, record in iter_records(tmp_path / "log"))
    assert "****@example.com" in text  # the sample rows as the client got them
    assert "canary" not in text and "123-45" not in text


def test_catalog_is_reread_after_ddl_through_the_proxy(masked_proxy: ProxyUnderTest) -> None:
    token = masked_proxy.token(roles=("agent_writer",), groups=("agents",))
    with psycopg.connect(**masked_proxy.conninfo(user="agent_writer", token=token), autocommit=True) as conn:
        conn.execute("SELECT count(*) FROM mcore.people").fetchone()  # the catalog is read now, without mcore.later
        conn.execute("CREATE TABLE mcore.later (id int, secret text)")
        conn.execute("INSERT INTO mcore.later VALUES (1, 'later-canary')")
        assert conn.execute("SELECT secret FROM mcore.later").fetchall() == [("****",)]
        assert conn.execute("SELECT count(*) FROM mcore.later WHERE secret = 'later-canary'").fetchone() == (0,)


def test_replay_applies_the_proxys_masks(masked_proxy: ProxyUnderTest, tmp_path: Path) -> None:
    """A masked session replays to the recorded digests only with the proxy's masking config."""
    import yaml
    from click.testing import CliRunner

    from pgproxy.audit.keys import generate_key
    from pgproxy.cli import main

    key = tmp_path / "audit.key"
    generate_key(key)
    data = copy.deepcopy(masked_proxy.config_data)
    data["audit"] = {"dir": str(tmp_path / "log"), "signing_key_file": str(key), "fsync": "always"}
    config_file = tmp_path / "pgproxy.yaml"
    config_file.write_text(yaml.safe_dump(data))
    running = RunningProxy(parse_config(data, Path.cwd())).start()
    try:
        signed = ProxyUnderTest(running, masked_proxy.audit, masked_proxy.keys, masked_proxy.tls,
                                masked_proxy.database, data)
        token = signed.token(roles=("agent_reader",), groups=("agents",))
        with psycopg.connect(**signed.conninfo(token=token), autocommit=True) as conn:
            conn.execute("SELECT id, email, ssn, salary, nick FROM mcore.people ORDER BY id").fetchall()
            conn.execute("SELECT 41 + 1").fetchall()
    finally:
        running.stop()
    runner = CliRunner()
    sessions = runner.invoke(main, ["audit", "sessions", str(tmp_path / "log")])
    session = next(line.split()[0] for line in sessions.output.splitlines()[1:] if line.strip())
    bundle = tmp_path / "bundle.json"
    assert runner.invoke(main, ["audit", "export", str(tmp_path / "log"), "--session", session,
                                "-o", str(bundle), "--config", str(config_file)]).exit_code == 0
    plain = runner.invoke(main, ["audit", "replay", str(bundle), "--target", masked_proxy.database.dsn(),
                                 "--pubkey", f"{key}.pub"])
    assert plain.exit_code == 0, plain.output
    assert "1 matched, 0 differ, 1 skipped" in plain.output and "read masked relations" in plain.output
    masked = runner.invoke(main, ["audit", "replay", str(bundle), "--target", masked_proxy.database.dsn(),
                                  "--config", str(config_file)])
    assert masked.exit_code == 0, masked.output
    assert "2 matched, 0 differ, 0 skipped" in masked.output
    assert "\\x" not in masked.output  # never the rewritten text (it carries the keyed-hash pads)

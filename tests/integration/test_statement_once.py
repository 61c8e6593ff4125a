"""One Statement per request: policy, masking and the audit log read one parse of the client's text.

The proxy runs in this process (a thread), so wrapping the parser functions counts every parse it does.
Each statement carries a never-sent marker, so no cache answers for it: what is counted is the work a
new statement costs.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from harness import ProxyUnderTest

import pgproxy.core.statement
import pgproxy.masking.rewrite
import pgproxy.protocol.tracker
from pgproxy.policy import classify as classify_module
from pgproxy.protocol.messages import Query

SCHEMA = """
DROP SCHEMA IF EXISTS monce CASCADE;
CREATE SCHEMA monce;
CREATE TABLE monce.people (id int PRIMARY KEY, name text, email text);
INSERT INTO monce.people VALUES (1, 'Ann', 'ann@example.com');
GRANT USAGE ON SCHEMA monce TO agent_reader;
GRANT SELECT ON ALL TABLES IN SCHEMA monce TO agent_reader;
"""
RULES = "tables:\n  monce.people:\n    columns:\n      email: email\n"


@pytest.fixture(scope="module")
def stacked(proxy: ProxyUnderTest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyUnderTest]:
    """A proxy with the default policy (allowed statements audited too), masking and the audit log."""
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as conn:
        conn.execute(SCHEMA)
    rules_dir = tmp_path_factory.mktemp("rules-once")
    (rules_dir / "people.yaml").write_text(RULES)
    policy = str(classify_module.__file__).replace("classify.py", "default_policy.yaml")
    running = proxy.variant(lambda d: d.update(masking={"rules_dir": str(rules_dir)},
                                               policy={"file": policy, "audit_allowed": True}))
    yield running
    running.running.stop()


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every text pglast parses from now on: statements (core.statement) and the rewrite's own fragments."""
    texts: list[str] = []
    for module in (pgproxy.core.statement, pgproxy.masking.rewrite):
        real = module.parse_sql

        def counting(sql: str, _real: Any = real) -> Any:
            texts.append(sql)
            return _real(sql)

        monkeypatch.setattr(module, "parse_sql", counting)
    return texts


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every Query text the tracker decodes from the client's bytes from now on."""
    texts: list[str] = []

    class Counting(Query.view):  # type: ignore[misc]
        __slots__ = ()

        @property
        def sql(self) -> str:
            texts.append(Query.sql.fget(self))  # type: ignore[attr-defined]
            return texts[-1]

    monkeypatch.setattr(pgproxy.protocol.tracker, "_query_view", Counting)
    return texts


def _events(p: ProxyUnderTest, marker: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in p.events(kind) if marker in e.get("sql", "")]


def test_a_simple_query_is_decoded_and_parsed_once_for_policy_masking_and_audit(
        stacked: ProxyUnderTest, parsed: list[str], decoded: list[str]) -> None:
    marker = f"once_{secrets.token_hex(6)}"
    sql = f"SELECT id, email FROM monce.people WHERE name <> '{marker}'"
    with psycopg.connect(**stacked.conninfo(), cursor_factory=psycopg.ClientCursor) as conn:
        row = conn.execute(sql).fetchone()
    assert row == (1, "****@example.com")  # masked: the rewrite ran on that one parse
    [statement] = _events(stacked, marker, "statement")
    assert statement["protocol"] == "simple"
    assert statement["masked_relations"] == ["monce.people"]
    [decision] = _events(stacked, marker, "policy_decision")
    assert decision["decision"] == "allow" and decision["classes"] == ["read"]
    assert [t for t in parsed if marker in t] == [sql]
    assert [t for t in decoded if marker in t] == [sql]


def test_a_prepared_statement_is_parsed_once_across_parse_bind_and_execute(stacked: ProxyUnderTest,
                                                                          parsed: list[str]) -> None:
    marker = f"once_{secrets.token_hex(6)}"
    sql = f"SELECT id, email FROM monce.people WHERE name <> '{marker}' AND id = %s"
    with psycopg.connect(**stacked.conninfo()) as conn:
        rows = [conn.execute(sql, (1,), prepare=True).fetchone() for _ in range(3)]
    assert rows == [(1, "****@example.com")] * 3
    statements = _events(stacked, marker, "statement")
    assert len(statements) == 3 and {e["protocol"] for e in statements} == {"extended"}
    assert all(e["masked_relations"] == ["monce.people"] for e in statements)
    assert [t for t in parsed if marker in t] == [sql.replace("%s", "$1")]


def test_the_masking_plan_is_looked_up_once_and_kept_on_the_statement(stacked: ProxyUnderTest,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The row description and the audit event read the plan the gate used, not the plan caches again."""
    import pgproxy.masking.engine as engine

    looked_up: list[str] = []
    real = engine.Masking.cached

    def counting(self: Any, version: int, rules_key: tuple[str, ...], sql: str) -> Any:
        looked_up.append(sql)
        return real(self, version, rules_key, sql)

    monkeypatch.setattr(engine.Masking, "cached", counting)
    marker = f"once_{secrets.token_hex(6)}"
    sql = f"SELECT id, email FROM monce.people WHERE name <> '{marker}'"
    with psycopg.connect(**stacked.conninfo(), cursor_factory=psycopg.ClientCursor) as conn:
        assert conn.execute(sql).fetchone() == (1, "****@example.com")
    [statement] = _events(stacked, marker, "statement")
    assert statement["masked_relations"] == ["monce.people"]
    assert [t for t in looked_up if marker in t] == []

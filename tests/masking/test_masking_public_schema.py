"""Views over masked tables in ``public`` (on the search_path) are masked, not read raw (issue 13, class 3)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from harness import ProxyUnderTest

SCHEMA = """
DROP TABLE IF EXISTS public.pubcust CASCADE;
CREATE TABLE public.pubcust (id int PRIMARY KEY, email text);
INSERT INTO public.pubcust VALUES (1, 'pub.canary@example.com');
CREATE VIEW public.v_pubcust AS SELECT id, email FROM pubcust;
CREATE MATERIALIZED VIEW public.mv_pubcust AS SELECT id, email FROM pubcust;
GRANT SELECT ON public.pubcust, public.v_pubcust, public.mv_pubcust TO agent_reader;
"""
RULES = """
tables:
  public.pubcust:
    columns:
      email: redact
"""
KEY_ENV = "PGPROXY_TEST_MASKING_KEY"
CANARY = "pub.canary@example.com"


@pytest.fixture(scope="module")
def public_masked(proxy: ProxyUnderTest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyUnderTest]:
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as conn:
        conn.execute(SCHEMA)
    rules_dir = tmp_path_factory.mktemp("public_rules")
    (rules_dir / "public.yaml").write_text(RULES)
    os.environ.setdefault(KEY_ENV, secrets.token_hex(32))
    masked = proxy.variant(lambda d: d.update(masking={"rules_dir": str(rules_dir), "key_env": KEY_ENV}))
    yield masked
    masked.running.stop()
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS public.pubcust CASCADE")


def _rows(p: ProxyUnderTest, sql: str) -> list[Any]:
    token = p.token(roles=("agent_reader",), groups=("agents",))
    with psycopg.connect(**p.conninfo(user="agent_reader", token=token)) as conn:
        return conn.execute(sql).fetchall()


@pytest.mark.parametrize("relation", ["pubcust", "v_pubcust", "mv_pubcust", "public.v_pubcust"])
def test_views_over_public_tables_are_masked(public_masked: ProxyUnderTest, relation: str) -> None:
    rows = _rows(public_masked, f"SELECT id, email FROM {relation}")
    assert [r[0] for r in rows] == [1]
    assert CANARY not in repr(rows)
    star = _rows(public_masked, f"SELECT * FROM {relation}")
    assert CANARY not in repr(star)


def test_superuser_still_sees_the_raw_value(public_masked: ProxyUnderTest) -> None:
    with psycopg.connect(public_masked.database.dsn()) as conn:
        assert conn.execute("SELECT email FROM public.v_pubcust").fetchone() == (CANARY,)

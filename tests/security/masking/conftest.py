"""Fixtures of the masking suites: the ``maskt`` schema and two proxies with the same masking rules.

``masked`` is only ever used by the masked identity (group ``agents``), so every event of its audit sink
must be canary-free; ``exempt`` serves the exempt identity (group ``dba``), which must see raw values. Both
are session-scoped: the suites share one schema and one pair of proxies.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import psycopg
import pytest
import yaml
from harness import ProxyUnderTest
from masking_support import EXEMPT_GROUP, KEY_ENV, MASKED_GROUP, RULES, schema_sql

from pgproxy.devdb import Database


@pytest.fixture(scope="session")
def masking_schema(database: Database, upstream_roles: str) -> Database:
    """The ``maskt`` schema with canary rows, views, functions and a trigger (created as the superuser)."""
    with psycopg.connect(database.dsn(), autocommit=True) as conn:
        for statement in schema_sql():
            conn.execute(statement)
        # Monitoring privileges: every session's statement text and memory contexts become readable, which
        # the masking layer must refuse (a rewritten statement carries the keyed-hash pads).
        conn.execute("GRANT pg_read_all_stats TO agent_reader, agent_writer")
    return database


@pytest.fixture(scope="session")
def masking_key() -> bytes:
    key = secrets.token_hex(32)
    os.environ[KEY_ENV] = key
    return key.encode()


@pytest.fixture(scope="session")
def masking_section(masking_schema: Database, masking_key: bytes,
                    tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The ``masking:`` config section over RULES, added to the default test proxy's config."""
    rules_dir = tmp_path_factory.mktemp("masking") / "masking_rules"
    rules_dir.mkdir()
    (rules_dir / "maskt.yaml").write_text(yaml.safe_dump(RULES, sort_keys=False))
    return {"rules_dir": str(rules_dir), "key_env": KEY_ENV, "notification_channels": []}


@pytest.fixture(scope="session")
def masked(proxy: ProxyUnderTest, masking_section: dict[str, object]) -> Iterator[ProxyUnderTest]:
    """A masking proxy used only by the masked identity."""
    under_test = proxy.variant(lambda data: data.update(masking=masking_section))
    try:
        yield under_test
    finally:
        under_test.running.stop()


@pytest.fixture(scope="session")
def exempt(proxy: ProxyUnderTest, masking_section: dict[str, object]) -> Iterator[ProxyUnderTest]:
    """The same configuration, used only by the exempt identity."""
    under_test = proxy.variant(lambda data: data.update(masking=masking_section))
    try:
        yield under_test
    finally:
        under_test.running.stop()


ROLES = ("agent_reader", "agent_writer")


@pytest.fixture(scope="session")
def masked_token(masked: ProxyUnderTest) -> str:
    return masked.token(sub="mask-agent", roles=ROLES, groups=(MASKED_GROUP,), ttl=3600)


@pytest.fixture(scope="session")
def exempt_token(exempt: ProxyUnderTest) -> str:
    return exempt.token(sub="mask-dba", roles=ROLES, groups=(EXEMPT_GROUP,), ttl=3600)

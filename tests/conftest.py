"""Shared pytest fixtures.

What for: one upstream PostgreSQL per test session (``database``, via ``pgproxy.devdb.start_database``:
``$PGPROXY_TEST_DSN`` > testcontainers when a Docker engine answers > a local temporary cluster) and dev
TLS material (``tls_files``).

Must never: start a server on a fixed port, or wipe a database it did not create.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import (
    AGENT_ROLES,
    SUPERUSER_PASSWORD_ENV,
    UPSTREAM_PASSWORD_ENV,
    ProxyUnderTest,
    proxy_config_data,
)

from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.config import parse_config
from pgproxy.devdb import Database, create_role, start_database
from pgproxy.identity import DevKeys, generate_dev_keys
from pgproxy.testing import RunningProxy
from pgproxy.tlsutil import DevTLS, generate_dev_ca_and_cert

# --------------------------------------------------------------------------------------------------
# Markers: what a test needs beyond Python (`pytest -m "not postgres and not browser and not node"`)
# --------------------------------------------------------------------------------------------------

BROWSER_FIXTURES = frozenset({"browser"})  # headless Chromium through Playwright
NODE_FIXTURES = frozenset({"node_pg"})  # tests/clients/node's script


def _needs(item: pytest.Item) -> set[str]:
    fixtures = set(getattr(item, "fixturenames", ()))
    params = getattr(getattr(item, "callspec", None), "params", {})
    needs = set()
    # The database fixture, directly or through another fixture, or a store/config parametrized on it.
    if "database" in fixtures or "postgres" in params.values():
        needs.add("postgres")
    if fixtures & BROWSER_FIXTURES:
        needs.add("browser")
    if fixtures & NODE_FIXTURES or (item.path.parent / "package.json").exists():
        needs.add("node")
    return needs


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for name in sorted(_needs(item)):
            item.add_marker(name)


# --------------------------------------------------------------------------------------------------
# Upstream database and TLS material
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def database() -> Iterator[Database]:
    """A running PostgreSQL with superuser credentials, shared by the whole session."""
    db, stop = start_database()
    try:
        yield db
    finally:
        stop()


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> DevTLS:
    """A dev CA and a server certificate for localhost / 127.0.0.1 / ::1."""
    return generate_dev_ca_and_cert(tmp_path_factory.mktemp("tls"))


# --------------------------------------------------------------------------------------------------
# Proxy fixtures (added by the lead)
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def upstream_roles(database: Database) -> str:
    """Create the agent roles upstream; returns their (shared) password, exported for the proxy."""
    password = secrets.token_urlsafe(18)
    for role in AGENT_ROLES:
        create_role(database, role, password)
    with psycopg.connect(database.dsn(), autocommit=True) as conn:
        for role in AGENT_ROLES:  # ordinary roles: masked identities use them (tests/security/masking)
            conn.execute(f"GRANT ALL ON SCHEMA public TO {role}")
    os.environ[UPSTREAM_PASSWORD_ENV] = password
    os.environ[SUPERUSER_PASSWORD_ENV] = database.password
    return password


@pytest.fixture(scope="session")
def dev_keys(tmp_path_factory: pytest.TempPathFactory) -> DevKeys:
    return generate_dev_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def proxy(database: Database, upstream_roles: str, dev_keys: DevKeys, tls_files: DevTLS) -> Iterator[ProxyUnderTest]:
    """One proxy for the whole test session (tests must not change its configuration)."""
    data = proxy_config_data(database, dev_keys, tls_files)
    audit = MemoryAuditSink()
    running = RunningProxy(parse_config(data, Path.cwd()), audit=audit).start()
    try:
        yield ProxyUnderTest(running, audit, dev_keys, tls_files, database, data)
    finally:
        running.stop()


@pytest.fixture
def make_proxy(proxy: ProxyUnderTest) -> Iterator[Callable[..., ProxyUnderTest]]:
    """Start an extra proxy whose config is the default one changed by ``mutate(data)``."""
    started: list[ProxyUnderTest] = []

    def make(mutate: Callable[[dict[str, Any]], None] | None = None,
             audit: MemoryAuditSink | None = None) -> ProxyUnderTest:
        started.append(proxy.variant(mutate, audit))
        return started[-1]

    yield make
    for p in started:
        p.running.stop()

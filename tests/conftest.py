"""Shared pytest fixtures.

What for: one upstream PostgreSQL per test session (``database``, via ``pgproxy.devdb.start_database``:
``$PGPROXY_TEST_DSN`` > testcontainers when a Docker engine answers > a local temporary cluster) and dev
TLS material (``tls_files``).

Must never: start a server on a fixed port, or wipe a database it did not create.
"""

from __future__ import annotations

import copy
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.config import parse_config
from pgproxy.devdb import Database, create_role, start_database
from pgproxy.identity import DevKeys, generate_dev_keys, mint_token
from pgproxy.testing import RunningProxy
from pgproxy.tlsutil import DevTLS, generate_dev_ca_and_cert

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

UPSTREAM_PASSWORD_ENV = "PGPROXY_TEST_UPSTREAM_PASSWORD"
SUPERUSER_PASSWORD_ENV = "PGPROXY_TEST_SUPERUSER_PASSWORD"
AGENT_ROLES = ("agent_reader", "agent_writer")
ISSUER = "https://issuer.test"
AUDIENCE = "pgproxy-test"


@dataclass
class ProxyUnderTest:
    """A running proxy in front of the test database, with helpers to mint tokens and connect."""

    running: RunningProxy
    audit: MemoryAuditSink
    keys: DevKeys
    tls: DevTLS
    database: Database
    config_data: dict[str, Any]

    @property
    def port(self) -> int:
        """The TLS listener."""
        return self.running.ports[0]

    @property
    def plain_port(self) -> int:
        """The loopback listener marked insecure_plaintext."""
        return self.running.ports[1]

    def token(self, sub: str = "agent-1", roles: Sequence[str] = ("agent_reader",), groups: Sequence[str] = (),
              ttl: float = 600, **claims: Any) -> str:
        return mint_token(self.keys.private_key_file, issuer=ISSUER, audience=AUDIENCE, subject=sub,
                          groups=list(groups), db_role=list(roles), ttl_seconds=ttl, extra_claims=claims)

    def conninfo(self, *, user: str = "agent_reader", token: str | None = None, tls: bool = True,
                 database: str | None = None, **extra: str) -> dict[str, str]:
        """libpq keyword parameters for connecting through the proxy."""
        params = {"host": "127.0.0.1", "port": str(self.port if tls else self.plain_port), "user": user,
                  "password": token if token is not None else self.token(roles=(user,)),
                  "dbname": database or self.database.database,
                  "sslmode": "verify-full" if tls else "disable"}
        if tls:
            params["sslrootcert"] = str(self.tls.ca_file)
        params.update(extra)
        return params

    def dsn(self, **kwargs: Any) -> str:
        """A libpq conninfo string (keyword form) for connecting through the proxy."""
        return " ".join(f"{k}='{v}'" for k, v in self.conninfo(**kwargs).items())

    def env(self, **kwargs: Any) -> dict[str, str]:
        """Environment for psql/pgbench connecting through the proxy."""
        c = self.conninfo(**kwargs)
        mapping = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "password": "PGPASSWORD",
                   "dbname": "PGDATABASE", "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT"}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update({mapping[k]: v for k, v in c.items() if k in mapping})
        return env

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [e for e in list(self.audit.events) if kind is None or e.get("event") == kind]


def proxy_config_data(database: Database, keys: DevKeys, tls: DevTLS) -> dict[str, Any]:
    """The test proxy's config: a TLS listener and a plaintext loopback listener, ES256 dev keys."""
    return {
        "listeners": [
            {"host": "127.0.0.1", "port": 0, "tls": {"cert_file": str(tls.cert_file), "key_file": str(tls.key_file)}},
            {"host": "127.0.0.1", "port": 0, "insecure_plaintext": True},
        ],
        "identity": {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["ES256", "RS256"],
                     "jwks_file": str(keys.jwks_file), "leeway_seconds": 0},
        "upstream": {"host": database.host, "port": database.port, "connect_timeout_seconds": 5,
                     "credentials": [{"role": database.superuser, "password_env": SUPERUSER_PASSWORD_ENV},
                                     {"role": "*", "password_env": UPSTREAM_PASSWORD_ENV}]},
        "limits": {"startup_timeout_seconds": 5, "max_message_bytes": 8 * 1024 * 1024},
    }


@pytest.fixture(scope="session")
def upstream_roles(database: Database) -> str:
    """Create the agent roles upstream; returns their (shared) password, exported for the proxy."""
    password = secrets.token_urlsafe(18)
    for role in AGENT_ROLES:
        create_role(database, role, password)
    with psycopg.connect(database.dsn(), autocommit=True) as conn:
        conn.execute("GRANT pg_read_server_files TO agent_writer")
        for role in AGENT_ROLES:
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
    started: list[RunningProxy] = []

    def make(mutate: Callable[[dict[str, Any]], None] | None = None,
             audit: MemoryAuditSink | None = None) -> ProxyUnderTest:
        data = copy.deepcopy(proxy.config_data)
        if mutate is not None:
            mutate(data)
        sink = audit or MemoryAuditSink()
        running = RunningProxy(parse_config(data, Path.cwd()), audit=sink).start()
        started.append(running)
        return ProxyUnderTest(running, sink, proxy.keys, proxy.tls, proxy.database, data)

    yield make
    for running in started:
        running.stop()

"""Fixtures for the approvals tests: both stores behind one parametrized fixture, requests, a clock.

``store_factory`` makes store instances on the same backing storage (one SQLite file, or one PostgreSQL
schema of the session's test database), so a test can play two replicas or the proxy plus the CLI.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from approval_helpers import StoreFactory, base_config_data
from harness import FakeClock

from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.config import parse_config
from pgproxy.devdb import Database
from pgproxy.identity import DevKeys, TokenVerifier
from pgproxy.policy.approvals import ApprovalStore
from pgproxy.policy.stores.postgres import PostgresApprovalStore
from pgproxy.policy.stores.sqlite import SQLiteApprovalStore


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["sqlite", "postgres"])
async def store_factory(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
                        ) -> AsyncIterator[StoreFactory]:
    """Makes stores sharing one backing storage; all are closed at the end of the test."""
    made: list[ApprovalStore] = []
    if request.param == "sqlite":
        path = tmp_path / "approvals.sqlite3"

        def make(**kwargs: Any) -> ApprovalStore:
            kwargs.setdefault("clock", clock)
            kwargs.setdefault("monotonic", clock)
            store = SQLiteApprovalStore(path, **kwargs)
            made.append(store)
            return store
    else:
        database: Database = request.getfixturevalue("database")
        schema = "apr_test_" + secrets.token_hex(4)

        def make(**kwargs: Any) -> ApprovalStore:
            kwargs.setdefault("clock", clock)
            kwargs.setdefault("monotonic", clock)
            store = PostgresApprovalStore(database.dsn(), schema=schema, **kwargs)
            made.append(store)
            return store
    make.kind = request.param  # type: ignore[attr-defined]
    yield make
    for store in made:
        await store.close()


@pytest.fixture
def audit() -> MemoryAuditSink:
    return MemoryAuditSink()


@pytest.fixture
def store(store_factory: StoreFactory, audit: MemoryAuditSink) -> ApprovalStore:
    return store_factory(audit=audit)


@pytest.fixture
def verifier(dev_keys: DevKeys) -> TokenVerifier:
    return TokenVerifier(parse_config(base_config_data(dev_keys), Path.cwd()).identity)

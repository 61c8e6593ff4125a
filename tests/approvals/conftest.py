"""Fixtures for the approvals tests: both stores behind one parametrized fixture, requests, a clock.

``store_factory`` makes store instances on the same backing storage (one SQLite file, or one PostgreSQL
schema of the session's test database), so a test can play two replicas or the proxy plus the CLI.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.config import parse_config
from pgproxy.devdb import Database
from pgproxy.identity import DevKeys, TokenVerifier, mint_token
from pgproxy.policy.approval_factory import new_request
from pgproxy.policy.approvals import ApprovalRequest, ApprovalStore
from pgproxy.policy.stores.postgres import PostgresApprovalStore
from pgproxy.policy.stores.sqlite import SQLiteApprovalStore


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


StoreFactory = Callable[..., ApprovalStore]


@pytest.fixture(params=["sqlite", "postgres"])
async def store_factory(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
                        ) -> AsyncIterator[StoreFactory]:
    """Makes stores sharing one backing storage; all are closed at the end of the test."""
    made: list[ApprovalStore] = []
    if request.param == "sqlite":
        path = tmp_path / "approvals.sqlite3"

        def make(**kwargs: Any) -> ApprovalStore:
            kwargs.setdefault("clock", clock)
            store = SQLiteApprovalStore(path, **kwargs)
            made.append(store)
            return store
    else:
        database: Database = request.getfixturevalue("database")
        schema = "apr_test_" + secrets.token_hex(4)

        def make(**kwargs: Any) -> ApprovalStore:
            kwargs.setdefault("clock", clock)
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


def make_request(clock: Callable[[], float] | None = None, *, subject: str = "agent-1", sql: str = "DELETE FROM t",
                 params: list[str | None] | None = None, groups: list[str] | None = None, quorum: int = 1,
                 expiry: float = 600.0, mode: str = "refuse") -> ApprovalRequest:
    return new_request(
        requester={"subject": subject, "groups": ["agents"], "agent_id": "bot-7"}, database="app", sql=sql,
        params=params or [], classification={"classes": ["write"], "tables": ["t"], "reasons": ["DELETE on t"]},
        rule="writes-need-approval", approver_groups=groups or ["dba", "oncall"], required_approvals=quorum,
        mode=mode,  # type: ignore[arg-type]
        reason="cleanup", expiry_seconds=expiry, now=clock() if clock else None)


# --------------------------------------------------------------------------------------------------
# Approver tokens (real JWTs signed with the session's dev keys)

ISSUER = "https://issuer.test"
AUDIENCE = "pgproxy-test"


def base_config_data(keys: DevKeys, **sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listeners": [{"host": "127.0.0.1", "port": 0, "insecure_plaintext": True}],
        "identity": {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["ES256"],
                     "jwks_file": str(keys.jwks_file), "leeway_seconds": 0},
        "upstream": {"credentials": [{"role": "*"}]},
    }
    data.update(sections)
    return data


def mint(keys: DevKeys, sub: str, groups: list[str], ttl: float = 600) -> str:
    return mint_token(keys.private_key_file, issuer=ISSUER, audience=AUDIENCE, subject=sub, groups=groups,
                      db_role=["agent_reader"], ttl_seconds=ttl)


@pytest.fixture
def verifier(dev_keys: DevKeys) -> TokenVerifier:
    return TokenVerifier(parse_config(base_config_data(dev_keys), Path.cwd()).identity)

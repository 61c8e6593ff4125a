"""The client matrix: the drivers the docs promise (SQLAlchemy, LangChain's SQL toolkit, Node.js `pg`,
pgjdbc), each through a real proxy with a policy, masking and approvals, doing what an agent does:
connect with a JWT, run a parameterised query, read a masked column, hit a denied and an
approval-needing statement.

What for: ``matrix`` is that proxy and the expectations every client test checks. Must never: skip
for a reason other than the client's runtime (Node.js, Java) being absent; `.ci/run` installs them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import psycopg
import pytest
from client_matrix import MASKING_KEY_ENV, POLICY, RULES, SCHEMA, Matrix
from harness import ProxyUnderTest


@pytest.fixture(scope="package")
def matrix(proxy: ProxyUnderTest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    tmp = tmp_path_factory.mktemp("clients")
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as conn:
        conn.execute(SCHEMA)
    (tmp / "policy.yaml").write_text(POLICY)
    (tmp / "rules").mkdir()
    (tmp / "rules" / "clientm.yaml").write_text(RULES)
    os.environ.setdefault(MASKING_KEY_ENV, secrets.token_hex(32))

    def configure(data: dict[str, object]) -> None:
        data["policy"] = {"file": str(tmp / "policy.yaml")}
        data["approvals"] = {"store": "sqlite", "path": str(tmp / "approvals.sqlite")}
        data["masking"] = {"rules_dir": str(tmp / "rules"), "key_env": MASKING_KEY_ENV}

    under = proxy.variant(configure)
    try:
        yield Matrix(under, under.token(sub="matrix-agent", roles=("agent_writer",), groups=("agents",),
                                        ttl=3600))
    finally:
        under.running.stop()

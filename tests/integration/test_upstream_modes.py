"""Upstream login methods and upstream TLS: each against its own real PostgreSQL cluster."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.config import parse_config
from pgproxy.devdb import Database, TemporaryCluster
from pgproxy.testing import RunningProxy

PASSWORD_ENV = "PGPROXY_TEST_MODE_PASSWORD"
CLUSTER_CA = "the cluster's own CA"


@pytest.fixture
def through(proxy: Any) -> Iterator[Callable[..., tuple[Database, str]]]:
    """Start a cluster with the given options and a proxy in front of it; returns (db, proxy conninfo)."""
    started: list[Any] = []

    def start(*, upstream: dict[str, Any] | None = None, **cluster_options: Any) -> tuple[Database, str]:
        cluster = TemporaryCluster(**cluster_options)
        started.append(cluster)
        db = cluster.start()
        os.environ[PASSWORD_ENV] = db.password
        data = copy.deepcopy(proxy.config_data)
        data["upstream"] = {"host": db.host, "port": db.port, "connect_timeout_seconds": 5,
                            "credentials": [{"role": db.superuser, "password_env": PASSWORD_ENV}],
                            **(upstream or {})}
        if cluster.ssl_ca_file is not None and (upstream or {}).get("sslrootcert") == CLUSTER_CA:
            data["upstream"]["sslrootcert"] = str(cluster.ssl_ca_file)
        running = RunningProxy(parse_config(data, Path.cwd()), audit=MemoryAuditSink()).start()
        started.append(running)
        conninfo = (f"host=127.0.0.1 port={running.ports[1]} user={db.superuser} dbname=postgres sslmode=disable "
                    f"password={proxy.token(roles=(db.superuser,))}")
        return db, conninfo

    yield start
    for item in reversed(started):
        item.stop()


@pytest.mark.parametrize("method", ["md5", "password", "trust"])
def test_upstream_login_methods(through: Callable[..., tuple[Database, str]], method: str) -> None:
    db, conninfo = through(auth_method=method)
    with psycopg.connect(conninfo) as conn:
        assert conn.execute("select current_user").fetchone() == (db.superuser,)
        (auth,) = conn.execute("select auth_method from pg_hba_file_rules where address = '127.0.0.1'").fetchone()
        assert auth == method


def test_upstream_tls_verify_full(through: Callable[..., tuple[Database, str]]) -> None:
    _, conninfo = through(ssl=True, upstream={"sslmode": "verify-full", "sslrootcert": CLUSTER_CA})
    with psycopg.connect(conninfo) as conn:
        (ssl,) = conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone()
        assert ssl is True


def test_upstream_tls_required_but_refused(through: Callable[..., tuple[Database, str]]) -> None:
    _, conninfo = through(upstream={"sslmode": "require"})  # this cluster has no TLS
    with pytest.raises(psycopg.OperationalError, match="upstream does not accept TLS but sslmode is require"):
        psycopg.connect(conninfo)


def test_upstream_tls_verify_full_rejects_wrong_ca(through: Callable[..., tuple[Database, str]],
                                                   tls_files: Any) -> None:
    _, conninfo = through(ssl=True, upstream={"sslmode": "verify-full", "sslrootcert": str(tls_files.ca_file)})
    expected = "TLS with the upstream database failed: CERTIFICATE_VERIFY_FAILED"
    with pytest.raises(psycopg.OperationalError, match=expected):
        psycopg.connect(conninfo)


def test_upstream_tls_ca_file_replaced_takes_effect(through: Callable[..., tuple[Database, str]], tls_files: Any,
                                                    tmp_path: Path) -> None:
    # The TLS client context is built once per version of the CA file, not once per process.
    ca_file = tmp_path / "upstream-ca.pem"
    ca_file.write_bytes(tls_files.ca_file.read_bytes())  # not the cluster's CA
    db, conninfo = through(ssl=True, upstream={"sslmode": "verify-full", "sslrootcert": str(ca_file)})
    expected = "TLS with the upstream database failed: CERTIFICATE_VERIFY_FAILED"
    with pytest.raises(psycopg.OperationalError, match=expected):
        psycopg.connect(conninfo)
    with psycopg.connect(db.dsn(), sslmode="require") as direct:
        (cluster_ca,) = direct.execute("show ssl_ca_file").fetchone()
    ca_file.write_bytes(Path(cluster_ca).read_bytes())
    for _ in range(2):
        with psycopg.connect(conninfo) as conn:
            assert conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()").fetchone() == (True,)
    ca_file.write_bytes(tls_files.ca_file.read_bytes() + b"\n")  # back to the wrong CA
    with pytest.raises(psycopg.OperationalError, match=expected):
        psycopg.connect(conninfo)

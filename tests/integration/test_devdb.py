"""Integration tests of pgproxy.devdb / tlsutil / demo_data against real PostgreSQL servers.

Each auth-method variant starts its own TemporaryCluster (about a second each); the default SCRAM
checks and the sample-schema checks use the session ``database`` fixture.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest

from pgproxy import devdb
from pgproxy.demo_data import CUSTOMER_COUNT, ORDER_COUNT, SAMPLE_ROLES, seed_sample_schema
from pgproxy.devdb import Database, TemporaryCluster, create_role
from pgproxy.tlsutil import DevTLS, client_context, generate_dev_ca_and_cert, server_context

pytestmark = pytest.mark.postgres  # every test here starts or finds PostgreSQL's own binaries


def _connect(dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(dsn, connect_timeout=10, autocommit=True)


def _scalar(dsn: str, query: str) -> object:
    with _connect(dsn) as conn:
        row = conn.execute(query.encode()).fetchone()
        assert row is not None
        return row[0]


# --------------------------------------------------------------------------------------------------
# Default (SCRAM) server: the session fixture
# --------------------------------------------------------------------------------------------------


async def test_scram_login_asyncpg(database: Database) -> None:
    conn = await asyncpg.connect(database.dsn(), timeout=10)
    try:
        assert await conn.fetchval("SELECT current_user") == database.superuser
        stored = await conn.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = current_user")
        assert stored.startswith("SCRAM-SHA-256$")
    finally:
        await conn.close()


def test_scram_login_psycopg(database: Database) -> None:
    assert _scalar(database.dsn(), "SELECT current_user") == database.superuser
    assert _scalar(database.dsn(), "SHOW password_encryption") == "scram-sha-256"


async def test_wrong_password_fails(database: Database) -> None:
    bad = database.dsn(password="definitely-not-the-password")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(bad, timeout=10)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _connect(bad)


def test_create_role_login_and_update(database: Database) -> None:
    name = f"devdb Test {uuid.uuid4().hex[:8]}"  # needs quoting: space and capitals
    try:
        create_role(database, name, "first-pw")
        assert _scalar(database.dsn(user=name, password="first-pw"), "SELECT current_user") == name
        # existing role: brought to the new attributes instead of failing
        create_role(database, name, "second-pw")
        with pytest.raises(psycopg.OperationalError):
            _connect(database.dsn(user=name, password="first-pw"))
        assert _scalar(database.dsn(user=name, password="second-pw"), "SELECT 1") == 1
        create_role(database, name, "second-pw", login=False)
        with pytest.raises(psycopg.OperationalError, match="not permitted to log in"):
            _connect(database.dsn(user=name, password="second-pw"))
    finally:
        with _connect(database.dsn()) as conn:
            conn.execute(psycopg.sql.SQL("DROP ROLE IF EXISTS {}").format(psycopg.sql.Identifier(name)))


def test_dsn_quotes_credentials() -> None:
    db = Database(host="::1", port=5433, superuser="a b", password="p@ss:/?", database="d/b")
    assert db.dsn() == "postgresql://a%20b:p%40ss%3A%2F%3F@[::1]:5433/d%2Fb"
    assert db.dsn(user="u", password="", params={"sslmode": "require"}) == (
        "postgresql://u@[::1]:5433/d%2Fb?sslmode=require"
    )


# --------------------------------------------------------------------------------------------------
# Other auth methods: one cluster each
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["md5", "password"])
async def test_password_auth_variants(method: str) -> None:
    with TemporaryCluster(auth_method=method) as db:
        rule = _scalar(
            db.dsn(),
            "SELECT auth_method FROM pg_hba_file_rules WHERE type = 'host' AND address = '127.0.0.1'",
        )
        assert rule == method
        stored = str(_scalar(db.dsn(), "SELECT rolpassword FROM pg_authid WHERE rolname = current_user"))
        # md5 must really be md5: a SCRAM verifier would make the server silently use SCRAM
        assert stored.startswith("md5" if method == "md5" else "SCRAM-SHA-256$")

        conn = await asyncpg.connect(db.dsn(), timeout=10)
        try:
            assert await conn.fetchval("SELECT 41 + 1") == 42
        finally:
            await conn.close()
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(db.dsn(password="wrong"), timeout=10)

        create_role(db, "app_user", "app-pw")
        assert _scalar(db.dsn(user="app_user", password="app-pw"), "SELECT current_user") == "app_user"
        if method == "md5":
            hashed = _scalar(db.dsn(), "SELECT rolpassword FROM pg_authid WHERE rolname = 'app_user'")
            assert str(hashed).startswith("md5")


def test_trust_cluster_port_retry_and_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    # Hold a port so the first start attempt clashes; the cluster must retry on another port.
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    ports = iter([taken])
    real_free_port = devdb._free_port
    monkeypatch.setattr(devdb, "_free_port", lambda: next(ports, None) or real_free_port())

    cluster = TemporaryCluster(auth_method="trust", superuser="boss")
    try:
        db = cluster.start()
        assert db.port != taken
        assert db.host == "127.0.0.1"
        data_dir, base_dir = cluster.data_dir, cluster.base_dir
        assert (data_dir / "PG_VERSION").is_file()
        assert base_dir.parent == Path(tempfile.gettempdir())
        # trust: any password is accepted
        assert _scalar(db.dsn(password="anything"), "SELECT current_user") == "boss"
        assert _scalar(db.dsn(), "SHOW listen_addresses") == "127.0.0.1"
        assert _scalar(db.dsn(), "SHOW fsync") == "off"
        assert _scalar(db.dsn(), "SHOW max_connections") == "300"
    finally:
        blocker.close()
        cluster.stop()

    assert not base_dir.exists()
    assert not data_dir.exists()
    assert not cluster.running
    cluster.stop()  # idempotent
    with pytest.raises(psycopg.OperationalError):
        _connect(db.dsn())


def test_start_failure_reports_log_tail() -> None:
    cluster = TemporaryCluster(extra_conf={"shared_buffers": "not-a-size"})
    with pytest.raises(RuntimeError, match="shared_buffers"):
        cluster.start()
    assert not cluster.running
    with pytest.raises(RuntimeError, match="not started"):
        _ = cluster.data_dir


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        TemporaryCluster(auth_method="peer")
    with pytest.raises(ValueError):
        TemporaryCluster(extra_conf={"work_mem = '1MB'\nfsync": "on"})


# --------------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ssl_cluster() -> Iterator[TemporaryCluster]:
    cluster = TemporaryCluster(ssl=True)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_ssl_verify_full_psycopg(ssl_cluster: TemporaryCluster) -> None:
    ca = ssl_cluster.ssl_ca_file
    assert ca is not None and ca.is_file()
    dsn = ssl_cluster.database.dsn(params={"sslmode": "verify-full", "sslrootcert": str(ca)})
    assert _scalar(dsn, "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True


async def test_ssl_verify_full_asyncpg(ssl_cluster: TemporaryCluster) -> None:
    ctx = client_context("verify-full", ssl_cluster.ssl_ca_file)
    assert ctx is not None
    conn = await asyncpg.connect(ssl_cluster.database.dsn(), ssl=ctx, timeout=10)
    try:
        version = await conn.fetchval("SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert version in ("TLSv1.2", "TLSv1.3")
    finally:
        await conn.close()


def test_ssl_verify_full_rejects_other_ca(ssl_cluster: TemporaryCluster, tls_files: DevTLS) -> None:
    dsn = ssl_cluster.database.dsn(params={"sslmode": "verify-full", "sslrootcert": str(tls_files.ca_file)})
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        _connect(dsn)


def test_tls_files_and_contexts(tmp_path: Path) -> None:
    tls = generate_dev_ca_and_cert(tmp_path / "tls", hostnames=("db.test", "10.1.2.3"))
    for key in (tls.key_file, tls.ca_key_file):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert client_context("disable") is None
    require = client_context("require")
    assert require is not None and require.verify_mode == ssl.CERT_NONE and not require.check_hostname
    verify_ca = client_context("verify-ca", tls.ca_file)
    assert verify_ca is not None and verify_ca.verify_mode == ssl.CERT_REQUIRED
    assert not verify_ca.check_hostname
    full = client_context("verify-full", tls.ca_file)
    assert full is not None and full.check_hostname
    assert full.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert server_context(tls.cert_file, tls.key_file).minimum_version >= ssl.TLSVersion.TLSv1_2
    with pytest.raises(ValueError):
        client_context("verify_full")

    from cryptography import x509

    cert = x509.load_pem_x509_certificate(tls.cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["db.test"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 29 <= lifetime.days <= 31


# --------------------------------------------------------------------------------------------------
# Sample schema
# --------------------------------------------------------------------------------------------------


def test_seed_sample_schema() -> None:
    # Its own cluster: roles are cluster-wide, and the shared one's agent roles belong to the proxy tests.
    with TemporaryCluster() as database:
        _check_seed(database)


def _check_seed(database: Database) -> None:
    seed_sample_schema(database.dsn(), "sample-pw")
    seed_sample_schema(database.dsn(), "sample-pw")  # re-runnable

    assert _scalar(database.dsn(), "SELECT count(*) FROM shop.customers") == CUSTOMER_COUNT
    assert _scalar(database.dsn(), "SELECT count(*) FROM shop.orders") == ORDER_COUNT
    assert _scalar(database.dsn(), "SELECT min(id) FROM shop.customers") == 1
    assert (
        _scalar(
            database.dsn(),
            "SELECT count(*) FROM shop.customers WHERE email ~ '^[a-z]+\\.[a-z]+[0-9]+@example\\.com$' "
            "AND ssn ~ '^[0-9]{3}-[0-9]{2}-[0-9]{4}$' AND card_number ~ '^[0-9]{16}$'",
        )
        == CUSTOMER_COUNT
    )

    for role in SAMPLE_ROLES:
        assert _scalar(database.dsn(user=role, password="sample-pw"), "SELECT current_user") == role

    reader = database.dsn(user="agent_reader", password="sample-pw")
    joined = "SELECT count(*) FROM shop.orders o JOIN shop.customers c ON c.id = o.customer_id"
    assert _scalar(reader, joined) == ORDER_COUNT
    with _connect(reader) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("DELETE FROM shop.orders")

    writer = database.dsn(user="agent_writer", password="sample-pw")
    with psycopg.connect(writer, connect_timeout=10) as conn:
        conn.execute(
            "INSERT INTO shop.orders (customer_id, amount, status, ordered_at) "
            "VALUES (1, 9.99, 'paid', now())"
        )
        conn.rollback()
    assert _scalar(database.dsn(), "SELECT count(*) FROM shop.orders") == ORDER_COUNT


def test_root_without_postgres_user_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import pwd

    def no_such_user(name: str) -> pwd.struct_passwd:
        raise KeyError(name)

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(pwd, "getpwnam", no_such_user)
    with pytest.raises(RuntimeError, match="useradd --system"):
        TemporaryCluster().start()

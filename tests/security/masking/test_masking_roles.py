"""Roles that can step around any rewrite are refused to masked identities at login (28000, saying why).

One ordinary (non-superuser) role per capability, created for this suite, logs in through the masking
proxy as the masked identity; each is refused before any statement runs, the refusal is in the audit log,
and ``pgproxy check`` flags it. An ordinary role still logs in and reads masked values.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import yaml
from click.testing import CliRunner
from harness import UPSTREAM_PASSWORD_ENV, ProxyUnderTest
from masking_support import CUSTOMERS, MASKED_GROUP, PEOPLE_SSN
from rawwire import parse_fields, password, read_message, startup_packet

from pgproxy.cli import main
from pgproxy.devdb import Database, create_role

pytestmark = pytest.mark.timeout(120)

# role -> (SQL that gives it the capability, as the superuser; words the refusal must contain)
CAPABLE = {
    "mrole_super": ("ALTER ROLE mrole_super SUPERUSER", "is a superuser"),
    "mrole_read_files": ("GRANT pg_read_server_files TO mrole_read_files", "member of pg_read_server_files"),
    "mrole_write_files": ("GRANT pg_write_server_files TO mrole_write_files", "member of pg_write_server_files"),
    "mrole_program": ("GRANT pg_execute_server_program TO mrole_program", "member of pg_execute_server_program"),
    "mrole_bypassrls": ("ALTER ROLE mrole_bypassrls BYPASSRLS", "has BYPASSRLS"),
    "mrole_createrole": ("ALTER ROLE mrole_createrole CREATEROLE", "has CREATEROLE"),
    "mrole_replication": ("ALTER ROLE mrole_replication REPLICATION", "has REPLICATION"),
    "mrole_lo_import": ("GRANT EXECUTE ON FUNCTION pg_catalog.lo_import(text) TO mrole_lo_import",
                        "can execute lo_import"),
    "mrole_fdw": ("GRANT USAGE ON FOREIGN DATA WRAPPER postgres_fdw TO mrole_fdw",
                  "foreign-data wrapper postgres_fdw"),
    "mrole_server": ("GRANT USAGE ON FOREIGN SERVER mrole_loopback TO mrole_server",
                     "foreign server mrole_loopback"),
    "mrole_mapping": ("CREATE USER MAPPING FOR mrole_mapping SERVER mrole_loopback",
                      "user mapping for the foreign server mrole_loopback"),
    "mrole_dblink": ("GRANT EXECUTE ON FUNCTION mrole_dblink.dblink_connect(text) TO mrole_dblink",
                     "can execute dblink_connect"),
    # Not inherited, but SET ROLE reaches it: membership counts the way the server grants it.
    "mrole_set_role": ("GRANT mrole_group TO mrole_set_role", "member of pg_execute_server_program"),
    "mrole_set_super": ("GRANT mrole_supergroup TO mrole_set_super", "can SET ROLE to a superuser through role "
                        "mrole_supergroup"),
}
PLAIN = "mrole_plain"


@pytest.fixture(scope="module")
def roles(masking_schema: Database, upstream_roles: str) -> Iterator[Database]:
    db = masking_schema
    names = [*CAPABLE, PLAIN]
    for name in names:
        create_role(db, name, upstream_roles)
    with psycopg.connect(db.dsn(), autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS mrole_dblink CASCADE")
        conn.execute("CREATE EXTENSION IF NOT EXISTS postgres_fdw")
        conn.execute(f"CREATE SERVER mrole_loopback FOREIGN DATA WRAPPER postgres_fdw "
                     f"OPTIONS (host '{db.host}', port '{db.port}', dbname '{db.database}')")
        with conn.transaction():  # never executable by PUBLIC, not even for a moment
            conn.execute("CREATE SCHEMA mrole_dblink")
            conn.execute("CREATE EXTENSION dblink SCHEMA mrole_dblink")
            conn.execute("REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA mrole_dblink FROM PUBLIC")
        conn.execute("CREATE ROLE mrole_group NOLOGIN")
        conn.execute("GRANT pg_execute_server_program TO mrole_group")
        conn.execute("CREATE ROLE mrole_supergroup NOLOGIN SUPERUSER")
        conn.execute("ALTER ROLE mrole_set_role NOINHERIT")
        for name in names:
            conn.execute(f"GRANT USAGE ON SCHEMA maskt TO {name}")
            conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA maskt TO {name}")
        for sql, _ in CAPABLE.values():
            conn.execute(sql)
    yield db
    with psycopg.connect(db.dsn(), autocommit=True) as conn:
        conn.execute("DROP SCHEMA mrole_dblink CASCADE")
        conn.execute("DROP SERVER mrole_loopback CASCADE")
        conn.execute("DROP EXTENSION postgres_fdw")
        for name in [*names, "mrole_group", "mrole_supergroup"]:
            conn.execute(f"DROP OWNED BY {name}")
            conn.execute(f"DROP ROLE {name}")


def _token(proxy: ProxyUnderTest, role: str) -> str:
    return proxy.token(sub=f"masked-{role}", roles=(role,), groups=(MASKED_GROUP,))


def _login_error(proxy: ProxyUnderTest, role: str) -> dict[str, str]:
    """Log in over the wire as the masked identity; the fields of the ErrorResponse that ends the login."""
    with socket.create_connection(("127.0.0.1", proxy.plain_port), timeout=10) as sock:
        sock.sendall(startup_packet(role, proxy.database.database))
        assert read_message(sock)[0] == "R"
        sock.sendall(password(_token(proxy, role)))
        kind, body = read_message(sock)
        assert kind == "E", (kind, body)
        return parse_fields(body)


@pytest.mark.parametrize("role", sorted(CAPABLE))
def test_role_that_steps_around_masking_is_refused_at_login(role: str, roles: Database,
                                                           masked: ProxyUnderTest) -> None:
    with psycopg.connect(roles.dsn(user=role, password=os.environ[UPSTREAM_PASSWORD_ENV])) as direct:
        assert direct.execute("SELECT current_user").fetchone() == (role,)  # the role itself logs in upstream
    before = len(masked.events("session_start"))
    error = _login_error(masked, role)
    why = CAPABLE[role][1]
    assert (error["S"], error["C"]) == ("FATAL", "28000"), error
    assert error["M"].startswith(f'pgproxy masking: database role "{role}" can step around masking'), error
    assert why in error["M"]
    refused = [e for e in masked.events("auth_failed") if e.get("user") == role]
    assert refused and why in refused[-1]["reason"], refused
    assert len(masked.events("session_start")) == before  # no session started, no statement ran


def test_login_is_refused_when_the_capabilities_cannot_be_checked(roles: Database, masked: ProxyUnderTest) -> None:
    create_role(roles, "mrole_unreadable", "not-the-proxy-credential")  # the proxy cannot log in as it
    try:
        error = _login_error(masked, "mrole_unreadable")
    finally:
        with psycopg.connect(roles.dsn(), autocommit=True) as conn:
            conn.execute("DROP ROLE mrole_unreadable")
    assert (error["C"], error["M"]) == ("57P03", 'pgproxy masking: the capabilities of database role '
                                                 '"mrole_unreadable" could not be checked'), error


def test_exempt_identity_may_still_use_such_a_role(roles: Database, exempt: ProxyUnderTest) -> None:
    token = exempt.token(sub="exempt-reader", roles=("mrole_read_files",), groups=("dba",))
    with psycopg.connect(exempt.dsn(user="mrole_read_files", token=token, tls=False)) as conn:
        assert conn.execute("SELECT ssn FROM maskt.people WHERE id = 1").fetchone() == (PEOPLE_SSN,)


def test_ordinary_role_logs_in_and_is_masked(roles: Database, masked: ProxyUnderTest) -> None:
    with psycopg.connect(masked.dsn(user=PLAIN, token=_token(masked, PLAIN), tls=False)) as conn:
        assert conn.execute("SELECT email FROM maskt.customers WHERE id = 1").fetchone() == ("****@example.com",)
        assert CUSTOMERS[0].email != "****@example.com"


def test_check_flags_roles_that_cannot_be_masked(roles: Database, masked: ProxyUnderTest, tmp_path: Path) -> None:
    def check(*credentials: str) -> tuple[int, str]:
        data = dict(masked.config_data)
        data["audit"] = {"jsonl_path": str(tmp_path / "audit.jsonl")}
        data["upstream"] = {**data["upstream"], "credentials": [
            {"role": role, "password_env": UPSTREAM_PASSWORD_ENV} for role in credentials]}
        config = tmp_path / "pgproxy.yaml"
        config.write_text(yaml.safe_dump(data))
        result = CliRunner().invoke(main, ["check", "-c", str(config), "--database", roles.database])
        return result.exit_code, result.output

    config_file = tmp_path / "pgproxy.yaml"
    assert check(PLAIN) == (0, f"{config_file}: OK\n")
    code, output = check(PLAIN, "mrole_program", "mrole_bypassrls")
    assert code == 1, output
    assert (f'error: {config_file}: masking: database role "mrole_program" can step around masking, so masked '
            "identities may not use it: it is a member of pg_execute_server_program") in output
    assert 'database role "mrole_bypassrls" can step around masking, so masked identities may not use it: it has '\
           "BYPASSRLS (they are refused at login)" in output
    assert PLAIN not in output

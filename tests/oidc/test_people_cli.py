"""`pgproxy login` (device authorization flow) and `pgproxy connect` against the real provider and proxy.

The commands run as a person runs them (subprocesses with their own token cache); the person's part
of the device flow (open the URL, confirm the code, sign in) is played over HTTP; psql is the real
client. The proxy trusts the provider through discovery, with no clock leeway so expiry is exact.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import ProxyUnderTest
from oidcprovider import (
    CLI_CLIENT,
    EXPIRING_CLI_CLIENT,
    SECRET_CLI_CLIENT,
    SECRET_CLI_SECRET,
    SHORT_CLI_CLIENT,
    OpenIDProvider,
)

from pgproxy.identity.people import TokenCache

SCOPES = ["--scope", "openid", "--scope", "offline_access", "--scope", "groups", "--scope", "pgproxy"]


@pytest.fixture(scope="module")
def oidc_proxy(proxy: ProxyUnderTest, openid_provider: OpenIDProvider) -> Any:
    def mutate(data: dict[str, Any]) -> None:
        data["identity"] = {"issuer": openid_provider.issuer, "audience": "pgproxy", "algorithms": ["RS256"],
                            "extra_audiences": [CLI_CLIENT, SHORT_CLI_CLIENT, EXPIRING_CLI_CLIENT,
                                                SECRET_CLI_CLIENT],
                            "discovery": True, "leeway_seconds": 0}
    started = proxy.variant(mutate)
    try:
        yield started
    finally:
        started.running.stop()


def pgproxy(*args: str, env: dict[str, str], check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "pgproxy", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check:
        assert done.returncode == 0, f"pgproxy {args[0]} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


def person_env(tmp_path: Path, op: OpenIDProvider, client_id: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return {**env, "PGPROXY_TOKEN_CACHE": str(tmp_path / "cache"), "PGPROXY_ISSUER": op.issuer,
            "PGPROXY_CLIENT_ID": client_id}


def cli_login(env: dict[str, str], op: OpenIDProvider, user: str) -> str:
    """Run `pgproxy login`, approve its device code as ``user``; the command's stderr."""
    process = subprocess.Popen([sys.executable, "-m", "pgproxy", "login", *SCOPES], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stderr is not None
    shown = ""
    try:
        while (match := re.search(r"\(or open (\S+)\)", shown)) is None:
            line = process.stderr.readline()
            assert line, f"pgproxy login printed no verification URL:\n{shown}"
            shown += line
        assert re.search(r"open \S+/device and enter the code [A-Z]{4}-[A-Z]{4}", shown), shown
        op.complete_device_login(match.group(1), user)
        rest, _ = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, shown + (rest or "")
    return shown + process.stderr.read() if not process.stderr.closed else shown


def connect_args(proxy: ProxyUnderTest, *extra: str) -> list[str]:
    return ["connect", "--host", "127.0.0.1", "--port", str(proxy.port), "-U", "agent_reader",
            "-d", proxy.database.database, "--sslrootcert", str(proxy.tls.ca_file), *extra]


def cached(env: dict[str, str], client_id: str) -> dict[str, Any]:
    data = TokenCache(Path(env["PGPROXY_TOKEN_CACHE"])).load(env["PGPROXY_ISSUER"], client_id)
    assert data is not None
    return data


def test_device_login_then_psql_with_the_cached_token(oidc_proxy: ProxyUnderTest, openid_provider: OpenIDProvider,
                                                      tmp_path: Path) -> None:
    env = person_env(tmp_path, openid_provider, CLI_CLIENT)
    refused = pgproxy(*connect_args(oidc_proxy), env=env, check=False)
    assert refused.returncode == 1 and "not logged in" in refused.stderr and "pgproxy login" in refused.stderr

    cli_login(env, openid_provider, "alice")
    cache_dir = tmp_path / "cache"
    files = list(cache_dir.iterdir())
    assert len(files) == 1
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    token = cached(env, CLI_CLIENT)["id_token"]

    done = pgproxy(*connect_args(oidc_proxy, "--", "-XAtc", "SELECT current_user"), env=env)
    assert done.stdout.strip() == "agent_reader"
    starts = [e for e in oidc_proxy.audit.events if e["event"] == "session_start"]
    assert starts[-1]["identity"]["subject"] == "alice"
    assert token not in json.dumps(oidc_proxy.audit.events, default=str)
    assert cached(env, CLI_CLIENT)["id_token"] == token  # still valid for an hour: no refresh

    # the other outputs: a DSN for command substitution, export lines for eval, a pg_service entry
    dsn = pgproxy(*connect_args(oidc_proxy, "--dsn"), env=env).stdout.strip()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("agent_reader",)
    exports = pgproxy(*connect_args(oidc_proxy, "--env"), env=env).stdout
    assert f"export PGPASSWORD={token}" in exports and "export PGSSLMODE=verify-full" in exports
    psql = subprocess.run(["bash", "-c", 'eval "$1"; psql -XAtc "SELECT current_user"', "-", exports],
                          capture_output=True, text=True, env=env, timeout=30, check=False)
    assert psql.stdout.strip() == "agent_reader", psql.stderr
    service_file = tmp_path / "pg_service.conf"
    service_file.write_text("[other]\nhost=db.example.com\n")
    pgproxy(*connect_args(oidc_proxy, "--service", "prod", "--service-file", str(service_file)), env=env)
    assert stat.S_IMODE(service_file.stat().st_mode) == 0o600
    assert "[other]" in service_file.read_text()
    psql = subprocess.run(["psql", "service=prod", "-XAtc", "SELECT current_user"], capture_output=True, text=True,
                          env={**env, "PGSERVICEFILE": str(service_file)}, timeout=30, check=False)
    assert psql.stdout.strip() == "agent_reader", psql.stderr

    pgproxy("logout", env=env)
    assert not list(cache_dir.iterdir())


def test_expired_tokens_are_refreshed_before_psql_runs(oidc_proxy: ProxyUnderTest,
                                                       openid_provider: OpenIDProvider, tmp_path: Path) -> None:
    env = person_env(tmp_path, openid_provider, SHORT_CLI_CLIENT)  # ID tokens live 3 s
    cli_login(env, openid_provider, "alice")
    first = cached(env, SHORT_CLI_CLIENT)
    time.sleep(3.5)
    with pytest.raises(psycopg.OperationalError, match="token expired"):
        psycopg.connect(**oidc_proxy.conninfo(user="agent_reader", token=first["id_token"]))  # type: ignore[arg-type]
    done = pgproxy(*connect_args(oidc_proxy, "--", "-XAtc", "SELECT current_user"), env=env)
    assert done.stdout.strip() == "agent_reader"
    second = cached(env, SHORT_CLI_CLIENT)
    assert second["id_token"] != first["id_token"]
    assert second["refresh_token"] != first["refresh_token"]  # the provider rotates refresh tokens
    assert second["expires_at"] > first["expires_at"]


def test_an_expired_login_asks_to_log_in_again(openid_provider: OpenIDProvider, oidc_proxy: ProxyUnderTest,
                                               tmp_path: Path) -> None:
    env = person_env(tmp_path, openid_provider, EXPIRING_CLI_CLIENT)  # refresh tokens live 4 s
    cli_login(env, openid_provider, "carol")
    time.sleep(4.5)
    done = pgproxy(*connect_args(oidc_proxy), env=env, check=False)
    assert done.returncode == 1
    assert "could not be refreshed (invalid_grant): run pgproxy login" in done.stderr


def test_browser_login_with_pkce_on_a_loopback_port(oidc_proxy: ProxyUnderTest, openid_provider: OpenIDProvider,
                                                    browser: Any, tmp_path: Path) -> None:
    env = person_env(tmp_path, openid_provider, CLI_CLIENT)
    process = subprocess.Popen([sys.executable, "-m", "pgproxy", "login", "--browser", "--no-open", *SCOPES],
                               env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        match = re.search(r"To log in, open (\S+)", line)
        assert match, line
        url = match.group(1)
        assert "code_challenge_method=S256" in url and "code_challenge=" in url and "redirect_uri=http" in url
        page = browser.new_page()
        page.goto(url)
        page.fill("#login", "bob")
        page.fill("#password", "bob-password")
        page.click("#login-form button[type=submit]")
        page.wait_for_selector("#done")
        assert "login received" in page.inner_text("#done")
        page.close()
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, err
    assert "Logged in to" in err
    done = pgproxy(*connect_args(oidc_proxy, "--", "-XAtc", "SELECT current_user"), env=env)
    assert done.stdout.strip() == "agent_reader"
    starts = [e for e in oidc_proxy.audit.events if e["event"] == "session_start"]
    assert starts[-1]["identity"]["subject"] == "bob"


def test_a_client_with_an_installed_app_secret(openid_provider: OpenIDProvider, oidc_proxy: ProxyUnderTest,
                                               tmp_path: Path) -> None:
    env = person_env(tmp_path, openid_provider, SECRET_CLI_CLIENT)
    refused = pgproxy("login", *SCOPES, env=env, check=False)
    assert refused.returncode == 1 and "invalid_client" in refused.stderr
    env["PGPROXY_CLIENT_SECRET"] = SECRET_CLI_SECRET
    cli_login(env, openid_provider, "alice")
    done = pgproxy(*connect_args(oidc_proxy, "--", "-XAtc", "SELECT current_user"), env=env)
    assert done.stdout.strip() == "agent_reader"


def test_a_cache_file_others_can_read_is_refused(openid_provider: OpenIDProvider, oidc_proxy: ProxyUnderTest,
                                                 tmp_path: Path) -> None:
    env = person_env(tmp_path, openid_provider, CLI_CLIENT)
    cache = TokenCache(tmp_path / "cache")
    path = cache.store(openid_provider.issuer, CLI_CLIENT, {"id_token": "x.y.z", "expires_at": time.time() + 600})
    path.chmod(0o644)
    done = pgproxy(*connect_args(oidc_proxy), env=env, check=False)
    assert done.returncode == 1 and "may be read by others (mode 644)" in done.stderr

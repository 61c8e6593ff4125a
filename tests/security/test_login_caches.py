"""What a login may take from a cache, through the real proxy and PostgreSQL: a verified token is reused
only for the very same token, never past its exp and never once its signing key is gone; the SCRAM keys
derived from the proxy's upstream password are reused, but a server whose password changed refuses the
login (the server proves itself in every exchange).

The proxies here run in the test's event loop with a verifier on a clock the test moves.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import pytest
from harness import proxy_config_data

from pgproxy.app import build_server
from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.config import parse_config
from pgproxy.devdb import Database, create_role
from pgproxy.identity import DevKeys, TokenVerifier, generate_dev_keys, mint_token
from pgproxy.server.listener import ProxyServer
from pgproxy.tlsutil import DevTLS

pytestmark = pytest.mark.timeout(60)

ISSUER = "https://issuer.test"
AUDIENCE = "pgproxy-test"


class Clock:
    """Epoch seconds: the real time until the test sets ``now``."""

    def __init__(self) -> None:
        self.now: float | None = None

    def __call__(self) -> float:
        return time.time() if self.now is None else self.now


class LoginProxy:
    """A ProxyServer in the test's loop, reached on its plaintext loopback listener."""

    def __init__(self, server: ProxyServer, audit: MemoryAuditSink, database: Database) -> None:
        self.server, self.audit, self.database = server, audit, database

    async def connect(self, token: str, user: str = "agent_reader") -> asyncpg.Connection:
        return await asyncpg.connect(host="127.0.0.1", port=self.server.bound_ports[1], user=user, password=token,
                                     database=self.database.database, ssl=False, timeout=10)

    async def query_as(self, token: str, user: str = "agent_reader") -> str:
        conn = await self.connect(token, user)
        try:
            return str(await conn.fetchval("select current_user"))
        finally:
            await conn.close()

    def failures(self) -> list[str]:
        return [e["reason"] for e in self.audit.events if e.get("event") == "auth_failed"]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def login_proxy(database: Database, upstream_roles: str, dev_keys: DevKeys, tls_files: DevTLS,
                      clock: Clock) -> AsyncIterator[Callable[..., Any]]:
    """Starts proxies (the test config changed by ``mutate``) whose verifier reads ``clock``."""
    started: list[ProxyServer] = []

    async def start(mutate: Callable[[dict[str, Any]], None] | None = None) -> LoginProxy:
        data = proxy_config_data(database, dev_keys, tls_files)
        if mutate is not None:
            mutate(data)
        config = parse_config(data, Path.cwd())
        audit = MemoryAuditSink()
        server = build_server(config, audit=audit, verifier=TokenVerifier(config.identity, now=clock))
        await server.start()
        started.append(server)
        return LoginProxy(server, audit, database)

    yield start
    for server in started:
        await server.close(drain_seconds=0)


def token(keys: DevKeys, ttl: float = 600, sub: str = "agent-1", roles: tuple[str, ...] = ("agent_reader",)) -> str:
    return mint_token(keys.private_key_file, issuer=ISSUER, audience=AUDIENCE, subject=sub, db_role=list(roles),
                      ttl_seconds=ttl)


@pytest.fixture
def signature_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every full token check (pyjwt's signature verification), counted."""
    checks: list[str] = []
    real_decode = jwt.decode

    def counting_decode(token: str, *args: Any, **kwargs: Any) -> Any:
        checks.append(token)
        return real_decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting_decode)
    return checks


# --------------------------------------------------------------------------------------------------
# Verified tokens


async def test_cached_token_is_refused_from_its_exp(login_proxy: Callable[..., Any], dev_keys: DevKeys, clock: Clock,
                                                    signature_checks: list[str]) -> None:
    proxy = await login_proxy()
    tok = token(dev_keys, ttl=120)
    assert await proxy.query_as(tok) == "agent_reader"
    assert await proxy.query_as(tok) == "agent_reader"
    assert signature_checks == [tok]  # the second login was served from the cache
    exp = jwt.decode(tok, options={"verify_signature": False})["exp"]
    clock.now = exp - 0.5
    assert await proxy.query_as(tok) == "agent_reader"
    clock.now = exp  # exp is a hard limit, cached or not
    with pytest.raises(asyncpg.InvalidPasswordError, match="token expired"):
        await proxy.connect(tok)
    clock.now = exp + 3600
    with pytest.raises(asyncpg.InvalidPasswordError, match="token expired"):
        await proxy.connect(tok)
    assert proxy.failures() == ["token expired", "token expired"]


async def test_only_the_very_same_token_is_served_from_the_cache(login_proxy: Callable[..., Any],
                                                                 dev_keys: DevKeys) -> None:
    proxy = await login_proxy()
    tok = token(dev_keys)
    assert await proxy.query_as(tok) == "agent_reader"
    head, payload, signature = tok.split(".")
    other_signature = token(dev_keys).split(".")[2]  # a valid signature, of another token
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    for forged in (f"{head}.{payload}.{other_signature}", f"{head}.{payload}.{flipped}"):
        with pytest.raises(asyncpg.InvalidPasswordError, match="invalid signature"):
            await proxy.connect(forged)
    # Same header and signature, another payload (another role): refused, not taken from the cache.
    other = token(dev_keys, roles=("agent_writer",)).split(".")[1]
    with pytest.raises(asyncpg.InvalidPasswordError, match="invalid signature"):
        await proxy.connect(f"{head}.{other}.{signature}", user="agent_writer")
    assert await proxy.query_as(tok) == "agent_reader"  # the genuine token still works
    assert len(proxy.failures()) == 3


async def test_cached_token_is_refused_once_its_key_is_rotated_out(login_proxy: Callable[..., Any],
                                                                   dev_keys: DevKeys, tmp_path: Path,
                                                                   signature_checks: list[str]) -> None:
    jwks = tmp_path / "jwks.json"
    shutil.copy(dev_keys.jwks_file, jwks)

    def own_jwks(data: dict[str, Any]) -> None:
        data["identity"]["jwks_file"] = str(jwks)

    proxy = await login_proxy(own_jwks)
    tok = token(dev_keys)
    assert await proxy.query_as(tok) == "agent_reader"
    assert await proxy.query_as(tok) == "agent_reader"
    assert signature_checks == [tok]
    new_keys = generate_dev_keys(tmp_path / "rotated")
    # Another key published under the old kid: the cached result was for the old key.
    jwks.write_text(new_keys.jwks_file.read_text().replace(new_keys.kid, dev_keys.kid))
    with pytest.raises(asyncpg.InvalidPasswordError, match="invalid signature"):
        await proxy.connect(tok)
    jwks.write_text(new_keys.jwks_file.read_text())  # the old kid is gone
    with pytest.raises(asyncpg.InvalidPasswordError, match="unknown key id"):
        await proxy.connect(tok)
    assert await proxy.query_as(token(new_keys)) == "agent_reader"


# --------------------------------------------------------------------------------------------------
# SCRAM keys of the proxy's upstream login


@pytest.fixture
def pbkdf2_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every PBKDF2 the proxy runs (its SCRAM key derivations), counted."""
    runs: list[int] = []
    real = hashlib.pbkdf2_hmac

    def counting(name: str, password: bytes, salt: bytes, iterations: int, *args: Any) -> bytes:
        runs.append(iterations)
        return real(name, password, salt, iterations, *args)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counting)
    return runs


async def test_scram_keys_are_cached_but_a_changed_server_password_is_refused(
        login_proxy: Callable[..., Any], database: Database, dev_keys: DevKeys, tmp_path: Path,
        pbkdf2_runs: list[int]) -> None:
    role = "lc_scram_" + secrets.token_hex(3)
    old_password, new_password = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
    create_role(database, role, old_password)
    password_file = tmp_path / "upstream-password"
    password_file.write_text(old_password)

    def own_credential(data: dict[str, Any]) -> None:
        data["upstream"]["credentials"].insert(0, {"role": role, "password_file": str(password_file)})

    proxy = await login_proxy(own_credential)
    tok = token(dev_keys, roles=(role,))
    for _ in range(3):
        assert await proxy.query_as(tok, user=role) == role
    assert len(pbkdf2_runs) == 1  # derived once, reused by the next logins

    create_role(database, role, new_password)  # ALTER ROLE ... PASSWORD: a new verifier (new salt) upstream
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="could not log in upstream"):
        await proxy.connect(tok, user=role)
    assert len(pbkdf2_runs) == 2  # the new salt was derived with the old password, and refused

    password_file.write_text(new_password)  # the operator updates the proxy's credential
    assert await proxy.query_as(tok, user=role) == role
    assert len(pbkdf2_runs) == 3

"""The proxy under test: helpers importable by name from test modules (conftest modules are not)."""

from __future__ import annotations

import asyncio
import copy
import os
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import yaml
from click.testing import CliRunner

from pgproxy.app import build_server
from pgproxy.audit.sink import AuditSink, MemoryAuditSink
from pgproxy.cli import main
from pgproxy.config import load_config, parse_config
from pgproxy.devdb import Database
from pgproxy.identity import DevKeys, mint_token
from pgproxy.server.listener import ProxyServer
from pgproxy.testing import RunningProxy
from pgproxy.tlsutil import DevTLS

UPSTREAM_PASSWORD_ENV = "PGPROXY_TEST_UPSTREAM_PASSWORD"
SUPERUSER_PASSWORD_ENV = "PGPROXY_TEST_SUPERUSER_PASSWORD"
AGENT_ROLES = ("agent_reader", "agent_writer")
ISSUER = "https://issuer.test"
AUDIENCE = "pgproxy-test"


class FakeClock:
    """A clock for code that takes one (``clock``/``now`` callables): tests move time, they never wait."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class ProxyUnderTest:
    """A running proxy in front of the test database, with helpers to mint tokens and connect."""

    running: RunningProxy
    audit: MemoryAuditSink
    keys: DevKeys
    tls: DevTLS
    database: Database
    config_data: dict[str, Any]

    def variant(self, mutate: Callable[[dict[str, Any]], None] | None = None,
                audit: MemoryAuditSink | None = None) -> ProxyUnderTest:
        """Start another proxy whose config is this one's changed by ``mutate(data)``; the caller stops it."""
        data = copy.deepcopy(self.config_data)
        if mutate is not None:
            mutate(data)
        sink = audit or MemoryAuditSink()
        running = RunningProxy(parse_config(data, Path.cwd()), audit=sink).start()
        return ProxyUnderTest(running, sink, self.keys, self.tls, self.database, data)

    async def asyncpg_connect(self, *, user: str = "agent_reader", token: str | None = None, tls: bool = True,
                              **kwargs: Any) -> asyncpg.Connection:
        """An asyncpg connection through this proxy (TLS verified against the test CA, or the plain listener)."""
        context: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(self.tls.ca_file)) if tls else False
        return await asyncpg.connect(host="127.0.0.1", port=self.port if tls else self.plain_port, user=user,
                                     password=token if token is not None else self.token(roles=(user,)),
                                     database=self.database.database, ssl=context, timeout=10, command_timeout=15,
                                     **kwargs)

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


def config_edit(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change to config data: set the dotted ``path`` (numbers index lists) to ``value``, or with
    ``KeyError`` as the value, remove it."""
    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is KeyError:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return mutate


async def approvals_cli(source: Path | None, keys: DevKeys, action: str, approval_id: str,
                        approver: str = "fin-1") -> str:
    """Run `pgproxy approvals <action> <id> -c <source>` as a finance approver (in a thread: the CLI runs
    its own event loop); its output."""
    assert source is not None
    approver_token = mint_token(keys.private_key_file, issuer=ISSUER, audience=AUDIENCE, subject=approver,
                                groups=["finance"], ttl_seconds=600)
    args = ["approvals", action, "-c", str(source), "--token", approver_token, approval_id]
    result = await asyncio.to_thread(CliRunner().invoke, main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


class ProxyServers:
    """ProxyServers started in the test's event loop from config data, each from a config file as
    `pgproxy serve -c FILE` does (so that `pgproxy approvals -c FILE` shares their approval store)."""

    def __init__(self, data: dict[str, Any], directory: Path) -> None:
        self.data = data
        self.directory = directory
        self.started: list[ProxyServer] = []

    async def start(self, mutate: Callable[[dict[str, Any]], None] | None = None,
                    audit: AuditSink | None = None) -> ProxyServer:
        """A started server with ``mutate`` applied to a copy of the data; a MemoryAuditSink unless
        ``audit`` is given or the config has a signed log (``audit.dir``)."""
        data = copy.deepcopy(self.data)
        if mutate is not None:
            mutate(data)
        path = self.directory / f"pgproxy-{len(self.started)}.yaml"
        path.write_text(yaml.safe_dump(data))
        if audit is None and "dir" not in data["audit"]:
            audit = MemoryAuditSink()
        server = build_server(load_config(path), audit=audit)
        await server.start()
        self.started.append(server)
        return server

    async def close(self) -> None:
        for server in self.started:
            await server.close(drain_seconds=0)


def companion_config(keys: DevKeys, tmp_path: Path, name: str, section: dict[str, Any]) -> dict[str, Any]:
    """A full proxy config for a companion proxy's tests: ``section`` under ``name`` (``http`` or ``grpc``),
    the PostgreSQL side on loopback plaintext, JSON-lines audit and SQLite approvals under ``tmp_path``."""
    return {
        "listeners": [{"host": "127.0.0.1", "port": 0, "insecure_plaintext": True}],
        "identity": {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["ES256"],
                     "jwks_file": str(keys.jwks_file), "leeway_seconds": 0, "default_db_role": "agent_reader"},
        "upstream": {"credentials": [{"role": "*"}]},
        "audit": {"jsonl_path": str(tmp_path / "audit.jsonl")},
        "approvals": {"store": "sqlite", "path": str(tmp_path / "approvals.sqlite3")},
        name: section,
    }


def companion_token(keys: DevKeys, sub: str = "agent-1", groups: tuple[str, ...] = ("agents",), ttl: float = 600,
                    **claims: Any) -> str:
    """A caller's token for the companion proxies (no database role)."""
    return mint_token(keys.private_key_file, issuer=ISSUER, audience=AUDIENCE, subject=sub, groups=list(groups),
                      ttl_seconds=ttl, extra_claims=claims)

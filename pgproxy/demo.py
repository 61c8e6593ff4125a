"""`pgproxy demo`: a throwaway database, the sample schema, dev keys and TLS, and the proxy, in one command.

Everything lives in a temporary directory that is removed on exit. The printed token is a development
token signed by a key generated for this run only.
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from .app import build_server
from .config import CONFIG_ENV_VAR, load_config
from .demo_data import seed_sample_schema
from .devdb import Database, start_database
from .identity import generate_dev_keys, mint_token
from .server.listener import stop_event_on_signals
from .tlsutil import generate_dev_ca_and_cert

DEMO_ISSUER = "pgproxy-demo"
DEMO_AUDIENCE = "pgproxy"
DEMO_SUBJECT = "demo-agent"
DEMO_ROLES = ("agent_reader", "agent_writer")
DEFAULT_PORT = 6432
DEFAULT_ADMIN_PORT = 6480
DEFAULT_POLICY = Path(__file__).parent / "policy" / "default_policy.yaml"
# The shipped example rules (masking_rules/ at the top of the source tree): masks shop.customers for agents.
DEMO_MASKING_RULES = Path(__file__).resolve().parent.parent / "masking_rules"


def pgproxy_command() -> str:
    """This installation's `pgproxy`, by absolute path: `make demo` does not put the venv on PATH."""
    script = Path(sys.executable).parent / "pgproxy"
    return shlex.quote(str(script)) if script.is_file() else f"{shlex.quote(sys.executable)} -m pgproxy"


def _pick_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free port")


@dataclass
class DemoEnvironment:
    """What a running demo offers: where to connect and with what."""

    workdir: Path
    database: Database
    config_file: Path
    ca_file: Path
    port: int
    token: str

    def connection_env(self) -> dict[str, str]:
        return {
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.port),
            "PGUSER": DEMO_ROLES[0],
            "PGPASSWORD": self.token,
            "PGSSLMODE": "verify-full",
            "PGSSLROOTCERT": str(self.ca_file),
            "PGDATABASE": self.database.database,
            "PGPROXY_UPSTREAM_DSN": self.database.dsn(),
            CONFIG_ENV_VAR: str(self.config_file),
            "PGPROXY_AUDIT_DIR": str(self.workdir / "audit"),
            "PGPROXY_AUDIT_PUBKEY": str(self.workdir / "keys" / "audit-signing.key.pub"),
        }


def write_demo_config(workdir: Path, database: Database, port: int) -> tuple[Path, Path]:
    """Create keys, certificates, the upstream password file and the config; returns (config, CA file)."""
    keys = generate_dev_keys(workdir / "keys")
    tls = generate_dev_ca_and_cert(workdir / "tls")
    password_file = workdir / "upstream-password"
    password_file.write_text(database.password)
    password_file.chmod(0o600)
    config: dict[str, Any] = {
        "listeners": [{"host": "127.0.0.1", "port": port,
                       "tls": {"cert_file": str(tls.cert_file), "key_file": str(tls.key_file)}}],
        "identity": {"issuer": DEMO_ISSUER, "audience": DEMO_AUDIENCE, "algorithms": ["ES256"],
                     "jwks_file": str(keys.jwks_file), "dev_signing_key_file": str(keys.private_key_file),
                     "default_db_role": DEMO_ROLES[0]},
        "upstream": {"host": database.host, "port": database.port, "sslmode": "disable",
                     "credentials": [{"role": "*", "password_file": str(password_file)}]},
        "audit": {"dir": str(workdir / "audit"), "signing_key_file": str(_audit_key(workdir)),
                  "checkpoint_every_seconds": 10},
        # The shipped policy: destructive and privilege statements wait for a DBA's approval.
        "policy": {"file": str(DEFAULT_POLICY)},
        "approvals": {"store": "sqlite", "path": str(workdir / "approvals.sqlite")},
        "admin": {"host": "127.0.0.1", "port": _pick_port(DEFAULT_ADMIN_PORT)},
    }
    if (DEMO_MASKING_RULES / "shop.yaml").is_file():
        config["masking"] = {"rules_dir": str(DEMO_MASKING_RULES)}
    config_file = workdir / "pgproxy.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_file, tls.ca_file


def _audit_key(workdir: Path) -> Path:
    """The demo's audit signing key (and its .pub), created once in the workdir."""
    from .audit.keys import generate_key

    key = workdir / "keys" / "audit-signing.key"
    if not key.exists():
        generate_key(key)
    return key


def _demo_token(config_file: Path, ttl_seconds: float) -> str:
    config = load_config(config_file)
    assert config.identity.dev_signing_key_file is not None
    return mint_token(config.identity.dev_signing_key_file, issuer=DEMO_ISSUER, audience=DEMO_AUDIENCE,
                      subject=DEMO_SUBJECT, groups=["agents"], db_role=list(DEMO_ROLES), ttl_seconds=ttl_seconds,
                      extra_claims={"agent_id": "demo-agent-1"})


def run_demo(env_file: Path | None, port: int | None, token_ttl: float,
             on_ready: Callable[[DemoEnvironment], None] | None = None) -> None:
    """Run the demo until SIGINT/SIGTERM, cleaning everything up afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="pgproxy-demo-"))
    stop_database: Callable[[], None] | None = None
    try:
        click.echo("starting a throwaway PostgreSQL ...", err=True)
        database, stop_database = start_database()
        # The demo's roles get the superuser's password: a single upstream secret for the demo.
        seed_sample_schema(database.dsn(), database.password)
        chosen = _pick_port(port if port is not None else DEFAULT_PORT)
        config_file, ca_file = write_demo_config(workdir, database, chosen)
        env = DemoEnvironment(workdir, database, config_file, ca_file, chosen, _demo_token(config_file, token_ttl))
        asyncio.run(_serve(env, env_file, on_ready))
    finally:
        if stop_database is not None:
            stop_database()
        shutil.rmtree(workdir, ignore_errors=True)


async def _serve(env: DemoEnvironment, env_file: Path | None,
                 on_ready: Callable[[DemoEnvironment], None] | None) -> None:
    server = build_server(load_config(env.config_file))
    await server.start()
    stop = stop_event_on_signals()
    variables = env.connection_env()
    if env_file is not None:
        env_file.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in variables.items()))
    _print_banner(env, variables, server.admin.port if server.admin is not None else 0)
    if on_ready is not None:
        on_ready(env)
    try:
        await stop.wait()
    finally:
        click.echo("stopping ...", err=True)
        await server.close(drain_seconds=2.0)


def _print_banner(env: DemoEnvironment, variables: dict[str, str], admin_port: int) -> None:
    conninfo = (f"host=127.0.0.1 port={env.port} user={DEMO_ROLES[0]} dbname={env.database.database} "
                f"sslmode=verify-full sslrootcert={env.ca_file}")
    pgproxy = pgproxy_command()
    audit_dir = shlex.quote(str(env.workdir / "audit"))
    approver_token = f"{pgproxy} token --sub dba-alice --group dba --role agent_reader"
    click.echo(f"""
pgproxy demo is running.

  proxy     127.0.0.1:{env.port} (TLS, token as password)
  upstream  {env.database.host}:{env.database.port} (the proxy logs in with its own credential)
  config    {env.config_file}
  audit     {env.workdir / 'audit'} (signed; pgproxy audit verify/sessions/show)
  admin UI  http://127.0.0.1:{admin_port}/ui/ (paste $PGPROXY_APPROVER_TOKEN from below: approvals, sessions)

Connect through the proxy (the password is a JWT for subject "{DEMO_SUBJECT}", roles {', '.join(DEMO_ROLES)}):

  PGPASSWORD={shlex.quote(env.token)} \\
    psql {shlex.quote(conninfo)}

Try:  SELECT full_name, email, ssn, card_number, salary FROM shop.customers LIMIT 5;   -- masked for agents
      SELECT count(*) FROM shop.customers WHERE email = 'bruno.novak1@example.com';  -- 0: filters see masks
      \\c - agent_writer
      DELETE FROM shop.orders WHERE status = 'cancelled';   -- fine
      DELETE FROM shop.orders;   -- refused: needs a DBA's approval (its id is in the error)
Approve it as a DBA, then run the same DELETE again (it runs once):
  export {CONFIG_ENV_VAR}={shlex.quote(str(env.config_file))}
  PGPROXY_APPROVER_TOKEN=$({approver_token}) && export PGPROXY_APPROVER_TOKEN
  {pgproxy} approvals list;  {pgproxy} approvals approve <id> --reason "cleanup ok"
Audit:  {pgproxy} audit sessions {audit_dir}
        {pgproxy} audit verify {audit_dir} --pubkey {shlex.quote(str(env.workdir / 'keys' / 'audit-signing.key.pub'))}
Ctrl-C stops the proxy and the database and removes {env.workdir}.
""")

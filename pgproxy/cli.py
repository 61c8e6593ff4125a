"""The `pgproxy` command: thin click wrappers that parse arguments and call the library.

Errors are one clear line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from .config import ConfigError, ProxyConfig, load_config

config_option = click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
                             help="Config file (default: $PGPROXY_CONFIG).")


def _load(config_path: str | None) -> ProxyConfig:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _event_loop_runner() -> asyncio.Runner:
    """An asyncio runner on uvloop when it is installed (measurably faster per message)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


@click.group()
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def main(log_level: str) -> None:
    """Identity-aware PostgreSQL gateway for agents and SQL tools."""
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@config_option
def serve(config_path: str | None) -> None:
    """Run the proxy until SIGTERM or SIGINT (sessions get a short drain period)."""
    config = _load(config_path)
    from .server.listener import ProxyServer

    async def run() -> None:
        server = ProxyServer(config)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        click.echo(f"pgproxy listening on ports {', '.join(map(str, server.bound_ports))}", err=True)
        await stop.wait()
        await server.close()

    try:
        with _event_loop_runner() as runner:
            runner.run(run())
    except (ConfigError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@config_option
def check(config_path: str | None) -> None:
    """Validate the config: keys, certificates and upstream credentials must all load."""
    config = _load(config_path)
    from .identity import TokenVerifier
    from .tlsutil import server_context

    problems: list[str] = []
    try:
        TokenVerifier(config.identity)
    except ConfigError as exc:
        problems.append(str(exc))
    for i, listener in enumerate(config.listeners):
        if listener.tls is not None:
            try:
                server_context(listener.tls.cert_file, listener.tls.key_file)
            except (OSError, ValueError) as exc:
                problems.append(f"listeners[{i}].tls: cannot load certificate/key: {exc}")
    for cred in config.upstream.credentials:
        try:
            cred.password()
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        for p in problems:
            click.echo(f"error: {p}", err=True)
        sys.exit(1)
    click.echo(f"{config.source}: OK")


@main.command()
@config_option
@click.option("--sub", "subject", required=True, help="Token subject (who the caller is).")
@click.option("--group", "groups", multiple=True, help="Group claim (repeatable).")
@click.option("--role", "roles", multiple=True, help="Database role the token allows (repeatable; first is default).")
@click.option("--ttl", default=3600.0, show_default=True, help="Lifetime in seconds.")
@click.option("--agent-id", default=None)
@click.option("--session-id", default=None)
@click.option("--tool-call-id", default=None)
@click.option("--key", "key_file", type=click.Path(exists=True, dir_okay=False),
              help="Signing key (default: identity.dev_signing_key_file from the config).")
def token(config_path: str | None, subject: str, groups: Sequence[str], roles: Sequence[str], ttl: float,
          agent_id: str | None, session_id: str | None, tool_call_id: str | None, key_file: str | None) -> None:
    """Mint a development token signed with a local key (for the demo and tests)."""
    from .identity import mint_token

    config = _load(config_path)
    key = Path(key_file) if key_file else config.identity.dev_signing_key_file
    if key is None:
        raise click.ClickException("no signing key: pass --key or set identity.dev_signing_key_file")
    names = config.identity.claims
    # Claims go under the names this config maps, so the token verifies against it.
    claims = {names.subject: subject, names.groups: list(groups), names.db_role: list(roles) or None,
              names.agent_id: agent_id, names.session_id: session_id, names.tool_call_id: tool_call_id}
    extra = {name: value for name, value in claims.items() if value is not None}
    try:
        click.echo(mint_token(key, issuer=config.identity.issuer, audience=config.identity.audience,
                              subject=subject, ttl_seconds=ttl, extra_claims=extra))
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot mint token: {exc}") from None


@main.command()
@click.option("--env-file", type=click.Path(dir_okay=False, writable=True),
              help="Write shell `export` lines for connecting once everything is ready.")
@click.option("--port", type=int, default=None, help="Proxy port (default 6432, or a free one).")
@click.option("--token-ttl", default=8 * 3600.0, show_default=True, help="Lifetime of the printed token (s).")
def demo(env_file: str | None, port: int | None, token_ttl: float) -> None:
    """Start a throwaway PostgreSQL with sample data and the proxy in front of it."""
    from .demo import run_demo

    try:
        run_demo(Path(env_file) if env_file else None, port, token_ttl)
    except KeyboardInterrupt:
        pass
    except (ConfigError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":
    main()

"""`pgproxy login`, `pgproxy logout` and `pgproxy connect`: people at a terminal, through their identity provider.

``connect`` hands psql a fresh token in the PGPASSWORD environment variable of the child process,
never on a command line (shell history, ``ps``). ``--dsn`` and ``--env`` print it for command
substitution or ``eval``; ``--service`` writes it into a pg_service file (mode 0600).
See docs/people.md.
"""

from __future__ import annotations

import configparser
import os
import shlex
import shutil
import subprocess
import webbrowser
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote, urlencode

import click

from .identity.people import DEFAULT_SCOPES, TOKEN_KINDS, DeviceCode, LoginError, PeopleLogin


def _provider_options(command: click.decorators.FC) -> click.decorators.FC:
    for option in reversed([
        click.option("--issuer", envvar="PGPROXY_ISSUER", required=True,
                     help="Your identity provider's issuer URL (or $PGPROXY_ISSUER)."),
        click.option("--client-id", envvar="PGPROXY_CLIENT_ID", required=True,
                     help="pgproxy's client id at the provider (or $PGPROXY_CLIENT_ID)."),
        click.option("--token-kind", type=click.Choice(TOKEN_KINDS), default="id_token", show_default=True,
                     envvar="PGPROXY_TOKEN_KIND", help="Which token the proxy verifies (its identity.audience)."),
    ]):
        command = option(command)
    return command


CLIENT_SECRET_ENV = "PGPROXY_CLIENT_SECRET"  # only for providers that give installed apps a secret (Google)


def _people(issuer: str, client_id: str, token_kind: str, scopes: Sequence[str] = DEFAULT_SCOPES) -> PeopleLogin:
    return PeopleLogin(issuer, client_id, scopes=tuple(scopes), token_kind=token_kind,
                       client_secret=os.environ.get(CLIENT_SECRET_ENV) or None)


def _show_code(code: DeviceCode) -> None:
    click.echo(f"To log in, open {code.verification_uri} and enter the code {code.user_code}", err=True)
    if code.verification_uri_complete:
        click.echo(f"(or open {code.verification_uri_complete})", err=True)
    click.echo(f"Waiting for the login to be approved (the code expires in {int(code.expires_in)} s)...", err=True)


@click.command()
@_provider_options
@click.option("--scope", "scopes", multiple=True, help="Scope to ask for (repeatable; default: "
              f"{' '.join(DEFAULT_SCOPES)}). Add your provider's groups scope if it has one.")
@click.option("--browser", is_flag=True, help="Log in in a browser on this machine (code flow with PKCE) "
              "instead of entering a code on another device.")
@click.option("--no-open", is_flag=True, help="With --browser: print the URL instead of opening a browser.")
def login(issuer: str, client_id: str, token_kind: str, scopes: Sequence[str], browser: bool, no_open: bool) -> None:
    """Log in through your identity provider (device authorization flow, or --browser) and cache the tokens."""
    people = _people(issuer, client_id, token_kind, scopes or DEFAULT_SCOPES)

    def show_url(url: str) -> None:
        click.echo(f"To log in, open {url}", err=True)
        if not no_open:
            webbrowser.open(url)

    try:
        path = people.browser_login(show_url) if browser else people.device_login(_show_code)
    except LoginError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"Logged in to {issuer}; tokens cached in {path}", err=True)


@click.command()
@_provider_options
def logout(issuer: str, client_id: str, token_kind: str) -> None:
    """Forget the cached tokens of this provider and client."""
    forgotten = _people(issuer, client_id, token_kind).logout()
    click.echo("Logged out" if forgotten else "Was not logged in", err=True)


@click.command(context_settings={"ignore_unknown_options": True})
@_provider_options
@click.option("--host", default="127.0.0.1", show_default=True, envvar="PGHOST", help="The proxy's host.")
@click.option("--port", default=6432, show_default=True, type=int, envvar="PGPORT", help="The proxy's port.")
@click.option("-U", "--user", "user", required=True, envvar="PGUSER",
              help="Database role to run as (one your token allows), or your subject for your default role.")
@click.option("-d", "--dbname", default=None, envvar="PGDATABASE", help="Database.")
@click.option("--sslmode", default="verify-full", show_default=True, help="libpq sslmode.")
@click.option("--sslrootcert", default=None, help="CA file the proxy's certificate is checked against.")
@click.option("--min-valid", default=60.0, show_default=True,
              help="Refresh the token when fewer seconds than this are left.")
@click.option("--dsn", "print_dsn", is_flag=True, help="Print a libpq URI (with the token) instead of running psql.")
@click.option("--env", "print_env", is_flag=True, help="Print PG* export lines (for eval) instead of running psql.")
@click.option("--service", default=None, help="Write this pg_service entry (with the token) instead of running psql.")
@click.option("--service-file", type=click.Path(dir_okay=False), default=None,
              help="The pg_service file to write (default: $PGSERVICEFILE, else ~/.pg_service.conf).")
@click.argument("psql_args", nargs=-1, type=click.UNPROCESSED)
def connect(issuer: str, client_id: str, token_kind: str, host: str, port: int, user: str, dbname: str | None,
            sslmode: str, sslrootcert: str | None, min_valid: float, print_dsn: bool, print_env: bool,
            service: str | None, service_file: str | None, psql_args: Sequence[str]) -> None:
    """Run psql through the proxy with a fresh token as the password (arguments after -- go to psql)."""
    if sum((print_dsn, print_env, service is not None)) > 1:
        raise click.UsageError("choose one of --dsn, --env and --service")
    try:
        token = _people(issuer, client_id, token_kind).fresh_token(min_valid)
    except LoginError as exc:
        raise click.ClickException(str(exc)) from None
    params = {"host": host, "port": str(port), "user": user, "dbname": dbname, "sslmode": sslmode,
              "sslrootcert": sslrootcert}
    libpq = {k: v for k, v in params.items() if v}
    if print_dsn:
        query = urlencode({k: v for k, v in libpq.items() if k in ("sslmode", "sslrootcert")})
        path = quote(libpq.get("dbname", ""), safe="")
        click.echo(f"postgresql://{quote(user, safe='')}:{quote(token, safe='')}@{host}:{port}/{path}?{query}")
        return
    if print_env:
        env_names = {"host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "dbname": "PGDATABASE",
                     "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT"}
        for key, value in libpq.items():
            click.echo(f"export {env_names[key]}={shlex.quote(value)}")
        click.echo(f"export PGPASSWORD={shlex.quote(token)}")
        return
    if service is not None:
        written = _write_service(service, service_file, {**libpq, "password": token})
        click.echo(f"Wrote service {service} to {written} (connect with: psql service={service})", err=True)
        return
    psql = shutil.which("psql")
    if psql is None:
        raise click.ClickException("psql is not installed (Debian: apt-get install postgresql-client)")
    env = {**os.environ, "PGPASSWORD": token, "PGHOST": host, "PGPORT": str(port), "PGSSLMODE": sslmode}
    for key, name in (("user", "PGUSER"), ("dbname", "PGDATABASE"), ("sslrootcert", "PGSSLROOTCERT")):
        if libpq.get(key):
            env[name] = libpq[key]
    raise SystemExit(subprocess.run([psql, *psql_args], env=env, check=False).returncode)


def _write_service(name: str, service_file: str | None, params: dict[str, str]) -> Path:
    """Replace section ``name`` of the pg_service file, which is (re)written with mode 0600."""
    path = Path(service_file or os.environ.get("PGSERVICEFILE") or Path.home() / ".pg_service.conf")
    config = configparser.ConfigParser(interpolation=None)
    config.optionxform = str  # type: ignore[assignment,method-assign]
    if path.exists():
        config.read(path)
    config[name] = params
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as out:
        config.write(out, space_around_delimiters=False)
    return path

"""The `pgproxy` command: thin click wrappers that parse arguments and call the library.

Errors are one clear line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from . import __version__
from .config import ConfigError, ProxyConfig, load_config
from .people_cli import connect, login, logout

if TYPE_CHECKING:
    from .audit.verify import TrustAnchor

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
@click.version_option(__version__, "--version", prog_name="pgproxy", message="%(prog)s %(version)s")
@click.option("--log-level", default=None,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
              help="Default: INFO for serve and demo, WARNING for the other commands.")
@click.pass_context
def main(ctx: click.Context, log_level: str | None) -> None:
    """Identity-aware PostgreSQL gateway for agents and SQL tools."""
    if log_level is None:
        log_level = "INFO" if ctx.invoked_subcommand in ("serve", "demo") else "WARNING"
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@config_option
@click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
              help="Log lines as text or one JSON object per line (default: logging.format, else text).")
def serve(config_path: str | None, log_format: str | None) -> None:
    """Run the proxy until SIGTERM or SIGINT (sessions get a short drain period); SIGHUP reloads the config."""
    config = _load(config_path)
    from .app import build_server
    from .logsetup import status_line, use_log_format
    from .server.listener import reload_on_sighup, stop_event_on_signals

    log_format = log_format or config.logging.format
    use_log_format(log_format)

    async def run() -> None:
        server = build_server(config)
        await server.start()
        stop = stop_event_on_signals()
        reload_on_sighup(server)
        click.echo(status_line(f"pgproxy {__version__} listening on ports {', '.join(map(str, server.bound_ports))}",
                               log_format), err=True)
        await stop.wait()
        await server.close()

    try:
        with _event_loop_runner() as runner:
            runner.run(run())
    except (ConfigError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@config_option
@click.option("--offline", is_flag=True, help="Do not connect upstream to check masking rules against the schema.")
@click.option("--role", default=None, help="Database role to read the schema as (default: masking.schema_role, "
              "else the first named credential, else identity.default_db_role).")
@click.option("--database", default=None, help="Database whose schema the masking rules are checked against "
              "(default: masking.schema_database, else upstream.database, else postgres).")
def check(config_path: str | None, offline: bool, role: str | None, database: str | None) -> None:
    """Validate the config: keys, certificates, credentials, policy and masking rules; every error at once."""
    config = _load_for_check(config_path)
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
    problems += _check_audit_and_approvals(config)
    if config.http is not None:  # the HTTP proxy's credentials and TLS files
        from .http.config import check_http

        problems += check_http(config.http)
    if config.grpc is not None:  # the gRPC proxy's credentials and TLS files
        from .grpcproxy.config import check_grpc

        problems += check_grpc(config.grpc)
    if config.masking is not None:  # the rules, the key and (unless --offline) the live schema
        problems += _check_masking(config, offline, role, database)
    if config.policy is not None:  # the statement policy: errors fail the check, shadowed rules warn
        from .policy.rules import check_policy, load_policy

        try:
            for warning in check_policy(load_policy(config.policy.file)):
                click.echo(f"warning: {config.policy.file}: {warning}", err=True)
        except ConfigError as exc:
            problems.append(f"policy.file: {exc}")
    if problems:
        for p in problems:  # each names its file: the config file, unless it names a rule or policy file
            click.echo(f"error: {p if p.startswith('/') else f'{config.source}: {p}'}", err=True)
        sys.exit(1)
    click.echo(f"{config.source}: OK")


def _load_for_check(config_path: str | None) -> ProxyConfig:
    """The config, or exit 1 after printing every error in it (file and field in each line)."""
    try:
        return load_config(config_path)
    except ConfigError as exc:
        for line in exc.lines:
            click.echo(f"error: {line}", err=True)
        sys.exit(1)


def _check_masking(config: ProxyConfig, offline: bool, role: str | None, database: str | None) -> list[str]:
    from .masking.check import check_live, check_rules, schema_target

    rules, problems = check_rules(config)
    if rules is None or offline:
        return problems
    default_role, default_database = schema_target(config)  # what serve checks at start
    role = role or default_role
    if role is None:
        return [*problems, "masking.schema_role: needed to read the live schema (the credentials only have '*' "
                           "and there is no identity.default_db_role): set it, pass --role, or --offline"]
    return problems + asyncio.run(check_live(config, rules, role, database or default_database))


def _check_audit_and_approvals(config: ProxyConfig) -> list[str]:
    """What `serve` would refuse at start: the audit signing key, the approvals store, the admin TLS."""
    from .audit.keys import KeyError_, load_private_key
    from .tlsutil import server_context

    problems: list[str] = []
    audit = config.audit
    if audit.dir is None and audit.jsonl_path is None:
        problems.append("audit: set jsonl_path or dir: the proxy does not run statements it cannot record")
    if audit.signing_key_file is not None:
        try:
            load_private_key(audit.signing_key_file)
        except KeyError_ as exc:
            problems.append(f"audit.signing_key_file: {exc}")
    if audit.store_dsn_env is not None:
        try:
            audit.store_dsn()
        except ConfigError as exc:
            problems.append(str(exc))
    if config.approvals is not None and config.approvals.store == "postgres":
        try:
            config.approvals.dsn()
        except ConfigError as exc:
            problems.append(str(exc))
    if config.admin is not None:
        try:
            config.admin.metrics_token()
        except ConfigError as exc:
            problems.append(str(exc))
    if config.admin is not None and config.admin.tls is not None:
        try:
            server_context(config.admin.tls.cert_file, config.admin.tls.key_file)
        except (OSError, ValueError) as exc:
            problems.append(f"admin.tls: cannot load certificate/key: {exc}")
    if config.policy is not None and config.approvals is None:
        from .policy.rules import load_policy

        try:
            if any(rule.action == "approve" for rule in load_policy(config.policy.file).rules):
                click.echo("warning: policy has approve rules but there is no approvals section: "
                           "those statements will be refused (57P03)", err=True)
        except ConfigError:
            pass  # reported by the policy check below
    return problems


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


@main.group()
def audit() -> None:
    """The signed audit log: keys, verification, sessions, evidence bundles and replay."""


_pubkey_option = click.option("--pubkey", "pubkeys", multiple=True, type=click.Path(exists=True, dir_okay=False),
                              help="Trusted public key (FILE.pub from keygen; repeatable for rotated keys).")
_log_dir = click.argument("directory", type=click.Path(exists=True, file_okay=False))
_anchor_config_option = click.option("--config", "-c", "anchor_config", default=None,
                                     type=click.Path(exists=True, dir_okay=False),
                                     help="The proxy's config: trust its signing key and audit.trusted_keys.")


def _config_anchor(config_path: str | None) -> TrustAnchor | None:
    """The trust anchor a proxy config pins (``--config``), or None."""
    if config_path is None:
        return None
    from .audit.keys import KeyError_
    from .audit.verify import config_anchor

    try:
        return config_anchor(_load(config_path).audit, config_path)
    except KeyError_ as exc:
        raise click.ClickException(str(exc)) from None


@audit.command("keygen")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="Private key file (0600).")
def audit_keygen(out: str) -> None:
    """Create an Ed25519 checkpoint signing key (FILE, mode 0600) and its public key (FILE.pub)."""
    from .audit.keys import KeyError_, generate_key

    try:
        pub, kid = generate_key(Path(out))
    except (KeyError_, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {out} (private, 0600) and {pub}; key id {kid}")


@audit.command("verify")
@_log_dir
@click.option("--witness", default=None, help="Witness directory or PostgreSQL DSN holding published checkpoints.")
@_pubkey_option
@_anchor_config_option
def audit_verify(directory: str, witness: str | None, pubkeys: Sequence[str], anchor_config: str | None) -> None:
    """Verify a log against a pinned key (--config, --pubkey or --witness): signatures, hash chain, Merkle
    roots, truncation, forks. Exit 1 on any problem, including a key that is not pinned."""
    from .audit.verify import verify_log

    report = verify_log(Path(directory), pubkeys=[Path(p) for p in pubkeys], witness=witness,
                        anchor=_config_anchor(anchor_config),
                        progress=lambda n: click.echo(f"  {n} records checked ...", err=True))
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    for p in report.problems:
        click.echo(f"TAMPERED: {p}", err=True)
    cp = report.latest_checkpoint
    summary = (f"log {report.log_id}: {report.records} records, {report.checkpoints} valid checkpoint(s)"
               + (f", latest signs {cp.tree_size} records (key {cp.key_id})" if cp else "")
               + f"; trust anchor: {report.anchor or 'none'}")
    if not report.ok:
        click.echo(f"FAILED: {summary}: {len(report.problems)} problem(s)")
        sys.exit(1)
    click.echo(f"OK: {summary}")


@audit.command("sessions")
@_log_dir
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (times as Unix seconds).")
def audit_sessions(directory: str, as_json: bool) -> None:
    """List the sessions recorded in a log."""
    from .audit.timeline import format_sessions, list_sessions

    sessions = list_sessions(Path(directory))
    click.echo(json.dumps(sessions, indent=2, default=str) if as_json else "\n".join(format_sessions(sessions)))


@audit.command("show")
@_log_dir
@click.argument("session")
@click.option("--json", "as_json", is_flag=True, help="Print the events as recorded, one JSON object per line.")
def audit_show(directory: str, session: str, as_json: bool) -> None:
    """Print one session's events as a timeline."""
    from .audit.timeline import session_events, show_session

    lines = ([json.dumps(e, default=str) for e in session_events(Path(directory), session)] if as_json
             else show_session(Path(directory), session))
    if not lines:
        raise click.ClickException(f"no records of session {session}")
    click.echo("\n".join(lines))


@audit.command("export")
@_log_dir
@click.option("--session", required=True, help="Session id (see `pgproxy audit sessions`).")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False))
@_pubkey_option
@_anchor_config_option
def audit_export(directory: str, session: str, output: str, pubkeys: Sequence[str], anchor_config: str | None) -> None:
    """Write one session's records with inclusion proofs and the signed checkpoint to a bundle (the log is
    verified first, against the key pinned by --config or --pubkey)."""
    from .audit.bundle import BundleError, export_session

    try:
        info = export_session(Path(directory), session, Path(output), pubkeys=[Path(p) for p in pubkeys],
                              anchor=_config_anchor(anchor_config),
                              progress=lambda text: click.echo(text, err=True))
    except BundleError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {output}: {info['records']} records, proofs against the checkpoint of "
               f"{info['tree_size']} records (key {info['key_id']})")


@audit.command("verify-bundle")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@_pubkey_option
@_anchor_config_option
def audit_verify_bundle(bundle: str, pubkeys: Sequence[str], anchor_config: str | None) -> None:
    """Check a bundle offline against a pinned key (--pubkey or --config): checkpoint signature, every
    record's inclusion proof, and that it holds every record of the session, in order."""
    from .audit.bundle import verify_bundle

    report = verify_bundle(Path(bundle), pubkeys=[Path(p) for p in pubkeys], anchor=_config_anchor(anchor_config))
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    for p in report.problems:
        click.echo(f"TAMPERED: {p}", err=True)
    if not report.ok:
        click.echo(f"FAILED: bundle for session {report.session}: {len(report.problems)} problem(s); "
                   f"trust anchor: {report.anchor or 'none'}")
        sys.exit(1)
    click.echo(f"OK: session {report.session}: all {report.records} records of the session, in order, included in "
               f"the signed log (key {report.key_id}); trust anchor: {report.anchor}")


def _store(config_path: str | None, dsn: str | None) -> tuple[str, str]:
    """(DSN, schema) of the central audit store: ``--dsn``, else the config's audit.store_dsn_env."""
    config = _load(config_path) if config_path is not None or dsn is None else None
    schema = config.audit.store_schema if config is not None else "pgproxy_audit"
    if dsn is not None:
        return dsn, schema
    assert config is not None
    if config.audit.store_dsn_env is None:
        raise click.ClickException("audit.store_dsn_env is not set: pass --dsn")
    try:
        return config.audit.store_dsn(), schema
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


_store_dsn_option = click.option("--dsn", default=None, help="The central store's DSN (default: the config's "
                                                               "audit.store_dsn_env).")


@audit.command("search")
@config_option
@_store_dsn_option
@click.option("--subject", default=None, help="Records of sessions (or exchanges) of this token subject.")
@click.option("--agent", "agent_id", default=None, help="... of this agent id.")
@click.option("--tool-call", "tool_call_id", default=None, help="... of this tool-call id.")
@click.option("--table", default=None, help="Policy decisions on statements touching this table.")
@click.option("--class", "statement_class", default=None, help="Policy decisions on this statement class.")
@click.option("--decision", default=None, help="Policy decision: allow, deny, approve, refuse.")
@click.option("--kind", default=None, help="Event kind, e.g. statement, session_start, policy_decision.")
@click.option("--session", default=None, help="One session id.")
@click.option("--since", default=None, help="From this time (ISO 8601, UTC unless a zone is given, or epoch).")
@click.option("--until", default=None, help="Before this time.")
@click.option("--text", default=None, help="Words in the statement text (full-text match).")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def audit_search(config_path: str | None, dsn: str | None, since: str | None, until: str | None, limit: int,
                 as_json: bool, **filters: str | None) -> None:
    """Search the central audit store (every replica's shipped log), oldest first."""
    import orjson

    from .audit.store import SearchFilters, parse_time, search
    from .audit.timeline import format_when

    store_dsn, schema = _store(config_path, dsn)
    try:
        query = SearchFilters(**filters, since=parse_time(since) if since else None,
                              until=parse_time(until) if until else None, limit=limit)
    except ValueError as exc:
        raise click.ClickException(f"--since/--until: {exc}") from None
    try:
        hits = search(store_dsn, schema, query)
    except Exception as exc:  # psycopg errors: the store is down or not set up
        raise click.ClickException(f"cannot search the audit store: {exc}") from None
    for h in hits:
        if as_json:
            click.echo(orjson.dumps(h.to_json()).decode())
        else:
            click.echo(f"{format_when(h.ts)}  {h.log_id[:8]}#{h.seq}  {h.session or '-'}  {h.kind}"
                       + (f"  {h.subject}" if h.subject else "") + (f"  [{h.decision}]" if h.decision else "")
                       + (f"  {h.sql}" if h.sql else ""))
    if not as_json:
        click.echo(f"{len(hits)} record(s)" + (" (--limit reached)" if len(hits) == limit else ""), err=True)


@audit.command("check-store")
@_anchor_config_option
@_store_dsn_option
@_pubkey_option
@click.option("--log-id", default=None, help="Check one log (default: every log in the store).")
def audit_check_store(anchor_config: str | None, dsn: str | None, pubkeys: Sequence[str], log_id: str | None) -> None:
    """Check the central store's rows against the signed checkpoints (pinned by --config or --pubkey):
    every shipped record, its hash chain and Merkle roots. Exit 1 on any problem."""
    from .audit.keys import KeyError_
    from .audit.store import check_store
    from .audit.verify import TrustAnchor

    store_dsn, schema = _store(anchor_config, dsn)
    try:
        anchor = (TrustAnchor.from_files([Path(p) for p in pubkeys], "--pubkey " + ", ".join(pubkeys)) if pubkeys
                  else _config_anchor(anchor_config))
    except KeyError_ as exc:
        raise click.ClickException(str(exc)) from None
    if anchor is None:
        raise click.ClickException("the signing key is not pinned: pass --config or --pubkey")
    try:
        report = check_store(store_dsn, schema, anchor, log_id=log_id,
                             progress=lambda n: click.echo(f"  {n} records checked ...", err=True))
    except Exception as exc:
        raise click.ClickException(f"cannot read the audit store: {exc}") from None
    for p in report.problems:
        click.echo(f"TAMPERED: {p}", err=True)
    summary = (f"{len(report.logs)} log(s), {sum(report.logs.values())} records, {report.checkpoints} valid "
               f"checkpoint(s); trust anchor: {report.anchor}")
    if not report.ok:
        click.echo(f"FAILED: {summary}: {len(report.problems)} problem(s)")
        sys.exit(1)
    click.echo(f"OK: {summary}")


@audit.command("replay")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@click.option("--target", required=True, help="DSN of a sandbox database to replay against.")
@click.option("--commit", is_flag=True, help="Commit the replay's transaction (default: roll back).")
@_pubkey_option
@click.option("--config", "-c", "config_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="The proxy's config: replay a masked identity's statements with its masking rules and key.")
def audit_replay(bundle: str, target: str, commit: bool, pubkeys: Sequence[str], config_path: str | None) -> None:
    """Re-run a bundle's statements and compare result digests with the recorded ones. Exit 1 on a difference."""
    from .audit.replay import ReplayError, ReplayOutcome, run_replay

    masking = None
    if config_path is not None:
        from .masking.replay import ReplayMasking

        try:
            masking = ReplayMasking.from_config(_load(config_path))
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None

    def progress(o: ReplayOutcome, n: int, total: int) -> None:
        click.echo(f"[{n}/{total}] #{o.index} {o.status.upper()}: {o.sql[:80]}"
                   + (f" ({o.detail})" if o.detail else ""))

    try:
        report = run_replay(Path(bundle), target, commit=commit, pubkeys=tuple(Path(p) for p in pubkeys),
                            progress=progress, masking=masking,
                            anchor=_config_anchor(config_path) if not pubkeys else None)
    except ReplayError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{report.count('match')} matched, {report.count('differ')} differ, {report.count('skipped')} skipped; "
               + ("committed" if report.committed else "rolled back"))
    if not report.ok:
        sys.exit(1)


@audit.command("replay-http")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@click.option("--base-url", required=True, help="Sandbox base URL the recorded paths are appended to.")
@click.option("--header", "headers", multiple=True, help="'Name: value' sent with every request (repeatable).")
@_pubkey_option
def audit_replay_http(bundle: str, base_url: str, headers: Sequence[str], pubkeys: Sequence[str]) -> None:
    """Re-send a bundle's HTTP exchanges to a sandbox and compare status and body digests. Exit 1 on a difference."""
    from .audit.replay import ReplayError, ReplayOutcome
    from .http.replay import run_http_replay

    def progress(o: ReplayOutcome, n: int, total: int) -> None:
        click.echo(f"[{n}/{total}] #{o.index} {o.status.upper()}: {o.sql[:80]}"
                   + (f" ({o.detail})" if o.detail else ""))

    parsed = {}
    for h in headers:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise click.ClickException(f"--header {h!r}: expected 'Name: value'")
        parsed[name.strip()] = value.strip()
    try:
        report = run_http_replay(Path(bundle), base_url, headers=parsed, pubkeys=tuple(Path(p) for p in pubkeys),
                                 progress=progress)
    except ReplayError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{report.count('match')} matched, {report.count('differ')} differ, {report.count('skipped')} skipped")
    if not report.ok:
        sys.exit(1)


@audit.command("replay-grpc")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@click.option("--target", required=True, help="host:port of a sandbox gRPC server to replay against.")
@click.option("--descriptor-set", type=click.Path(exists=True, dir_okay=False), default=None,
              help="FileDescriptorSet of the services (default: ask the sandbox's server reflection).")
@click.option("--metadata", "metadata", multiple=True, help="'key: value' sent with every call (repeatable).")
@click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Connect with TLS, trusting this CA.")
@click.option("--tls", is_flag=True, help="Connect with TLS, trusting the system's CAs.")
@_pubkey_option
def audit_replay_grpc(bundle: str, target: str, descriptor_set: str | None, metadata: Sequence[str],
                      ca_file: str | None, tls: bool, pubkeys: Sequence[str]) -> None:
    """Re-run a bundle's gRPC calls against a sandbox and compare status and response digests. Exit 1 on a
    difference."""
    from .audit.replay import ReplayError, ReplayOutcome
    from .grpcproxy.replay import run_grpc_replay

    def progress(o: ReplayOutcome, n: int, total: int) -> None:
        click.echo(f"[{n}/{total}] #{o.index} {o.status.upper()}: {o.sql[:80]}"
                   + (f" ({o.detail})" if o.detail else ""))

    parsed = {}
    for m in metadata:
        key, sep, value = m.partition(":")
        if not sep or not key.strip():
            raise click.ClickException(f"--metadata {m!r}: expected 'key: value'")
        parsed[key.strip().lower()] = value.strip()
    try:
        report = run_grpc_replay(Path(bundle), target, descriptor_set=Path(descriptor_set) if descriptor_set else None,
                                 metadata=parsed, ca_file=Path(ca_file) if ca_file else None, tls=tls,
                                 pubkeys=tuple(Path(p) for p in pubkeys), progress=progress)
    except ReplayError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{report.count('match')} matched, {report.count('differ')} differ, {report.count('skipped')} skipped")
    if not report.ok:
        sys.exit(1)


@main.group()
def approvals() -> None:
    """Review and decide statements waiting for approval (docs/approvals.md)."""


_approver_token = click.option("--token", "approver_token", envvar="PGPROXY_APPROVER_TOKEN", default=None,
                               help="Approver's JWT (default: $PGPROXY_APPROVER_TOKEN); its sub and groups decide.")
_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _approvals_run(config_path: str | None, token_: str | None, action: str, approval_id: str | None = None,
                   **kwargs: object) -> None:
    from .policy.approval_cli import ApprovalCLIError, run_approvals_command

    config = _load(config_path)
    try:
        with _event_loop_runner() as runner:
            click.echo(runner.run(run_approvals_command(config, token_, action, approval_id, **kwargs)))  # type: ignore[arg-type]
    except ApprovalCLIError as exc:
        raise click.ClickException(str(exc)) from None


@approvals.command("list")
@config_option
@_approver_token
@_json_option
@click.option("--status", type=click.Choice(["pending", "approved", "denied", "expired", "used"]), default=None)
def approvals_list(config_path: str | None, approver_token: str | None, as_json: bool, status: str | None) -> None:
    """List requests you may decide (newest first)."""
    _approvals_run(config_path, approver_token, "list", status=status, as_json=as_json)


@approvals.command("show")
@config_option
@_approver_token
@_json_option
@click.argument("approval_id")
def approvals_show(config_path: str | None, approver_token: str | None, as_json: bool, approval_id: str) -> None:
    """Show a request: exact SQL, parameters, requester, reasons, rule, impact, decisions."""
    _approvals_run(config_path, approver_token, "show", approval_id, as_json=as_json)


@approvals.command("approve")
@config_option
@_approver_token
@_json_option
@click.option("--reason", default=None, help="Why (recorded with the decision).")
@click.argument("approval_id")
def approvals_approve(config_path: str | None, approver_token: str | None, as_json: bool, reason: str | None,
                      approval_id: str) -> None:
    """Approve a request (as the token's subject)."""
    _approvals_run(config_path, approver_token, "approve", approval_id, reason=reason, as_json=as_json)


@approvals.command("deny")
@config_option
@_approver_token
@_json_option
@click.option("--reason", default=None, help="Why (recorded with the decision).")
@click.argument("approval_id")
def approvals_deny(config_path: str | None, approver_token: str | None, as_json: bool, reason: str | None,
                   approval_id: str) -> None:
    """Deny a request (one deny is final)."""
    _approvals_run(config_path, approver_token, "deny", approval_id, reason=reason, as_json=as_json)


if __name__ == "__main__":
    main()


# People at a terminal log in through their identity provider (pgproxy/people_cli.py).
for _command in (login, logout, connect):
    main.add_command(_command)

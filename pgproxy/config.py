"""The YAML configuration schema: one pydantic model per section, parsed once at start.

Each field is declared once, with its type, bounds, default and description (the configuration
reference in docs/configuration.md is generated from these, see `pgproxy.configdoc`). `load_config`
reports every problem of the file at once, each line naming the file and the field
(``pgproxy.yaml: upstream.sslmode: ...``), before the proxy accepts a single connection. Secrets are
never in the file itself: only the names of the environment variables or files that hold them.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import Field, PrivateAttr, ValidationError, model_validator

from .schema import (
    Between,
    ExistingFile,
    Flag,
    Identifier,
    Int,
    NewFile,
    NonEmpty,
    Number,
    Port,
    Problem,
    Schema,
    Seconds,
    Text,
    error_lines,
)

if TYPE_CHECKING:
    from .grpcproxy.config import GrpcConfig
    from .http.config import HttpConfig

CONFIG_ENV_VAR = "PGPROXY_CONFIG"

AsymmetricAlgorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
                              "EdDSA"]
SymmetricAlgorithm = Literal["HS256", "HS384", "HS512"]
Algorithm = Literal[AsymmetricAlgorithm, SymmetricAlgorithm]
ASYMMETRIC_ALGORITHMS = frozenset(get_args(AsymmetricAlgorithm))
SYMMETRIC_ALGORITHMS = frozenset(get_args(SymmetricAlgorithm))
SslMode = Literal["disable", "require", "verify-ca", "verify-full"]
LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[str, ...] = get_args(LogFormat)
# Clock skew allowed for a token's nbf and iat: small, it is not a grace period (exp is never extended).
MAX_LEEWAY_SECONDS = 60.0
HTTPS_ONLY = "must be an https URL (plain http only for loopback)"


class ConfigError(Exception):
    """A configuration problem: one line per problem, each naming the field (and the file, when read from one)."""

    def __init__(self, message: str, lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.lines = lines if lines is not None else [message]


def read_secret(where: str, env: str | None, file: Path | None) -> str | None:
    """The secret in environment variable ``env`` or in ``file`` (trailing newline dropped); None if neither.

    Read when needed, never at parse time, so that the config itself holds no secret.
    """
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"{where}: environment variable {env} is not set")
        return value
    if file is not None:
        try:
            return file.read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {file}: {exc.strerror}") from None
    return None


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (127.0.0.0/8, ::1), nothing else."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def secure_url(url: str) -> bool:
    """https, or plain http to a loopback host (keys fetched in clear text could be swapped)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    if parts.scheme != "http" or parts.username is not None or not parts.hostname:
        return False
    return is_loopback_host(parts.hostname)


def _env_value(where: str, env: str | None) -> str:
    """The non-empty value of environment variable ``env``; fails closed when it is unset or empty."""
    value = os.environ.get(env or "")
    if not value:
        raise ConfigError(f"{where}: environment variable {env} is not set")
    return value


# --------------------------------------------------------------------------------------------------
# Sections


class TLSConfig(Schema):
    """A TLS certificate and key (both required when the section is present)."""

    cert_file: ExistingFile
    """PEM certificate, optionally followed by its chain."""
    key_file: ExistingFile
    """Unencrypted PEM private key."""


class ListenerConfig(Schema):
    """One listening socket."""

    host: Text = "127.0.0.1"
    """Address to bind (`0.0.0.0` for all IPv4 addresses, `::` for IPv6)."""
    port: Port = 6432
    """`0` lets the OS pick a free port; the chosen port is logged."""
    tls: TLSConfig | None = None
    """The certificate clients see; required unless `insecure_plaintext: true`."""
    insecure_plaintext: Flag = False
    """Accept the token over an unencrypted connection: only on a loopback host (demos and tests)."""

    def problems(self) -> Iterator[Problem]:
        if self.insecure_plaintext and not is_loopback_host(self.host):
            yield ("insecure_plaintext", f"only allowed on a loopback host (127.0.0.1, ::1, localhost), not "
                   f"{self.host!r}: tokens would cross the network in clear text")
        if self.tls is None and not self.insecure_plaintext:
            yield ("", "a listener needs tls (cert_file, key_file) because the token is sent as a cleartext "
                   "password; set insecure_plaintext: true only for loopback demos")


class ClaimNames(Schema):
    """Which JWT claims carry each part of the identity (each value names a claim)."""

    subject: Text = "sub"
    """Who the caller is (required in every token)."""
    groups: Text = "groups"
    """Group membership: a list of strings, or one string separated by spaces or commas."""
    db_role: Text = "db_role"
    """The database role(s) the token allows: a string or a list; the first is the default."""
    agent_id: Text = "agent_id"
    """Optional string."""
    session_id: Text = "session_id"
    """Optional string."""
    tool_call_id: Text = "tool_call_id"
    """Optional string."""


class IdentityConfig(Schema):
    """How the token that callers send as their password is verified."""

    issuer: Text
    """The token's `iss` must equal it."""
    audience: Text
    """The token's `aud` (string or list) must contain it."""
    algorithms: Annotated[tuple[Algorithm, ...],
                          NonEmpty("required (an explicit allowlist, e.g. [RS256, ES256])")]
    """The explicit allowlist of signature algorithms; never mix `HS*` with public-key algorithms."""
    jwks_file: ExistingFile | None = None
    """Key source: a local JWKS file."""
    jwks_url: Text | None = None
    """Key source: a JWKS URL. Must start with `https://`; plain `http://` only to a loopback host
    (`127.0.0.0/8`, `::1`, `localhost`)."""
    hs256_secret_env: Text | None = None
    """Key source: the environment variable holding the shared HMAC secret (at least 32 bytes)."""
    leeway_seconds: Annotated[Number, Between(0, MAX_LEEWAY_SECONDS)] = 30.0
    """Clock skew allowed when checking `nbf` and `iat`; `exp` is a hard limit that the leeway never extends
    ([identity.md](identity.md#time-claims))."""
    jwks_cache_seconds: Seconds = 300.0
    """`jwks_url` and `discovery` only: how long fetched keys count as fresh."""
    jwks_timeout_seconds: Annotated[Number, Between(0.1)] = 5.0
    """`jwks_url` and `discovery` only: timeout of one fetch."""
    jwks_min_refresh_seconds: Seconds = 10.0
    """`jwks_url` and `discovery` only: minimum time between two fetches (an unknown `kid` cannot force more)."""
    claims: ClaimNames = Field(default_factory=ClaimNames)
    """Which claim carries each part of the identity."""
    default_db_role: Text | None = None
    """Role used when a token carries no role claim."""
    dev_signing_key_file: NewFile | None = None
    """Need not exist. Used only by `pgproxy token` to mint development tokens; `serve` never reads it."""
    discovery: Flag = False
    """Key source: the JWKS URL named by `<issuer>/.well-known/openid-configuration`
    ([people.md](people.md#issuer-discovery-on-the-wire-listener)). `issuer` must then be `https://` (plain
    `http://` only on loopback)."""
    extra_audiences: tuple[Text, ...] = ()
    """More audiences a token may name instead of `audience`, e.g. the client id of `pgproxy login`, to which
    people's ID tokens are issued."""

    def problems(self) -> Iterator[Problem]:
        sources = [x for x in (self.jwks_file, self.jwks_url, self.hs256_secret_env) if x is not None]
        if len(sources) + self.discovery != 1:
            yield ("", "set exactly one key source: jwks_file, jwks_url, discovery or hs256_secret_env")
        if self.jwks_url is not None and not secure_url(self.jwks_url):
            yield ("jwks_url", HTTPS_ONLY)
        symmetric = [a for a in self.algorithms if a in SYMMETRIC_ALGORITHMS]
        if self.hs256_secret_env is not None and len(symmetric) != len(self.algorithms):
            yield ("algorithms", "an HS256 secret only verifies HS* algorithms")
        if self.hs256_secret_env is None and symmetric:
            yield ("algorithms", "HS* algorithms need hs256_secret_env; never mix them with public keys "
                   "(algorithm confusion)")
        if self.discovery and not secure_url(self.issuer):
            yield ("issuer", "discovery needs an https issuer URL (plain http only for loopback)")


class UpstreamCredential(Schema):
    """How the proxy logs in upstream as ``role``; no password source means trust/peer-style login."""

    role: Text
    """A database role name, or `"*"` for any role."""
    password_env: Text | None = None
    """Name of an environment variable holding the password."""
    password_file: ExistingFile | None = None
    """A file holding the password (without trailing CR/LF); read at each upstream login."""

    def password(self) -> str | None:
        return read_secret(f"upstream.credentials[{self.role}]", self.password_env, self.password_file)

    def problems(self) -> Iterator[Problem]:
        if self.password_env and self.password_file:
            yield ("", "set password_env or password_file, not both")


class UpstreamPoolConfig(Schema):
    """Idle upstream connections kept, after a reset, for the next client with exactly the same login."""

    enabled: Flag = False
    """Keep a cleanly ended session's upstream connection for the next client of the same role, database and
    startup parameters (after `DISCARD ALL`). Off: every client gets a backend of its own, closed when it leaves."""
    max_idle_per_key: Annotated[Int, Between(1)] = 16
    """Idle connections kept for one login (role, database and startup parameters)."""
    max_idle_total: Annotated[Int, Between(1)] = 256
    """Idle connections kept in all."""
    idle_timeout_seconds: Annotated[Number, Between(0.1)] = 60.0
    """An idle connection nobody took for this long is closed."""
    max_lifetime_seconds: Annotated[Number, Between(1)] = 3600.0
    """A connection older than this (from its login) is closed instead of being kept or handed out."""
    reset_timeout_seconds: Annotated[Number, Between(0.1)] = 5.0
    """Time the server has to finish `DISCARD ALL` after a client left; a slower reset closes the connection."""


class UpstreamConfig(Schema):
    """The PostgreSQL server the proxy connects to, and how it logs in."""

    host: Text = "127.0.0.1"
    """Upstream host name or address."""
    port: Port = 5432
    """Upstream port."""
    database: Text | None = None
    """If set, every session uses this database, whatever the client asked for."""
    sslmode: SslMode = "disable"
    """TLS to the upstream (see below); there is no `allow` or `prefer`: no fallback to plaintext."""
    sslrootcert: ExistingFile | None = None
    """CA certificates that verify the server; required with `verify-ca` and `verify-full`."""
    connect_timeout_seconds: Annotated[Number, Between(0.1)] = 10.0
    """Applies separately to the TCP connect and to the login; also used when forwarding a cancel request."""
    credentials: Annotated[tuple[UpstreamCredential, ...], NonEmpty(
        "at least one upstream credential is required (role: '*' matches any mapped role)")]
    """The logins the proxy can use upstream; the client never sees them."""
    pool: UpstreamPoolConfig = Field(default_factory=UpstreamPoolConfig)
    """Reuse of upstream connections between clients (off by default, see below)."""

    def credential_for(self, role: str) -> UpstreamCredential | None:
        """The credential for ``role``, else the ``*`` wildcard entry, else None (role not allowed)."""
        wildcard = None
        for cred in self.credentials:
            if cred.role == role:
                return cred
            if cred.role == "*":
                wildcard = cred
        return wildcard

    def problems(self) -> Iterator[Problem]:
        if self.sslmode in ("verify-ca", "verify-full") and self.sslrootcert is None:
            yield ("sslrootcert", f"required with sslmode {self.sslmode}")


class LimitsConfig(Schema):
    """Sizes, time-outs and connection counts that protect the proxy and the database."""

    max_message_bytes: Annotated[Int, Between(1024, 1 << 30)] = 64 * 1024 * 1024
    """Largest protocol message accepted in either direction (64 MiB by default)."""
    max_startup_packet_bytes: Annotated[Int, Between(64, 10_000)] = 10_000
    """Largest startup packet accepted from a client (PostgreSQL's own limit is 10000)."""
    startup_timeout_seconds: Annotated[Number, Between(0.1)] = 15.0
    """Time allowed from connecting until the token is verified (TLS handshake included)."""
    max_connections: Annotated[Int, Between(1)] = 1000
    """Client sessions of this proxy process; as in PostgreSQL a connection counts once it has sent its startup
    packet (silent sockets are ended by the startup timeout)."""
    max_connections_per_identity: Annotated[Int, Between(1)] = 100
    """Sessions of one token subject in this proxy process."""
    idle_timeout_seconds: Seconds = 0.0
    """`0` turns it off. Ends a session that has been idle, outside a transaction, for longer than this."""
    idle_in_transaction_timeout_seconds: Seconds = 0.0
    """`0` turns it off. Ends a session idle inside a transaction block for longer (its transaction rolls back)."""


class AuditConfig(Schema):
    """Where every session event is recorded: exactly one of `jsonl_path` or `dir`."""

    jsonl_path: NewFile | None = None
    """A plain JSON-lines file (unsigned). Need not exist: parent directories are created, and the file is
    created with mode 0600 and appended to."""
    dir: NewFile | None = None
    """The signed, tamper-evident log's directory. Need not exist; it is created with mode 0700. An existing log
    is checked at start-up ([audit.md](audit.md#reopening)), and `serve` refuses to start if it fails, if its
    checkpoints were signed by a key the proxy does not trust, or if another process holds the directory's
    lock."""
    signing_key_file: ExistingFile | None = None
    """Required with `dir`, and only allowed with it: an Ed25519 private key from `pgproxy audit keygen`."""
    checkpoint_every_records: Annotated[Int, Between(1)] = 1000
    """Sign a checkpoint after this many new records."""
    checkpoint_every_seconds: Annotated[Number, Between(0.01)] = 60.0
    """Sign a checkpoint once this long has passed since the last one and new records exist. One is also signed
    after each `session_end` and at shutdown."""
    fsync: Literal["always", "interval", "never"] = "interval"
    """When the log is flushed to disk ([audit.md](audit.md#durability-and-the-fail-closed-guarantee))."""
    segment_max_bytes: Annotated[Int, Between(1024)] = 64 * 1024 * 1024
    """Start a new segment file once the current one reaches this size (64 MiB by default)."""
    witness_dir: NewFile | None = None
    """Only with `dir`. Need not exist. A directory, ideally on storage that the proxy host can't rewrite, where
    every checkpoint is also appended."""
    witness_dsn: Text | None = None
    """Only with `dir`; not together with `witness_dir`. A PostgreSQL connection string; every checkpoint is
    also inserted there. See [deployment.md](deployment.md#witness) for the privileges it needs."""
    max_result_rows: Annotated[Int, Between(0, 100_000)] = 20
    """Rows of each result stored in the record; the digest covers every row."""
    trusted_keys: tuple[ExistingFile, ...] = ()
    """Only with `dir`. Public keys (`FILE.pub`) of earlier signing keys, after a rotation. With
    `signing_key_file`, the keys the proxy and `pgproxy audit ... --config` trust
    ([audit.md](audit.md#trust-anchors))."""
    store_dsn_env: Text | None = None
    """Only with `dir`. Name of the environment variable holding the DSN of the
    [central store](audit.md#central-store); `serve` refuses to start if it is unset."""
    store_schema: Identifier = "pgproxy_audit"
    """The central store's schema; its tables are created in it if missing."""

    def store_dsn(self) -> str:
        """The central store's DSN from ``store_dsn_env``."""
        return _env_value("audit.store_dsn_env", self.store_dsn_env)

    def problems(self) -> Iterator[Problem]:
        if self.jsonl_path is not None and self.dir is not None:
            yield ("", "set exactly one of jsonl_path or dir, not both")
        if self.dir is not None and self.signing_key_file is None:
            yield ("signing_key_file", "required with dir (create one with `pgproxy audit keygen`)")
        if self.dir is None:
            for key in ("signing_key_file", "witness_dir", "witness_dsn", "trusted_keys", "store_dsn_env"):
                if getattr(self, key):
                    yield (key, "only used with dir (the signed audit log)")
        if self.witness_dir is not None and self.witness_dsn is not None:
            yield ("", "set witness_dir or witness_dsn, not both")


APPROVAL_STORES = ("sqlite", "postgres")


class SlackApprover(Schema):
    """A Slack user who may press Approve / Deny, and the identity they decide as."""

    slack_user: Text
    """Slack's user id (`U...`), never the display name, which anyone can change."""
    subject: Text
    """The subject this user decides as."""
    groups: Annotated[tuple[Text, ...], NonEmpty("expected a non-empty list of group names")]
    """The groups this user decides as."""


class SlackConfig(Schema):
    """Approval requests as Slack messages with Approve / Deny buttons (docs/approvals.md#slack)."""

    channel: Text
    """The channel id (`C...`) the bot posts to."""
    bot_token_env: Text
    """Environment variable holding the bot token (`xoxb-...`, scope `chat:write`)."""
    signing_secret_env: Text
    """Environment variable holding the Slack app's signing secret."""
    approvers: Annotated[tuple[SlackApprover, ...], NonEmpty(
        "required (the Slack users who may decide, with their identity)")]
    """The Slack users who may decide; a user may be listed once."""
    api_url: Text = "https://slack.com/api/"
    """Slack's Web API. `https://` (plain `http://` only on loopback)."""
    timestamp_tolerance_seconds: Annotated[Number, Between(1)] = 300.0
    """Button presses whose `X-Slack-Request-Timestamp` is further from now are refused."""

    def bot_token(self) -> str:
        value = read_secret("approvals.slack.bot_token_env", self.bot_token_env, None)
        assert value is not None
        return value

    def signing_secret(self) -> bytes:
        value = read_secret("approvals.slack.signing_secret_env", self.signing_secret_env, None)
        assert value is not None
        return value.encode()

    def problems(self) -> Iterator[Problem]:
        users = [a.slack_user for a in self.approvers]
        if len(set(users)) != len(users):
            yield ("approvers", "a Slack user is listed twice")
        if not secure_url(self.api_url):
            yield ("api_url", HTTPS_ONLY)


class ApprovalsConfig(Schema):
    """Where approval requests live (docs/approvals.md) and who hears about new ones."""

    store: Literal["sqlite", "postgres"] = "sqlite"
    """`sqlite` (one host) or `postgres` (several proxy replicas)."""
    path: NewFile | None = None
    """`sqlite`: required, and only allowed with it. The database file; it need not exist, and it and its parent
    directories are created on first use."""
    dsn_env: Text | None = None
    """`postgres`: required, and only allowed with it. Name of the environment variable that holds the DSN. If
    the variable is unset, `serve` refuses to start when a `policy` or `admin` section uses the store."""
    schema_: Identifier = Field("pgproxy", alias="schema")
    """`postgres` only: the schema of the approval tables (created if missing)."""
    webhook_url: Text | None = None
    """Each new request is POSTed here as JSON; `https://` (plain `http://` only to a loopback host)."""
    slack: SlackConfig | None = None
    """Each new request is a Slack message with Approve / Deny buttons; needs an `admin` section
    ([approvals.md](approvals.md#slack))."""

    @property
    def schema(self) -> str:  # type: ignore[override]  # the YAML key; BaseModel.schema is pydantic v1's
        return self.schema_

    def dsn(self) -> str:
        """The PostgreSQL DSN from ``dsn_env`` (postgres store only)."""
        return _env_value("approvals.dsn_env", self.dsn_env)

    def problems(self) -> Iterator[Problem]:
        if self.store == "sqlite":
            if self.path is None:
                yield ("path", "required with store sqlite (the approvals database file)")
            if self.dsn_env is not None:
                yield ("dsn_env", "only used with store postgres")
            if "schema_" in self.model_fields_set:
                yield ("schema", "only used with store postgres")
        else:
            if self.dsn_env is None:
                yield ("dsn_env", "required with store postgres (the environment variable holding the DSN)")
            if self.path is not None:
                yield ("path", "only used with store sqlite")
        if self.webhook_url is not None and not secure_url(self.webhook_url):
            yield ("webhook_url", HTTPS_ONLY)


class PolicyConfig(Schema):
    """The statement policy (docs/policy.md); without this section no policy gate runs."""

    file: ExistingFile
    """The policy YAML file. It is validated by `pgproxy check`, when `serve` starts and at each reload, which
    reads it again."""
    audit_allowed: Flag = False
    """Also write a `policy_decision` audit event for every allowed statement. Denials and approval decisions
    are always recorded."""


class MaskingConfig(Schema):
    """Column masking (docs/masking.md); without this section nothing is masked."""

    rules_dir: ExistingFile
    """The directory of `*.yaml` / `*.yml` rule files."""
    key_env: Text | None = None
    """Environment variable holding the `keyed_hash` secret (at least 32 bytes)."""
    key_file: ExistingFile | None = None
    """File holding that secret instead (not with `key_env`); one of them is required when a rule uses `keyed_hash`."""
    catalog_refresh_seconds: Annotated[Number, Between(1)] = 60.0
    """How long a catalog snapshot is used; DDL through the proxy also refreshes it."""
    notification_channels: tuple[Text, ...] = ()
    """NOTIFY channels whose payloads masked identities receive unchanged; other payloads are emptied."""
    schema_database: Text | None = Field(None, json_schema_extra={"doc_default": "`upstream.database`, else "
                                                                                 "`postgres`"})
    """The database whose live schema `serve` (and `pgproxy check`) reads to verify the rules."""
    schema_role: Text | None = Field(None, json_schema_extra={"doc_default": "the first credential with a role "
                                                                             "name, else `identity.default_db_role`"})
    """The role the proxy logs in as (with its own credential) to read that schema."""
    allow_schema_mismatch: Flag = False
    """By default `serve` refuses to start, and a reload is refused, when a rule names a relation or column that
    the live schema lacks, a mask does not fit its column's type, or the schema cannot be read: a misspelt
    column would otherwise stay unmasked. `true` logs these as warnings and starts anyway (for rules on tables
    created later)."""

    def key(self) -> bytes | None:
        """The keyed-hash secret, or None when none is configured."""
        if self.key_env is not None:
            value = os.environ.get(self.key_env)
            if value is None:
                raise ConfigError(f"masking.key_env: environment variable {self.key_env} is not set")
            secret = value.encode()
        elif self.key_file is not None:
            try:
                secret = self.key_file.read_bytes().rstrip(b"\r\n")
            except OSError as exc:
                raise ConfigError(f"masking.key_file: cannot read {self.key_file}: {exc.strerror}") from None
        else:
            return None
        if len(secret) < 32:
            raise ConfigError("masking: the keyed-hash key must be at least 32 bytes")
        return secret

    def problems(self) -> Iterator[Problem]:
        if self.key_env and self.key_file:
            yield ("", "set key_env or key_file, not both")


class OidcLoginConfig(Schema):
    """People log in to the admin UI through an OpenID provider (authorization code + PKCE; docs/people.md)."""

    issuer: Text
    """The provider's issuer URL, `https://` (plain `http://` only on loopback)."""
    client_id: Text
    """The client id registered at the provider."""
    redirect_uri: Text | None = Field(None, json_schema_extra={"doc_default": "the URL the browser used to reach "
                                                                              "the UI"})
    """`https://<admin host>:<port>/ui/oidc/callback` as registered at the provider (set it behind a reverse proxy)."""
    client_secret_env: Text | None = None
    """Environment variable holding the client secret; unset: a public client (PKCE only)."""
    scopes: tuple[Text, ...] = ("openid", "profile", "email")
    """Scopes asked for; must include `openid`."""
    groups_claim: Text = "groups"
    """The ID token claim that carries the groups."""
    subject_claim: Text = "sub"
    """The ID token claim that names the person."""
    algorithms: Annotated[tuple[AsymmetricAlgorithm, ...], NonEmpty("required: at least one algorithm")] = ("RS256",)
    """Public-key algorithms the ID token may be signed with."""
    provider_logout: Flag = True
    """Logging out also ends the session at the provider (its `end_session_endpoint`)."""

    def client_secret(self) -> str | None:
        return read_secret("admin.oidc.client_secret_env", self.client_secret_env, None)

    def problems(self) -> Iterator[Problem]:
        if not all(" " not in x for x in self.scopes) or "openid" not in self.scopes:
            yield ("scopes", "expected a list of scope names including openid")
        for key in ("issuer", "redirect_uri"):
            value = getattr(self, key)
            if value is not None and not secure_url(value):
                yield (key, HTTPS_ONLY)
        if self.redirect_uri is not None and not urlsplit(self.redirect_uri).path.endswith("/ui/oidc/callback"):
            yield ("redirect_uri", "must end with /ui/oidc/callback (the UI's callback page)")


class AdminConfig(Schema):
    """The admin HTTP listener: approvals API, web UI, metrics and reload."""

    host: Text = "127.0.0.1"
    """Address to bind."""
    port: Port = 8080
    """The listener's port."""
    tls: TLSConfig | None = None
    """Required unless `host` is loopback: approvers send their tokens to this listener."""
    ui: Flag = True
    """Serve the web UI under `/ui/` ([admin-ui.md](admin-ui.md))."""
    analyst_groups: tuple[Text, ...] | None = Field(None, json_schema_extra={
        "doc_default": "the approver groups of the policy's `approve` rules"})
    """Token groups that may view sessions and the whole approval queue in the web UI (deciding still needs a
    request's approver group)."""
    metrics_token_env: Text | None = None
    """Name of the environment variable holding the bearer token that `GET /metrics` requires. Unset: `/metrics`
    is open. Set but the variable is unset or empty: `pgproxy serve` refuses to start. See
    [operations.md](operations.md#prometheus-metrics)."""
    oidc: OidcLoginConfig | None = None
    """Web UI login through an OpenID provider (authorization code + PKCE); see
    [people.md](people.md#adminoidc-settings)."""
    token_login: Flag = Field(True, json_schema_extra={"doc_default": "`true` without `oidc`, `false` with it"})
    """Keep the web UI's pasted-JWT login form."""
    operator_groups: tuple[Text, ...] = ()
    """Token groups whose members may reload the config with `POST /api/reload`
    ([operations.md](operations.md#reload)). Empty: the endpoint answers 403 and only SIGHUP reloads. `/livez`
    and `/readyz` are always served, without credentials."""

    @model_validator(mode="before")
    @classmethod
    def _token_login_default(cls, data: Any) -> Any:
        """The pasted-JWT form is on by default only when no OpenID login is configured."""
        if isinstance(data, Mapping) and data.get("token_login") is None:
            return {**data, "token_login": data.get("oidc") is None}
        return data

    def metrics_token(self) -> str | None:
        """The bearer token /metrics requires (None: open); fails closed when the variable is unset."""
        if self.metrics_token_env is None:
            return None
        return _env_value("admin.metrics_token_env", self.metrics_token_env)

    def problems(self) -> Iterator[Problem]:
        if self.tls is None and not is_loopback_host(self.host):
            yield ("tls", "required unless host is loopback (approver tokens would cross the network in clear "
                   f"text), host is {self.host!r}")


class LoggingConfig(Schema):
    """How `pgproxy serve` writes its own log to stderr (docs/operations.md#logs)."""

    format: LogFormat = "text"
    """`text`, or `json` for one JSON object per line. `pgproxy serve --log-format` overrides it."""


class ProxyConfig(Schema):
    """The whole file."""

    listeners: Annotated[tuple[ListenerConfig, ...], NonEmpty(
        "at least one listener is required")]
    """Each entry opens one listening socket."""
    identity: IdentityConfig
    """How callers' tokens are verified."""
    upstream: UpstreamConfig
    """The PostgreSQL server behind the proxy."""
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    """Sizes, time-outs and connection counts."""
    audit: AuditConfig = Field(default_factory=AuditConfig)
    """Where session events are recorded; `pgproxy serve` needs `jsonl_path` or `dir`."""
    approvals: ApprovalsConfig | None = None
    """The approval store: needed by policy rules with `action: approve`, the `admin` API and `pgproxy approvals`."""
    admin: AdminConfig | None = None
    """The admin HTTP listener; needs `approvals`."""
    policy: PolicyConfig | None = None
    """The statement policy ([policy.md](policy.md)); without it no policy runs."""
    masking: MaskingConfig | None = None
    """Column masking ([masking.md](masking.md)); without it nothing is masked."""
    http: HttpConfig | None = None
    """The HTTP companion proxy ([http.md](http.md))."""
    grpc: GrpcConfig | None = None
    """The gRPC companion proxy ([grpc.md](grpc.md))."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """The format of `pgproxy serve`'s own log ([operations.md](operations.md#logs))."""
    _source: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> Path | None:
        """The file this config was read from (None when built from data)."""
        return self._source

    def problems(self) -> Iterator[Problem]:
        if self.admin is not None and self.approvals is None:
            yield ("admin", "needs an approvals section (the admin listener serves the approvals API)")
        if self.approvals is not None and self.approvals.slack is not None and self.admin is None:
            yield ("approvals.slack", "needs an admin section (Slack sends button presses to the admin "
                   "listener's /slack/interactions)")


# --------------------------------------------------------------------------------------------------
# Loading


def parse_config(data: Any, base_dir: Path, source: Path | None = None) -> ProxyConfig:
    """Build a validated ProxyConfig from already-loaded YAML data; relative paths are below ``base_dir``.

    Every problem is reported at once: the ConfigError has one line per problem, each starting with the
    field path, prefixed by ``source`` when there is one.
    """
    complete_schema()
    try:
        config = ProxyConfig.model_validate({} if data is None else data, context={"base_dir": base_dir})
    except ValidationError as exc:
        lines = [f"{source}: {line}" if source is not None else line for line in error_lines(exc)]
        raise ConfigError("\n".join(lines), lines) from None
    config._source = source
    return config


def load_config(path: str | os.PathLike[str] | None) -> ProxyConfig:
    """Load the config file at ``path`` (or ``$PGPROXY_CONFIG`` when None)."""
    if path is None:
        env = os.environ.get(CONFIG_ENV_VAR)
        if not env:
            raise ConfigError(f"no config file: pass -c FILE or set {CONFIG_ENV_VAR}")
        path = env
    p = Path(path)
    return parse_config(load_yaml(p), p.resolve().parent, source=p)


def load_yaml(path: Path) -> Any:
    """The YAML document in ``path``; unreadable files and bad YAML become one-line ConfigErrors."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None


def complete_schema() -> None:
    """Complete ProxyConfig with the HTTP and gRPC sections, imported when first needed (they import this module)."""
    if ProxyConfig.__pydantic_complete__:
        return
    from .grpcproxy.config import GrpcConfig
    from .http.config import HttpConfig

    ProxyConfig.model_rebuild(_types_namespace={"HttpConfig": HttpConfig, "GrpcConfig": GrpcConfig})

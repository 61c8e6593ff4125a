"""The YAML configuration schema, parsed once at start into frozen dataclasses.

Every field is validated here with an error naming its path (``upstream.sslmode: ...``) so that a
mistake is reported before the proxy accepts a single connection. Secrets are never stored in the
config file itself: only the names of environment variables or files that hold them.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml

if TYPE_CHECKING:
    from .grpcproxy.config import GrpcConfig
    from .http.config import HttpConfig

CONFIG_ENV_VAR = "PGPROXY_CONFIG"

ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                                   "ES512", "EdDSA"})
SYMMETRIC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
SSLMODES = ("disable", "require", "verify-ca", "verify-full")
# Clock skew allowed for a token's nbf and iat: small, it is not a grace period (exp is never extended).
MAX_LEEWAY_SECONDS = 60.0


class ConfigError(Exception):
    """A configuration problem, with the dotted path of the offending field in its message."""


@dataclass(frozen=True)
class TLSConfig:
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class ListenerConfig:
    host: str = "127.0.0.1"
    port: int = 6432
    tls: TLSConfig | None = None
    # Accept the token over a plaintext connection: only for loopback demos and tests.
    insecure_plaintext: bool = False


@dataclass(frozen=True)
class ClaimNames:
    """Which JWT claims carry each part of the identity."""

    subject: str = "sub"
    groups: str = "groups"
    db_role: str = "db_role"
    agent_id: str = "agent_id"
    session_id: str = "session_id"
    tool_call_id: str = "tool_call_id"


@dataclass(frozen=True)
class IdentityConfig:
    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    jwks_file: Path | None = None
    jwks_url: str | None = None
    hs256_secret_env: str | None = None
    leeway_seconds: float = 30.0
    jwks_cache_seconds: float = 300.0
    jwks_timeout_seconds: float = 5.0
    # Minimum interval between JWKS refreshes triggered by an unknown ``kid`` (limits key-probing storms).
    jwks_min_refresh_seconds: float = 10.0
    claims: ClaimNames = field(default_factory=ClaimNames)
    default_db_role: str | None = None
    # Private key used only by `pgproxy token` to mint development tokens; never read by `serve`.
    dev_signing_key_file: Path | None = None
    # Keys from the JWKS URL named by the issuer's OpenID discovery document (a key source).
    discovery: bool = False
    # More accepted audiences, e.g. the client id that `pgproxy login` uses (people's ID tokens name it).
    extra_audiences: tuple[str, ...] = ()


@dataclass(frozen=True)
class UpstreamCredential:
    """How the proxy logs in upstream as ``role``; no password source means trust/peer-style login."""

    role: str
    password_env: str | None = None
    password_file: Path | None = None

    def password(self) -> str | None:
        return read_secret(f"upstream.credentials[{self.role}]", self.password_env, self.password_file)


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


@dataclass(frozen=True)
class UpstreamConfig:
    host: str = "127.0.0.1"
    port: int = 5432
    # When set, every session goes to this database whatever the client asked for.
    database: str | None = None
    sslmode: str = "disable"
    sslrootcert: Path | None = None
    connect_timeout_seconds: float = 10.0
    credentials: tuple[UpstreamCredential, ...] = ()

    def credential_for(self, role: str) -> UpstreamCredential | None:
        """The credential for ``role``, else the ``*`` wildcard entry, else None (role not allowed)."""
        wildcard = None
        for cred in self.credentials:
            if cred.role == role:
                return cred
            if cred.role == "*":
                wildcard = cred
        return wildcard


@dataclass(frozen=True)
class LimitsConfig:
    max_message_bytes: int = 64 * 1024 * 1024
    max_startup_packet_bytes: int = 10_000
    startup_timeout_seconds: float = 15.0
    max_connections: int = 1000  # all sessions of this proxy process
    max_connections_per_identity: int = 100  # sessions of one token subject
    idle_timeout_seconds: float = 0.0  # 0: never end idle sessions
    idle_in_transaction_timeout_seconds: float = 0.0  # 0: never end sessions idle inside a transaction


@dataclass(frozen=True)
class AuditConfig:
    jsonl_path: Path | None = None
    # The signed, tamper-evident log (docs/audit.md); exclusive with jsonl_path.
    dir: Path | None = None
    signing_key_file: Path | None = None
    checkpoint_every_records: int = 1000
    checkpoint_every_seconds: float = 60.0
    fsync: str = "interval"  # always | interval | never
    segment_max_bytes: int = 64 * 1024 * 1024
    witness_dir: Path | None = None
    witness_dsn: str | None = None
    max_result_rows: int = 20
    # Public keys of earlier signing keys (after a rotation): with the signing key's own, the keys the
    # proxy and `pgproxy audit verify --config` trust; the log's own keys/ directory is never trusted.
    trusted_keys: tuple[Path, ...] = ()
    # The central store (docs/audit.md#central-store): records and checkpoints shipped to PostgreSQL.
    store_dsn_env: str | None = None  # environment variable holding the store's DSN
    store_schema: str = "pgproxy_audit"

    def store_dsn(self) -> str:
        """The central store's DSN from ``store_dsn_env``."""
        value = os.environ.get(self.store_dsn_env or "")
        if not value:
            raise ConfigError(f"audit.store_dsn_env: environment variable {self.store_dsn_env} is not set")
        return value


APPROVAL_STORES = ("sqlite", "postgres")


@dataclass(frozen=True)
class SlackApprover:
    """A Slack user who may press Approve / Deny, and the identity they decide as."""

    slack_user: str  # Slack's user id (U...), never the display name, which anyone can change
    subject: str
    groups: tuple[str, ...]


@dataclass(frozen=True)
class SlackConfig:
    """Approval requests as Slack messages with Approve / Deny buttons (docs/approvals.md#slack)."""

    channel: str
    bot_token_env: str
    signing_secret_env: str
    approvers: tuple[SlackApprover, ...]
    api_url: str = "https://slack.com/api/"
    timestamp_tolerance_seconds: float = 300.0

    def bot_token(self) -> str:
        value = read_secret("approvals.slack.bot_token_env", self.bot_token_env, None)
        assert value is not None
        return value

    def signing_secret(self) -> bytes:
        value = read_secret("approvals.slack.signing_secret_env", self.signing_secret_env, None)
        assert value is not None
        return value.encode()


@dataclass(frozen=True)
class ApprovalsConfig:
    """Where approval requests live (docs/approvals.md) and who hears about new ones."""

    store: str = "sqlite"  # sqlite | postgres
    path: Path | None = None  # sqlite: the database file
    dsn_env: str | None = None  # postgres: environment variable holding the DSN
    schema: str = "pgproxy"  # postgres: schema of the approval tables (created if missing)
    webhook_url: str | None = None  # each new request is POSTed here as JSON
    slack: SlackConfig | None = None  # each new request is a Slack message with Approve / Deny buttons

    def dsn(self) -> str:
        """The PostgreSQL DSN from ``dsn_env`` (postgres store only)."""
        value = os.environ.get(self.dsn_env or "")
        if not value:
            raise ConfigError(f"approvals.dsn_env: environment variable {self.dsn_env} is not set")
        return value


@dataclass(frozen=True)
class PolicyConfig:
    """The statement policy (pgproxy/policy/rules.py); without this section no policy gate runs."""

    file: Path
    audit_allowed: bool = False  # also record a policy_decision event for every allowed statement


@dataclass(frozen=True)
class MaskingConfig:
    """Column masking (pgproxy/masking/); without this section nothing is masked."""

    rules_dir: Path
    key_env: str | None = None
    key_file: Path | None = None
    catalog_refresh_seconds: float = 60.0
    # NOTIFY channels whose payloads reach masked identities unchanged; other payloads are emptied.
    notification_channels: tuple[str, ...] = ()
    # Where serve (and check) read the live schema to verify the rules: database and role to log in as.
    schema_database: str | None = None
    schema_role: str | None = None
    # Start even if a rule names a relation or column the schema lacks (default: refuse to start).
    allow_schema_mismatch: bool = False

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


@dataclass(frozen=True)
class OidcLoginConfig:
    """People log in to the admin UI through an OpenID provider (authorization code + PKCE; docs/people.md)."""

    issuer: str
    client_id: str
    # https://<admin host>:<port>/ui/oidc/callback as registered at the provider; None: the URL the
    # browser used to reach the UI (set it behind a reverse proxy)
    redirect_uri: str | None = None
    client_secret_env: str | None = None  # None: a public client (PKCE only)
    scopes: tuple[str, ...] = ("openid", "profile", "email")
    groups_claim: str = "groups"
    subject_claim: str = "sub"
    algorithms: tuple[str, ...] = ("RS256",)
    provider_logout: bool = True  # logging out also ends the session at the provider (end_session_endpoint)

    def client_secret(self) -> str | None:
        return read_secret("admin.oidc.client_secret_env", self.client_secret_env, None)


@dataclass(frozen=True)
class AdminConfig:
    """The admin HTTP listener (approvals API)."""

    host: str = "127.0.0.1"
    port: int = 8080
    tls: TLSConfig | None = None
    ui: bool = True  # the web UI under /ui/ (docs/admin-ui.md)
    analyst_groups: tuple[str, ...] | None = None  # may view sessions in the UI; None: the policy's approver groups
    metrics_token_env: str | None = None  # /metrics needs this bearer token when set (docs/operations.md)
    oidc: OidcLoginConfig | None = None  # UI login through an OpenID provider
    # The UI's pasted-JWT login form; on by default only when no oidc login is configured.
    token_login: bool = True
    # Token groups that may reload the config with POST /api/reload (empty: only SIGHUP reloads).
    operator_groups: tuple[str, ...] = ()

    def metrics_token(self) -> str | None:
        """The bearer token /metrics requires (None: open); fails closed when the variable is unset."""
        if self.metrics_token_env is None:
            return None
        value = os.environ.get(self.metrics_token_env)
        if not value:
            raise ConfigError(f"admin.metrics_token_env: environment variable {self.metrics_token_env} is not set")
        return value


LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class LoggingConfig:
    """How `pgproxy serve` writes its own log to stderr (docs/operations.md#logs)."""

    format: str = "text"  # text | json (one JSON object per line)


@dataclass(frozen=True)
class ProxyConfig:
    listeners: tuple[ListenerConfig, ...]
    identity: IdentityConfig
    upstream: UpstreamConfig
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    source: Path | None = None
    approvals: ApprovalsConfig | None = None
    admin: AdminConfig | None = None
    policy: PolicyConfig | None = None
    masking: MaskingConfig | None = None
    http: HttpConfig | None = None  # the HTTP companion proxy (pgproxy/http/, docs/http.md)
    grpc: GrpcConfig | None = None  # the gRPC companion proxy (pgproxy/grpcproxy/, docs/grpc.md)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


# --------------------------------------------------------------------------------------------------
# Parsing


class Section:
    """A mapping under a dotted path that reports unknown keys and wrong types precisely."""

    def __init__(self, data: Any, path: str, base_dir: Path) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
        self.data = dict(data)
        self.path = path
        self.base_dir = base_dir
        self.used: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def raw(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.raw(key)
        if value is None:
            if required:
                raise ConfigError(f"{self.at(key)}: required")
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.at(key)}: expected a non-empty string")
        return value

    def req_str(self, key: str) -> str:
        value = self.string(key, required=True)
        assert value is not None
        return value

    def integer(self, key: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.at(key)}: expected an integer")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ConfigError(f"{self.at(key)}: must be {bound}, got {value}")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0, maximum: float | None = None) -> float:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self.at(key)}: expected a number")
        if value < minimum:
            raise ConfigError(f"{self.at(key)}: must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{self.at(key)}: must be <= {maximum}, got {value}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self.at(key)}: expected true or false")
        return value

    def path_(self, key: str, *, must_exist: bool = True) -> Path | None:
        value = self.string(key)
        if value is None:
            return None
        p = Path(value)
        if not p.is_absolute():
            p = self.base_dir / p
        if must_exist and not p.exists():
            raise ConfigError(f"{self.at(key)}: file not found: {p}")
        return p

    def section(self, key: str) -> Section:
        return Section(self.raw(key), self.at(key), self.base_dir)

    def items(self, key: str) -> list[Any]:
        value = self.raw(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(f"{self.at(key)}: expected a list")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.at(unknown[0])}: unknown setting")


def parse_listener(s: Section) -> ListenerConfig:
    tls_section = s.raw("tls")
    tls = None
    if tls_section is not None:
        t = Section(tls_section, s.at("tls"), s.base_dir)
        cert, key = t.path_("cert_file"), t.path_("key_file")
        if cert is None or key is None:
            raise ConfigError(f"{t.path}: cert_file and key_file are both required")
        t.done()
        tls = TLSConfig(cert, key)
    listener = ListenerConfig(
        host=s.string("host", "127.0.0.1") or "127.0.0.1",
        port=s.integer("port", 6432, maximum=65535),
        tls=tls,
        insecure_plaintext=s.boolean("insecure_plaintext", False),
    )
    s.done()
    if listener.insecure_plaintext and not is_loopback_host(listener.host):
        raise ConfigError(f"{s.at('insecure_plaintext')}: only allowed on a loopback host (127.0.0.1, ::1, "
                          f"localhost), not {listener.host!r}: tokens would cross the network in clear text")
    if listener.tls is None and not listener.insecure_plaintext:
        raise ConfigError(f"{s.path}: a listener needs tls (cert_file, key_file) because the token is sent as "
                          "a cleartext password; set insecure_plaintext: true only for loopback demos")
    return listener


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


def _identity(s: Section) -> IdentityConfig:
    algorithms = s.items("algorithms")
    if not algorithms:
        raise ConfigError(f"{s.at('algorithms')}: required (an explicit allowlist, e.g. [RS256, ES256])")
    for alg in algorithms:
        if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS | SYMMETRIC_ALGORITHMS:
            raise ConfigError(f"{s.at('algorithms')}: unsupported algorithm {alg!r} "
                              f"(allowed: {', '.join(sorted(ASYMMETRIC_ALGORITHMS | SYMMETRIC_ALGORITHMS))})")
    jwks_file = s.path_("jwks_file")
    jwks_url = s.string("jwks_url")
    secret_env = s.string("hs256_secret_env")
    discovery = s.boolean("discovery", False)
    extra_audiences = s.items("extra_audiences")
    if not all(isinstance(a, str) and a for a in extra_audiences):
        raise ConfigError(f"{s.at('extra_audiences')}: expected a list of audience strings")
    sources = [x for x in (jwks_file, jwks_url, secret_env) if x is not None]
    if len(sources) + discovery != 1:
        raise ConfigError(f"{s.path}: set exactly one key source: jwks_file, jwks_url, discovery or "
                          "hs256_secret_env")
    if jwks_url is not None and not secure_url(jwks_url):
        raise ConfigError(f"{s.at('jwks_url')}: must be an https URL (plain http only for loopback)")
    symmetric = [a for a in algorithms if a in SYMMETRIC_ALGORITHMS]
    if secret_env is not None and len(symmetric) != len(algorithms):
        raise ConfigError(f"{s.at('algorithms')}: an HS256 secret only verifies HS* algorithms")
    if secret_env is None and symmetric:
        raise ConfigError(f"{s.at('algorithms')}: HS* algorithms need hs256_secret_env; never mix them with "
                          "public keys (algorithm confusion)")
    c = s.section("claims")
    claims = ClaimNames(**{name: c.string(name, default) or default
                           for name, default in ClaimNames().__dict__.items()})
    c.done()
    ident = IdentityConfig(
        issuer=s.req_str("issuer"),
        audience=s.req_str("audience"),
        algorithms=tuple(algorithms),
        jwks_file=jwks_file,
        jwks_url=jwks_url,
        hs256_secret_env=secret_env,
        leeway_seconds=s.number("leeway_seconds", 30.0, maximum=MAX_LEEWAY_SECONDS),
        jwks_cache_seconds=s.number("jwks_cache_seconds", 300.0),
        jwks_timeout_seconds=s.number("jwks_timeout_seconds", 5.0, minimum=0.1),
        jwks_min_refresh_seconds=s.number("jwks_min_refresh_seconds", 10.0),
        claims=claims,
        default_db_role=s.string("default_db_role"),
        dev_signing_key_file=s.path_("dev_signing_key_file", must_exist=False),
        discovery=discovery,
        extra_audiences=tuple(extra_audiences),
    )
    s.done()
    if discovery and not secure_url(ident.issuer):
        raise ConfigError(f"{s.at('issuer')}: discovery needs an https issuer URL (plain http only for loopback)")
    return ident


def _upstream(s: Section) -> UpstreamConfig:
    creds = []
    for i, item in enumerate(s.items("credentials")):
        c = Section(item, f"{s.at('credentials')}[{i}]", s.base_dir)
        cred = UpstreamCredential(role=c.req_str("role"), password_env=c.string("password_env"),
                                  password_file=c.path_("password_file"))
        c.done()
        if cred.password_env and cred.password_file:
            raise ConfigError(f"{c.path}: set password_env or password_file, not both")
        creds.append(cred)
    if not creds:
        raise ConfigError(f"{s.at('credentials')}: at least one upstream credential is required "
                          "(role: '*' matches any mapped role)")
    sslmode = s.string("sslmode", "disable") or "disable"
    if sslmode not in SSLMODES:
        raise ConfigError(f"{s.at('sslmode')}: must be one of {', '.join(SSLMODES)}")
    up = UpstreamConfig(
        host=s.string("host", "127.0.0.1") or "127.0.0.1",
        port=s.integer("port", 5432, maximum=65535),
        database=s.string("database"),
        sslmode=sslmode,
        sslrootcert=s.path_("sslrootcert"),
        connect_timeout_seconds=s.number("connect_timeout_seconds", 10.0, minimum=0.1),
        credentials=tuple(creds),
    )
    s.done()
    if sslmode in ("verify-ca", "verify-full") and up.sslrootcert is None:
        raise ConfigError(f"{s.at('sslrootcert')}: required with sslmode {sslmode}")
    return up


def _audit(s: Section) -> AuditConfig:
    fsync = s.string("fsync", "interval") or "interval"
    if fsync not in ("always", "interval", "never"):
        raise ConfigError(f"{s.at('fsync')}: must be one of always, interval, never")
    audit = AuditConfig(
        jsonl_path=s.path_("jsonl_path", must_exist=False),
        dir=s.path_("dir", must_exist=False),
        signing_key_file=s.path_("signing_key_file"),
        checkpoint_every_records=s.integer("checkpoint_every_records", 1000, minimum=1),
        checkpoint_every_seconds=s.number("checkpoint_every_seconds", 60.0, minimum=0.01),
        fsync=fsync,
        segment_max_bytes=s.integer("segment_max_bytes", 64 * 1024 * 1024, minimum=1024),
        witness_dir=s.path_("witness_dir", must_exist=False),
        witness_dsn=s.string("witness_dsn"),
        max_result_rows=s.integer("max_result_rows", 20, maximum=100_000),
        trusted_keys=tuple(_key_path(s, i, v) for i, v in enumerate(s.items("trusted_keys"))),
        store_dsn_env=s.string("store_dsn_env"),
        store_schema=s.string("store_schema", "pgproxy_audit") or "pgproxy_audit",
    )
    s.done()
    if audit.jsonl_path is not None and audit.dir is not None:
        raise ConfigError(f"{s.path}: set exactly one of jsonl_path or dir, not both")
    if audit.dir is not None and audit.signing_key_file is None:
        raise ConfigError(f"{s.at('signing_key_file')}: required with dir (create one with `pgproxy audit keygen`)")
    if audit.dir is None:
        for key in ("signing_key_file", "witness_dir", "witness_dsn", "trusted_keys", "store_dsn_env"):
            if getattr(audit, key):
                raise ConfigError(f"{s.at(key)}: only used with dir (the signed audit log)")
    if audit.witness_dir is not None and audit.witness_dsn is not None:
        raise ConfigError(f"{s.path}: set witness_dir or witness_dsn, not both")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", audit.store_schema):
        raise ConfigError(f"{s.at('store_schema')}: must be a plain identifier (letters, digits, _; at most 63)")
    return audit


def _key_path(s: Section, index: int, value: Any) -> Path:
    where = f"{s.at('trusted_keys')}[{index}]"
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a public key file path")
    p = Path(value) if Path(value).is_absolute() else s.base_dir / value
    if not p.exists():
        raise ConfigError(f"{where}: file not found: {p}")
    return p


def _approvals(s: Section) -> ApprovalsConfig:
    store = s.string("store", "sqlite") or "sqlite"
    if store not in APPROVAL_STORES:
        raise ConfigError(f"{s.at('store')}: must be one of {', '.join(APPROVAL_STORES)}, got {store!r}")
    schema = s.string("schema", "pgproxy") or "pgproxy"
    approvals = ApprovalsConfig(
        store=store,
        path=s.path_("path", must_exist=False),
        dsn_env=s.string("dsn_env"),
        schema=schema,
        webhook_url=s.string("webhook_url"),
        slack=_slack(s.section("slack")) if s.raw("slack") is not None else None,
    )
    s.done()
    if store == "sqlite":
        if approvals.path is None:
            raise ConfigError(f"{s.at('path')}: required with store sqlite (the approvals database file)")
        for key in ("dsn_env",):
            if getattr(approvals, key) is not None:
                raise ConfigError(f"{s.at(key)}: only used with store postgres")
        if "schema" in s.data and s.data["schema"] is not None:
            raise ConfigError(f"{s.at('schema')}: only used with store postgres")
    else:
        if approvals.dsn_env is None:
            raise ConfigError(f"{s.at('dsn_env')}: required with store postgres (the environment variable "
                              "holding the DSN)")
        if approvals.path is not None:
            raise ConfigError(f"{s.at('path')}: only used with store sqlite")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", schema):
            raise ConfigError(f"{s.at('schema')}: must be a plain identifier (letters, digits, _; at most 63), "
                              f"got {schema!r}")
    if approvals.webhook_url is not None and not secure_url(approvals.webhook_url):
        raise ConfigError(f"{s.at('webhook_url')}: must be an https URL (plain http only for loopback)")
    return approvals


def _slack(s: Section) -> SlackConfig:
    approvers = []
    for i, item in enumerate(s.items("approvers")):
        a = Section(item, f"{s.at('approvers')}[{i}]", s.base_dir)
        groups = a.items("groups")
        if not groups or not all(isinstance(g, str) and g for g in groups):
            raise ConfigError(f"{a.at('groups')}: expected a non-empty list of group names")
        approvers.append(SlackApprover(a.req_str("slack_user"), a.req_str("subject"), tuple(groups)))
        a.done()
    if not approvers:
        raise ConfigError(f"{s.at('approvers')}: required (the Slack users who may decide, with their identity)")
    users = [a.slack_user for a in approvers]
    if len(set(users)) != len(users):
        raise ConfigError(f"{s.at('approvers')}: a Slack user is listed twice")
    slack = SlackConfig(
        channel=s.req_str("channel"),
        bot_token_env=s.req_str("bot_token_env"),
        signing_secret_env=s.req_str("signing_secret_env"),
        approvers=tuple(approvers),
        api_url=s.string("api_url", SlackConfig.api_url) or SlackConfig.api_url,
        timestamp_tolerance_seconds=s.number("timestamp_tolerance_seconds", 300.0, minimum=1.0),
    )
    s.done()
    if not secure_url(slack.api_url):
        raise ConfigError(f"{s.at('api_url')}: must be an https URL (plain http only for loopback)")
    return slack


def _admin(s: Section) -> AdminConfig:
    tls = None
    if s.raw("tls") is not None:
        t = s.section("tls")
        cert, key = t.path_("cert_file"), t.path_("key_file")
        if cert is None or key is None:
            raise ConfigError(f"{t.path}: cert_file and key_file are both required")
        t.done()
        tls = TLSConfig(cert, key)
    analysts = s.items("analyst_groups") if s.raw("analyst_groups") is not None else None
    if analysts is not None and not all(isinstance(g, str) and g for g in analysts):
        raise ConfigError(f"{s.at('analyst_groups')}: expected a list of group names")
    oidc = _oidc_login(s.section("oidc")) if s.raw("oidc") is not None else None
    operators = s.items("operator_groups")
    if not all(isinstance(g, str) and g for g in operators):
        raise ConfigError(f"{s.at('operator_groups')}: expected a list of group names")
    admin = AdminConfig(host=s.string("host", "127.0.0.1") or "127.0.0.1",
                        port=s.integer("port", 8080, maximum=65535), tls=tls, ui=s.boolean("ui", True),
                        analyst_groups=tuple(analysts) if analysts is not None else None,
                        metrics_token_env=s.string("metrics_token_env"), oidc=oidc,
                        token_login=s.boolean("token_login", oidc is None), operator_groups=tuple(operators))
    s.done()
    if admin.tls is None and not is_loopback_host(admin.host):
        raise ConfigError(f"{s.at('tls')}: required unless host is loopback (approver tokens would cross the "
                          f"network in clear text), host is {admin.host!r}")
    return admin


def _oidc_login(s: Section) -> OidcLoginConfig:
    scopes = s.items("scopes") or ["openid", "profile", "email"]
    if not all(isinstance(x, str) and x and " " not in x for x in scopes) or "openid" not in scopes:
        raise ConfigError(f"{s.at('scopes')}: expected a list of scope names including openid")
    algorithms = s.items("algorithms") or ["RS256"]
    if not all(isinstance(a, str) and a in ASYMMETRIC_ALGORITHMS for a in algorithms):
        raise ConfigError(f"{s.at('algorithms')}: expected public-key algorithms "
                          f"({', '.join(sorted(ASYMMETRIC_ALGORITHMS))})")
    oidc = OidcLoginConfig(
        issuer=s.req_str("issuer"),
        client_id=s.req_str("client_id"),
        redirect_uri=s.string("redirect_uri"),
        client_secret_env=s.string("client_secret_env"),
        scopes=tuple(scopes),
        groups_claim=s.string("groups_claim", "groups") or "groups",
        subject_claim=s.string("subject_claim", "sub") or "sub",
        algorithms=tuple(algorithms),
        provider_logout=s.boolean("provider_logout", True),
    )
    s.done()
    for key in ("issuer", "redirect_uri"):
        value = getattr(oidc, key)
        if value is not None and not secure_url(value):
            raise ConfigError(f"{s.at(key)}: must be an https URL (plain http only for loopback)")
    if oidc.redirect_uri is not None and not urlsplit(oidc.redirect_uri).path.endswith("/ui/oidc/callback"):
        raise ConfigError(f"{s.at('redirect_uri')}: must end with /ui/oidc/callback (the UI's callback page)")
    return oidc


def parse_config(data: Any, base_dir: Path, source: Path | None = None) -> ProxyConfig:
    """Build a validated ProxyConfig from already-loaded YAML data."""
    root = Section(data, "", base_dir)
    listeners = [parse_listener(Section(item, f"listeners[{i}]", base_dir))
                 for i, item in enumerate(root.items("listeners"))]
    if not listeners:
        raise ConfigError("listeners: at least one listener is required")
    if "identity" not in root.data:
        raise ConfigError("identity: required")
    if "upstream" not in root.data:
        raise ConfigError("upstream: required")
    identity = _identity(root.section("identity"))
    upstream = _upstream(root.section("upstream"))
    lim = root.section("limits")
    limits = LimitsConfig(
        max_message_bytes=lim.integer("max_message_bytes", LimitsConfig.max_message_bytes, minimum=1024,
                                  maximum=1 << 30),
        # PostgreSQL itself refuses startup packets over 10000 bytes; so does the decoder.
        max_startup_packet_bytes=lim.integer("max_startup_packet_bytes", LimitsConfig.max_startup_packet_bytes,
                                             minimum=64, maximum=10_000),
        startup_timeout_seconds=lim.number("startup_timeout_seconds", LimitsConfig.startup_timeout_seconds,
                                          minimum=0.1),
        max_connections=lim.integer("max_connections", LimitsConfig.max_connections, minimum=1),
        max_connections_per_identity=lim.integer("max_connections_per_identity",
                                                 LimitsConfig.max_connections_per_identity, minimum=1),
        idle_timeout_seconds=lim.number("idle_timeout_seconds", LimitsConfig.idle_timeout_seconds),
        idle_in_transaction_timeout_seconds=lim.number("idle_in_transaction_timeout_seconds",
                                                       LimitsConfig.idle_in_transaction_timeout_seconds),
    )
    lim.done()
    aud = root.section("audit")
    audit = _audit(aud)
    approvals = _approvals(root.section("approvals")) if root.raw("approvals") is not None else None
    admin = _admin(root.section("admin")) if root.raw("admin") is not None else None
    if admin is not None and approvals is None:
        raise ConfigError("admin: needs an approvals section (the admin listener serves the approvals API)")
    if approvals is not None and approvals.slack is not None and admin is None:
        raise ConfigError("approvals.slack: needs an admin section (Slack sends button presses to the admin "
                          "listener's /slack/interactions)")
    policy = None
    if root.raw("policy") is not None:
        pol = root.section("policy")
        policy_file = pol.path_("file")
        if policy_file is None:
            raise ConfigError("policy.file: required (the YAML policy, e.g. pgproxy/policy/default_policy.yaml)")
        policy = PolicyConfig(file=policy_file, audit_allowed=pol.boolean("audit_allowed", False))
        pol.done()
    masking = _masking(root.section("masking")) if root.raw("masking") is not None else None
    http = None
    if root.raw("http") is not None:
        from .http.config import parse_http

        http = parse_http(root.section("http"))
    grpc = None
    if root.raw("grpc") is not None:
        from .grpcproxy.config import parse_grpc

        grpc = parse_grpc(root.section("grpc"))
    log_section = root.section("logging")
    log_format = log_section.string("format", "text") or "text"
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"logging.format: must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    log_section.done()
    root.done()
    return ProxyConfig(listeners=tuple(listeners), identity=identity, upstream=upstream, limits=limits,
                       audit=audit, source=source, approvals=approvals, admin=admin, policy=policy,
                       masking=masking, http=http, grpc=grpc, logging=LoggingConfig(log_format))


def _masking(s: Section) -> MaskingConfig:
    rules_dir = s.path_("rules_dir")
    if rules_dir is None:
        raise ConfigError(f"{s.at('rules_dir')}: required (the directory of masking rule files)")
    channels = s.items("notification_channels")
    if not all(isinstance(c, str) and c for c in channels):
        raise ConfigError(f"{s.at('notification_channels')}: expected a list of channel names")
    masking = MaskingConfig(rules_dir=rules_dir, key_env=s.string("key_env"), key_file=s.path_("key_file"),
                            catalog_refresh_seconds=s.number("catalog_refresh_seconds", 60.0, minimum=1.0),
                            notification_channels=tuple(channels), schema_database=s.string("schema_database"),
                            schema_role=s.string("schema_role"),
                            allow_schema_mismatch=s.boolean("allow_schema_mismatch", False))
    s.done()
    if masking.key_env and masking.key_file:
        raise ConfigError(f"{s.path}: set key_env or key_file, not both")
    return masking


# Valid stand-ins for a section that failed, so that checking goes on to the sections after it.
_STAND_INS: dict[str, Any] = {
    "listeners": [{"insecure_plaintext": True}],
    "identity": {"issuer": "-", "audience": "-", "algorithms": ["HS256"], "hs256_secret_env": "-"},
    "upstream": {"credentials": [{"role": "*"}]},
    "approvals": {"store": "sqlite", "path": "-"},
}


def config_errors(data: Any, base_dir: Path) -> list[str]:
    """Every error of the config ``data``, not just the first one that ``parse_config`` raises.

    Each failing top-level section is replaced by a valid stand-in (or dropped) and the rest is parsed
    again, so one run of `pgproxy check` reports a problem in each section.
    """
    if not isinstance(data, Mapping):
        return [f"config: expected a mapping, got {type(data).__name__}"]
    data = dict(data)
    errors: list[str] = []
    while True:
        try:
            parse_config(data, base_dir)
            return errors
        except ConfigError as exc:
            message = str(exc)
        errors.append(message)
        section = re.split(r"[.\[:]", message, maxsplit=1)[0]
        if len(errors) > 100:
            return errors
        if section in _STAND_INS and data.get(section) != _STAND_INS[section]:
            data[section] = _STAND_INS[section]
        elif section in data:
            del data[section]
        else:
            return errors  # not about one section (or its stand-in failed too): nothing to set aside


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

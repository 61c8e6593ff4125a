"""The YAML configuration schema, parsed once at start into frozen dataclasses.

Every field is validated here with an error naming its path (``upstream.sslmode: ...``) so that a
mistake is reported before the proxy accepts a single connection. Secrets are never stored in the
config file itself: only the names of environment variables or files that hold them.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

CONFIG_ENV_VAR = "PGPROXY_CONFIG"

ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                                   "ES512", "EdDSA"})
SYMMETRIC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
SSLMODES = ("disable", "require", "verify-ca", "verify-full")


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


@dataclass(frozen=True)
class UpstreamCredential:
    """How the proxy logs in upstream as ``role``; no password source means trust/peer-style login."""

    role: str
    password_env: str | None = None
    password_file: Path | None = None

    def password(self) -> str | None:
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(f"upstream.credentials[{self.role}]: environment variable "
                                  f"{self.password_env} is not set")
            return value
        if self.password_file is not None:
            try:
                return self.password_file.read_text().rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(f"upstream.credentials[{self.role}]: cannot read password file: "
                                  f"{exc.strerror}") from None
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


@dataclass(frozen=True)
class AuditConfig:
    jsonl_path: Path | None = None


@dataclass(frozen=True)
class ProxyConfig:
    listeners: tuple[ListenerConfig, ...]
    identity: IdentityConfig
    upstream: UpstreamConfig
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    source: Path | None = None


# --------------------------------------------------------------------------------------------------
# Parsing


class _Section:
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

    def _p(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def raw(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.raw(key)
        if value is None:
            if required:
                raise ConfigError(f"{self._p(key)}: required")
            return default
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self._p(key)}: expected a non-empty string")
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
            raise ConfigError(f"{self._p(key)}: expected an integer")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ConfigError(f"{self._p(key)}: must be {bound}, got {value}")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        value = self.raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self._p(key)}: expected a number")
        if value < minimum:
            raise ConfigError(f"{self._p(key)}: must be >= {minimum}, got {value}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ConfigError(f"{self._p(key)}: expected true or false")
        return value

    def path_(self, key: str, *, must_exist: bool = True) -> Path | None:
        value = self.string(key)
        if value is None:
            return None
        p = Path(value)
        if not p.is_absolute():
            p = self.base_dir / p
        if must_exist and not p.exists():
            raise ConfigError(f"{self._p(key)}: file not found: {p}")
        return p

    def section(self, key: str) -> _Section:
        return _Section(self.raw(key), self._p(key), self.base_dir)

    def items(self, key: str) -> list[Any]:
        value = self.raw(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ConfigError(f"{self._p(key)}: expected a list")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self._p(unknown[0])}: unknown setting")


def _listener(s: _Section) -> ListenerConfig:
    tls_section = s.raw("tls")
    tls = None
    if tls_section is not None:
        t = _Section(tls_section, s._p("tls"), s.base_dir)
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
        raise ConfigError(f"{s._p('insecure_plaintext')}: only allowed on a loopback host (127.0.0.1, ::1, "
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


def _secure_url(url: str) -> bool:
    """https, or plain http to a loopback host (keys fetched in clear text could be swapped)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    if parts.scheme != "http" or parts.username is not None or not parts.hostname:
        return False
    return is_loopback_host(parts.hostname)


def _identity(s: _Section) -> IdentityConfig:
    algorithms = s.items("algorithms")
    if not algorithms:
        raise ConfigError(f"{s._p('algorithms')}: required (an explicit allowlist, e.g. [RS256, ES256])")
    for alg in algorithms:
        if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS | SYMMETRIC_ALGORITHMS:
            raise ConfigError(f"{s._p('algorithms')}: unsupported algorithm {alg!r} "
                              f"(allowed: {', '.join(sorted(ASYMMETRIC_ALGORITHMS | SYMMETRIC_ALGORITHMS))})")
    jwks_file = s.path_("jwks_file")
    jwks_url = s.string("jwks_url")
    secret_env = s.string("hs256_secret_env")
    sources = [x for x in (jwks_file, jwks_url, secret_env) if x is not None]
    if len(sources) != 1:
        raise ConfigError(f"{s.path}: set exactly one key source: jwks_file, jwks_url or hs256_secret_env")
    if jwks_url is not None and not _secure_url(jwks_url):
        raise ConfigError(f"{s._p('jwks_url')}: must be an https URL (plain http only for loopback)")
    symmetric = [a for a in algorithms if a in SYMMETRIC_ALGORITHMS]
    if secret_env is not None and len(symmetric) != len(algorithms):
        raise ConfigError(f"{s._p('algorithms')}: an HS256 secret only verifies HS* algorithms")
    if secret_env is None and symmetric:
        raise ConfigError(f"{s._p('algorithms')}: HS* algorithms need hs256_secret_env; never mix them with "
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
        leeway_seconds=s.number("leeway_seconds", 30.0),
        jwks_cache_seconds=s.number("jwks_cache_seconds", 300.0),
        jwks_timeout_seconds=s.number("jwks_timeout_seconds", 5.0, minimum=0.1),
        jwks_min_refresh_seconds=s.number("jwks_min_refresh_seconds", 10.0),
        claims=claims,
        default_db_role=s.string("default_db_role"),
        dev_signing_key_file=s.path_("dev_signing_key_file", must_exist=False),
    )
    s.done()
    return ident


def _upstream(s: _Section) -> UpstreamConfig:
    creds = []
    for i, item in enumerate(s.items("credentials")):
        c = _Section(item, f"{s._p('credentials')}[{i}]", s.base_dir)
        cred = UpstreamCredential(role=c.req_str("role"), password_env=c.string("password_env"),
                                  password_file=c.path_("password_file"))
        c.done()
        if cred.password_env and cred.password_file:
            raise ConfigError(f"{c.path}: set password_env or password_file, not both")
        creds.append(cred)
    if not creds:
        raise ConfigError(f"{s._p('credentials')}: at least one upstream credential is required "
                          "(role: '*' matches any mapped role)")
    sslmode = s.string("sslmode", "disable") or "disable"
    if sslmode not in SSLMODES:
        raise ConfigError(f"{s._p('sslmode')}: must be one of {', '.join(SSLMODES)}")
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
        raise ConfigError(f"{s._p('sslrootcert')}: required with sslmode {sslmode}")
    return up


def parse_config(data: Any, base_dir: Path, source: Path | None = None) -> ProxyConfig:
    """Build a validated ProxyConfig from already-loaded YAML data."""
    root = _Section(data, "", base_dir)
    listeners = [_listener(_Section(item, f"listeners[{i}]", base_dir))
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
        max_startup_packet_bytes=lim.integer("max_startup_packet_bytes", LimitsConfig.max_startup_packet_bytes,
                                         minimum=64, maximum=1 << 20),
        startup_timeout_seconds=lim.number("startup_timeout_seconds", LimitsConfig.startup_timeout_seconds,
                                          minimum=0.1),
    )
    lim.done()
    aud = root.section("audit")
    audit = AuditConfig(jsonl_path=aud.path_("jsonl_path", must_exist=False))
    aud.done()
    root.done()
    return ProxyConfig(listeners=tuple(listeners), identity=identity, upstream=upstream, limits=limits,
                       audit=audit, source=source)


def load_config(path: str | os.PathLike[str] | None) -> ProxyConfig:
    """Load the config file at ``path`` (or ``$PGPROXY_CONFIG`` when None)."""
    if path is None:
        env = os.environ.get(CONFIG_ENV_VAR)
        if not env:
            raise ConfigError(f"no config file: pass -c FILE or set {CONFIG_ENV_VAR}")
        path = env
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML: {exc}") from None
    return parse_config(data, p.resolve().parent, source=p)

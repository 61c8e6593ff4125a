"""The ``http:`` config section: listener, targets (upstream, credential, limits, masks) and policy.

Parsed by ``pgproxy.config.parse_config`` with the same dotted-path errors as every other section
(``http.targets[0].credential.kind: ...``). Credentials are never in the file, only the environment
variable or file that holds them; they are read when the proxy starts.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

from ..config import ConfigError, ListenerConfig, Section, parse_listener, read_secret, secure_url
from .jsonmask import JsonPath, parse_path

if TYPE_CHECKING:
    from .policy import HttpPolicy

CREDENTIAL_KINDS = ("header", "bearer", "basic")
MASK_DIRECTIONS = ("request", "response")
_TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Credentials shorter than this are not searched for in responses (a 2-character secret would scrub
# innocent text); they are still injected and still kept out of the audit log.
MIN_SCRUB_CHARS = 6
T = TypeVar("T")


@dataclass(frozen=True)
class CredentialConfig:
    """What the proxy adds to each upstream request on the caller's behalf."""

    kind: str  # header | bearer | basic
    where: str  # dotted config path, for errors
    header: str = "Authorization"  # kind header: the header that carries the value
    username: str | None = None  # kind basic
    value_env: str | None = None
    value_file: Path | None = None

    def resolve(self) -> tuple[str, str, tuple[str, ...]]:
        """(header name, header value, strings that must never reach the caller or the log)."""
        value = read_secret(self.where, self.value_env, self.value_file)
        if not value:
            raise ConfigError(f"{self.where}: the credential is empty")
        if self.kind == "bearer":
            return "Authorization", f"Bearer {value}", (value,)
        if self.kind == "basic":
            encoded = base64.b64encode(f"{self.username}:{value}".encode()).decode("ascii")
            return "Authorization", f"Basic {encoded}", (value, encoded)
        return self.header, value, (value,)


@dataclass(frozen=True)
class MaskRule:
    """JSON field paths replaced by ``"[masked]"`` in the audit log (and, with ``caller``, in responses)."""

    paths: tuple[JsonPath, ...]
    request: bool = True
    response: bool = True
    caller: bool = False  # also mask the response body the caller receives


@dataclass(frozen=True)
class TargetConfig:
    """One upstream HTTP service, reached at ``/<name>/...`` on the HTTP listener."""

    name: str
    upstream: str  # base URL, no trailing slash
    credential: CredentialConfig | None = None
    connect_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 30.0  # longest pause between two reads from the upstream
    total_timeout_seconds: float = 300.0
    max_request_bytes: int = 10 * 1024 * 1024
    max_response_bytes: int = 100 * 1024 * 1024
    masks: tuple[MaskRule, ...] = ()
    sslrootcert: Path | None = None  # CA bundle for an https upstream with a private CA

    def mask_paths(self, direction: str, *, caller: bool = False) -> tuple[JsonPath, ...]:
        """The paths masked in ``direction`` (request/response), only the caller-facing ones if ``caller``."""
        return tuple(p for rule in self.masks
                     if getattr(rule, direction) and (rule.caller or not caller) for p in rule.paths)


@dataclass(frozen=True)
class HttpConfig:
    listen: ListenerConfig
    targets: tuple[TargetConfig, ...]
    policy: HttpPolicy
    audit_body_bytes: int = 64 * 1024  # body bytes kept in each audit record (the digest covers all)
    mask_max_bytes: int = 8 * 1024 * 1024  # responses masked for the caller are buffered up to this

    def target(self, name: str) -> TargetConfig | None:
        for target in self.targets:
            if target.name == name:
                return target
        return None


def _credential(s: Section) -> CredentialConfig:
    kind = s.req_str("kind")
    if kind not in CREDENTIAL_KINDS:
        raise ConfigError(f"{s.at('kind')}: must be one of {', '.join(CREDENTIAL_KINDS)}, got {kind!r}")
    cred = CredentialConfig(kind=kind, where=s.path, header=s.string("header", "Authorization") or "Authorization",
                            username=s.string("username"), value_env=s.string("value_env"),
                            value_file=s.path_("value_file"))
    s.done()
    if (cred.value_env is None) == (cred.value_file is None):
        raise ConfigError(f"{s.path}: set exactly one of value_env or value_file")
    if kind == "basic" and cred.username is None:
        raise ConfigError(f"{s.at('username')}: required with kind basic")
    if kind != "basic" and cred.username is not None:
        raise ConfigError(f"{s.at('username')}: only used with kind basic")
    if kind != "header" and "header" in s.data:
        raise ConfigError(f"{s.at('header')}: only used with kind header ({kind} uses Authorization)")
    if not _HEADER_NAME.fullmatch(cred.header):
        raise ConfigError(f"{s.at('header')}: not a valid header name: {cred.header!r}")
    return cred


def parse_mask(s: Section) -> MaskRule:
    """One mask rule (``paths``, ``in``, ``caller``); the gRPC section reads its rules with it too."""
    paths = []
    for i, text in enumerate(s.items("paths")):
        if not isinstance(text, str):
            raise ConfigError(f"{s.at('paths')}[{i}]: expected a string such as $.customer.email")
        try:
            paths.append(parse_path(text))
        except ValueError as exc:
            raise ConfigError(f"{s.at('paths')}[{i}]: {exc}") from None
    if not paths:
        raise ConfigError(f"{s.at('paths')}: required (JSON field paths, e.g. $.customer.email, items[*].ssn)")
    directions = s.items("in") or list(MASK_DIRECTIONS)
    for d in directions:
        if d not in MASK_DIRECTIONS:
            raise ConfigError(f"{s.at('in')}: must list request and/or response, got {d!r}")
    rule = MaskRule(tuple(paths), request="request" in directions, response="response" in directions,
                    caller=s.boolean("caller", False))
    s.done()
    if rule.caller and not rule.response:
        raise ConfigError(f"{s.at('caller')}: only applies to responses (add response to `in`)")
    return rule


def _target(s: Section, names: set[str]) -> TargetConfig:
    name = s.req_str("name")
    if not _TARGET_NAME.fullmatch(name):
        raise ConfigError(f"{s.at('name')}: letters, digits, '.', '_' and '-' only (it is a URL path segment)")
    if name in names:
        raise ConfigError(f"{s.at('name')}: duplicate target name {name!r}")
    names.add(name)
    upstream = s.req_str("upstream").rstrip("/")
    parts = urlsplit(upstream)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ConfigError(f"{s.at('upstream')}: expected a base URL such as https://api.example.com/v1")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{s.at('upstream')}: no credentials in the URL (use credential: with value_env)")
    credential = _credential(s.section("credential")) if s.raw("credential") is not None else None
    if credential is not None and not secure_url(upstream):
        raise ConfigError(f"{s.at('upstream')}: must be https when a credential is injected (plain http only "
                          "for loopback)")
    masks = tuple(parse_mask(Section(item, f"{s.at('masks')}[{i}]", s.base_dir))
                  for i, item in enumerate(s.items("masks")))
    target = TargetConfig(
        name=name, upstream=upstream, credential=credential,
        connect_timeout_seconds=s.number("connect_timeout_seconds", 5.0, minimum=0.01),
        read_timeout_seconds=s.number("read_timeout_seconds", 30.0, minimum=0.01),
        total_timeout_seconds=s.number("total_timeout_seconds", 300.0, minimum=0.01),
        max_request_bytes=s.integer("max_request_bytes", TargetConfig.max_request_bytes, minimum=0),
        max_response_bytes=s.integer("max_response_bytes", TargetConfig.max_response_bytes, minimum=0),
        masks=masks, sslrootcert=s.path_("sslrootcert"))
    s.done()
    if target.sslrootcert is not None and parts.scheme != "https":
        raise ConfigError(f"{s.at('sslrootcert')}: only used with an https upstream")
    return target


def parse_companion(s: Section, proxy: str,
                    parse_target: Callable[[Section, set[str]], T]) -> tuple[ListenerConfig, tuple[T, ...], set[str]]:
    """The ``listen`` and ``targets`` of a companion proxy's section, and the target names."""
    listen_section = s.section("listen")
    if listen_section.raw("port") is None:
        raise ConfigError(f"{listen_section.at('port')}: required (the {proxy} proxy's port; 0 picks a free one)")
    listen = parse_listener(listen_section)
    names: set[str] = set()
    targets = tuple(parse_target(Section(item, f"{s.at('targets')}[{i}]", s.base_dir), names)
                    for i, item in enumerate(s.items("targets")))
    if not targets:
        raise ConfigError(f"{s.at('targets')}: at least one target is required")
    return listen, targets, names


def parse_http(s: Section) -> HttpConfig:
    """The validated ``http`` section (``s`` is the section at path ``http``)."""
    from .policy import parse_http_policy

    listen, targets, names = parse_companion(s, "HTTP", _target)
    policy = parse_http_policy(s, names)
    http = HttpConfig(listen=listen, targets=targets, policy=policy,
                      audit_body_bytes=s.integer("audit_body_bytes", 64 * 1024, maximum=16 * 1024 * 1024),
                      mask_max_bytes=s.integer("mask_max_bytes", 8 * 1024 * 1024, minimum=1024))
    s.done()
    return http


def check_http(http: HttpConfig) -> list[str]:
    """What `pgproxy serve` would refuse at start: unreadable credentials or TLS files (for `pgproxy check`)."""
    from ..tlsutil import server_context

    problems = []
    for target in http.targets:
        if target.credential is not None:
            try:
                target.credential.resolve()
            except ConfigError as exc:
                problems.append(str(exc))
    if http.listen.tls is not None:
        try:
            server_context(http.listen.tls.cert_file, http.listen.tls.key_file)
        except (OSError, ValueError) as exc:
            problems.append(f"http.listen.tls: cannot load certificate/key: {exc}")
    return problems

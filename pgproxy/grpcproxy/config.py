"""The ``grpc:`` config section: listener, targets (upstream, TLS, credential, descriptors, masks) and policy.

Parsed by ``pgproxy.config.parse_config`` with the same dotted-path errors as every other section
(``grpc.targets[0].credential.kind: ...``). Secrets (the credential, the client key) are never in the
file: only the environment variable or file that holds them, read when the proxy starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ConfigError, ListenerConfig, Section, is_loopback_host, read_secret
from ..http.config import MIN_SCRUB_CHARS, MaskRule, parse_companion, parse_mask
from ..http.jsonmask import JsonPath

if TYPE_CHECKING:
    from .descriptors import Method
    from .policy import GrpcPolicy

__all__ = ["MIN_SCRUB_CHARS", "CredentialConfig", "GrpcConfig", "TargetConfig", "check_grpc", "parse_grpc"]

CREDENTIAL_KINDS = ("bearer", "metadata")
UNDECODABLE = ("refuse", "digest")
_TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")
_UPSTREAM = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})")


@dataclass(frozen=True)
class CredentialConfig:
    """The metadata the proxy adds to each upstream call on the caller's behalf."""

    kind: str  # bearer | metadata
    where: str  # dotted config path, for errors
    key: str = "authorization"
    value_env: str | None = None
    value_file: Path | None = None

    def resolve(self) -> tuple[str, str, str]:
        """(metadata key, metadata value, the secret that must never reach the caller or the log)."""
        value = read_secret(self.where, self.value_env, self.value_file)
        if not value:
            raise ConfigError(f"{self.where}: the credential is empty")
        if self.kind == "bearer":
            return "authorization", f"Bearer {value}", value
        return self.key, value, value


@dataclass(frozen=True)
class UpstreamTLS:
    """TLS to the upstream; ``cert_file``/``key_file`` is the proxy's client certificate (mTLS)."""

    ca_file: Path | None = None  # default: the system's CAs
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None  # expected name in the upstream's certificate, if not its host

    def load(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """(root certificates, client key, client certificate chain) as PEM bytes."""
        def read(path: Path | None) -> bytes | None:
            if path is None:
                return None
            try:
                return path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        return read(self.ca_file), read(self.key_file), read(self.cert_file)


@dataclass(frozen=True)
class GrpcMaskRule:
    """An HTTP-style mask rule (field paths, directions, caller) limited to some message types."""

    rule: MaskRule
    messages: tuple[str, ...] = ()  # full message type names (globs); empty: every message

    def applies(self, message_type: str) -> bool:
        return not self.messages or any(fnmatchcase(message_type, m) for m in self.messages)


@dataclass(frozen=True)
class TargetConfig:
    """One upstream gRPC server; calls to a method of one of its ``services`` go there."""

    name: str
    upstream: str  # host:port
    services: tuple[str, ...]  # globs on the full service name, e.g. shop.v1.Orders or shop.v1.*
    tls: UpstreamTLS | None = None
    credential: CredentialConfig | None = None
    descriptor_file: Path | None = None  # a FileDescriptorSet (protoc --descriptor_set_out --include_imports)
    reflection: bool = False  # else ask the upstream's server reflection service for the descriptors
    undecodable: str = "refuse"  # refuse | digest: messages the descriptors cannot decode
    timeout_seconds: float = 300.0  # the longest call; the caller's deadline applies when shorter
    max_message_bytes: int = 4 * 1024 * 1024
    masks: tuple[GrpcMaskRule, ...] = ()

    def load_descriptors(self) -> dict[str, Method]:
        """The method table of ``descriptor_file`` (ConfigError if it cannot be read)."""
        from .descriptors import DescriptorError, load_descriptor_set

        assert self.descriptor_file is not None
        try:
            return load_descriptor_set(self.descriptor_file.read_bytes())
        except (DescriptorError, OSError) as exc:
            raise ConfigError(f"grpc target {self.name}: descriptors {self.descriptor_file}: {exc}") from None

    def serves(self, service: str) -> bool:
        return any(fnmatchcase(service, pattern) for pattern in self.services)

    def mask_paths(self, message_type: str, direction: str, *, caller: bool = False) -> tuple[JsonPath, ...]:
        """The paths masked in messages of ``message_type`` sent in ``direction`` (request/response)."""
        return tuple(p for m in self.masks if m.applies(message_type) and getattr(m.rule, direction)
                     and (m.rule.caller or not caller) for p in m.rule.paths)


@dataclass(frozen=True)
class GrpcConfig:
    listen: ListenerConfig
    targets: tuple[TargetConfig, ...]
    policy: GrpcPolicy
    audit_messages: int = 32  # messages per direction kept in each audit record (digests cover all)
    audit_message_bytes: int = 64 * 1024  # larger messages are recorded by size and digest only

    def route(self, service: str) -> TargetConfig | None:
        for target in self.targets:
            if target.serves(service):
                return target
        return None


def _credential(s: Section) -> CredentialConfig:
    kind = s.req_str("kind")
    if kind not in CREDENTIAL_KINDS:
        raise ConfigError(f"{s.at('kind')}: must be one of {', '.join(CREDENTIAL_KINDS)}, got {kind!r}")
    cred = CredentialConfig(kind=kind, where=s.path, key=s.string("key", "authorization") or "authorization",
                            value_env=s.string("value_env"), value_file=s.path_("value_file"))
    s.done()
    if (cred.value_env is None) == (cred.value_file is None):
        raise ConfigError(f"{s.path}: set exactly one of value_env or value_file")
    if kind == "bearer" and "key" in s.data:
        raise ConfigError(f"{s.at('key')}: only used with kind metadata (bearer uses authorization)")
    if kind == "metadata" and "key" not in s.data:
        raise ConfigError(f"{s.at('key')}: required with kind metadata (e.g. x-api-key)")
    if not _METADATA_KEY.fullmatch(cred.key) or cred.key.startswith("grpc-") or cred.key.endswith("-bin"):
        raise ConfigError(f"{s.at('key')}: a lower-case ASCII metadata key, not grpc-* or *-bin, got {cred.key!r}")
    return cred


def _tls(s: Section) -> UpstreamTLS:
    tls = UpstreamTLS(ca_file=s.path_("ca_file"), cert_file=s.path_("cert_file"), key_file=s.path_("key_file"),
                      server_name=s.string("server_name"))
    s.done()
    if (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError(f"{s.path}: cert_file and key_file go together (the proxy's client certificate)")
    return tls


def _mask(s: Section) -> GrpcMaskRule:
    messages = s.items("messages")
    if not all(isinstance(m, str) and m for m in messages):
        raise ConfigError(f"{s.at('messages')}: expected a list of message type names such as shop.v1.Order")
    rest = Section({k: v for k, v in s.data.items() if k != "messages"}, s.path, s.base_dir)
    return GrpcMaskRule(parse_mask(rest), tuple(messages))


def _target(s: Section, names: set[str]) -> TargetConfig:
    name = s.req_str("name")
    if not _TARGET_NAME.fullmatch(name):
        raise ConfigError(f"{s.at('name')}: letters, digits, '.', '_' and '-' only")
    if name in names:
        raise ConfigError(f"{s.at('name')}: duplicate target name {name!r}")
    names.add(name)
    upstream = s.req_str("upstream")
    m = _UPSTREAM.fullmatch(upstream)
    if m is None or not 0 < int(m["port"]) < 65536:
        raise ConfigError(f"{s.at('upstream')}: expected host:port such as orders.internal:443 or [::1]:50051")
    services = s.items("services")
    if not services or not all(isinstance(v, str) and v for v in services):
        raise ConfigError(f"{s.at('services')}: required, a list of service names or globs (shop.v1.Orders, shop.*)")
    tls = _tls(s.section("tls")) if s.raw("tls") is not None else None
    credential = _credential(s.section("credential")) if s.raw("credential") is not None else None
    descriptors = s.section("descriptors")
    descriptor_file = descriptors.path_("file")
    reflection = descriptors.boolean("reflection", False)
    descriptors.done()
    if descriptor_file is not None and reflection:
        raise ConfigError(f"{descriptors.path}: set file or reflection: true, not both")
    undecodable = s.string("undecodable", "refuse") or "refuse"
    if undecodable not in UNDECODABLE:
        raise ConfigError(f"{s.at('undecodable')}: must be refuse or digest, got {undecodable!r}")
    masks = tuple(_mask(Section(item, f"{s.at('masks')}[{i}]", s.base_dir)) for i, item in enumerate(s.items("masks")))
    target = TargetConfig(
        name=name, upstream=upstream, services=tuple(services), tls=tls, credential=credential,
        descriptor_file=descriptor_file, reflection=reflection, undecodable=undecodable,
        timeout_seconds=s.number("timeout_seconds", 300.0, minimum=0.01),
        max_message_bytes=s.integer("max_message_bytes", TargetConfig.max_message_bytes, minimum=1024,
                                    maximum=1 << 30),
        masks=masks)
    s.done()
    host = m["host"].strip("[]")
    if tls is None and (credential is not None) and not is_loopback_host(host):
        raise ConfigError(f"{s.at('tls')}: required when a credential is injected (plaintext only to loopback)")
    if masks and descriptor_file is None and not reflection:
        raise ConfigError(f"{s.at('descriptors')}: masks need descriptors (file: or reflection: true)")
    return target


def parse_grpc(s: Section) -> GrpcConfig:
    """The validated ``grpc`` section (``s`` is the section at path ``grpc``)."""
    from .policy import parse_grpc_policy

    listen, targets, names = parse_companion(s, "gRPC", _target)
    policy = parse_grpc_policy(s, names)
    config = GrpcConfig(listen=listen, targets=targets, policy=policy,
                        audit_messages=s.integer("audit_messages", 32, maximum=10_000),
                        audit_message_bytes=s.integer("audit_message_bytes", 64 * 1024, maximum=16 * 1024 * 1024))
    s.done()
    return config


def check_grpc(config: GrpcConfig) -> list[str]:
    """What `pgproxy serve` would refuse at start: unreadable credentials or TLS files (for `pgproxy check`)."""
    from ..tlsutil import server_context

    problems = []
    for i, target in enumerate(config.targets):
        try:
            if target.credential is not None:
                target.credential.resolve()
            if target.tls is not None:
                target.tls.load()
            if target.descriptor_file is not None:
                target.load_descriptors()
        except ConfigError as exc:
            problems.append(f"grpc.targets[{i}]: {exc}" if not str(exc).startswith("grpc.") else str(exc))
    if config.listen.tls is not None:
        try:
            server_context(config.listen.tls.cert_file, config.listen.tls.key_file)
        except (OSError, ValueError) as exc:
            problems.append(f"grpc.listen.tls: cannot load certificate/key: {exc}")
    return problems

"""The ``grpc:`` config section: listener, targets (upstream, TLS, credential, descriptors, masks) and policy.

Part of the config schema (`pgproxy.config`), with the same field-path errors as every other section
(``grpc.targets[0].credential.kind: ...``). Secrets (the credential, the client key) are never in the
file: only the environment variable or file that holds them, read when the proxy starts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, PrivateAttr

from ..config import ConfigError, is_loopback_host, read_secret
from ..http.config import MIN_SCRUB_CHARS, Companion, MaskRule
from ..http.jsonmask import JsonPath
from ..schema import Between, ExistingFile, Flag, Int, Matches, NonEmpty, Number, Problem, Schema, Text
from ..sections import Section

if TYPE_CHECKING:
    from .descriptors import Method
    from .policy import GrpcPolicy

__all__ = ["MIN_SCRUB_CHARS", "CredentialConfig", "GrpcConfig", "TargetConfig", "check_grpc"]

_UPSTREAM = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})")
MetadataKey = Annotated[str, Matches(r"(?!grpc-)[0-9a-z_.-]+(?<!-bin)",
                                     "a lower-case ASCII metadata key, not grpc-* or *-bin",
                                     "a lower-case ASCII metadata key, not `grpc-*` or `*-bin`")]


def _host_port(value: str) -> str:
    m = _UPSTREAM.fullmatch(value)
    if m is None or not 0 < int(m["port"]) < 65536:
        raise ValueError("expected host:port such as orders.internal:443 or [::1]:50051")
    return value


class CredentialConfig(Schema):
    """The metadata the proxy adds to each upstream call: exactly one of `value_env`, `value_file`."""

    kind: Literal["bearer", "metadata"]
    """`bearer` (`authorization: Bearer <value>`) or `metadata` (`<key>: <value>`)."""
    key: MetadataKey = "authorization"
    """Required with `kind: metadata`, not allowed with `bearer`, e.g. `x-api-key`."""
    value_env: Text | None = None
    """Environment variable holding the secret."""
    value_file: ExistingFile | None = None
    """File holding the secret (a trailing newline is dropped). Set exactly one of `value_env` and
    `value_file`."""
    _where: str = PrivateAttr(default="credential")  # its field path, for errors when it is read

    def resolve(self) -> tuple[str, str, str]:
        """(metadata key, metadata value, the secret that must never reach the caller or the log)."""
        value = read_secret(self._where, self.value_env, self.value_file)
        if not value:
            raise ConfigError(f"{self._where}: the credential is empty")
        if self.kind == "bearer":
            return "authorization", f"Bearer {value}", value
        return self.key, value, value

    def problems(self) -> Iterator[Problem]:
        if (self.value_env is None) == (self.value_file is None):
            yield ("", "set exactly one of value_env or value_file")
        if self.kind == "bearer" and "key" in self.model_fields_set:
            yield ("key", "only used with kind metadata (bearer uses authorization)")
        if self.kind == "metadata" and "key" not in self.model_fields_set:
            yield ("key", "required with kind metadata (e.g. x-api-key)")


class UpstreamTLS(Schema):
    """TLS to the upstream; ``cert_file``/``key_file`` is the proxy's client certificate (mTLS)."""

    ca_file: ExistingFile | None = Field(None, json_schema_extra={"doc_default": "the system's CAs"})
    """CA bundle to verify the upstream's certificate."""
    cert_file: ExistingFile | None = None
    """The proxy's client certificate (mTLS); set both `cert_file` and `key_file` or neither. The caller
    never has them."""
    key_file: ExistingFile | None = None
    """The proxy's client key (mTLS)."""
    server_name: Text | None = Field(None, json_schema_extra={"doc_default": "the upstream host"})
    """The name expected in the upstream's certificate, when it differs from the host."""

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

    def problems(self) -> Iterator[Problem]:
        if (self.cert_file is None) != (self.key_file is None):
            yield ("", "cert_file and key_file go together (the proxy's client certificate)")


class Descriptors(Schema):
    """Where the message types come from: a file or the upstream's server reflection, not both."""

    file: ExistingFile | None = None
    """A FileDescriptorSet (`protoc --descriptor_set_out --include_imports`), read when `pgproxy serve` starts:
    an unreadable or invalid file stops the start, and `pgproxy check` reports it."""
    reflection: Flag = False
    """Ask the upstream's server reflection service for the descriptors, once, on the first call."""

    def problems(self) -> Iterator[Problem]:
        if self.file is not None and self.reflection:
            yield ("", "set file or reflection: true, not both")


class GrpcMaskRule(MaskRule):
    """An HTTP-style mask rule (field paths, directions, caller) limited to some message types."""

    messages: tuple[Text, ...] = ()
    """Full message type names (globs) the rule applies to, e.g. `shop.v1.Order`; empty: every message."""

    def applies(self, message_type: str) -> bool:
        return not self.messages or any(fnmatchcase(message_type, m) for m in self.messages)


class TargetConfig(Schema):
    """One upstream gRPC server; calls to a method of one of its ``services`` go there."""

    name: Annotated[str, Matches(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", "letters, digits, '.', '_' and '-' only")]
    """Unique; names the target in rules and audit records."""
    upstream: Annotated[Text, AfterValidator(_host_port)]
    """`host:port`, e.g. `orders.internal:443` (`[::1]:50051` for IPv6)."""
    services: Annotated[tuple[Text, ...], NonEmpty(
        "required, a list of service names or globs (shop.v1.Orders, shop.*)")]
    """Full service names or globs: `shop.v1.Orders`, `shop.*`."""
    tls: UpstreamTLS | None = None
    """TLS to the upstream. Without it the channel is plaintext, which with a `credential` is only allowed to a
    loopback host."""
    credential: CredentialConfig | None = None
    """Metadata the proxy adds to every call."""
    descriptors: Descriptors = Field(default_factory=Descriptors)
    """Where the message types come from; required with `masks`."""
    undecodable: Literal["refuse", "digest"] = "refuse"
    """What happens to messages the descriptors cannot decode (see [decoding](grpc.md#decoding))."""
    timeout_seconds: Annotated[Number, Between(0.01)] = 300.0
    """The longest call; a caller's shorter deadline applies as it is."""
    max_message_bytes: Annotated[Int, Between(1024, 1 << 30)] = 4 * 1024 * 1024
    """Largest message in either direction."""
    masks: tuple[GrpcMaskRule, ...] = ()
    """[Masking rules](grpc.md#masking): message fields masked in the audit log (and for the caller)."""

    @property
    def descriptor_file(self) -> Path | None:
        return self.descriptors.file

    @property
    def reflection(self) -> bool:
        return self.descriptors.reflection

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
        return tuple(p for m in self.masks if m.applies(message_type) and getattr(m, direction)
                     and (m.caller or not caller) for p in m.paths)

    def problems(self) -> Iterator[Problem]:
        host = self.upstream.rpartition(":")[0].strip("[]")
        if self.tls is None and self.credential is not None and not is_loopback_host(host):
            yield ("tls", "required when a credential is injected (plaintext only to loopback)")
        if self.masks and self.descriptor_file is None and not self.reflection:
            yield ("descriptors", "masks need descriptors (file: or reflection: true)")


class GrpcConfig(Companion):
    """The gRPC companion proxy (docs/grpc.md)."""

    proxy: ClassVar[str] = "gRPC"
    targets: Annotated[tuple[TargetConfig, ...], NonEmpty("at least one target is required")]
    """The upstream gRPC servers."""
    audit_messages: Annotated[Int, Between(0, 10_000)] = 32
    """Messages of each direction kept in each audit record; the digest covers all of them."""
    audit_message_bytes: Annotated[Int, Between(0, 16 * 1024 * 1024)] = 64 * 1024
    """Larger messages are recorded by size and digest only."""

    @property
    def policy(self) -> GrpcPolicy:
        return self._policy  # type: ignore[no-any-return]  # set by the validator

    def named_targets(self) -> Sequence[TargetConfig]:
        return self.targets

    def parse_policy(self, section: Section, names: set[str]) -> GrpcPolicy:
        from .policy import parse_grpc_policy

        return parse_grpc_policy(section, names)

    def route(self, service: str) -> TargetConfig | None:
        for target in self.targets:
            if target.serves(service):
                return target
        return None


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

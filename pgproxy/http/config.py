"""The ``http:`` config section: listener, targets (upstream, credential, limits, masks) and policy.

Part of the config schema (`pgproxy.config`), with the same field-path errors as every other section
(``http.targets[0].credential.kind: ...``). Credentials are never in the file, only the environment
variable or file that holds them; they are read when the proxy starts. `Companion` is the part the
HTTP and gRPC sections share: the listener, the targets' names, and the rules read by the policy parser.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Protocol
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, PlainValidator, PrivateAttr

from ..config import ConfigError, ListenerConfig, read_secret, secure_url
from ..schema import Between, ExistingFile, Flag, Int, Matches, NonEmpty, Number, Problem, Schema, Text
from ..sections import Section
from .jsonmask import JsonPath, parse_path

if TYPE_CHECKING:
    from .policy import HttpPolicy

# Credentials shorter than this are not searched for in responses (a 2-character secret would scrub
# innocent text); they are still injected and still kept out of the audit log.
MIN_SCRUB_CHARS = 6
TargetName = Annotated[str, Matches(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}",
                                    "letters, digits, '.', '_' and '-' only (it is a URL path segment)")]
HeaderName = Annotated[str, Matches(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", "not a valid header name",
                                    "a valid HTTP header name")]
Timeout = Annotated[Number, Between(0.01)]


def _json_path(value: Any) -> JsonPath:
    if isinstance(value, JsonPath):
        return value
    if not isinstance(value, str):
        raise ValueError("expected a string such as $.customer.email")
    return parse_path(value)


JsonPathField = Annotated[JsonPath, PlainValidator(_json_path)]


class CredentialConfig(Schema):
    """What the proxy adds to each upstream request on the caller's behalf: exactly one of `value_env`, `value_file`."""

    kind: Literal["header", "bearer", "basic"]
    """`bearer` (`Authorization: Bearer <value>`), `basic` (`Authorization: Basic base64(username:value)`), or
    `header` (`<header>: <value>`)."""
    header: HeaderName = "Authorization"
    """`kind: header` only: the header name, e.g. `X-Api-Key`."""
    username: Text | None = None
    """Required with `kind: basic`, not allowed otherwise."""
    value_env: Text | None = None
    """Environment variable holding the secret."""
    value_file: ExistingFile | None = None
    """File holding the secret (a trailing newline is dropped). Set exactly one of `value_env` and
    `value_file`."""
    _where: str = PrivateAttr(default="credential")  # its field path, for errors when it is read

    def resolve(self) -> tuple[str, str, tuple[str, ...]]:
        """(header name, header value, strings that must never reach the caller or the log)."""
        value = read_secret(self._where, self.value_env, self.value_file)
        if not value:
            raise ConfigError(f"{self._where}: the credential is empty")
        if self.kind == "bearer":
            return "Authorization", f"Bearer {value}", (value,)
        if self.kind == "basic":
            encoded = base64.b64encode(f"{self.username}:{value}".encode()).decode("ascii")
            return "Authorization", f"Basic {encoded}", (value, encoded)
        return self.header, value, (value,)

    def problems(self) -> Iterator[Problem]:
        if (self.value_env is None) == (self.value_file is None):
            yield ("", "set exactly one of value_env or value_file")
        if self.kind == "basic" and self.username is None:
            yield ("username", "required with kind basic")
        if self.kind != "basic" and self.username is not None:
            yield ("username", "only used with kind basic")
        if self.kind != "header" and "header" in self.model_fields_set:
            yield ("header", f"only used with kind header ({self.kind} uses Authorization)")


class MaskRule(Schema):
    """JSON field paths replaced by ``"[masked]"`` in the audit log (and, with ``caller``, in responses)."""

    paths: Annotated[tuple[JsonPathField, ...], NonEmpty(
        "required (JSON field paths, e.g. $.customer.email, items[*].ssn)")]
    """JSON field paths such as `$.customer.email` or `items[*].ssn` ([syntax](http.md#masking))."""
    in_: Annotated[tuple[Literal["request", "response"], ...], NonEmpty("must list request and/or response")] = Field(
        ("request", "response"), alias="in")
    """Which bodies (or messages) the rule applies to."""
    caller: Flag = False
    """Also mask the response the caller receives (needs `response` in `in`)."""

    @property
    def request(self) -> bool:
        return "request" in self.in_

    @property
    def response(self) -> bool:
        return "response" in self.in_

    def problems(self) -> Iterator[Problem]:
        if self.caller and not self.response:
            yield ("caller", "only applies to responses (add response to `in`)")


class TargetConfig(Schema):
    """One upstream HTTP service, reached at ``/<name>/...`` on the HTTP listener."""

    name: TargetName
    """Unique; it is the first path segment callers use."""
    upstream: Annotated[Text, AfterValidator(lambda url: url.rstrip("/"))]
    """Base URL such as `https://api.example.com/v1`: `http://` or `https://`, no user or password, no query.
    With a `credential`, it must be `https://` (plain `http://` only to a loopback host)."""
    credential: CredentialConfig | None = None
    """What the proxy adds to every request."""
    connect_timeout_seconds: Timeout = 5.0
    """Connecting to the upstream."""
    read_timeout_seconds: Timeout = 30.0
    """Longest wait for the next bytes from the upstream."""
    total_timeout_seconds: Timeout = 300.0
    """Whole exchange with the upstream."""
    max_request_bytes: Annotated[Int, Between(0)] = 10 * 1024 * 1024
    """Larger request bodies get 413."""
    max_response_bytes: Annotated[Int, Between(0)] = 100 * 1024 * 1024
    """Larger responses get 502 (or are cut, see [errors](http.md#errors))."""
    masks: tuple[MaskRule, ...] = ()
    """[Masking rules](http.md#masking): JSON fields masked in the audit log (and for the caller)."""
    sslrootcert: ExistingFile | None = None
    """CA bundle for an `https` upstream with a private CA (default: the system's CAs)."""

    def mask_paths(self, direction: str, *, caller: bool = False) -> tuple[JsonPath, ...]:
        """The paths masked in ``direction`` (request/response), only the caller-facing ones if ``caller``."""
        return tuple(p for rule in self.masks
                     if getattr(rule, direction) and (rule.caller or not caller) for p in rule.paths)

    def problems(self) -> Iterator[Problem]:
        parts = urlsplit(self.upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            yield ("upstream", "expected a base URL such as https://api.example.com/v1")
        elif parts.username is not None or parts.password is not None:
            yield ("upstream", "no credentials in the URL (use credential: with value_env)")
        elif self.credential is not None and not secure_url(self.upstream):
            yield ("upstream", "must be https when a credential is injected (plain http only for loopback)")
        if self.sslrootcert is not None and parts.scheme != "https":
            yield ("sslrootcert", "only used with an https upstream")


class _Named(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def credential(self) -> Any: ...


class Companion(Schema):
    """What the HTTP and gRPC sections share: a listener whose port must be set, named targets, rules."""

    proxy: ClassVar[str]
    listen: ListenerConfig
    """`port` is required (`0` picks a free one). Same rules as [`listeners`](configuration.md#listeners): `tls`,
    or `insecure_plaintext: true` only on a loopback host (tokens are sent with every request)."""
    rules: tuple[dict[str, Any], ...] = ()
    """The policy: ordered rules, the first match decides; each a `match` plus the action keys of the SQL policy
    ([HTTP rules](http.md#policy), [gRPC rules](grpc.md#policy))."""
    default: Literal["allow", "deny"] = "deny"
    """What happens to requests (calls) no rule matches."""
    _policy: Any = PrivateAttr(default=None)  # built from the rules by the validator

    def named_targets(self) -> Sequence[_Named]:
        raise NotImplementedError

    def parse_policy(self, section: Section, names: set[str]) -> object:
        raise NotImplementedError

    def problems(self) -> Iterator[Problem]:
        """The companion rules; also builds the policy and names each credential by its field path."""
        if "port" not in self.listen.model_fields_set:
            yield ("listen.port", f"required (the {self.proxy} proxy's port; 0 picks a free one)")
        names: set[str] = set()
        for i, target in enumerate(self.named_targets()):
            if target.name in names:
                yield (f"targets[{i}].name", f"duplicate target name {target.name!r}")
            names.add(target.name)
            if target.credential is not None:
                target.credential._where = f"{self.proxy.lower()}.targets[{i}].credential"
        rules = Section({"rules": list(self.rules), "default": self.default}, "")
        try:
            self._policy = self.parse_policy(rules, names)
        except ConfigError as exc:
            field, _, message = str(exc).partition(": ")
            yield (field, message)


class HttpConfig(Companion):
    """The HTTP companion proxy (docs/http.md)."""

    proxy: ClassVar[str] = "HTTP"
    targets: Annotated[tuple[TargetConfig, ...], NonEmpty("at least one target is required")]
    """The upstream HTTP services."""
    audit_body_bytes: Annotated[Int, Between(0, 16 * 1024 * 1024)] = 64 * 1024
    """Body bytes kept in each audit record; the digest covers the whole body."""
    mask_max_bytes: Annotated[Int, Between(1024)] = 8 * 1024 * 1024
    """Largest JSON response that can be masked for the caller (it is buffered)."""

    @property
    def policy(self) -> HttpPolicy:
        return self._policy  # type: ignore[no-any-return]  # set by the validator

    def named_targets(self) -> Sequence[TargetConfig]:
        return self.targets

    def parse_policy(self, section: Section, names: set[str]) -> HttpPolicy:
        from .policy import parse_http_policy

        return parse_http_policy(section, names)

    def target(self, name: str) -> TargetConfig | None:
        for target in self.targets:
            if target.name == name:
                return target
        return None


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

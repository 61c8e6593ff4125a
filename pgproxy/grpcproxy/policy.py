"""The gRPC policy: ordered rules on target, service and method (plus who calls), first match decides.

    grpc:
      rules:
        - name: refunds-need-approval
          match: {services: [shop.v1.Orders], methods: ["Refund*"]}
          action: approve          # allow | deny | approve: the same keys as SQL policy rules
          approvers: [finance]
      default: allow

``match`` keys (all optional; any value of a list matches, all keys must): ``targets``, ``services``
(globs on the full service name, ``shop.v1.*``), ``methods`` (globs on the method name), ``subjects``,
``groups``, ``agent_ids``. The action keys are parsed by the SQL policy's own rule parser, as on the
HTTP side. Without ``default`` nothing unmatched passes (deny).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from ..config import ConfigError
from ..http.policy import CALLER_KEYS, CallerMatch, caller_match, match_lists, parse_rules
from ..identity import Identity
from ..policy.rules import Decision, Rule
from ..sections import Section

MATCH_KEYS = ("targets", "services", "methods", *CALLER_KEYS)


@dataclass(frozen=True)
class GrpcMatch(CallerMatch):
    targets: frozenset[str] | None = None
    services: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None

    def matches(self, identity: Identity, target: str, service: str, method: str) -> bool:
        return ((self.targets is None or target in self.targets)
                and (self.services is None or any(fnmatchcase(service, p) for p in self.services))
                and (self.methods is None or any(fnmatchcase(method, p) for p in self.methods))
                and self.caller_matches(identity))


@dataclass(frozen=True)
class GrpcRule:
    match: GrpcMatch
    rule: Rule  # name, action, message, approval requirement


@dataclass(frozen=True)
class GrpcPolicy:
    rules: tuple[GrpcRule, ...] = ()
    default: Literal["allow", "deny"] = "deny"

    def decide(self, identity: Identity, target: str, service: str, method: str) -> Decision:
        for r in self.rules:
            if r.match.matches(identity, target, service, method):
                reason = f"/{service}/{method} on {target}"
                return Decision(r.rule.action, r.rule.name, r.rule.message, r.rule.approval, (reason,))
        message = None if self.default == "allow" else "no rule allows this call"
        return Decision(self.default, "default", message, None, ())


def _match(s: Section, target_names: set[str]) -> GrpcMatch:
    values = match_lists(s, MATCH_KEYS, target_names)
    for m in values.get("methods", []):
        if "/" in m:
            raise ConfigError(f"{s.at('methods')}: {m!r}: method names only (put the service in `services`)")
    return GrpcMatch(targets=frozenset(values["targets"]) if "targets" in values else None,
                     services=tuple(values["services"]) if "services" in values else None,
                     methods=tuple(values["methods"]) if "methods" in values else None, **caller_match(values))


def parse_grpc_policy(section: Section, target_names: set[str]) -> GrpcPolicy:
    """Read ``rules`` and ``default`` of the ``grpc`` section (the HTTP policy's rule reader)."""
    rules, default = parse_rules(section, lambda s: _match(s, target_names), "call")
    return GrpcPolicy(tuple(GrpcRule(match, rule) for match, rule in rules), default)

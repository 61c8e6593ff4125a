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

from ..config import ConfigError, Section
from ..identity import Identity
from ..policy.rules import Decision, Rule, parse_rule

MATCH_KEYS = ("targets", "services", "methods", "subjects", "groups", "agent_ids")


@dataclass(frozen=True)
class GrpcMatch:
    targets: frozenset[str] | None = None
    services: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    subjects: frozenset[str] | None = None
    groups: frozenset[str] | None = None
    agent_ids: frozenset[str] | None = None

    def matches(self, identity: Identity, target: str, service: str, method: str) -> bool:
        return ((self.targets is None or target in self.targets)
                and (self.services is None or any(fnmatchcase(service, p) for p in self.services))
                and (self.methods is None or any(fnmatchcase(method, p) for p in self.methods))
                and (self.subjects is None or identity.subject in self.subjects)
                and (self.groups is None or not self.groups.isdisjoint(identity.groups))
                and (self.agent_ids is None or identity.agent_id in self.agent_ids))


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
    values: dict[str, list[str]] = {}
    for key in MATCH_KEYS:
        if s.raw(key) is None:
            continue
        items = s.items(key)
        if not items or not all(isinstance(v, str) and v for v in items):
            raise ConfigError(f"{s.at(key)}: expected a non-empty list of strings (omit the key to match anything)")
        values[key] = items
    s.done()
    for t in values.get("targets", []):
        if t not in target_names:
            raise ConfigError(f"{s.at('targets')}: unknown target {t!r} (known: {', '.join(sorted(target_names))})")
    for m in values.get("methods", []):
        if "/" in m:
            raise ConfigError(f"{s.at('methods')}: {m!r}: method names only (put the service in `services`)")

    def sets(key: str) -> frozenset[str] | None:
        return frozenset(values[key]) if key in values else None

    def globs(key: str) -> tuple[str, ...] | None:
        return tuple(values[key]) if key in values else None

    return GrpcMatch(targets=sets("targets"), services=globs("services"), methods=globs("methods"),
                     subjects=sets("subjects"), groups=sets("groups"), agent_ids=sets("agent_ids"))


def parse_grpc_policy(section: Section, target_names: set[str]) -> GrpcPolicy:
    """Read ``rules`` and ``default`` of the ``grpc`` section."""
    rules: list[GrpcRule] = []
    names: set[str] = set()
    for i, item in enumerate(section.items("rules")):
        s = Section(item, f"{section.at('rules')}[{i}]", section.base_dir)
        if s.raw("match") is None:
            raise ConfigError(f"{s.at('match')}: required (use `match: {{}}` to match every call)")
        match = _match(s.section("match"), target_names)
        # The action part goes through the SQL rule parser (with an empty SQL match).
        action_part = Section({**{k: v for k, v in s.data.items() if k != "match"}, "match": {}}, s.path,
                              s.base_dir)
        rules.append(GrpcRule(match, parse_rule(action_part, names)))
    default = section.string("default", "deny")
    if default not in ("allow", "deny"):
        raise ConfigError(f"{section.at('default')}: must be allow or deny, got {default!r}")
    return GrpcPolicy(tuple(rules), "allow" if default == "allow" else "deny")

"""The HTTP policy: ordered rules on target, method and path (plus who calls), first match decides.

    http:
      rules:
        - name: refunds-need-approval
          match: {targets: [payments], methods: [POST], paths: ["/v1/refunds*"]}
          action: approve          # allow | deny | approve: the same keys as SQL policy rules
          approvers: [finance]
          mode: refuse
      default: allow

``match`` keys (all optional; any value of a list matches, all keys must): ``targets``, ``methods``,
``paths`` (glob patterns on the path below the target, ``*`` also crosses ``/``), ``subjects``,
``groups``, ``agent_ids``. The action keys (``action``, ``message``, ``approvers``, ``approvals``,
``expires``, ``mode``, ``timeout``) are parsed by the SQL policy's own rule parser, so both sides
accept and reject exactly the same things. Without ``default`` nothing unmatched passes (deny).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal, TypeVar

from ..config import ConfigError
from ..identity import Identity
from ..policy.rules import Decision, Rule, parse_rule
from ..sections import Section

MATCH_KEYS = ("targets", "methods", "paths", "subjects", "groups", "agent_ids")
CALLER_KEYS = ("subjects", "groups", "agent_ids")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
M = TypeVar("M")


@dataclass(frozen=True)
class CallerMatch:
    """Who calls: the match keys of every companion proxy's rules (HTTP, gRPC)."""

    subjects: frozenset[str] | None = None
    groups: frozenset[str] | None = None
    agent_ids: frozenset[str] | None = None

    def caller_matches(self, identity: Identity) -> bool:
        return ((self.subjects is None or identity.subject in self.subjects)
                and (self.groups is None or not self.groups.isdisjoint(identity.groups))
                and (self.agent_ids is None or identity.agent_id in self.agent_ids))


@dataclass(frozen=True)
class HttpMatch(CallerMatch):
    targets: frozenset[str] | None = None
    methods: frozenset[str] | None = None
    paths: tuple[str, ...] | None = None

    def matches(self, identity: Identity, target: str, method: str, path: str) -> bool:
        return ((self.targets is None or target in self.targets)
                and (self.methods is None or method in self.methods)
                and (self.paths is None or any(fnmatchcase(path, p) for p in self.paths))
                and self.caller_matches(identity))


@dataclass(frozen=True)
class HttpRule:
    match: HttpMatch
    rule: Rule  # name, action, message, approval requirement


@dataclass(frozen=True)
class HttpPolicy:
    rules: tuple[HttpRule, ...] = ()
    default: Literal["allow", "deny"] = "deny"

    def decide(self, identity: Identity, target: str, method: str, path: str) -> Decision:
        for r in self.rules:
            if r.match.matches(identity, target, method, path):
                reason = f"{method} {path} on {target}"
                return Decision(r.rule.action, r.rule.name, r.rule.message, r.rule.approval, (reason,))
        message = None if self.default == "allow" else "no rule allows this request"
        return Decision(self.default, "default", message, None, ())


def match_lists(s: Section, keys: tuple[str, ...], target_names: set[str]) -> dict[str, list[str]]:
    """The ``match`` keys that are set, each a non-empty list of strings; ``targets`` must name targets."""
    values: dict[str, list[str]] = {}
    for key in keys:
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
    return values


def caller_match(values: dict[str, list[str]]) -> dict[str, frozenset[str] | None]:
    """The ``CallerMatch`` fields from ``match_lists``."""
    return {key: frozenset(values[key]) if key in values else None for key in CALLER_KEYS}


def parse_rules(section: Section, parse_match: Callable[[Section], M],
                unit: str) -> tuple[list[tuple[M, Rule]], Literal["allow", "deny"]]:
    """``rules`` (each a ``match`` read by ``parse_match`` plus SQL-policy action keys) and ``default``."""
    rules: list[tuple[M, Rule]] = []
    names: set[str] = set()
    for i, item in enumerate(section.items("rules")):
        s = Section(item, f"{section.at('rules')}[{i}]")
        if s.raw("match") is None:
            raise ConfigError(f"{s.at('match')}: required (use `match: {{}}` to match every {unit})")
        match = parse_match(s.section("match"))
        # The action part goes through the SQL rule parser (with an empty SQL match).
        action_part = Section({**{k: v for k, v in s.data.items() if k != "match"}, "match": {}}, s.path)
        rules.append((match, parse_rule(action_part, names)))
    default = section.string("default", "deny")
    if default not in ("allow", "deny"):
        raise ConfigError(f"{section.at('default')}: must be allow or deny, got {default!r}")
    return rules, "allow" if default == "allow" else "deny"


def _match(s: Section, target_names: set[str]) -> HttpMatch:
    values = match_lists(s, MATCH_KEYS, target_names)
    methods = [m.upper() for m in values.get("methods", [])]
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"{s.at('methods')}: unknown method {m!r} (known: {', '.join(sorted(METHODS))})")
    for p in values.get("paths", []):
        if not p.startswith(("/", "*")):
            raise ConfigError(f"{s.at('paths')}: {p!r} must start with / (the path below the target)")
    return HttpMatch(targets=frozenset(values["targets"]) if "targets" in values else None,
                     methods=frozenset(methods) if methods else None,
                     paths=tuple(values["paths"]) if "paths" in values else None, **caller_match(values))


def parse_http_policy(http: Section, target_names: set[str]) -> HttpPolicy:
    """Read ``rules`` and ``default`` of the ``http`` section."""
    rules, default = parse_rules(http, lambda s: _match(s, target_names), "request")
    return HttpPolicy(tuple(HttpRule(match, rule) for match, rule in rules), default)

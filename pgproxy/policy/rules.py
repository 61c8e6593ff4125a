"""The statement policy: ordered YAML rules, first match decides, then a default.

    rules:
      - name: dba-approves-destructive
        match: {classes: [destructive, dcl]}
        action: approve
        approvers: [dba]          # any of these groups may approve
        approvals: 1              # how many distinct approvers
        expires: 3600             # seconds a request (and an approval) stays valid
        mode: refuse              # refuse: fail now, retry once approved; hold: wait in the session
        timeout: 300              # hold mode: how long the session waits
      - name: agents-no-code
        match: {groups: [agents], classes: [procedural, copy_program, dangerous_function]}
        action: deny
        message: agents may not run procedural code
    default: allow

``match`` keys (all optional; within a list any value matches, across keys all must): ``subjects``,
``groups``, ``agent_ids``, ``roles`` (the database role of the session), ``databases``, ``classes``,
``tables`` and ``functions`` (glob patterns, e.g. ``shop.*``, ``dblink*``). An unqualified table name
matches a schema-qualified pattern when its table part matches (the search_path decides which schema it
is, so the policy assumes it may be any). A multi-statement string is judged statement by statement and
the strictest decision wins (deny, then approve, then allow).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, load_yaml
from ..identity import Identity
from ..sections import Section
from .classify import CLASSES, UNPARSED, Classification, StatementInfo

Action = Literal["allow", "deny", "approve"]
ACTIONS = ("allow", "deny", "approve")
MATCH_KEYS = ("subjects", "groups", "agent_ids", "roles", "databases", "classes", "tables", "functions")
_GLOB_KEYS = frozenset({"tables", "functions"})
_STRICTNESS = {"allow": 0, "approve": 1, "deny": 2}


@dataclass(frozen=True)
class ApprovalRequirement:
    approvers: tuple[str, ...]
    approvals: int = 1
    expires: float = 3600.0
    mode: Literal["refuse", "hold"] = "refuse"
    timeout: float = 300.0
    # What refuse mode does inside a transaction block: refuse (the error aborts the transaction; the
    # caller rolls back and runs it again once approved) or hold (wait up to ``timeout``).
    in_transaction: Literal["refuse", "hold"] = "refuse"


@dataclass(frozen=True)
class Match:
    subjects: frozenset[str] | None = None
    groups: frozenset[str] | None = None
    agent_ids: frozenset[str] | None = None
    roles: frozenset[str] | None = None
    databases: frozenset[str] | None = None
    classes: frozenset[str] | None = None
    tables: tuple[str, ...] | None = None
    functions: tuple[str, ...] | None = None

    def matches(self, identity: Identity, statement: StatementInfo, database: str, role: str) -> bool:
        if not self.matches_caller(identity, database, role):
            return False
        if self.classes is not None and self.classes.isdisjoint(statement.classes):
            return False
        if self.tables is not None and not any(table_matches(t, p) for t in statement.tables for p in self.tables):
            return False
        return self.functions is None or any(
            function_matches(f, p) for f in statement.functions for p in self.functions)

    @property
    def judges_statement(self) -> bool:
        """The match looks at the statement (classes, tables, functions), not only at who runs it where."""
        return self.classes is not None or self.tables is not None or self.functions is not None

    def matches_caller(self, identity: Identity, database: str, role: str) -> bool:
        if self.subjects is not None and identity.subject not in self.subjects:
            return False
        if self.groups is not None and self.groups.isdisjoint(identity.groups):
            return False
        if self.agent_ids is not None and identity.agent_id not in self.agent_ids:
            return False
        if self.roles is not None and role not in self.roles:
            return False
        return self.databases is None or database in self.databases

    def keys(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in MATCH_KEYS if getattr(self, k) is not None}


@dataclass(frozen=True)
class Rule:
    name: str
    match: Match
    action: Action
    message: str | None = None
    approval: ApprovalRequirement | None = None
    path: str = ""  # where it was defined, for messages (rules[2])


@dataclass(frozen=True)
class Decision:
    action: Action
    rule: str  # the rule's name, or "default"
    message: str | None = None
    approval: ApprovalRequirement | None = None
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    default: Literal["allow", "deny"] = "allow"
    source: Path | None = None

    def decide(self, identity: Identity, classification: Classification, database: str, role: str) -> Decision:
        """The strictest of the per-statement decisions (first matching rule each, else the default)."""
        statements = classification.statements or (_EMPTY,)
        best: Decision | None = None
        for statement in statements:
            decision = self._decide_one(identity, statement, database, role)
            if best is None or _STRICTNESS[decision.action] > _STRICTNESS[best.action]:
                best = decision
        assert best is not None
        return best

    def decide_unparsed(self, identity: Identity, database: str, role: str) -> Decision:
        """The decision for a statement the proxy could not parse: it may be any statement.

        The first rule that may match it decides: a deny or approve rule whose caller criteria match
        (whatever its classes, tables or functions: the statement may have them), an allow rule only
        when it names the class ``unparsed`` or does not look at the statement at all.
        """
        for rule in self.rules:
            match = rule.match
            if not match.matches_caller(identity, database, role):
                continue
            named = match.classes is not None and UNPARSED in match.classes
            if named or rule.action != "allow" or not match.judges_statement:
                return Decision(rule.action, rule.name, rule.message, rule.approval)
        message = None if self.default == "allow" else "no rule allows this statement"
        return Decision(self.default, "default", message)

    def _decide_one(self, identity: Identity, statement: StatementInfo, database: str, role: str) -> Decision:
        for rule in self.rules:
            if rule.match.matches(identity, statement, database, role):
                return Decision(rule.action, rule.name, rule.message, rule.approval, statement.reasons)
        message = None if self.default == "allow" else "no rule allows this statement"
        return Decision(self.default, "default", message, None, statement.reasons)


_EMPTY = StatementInfo("", "", frozenset(), (), (), (), ())


def table_matches(table: str, pattern: str) -> bool:
    t, p = table.lower(), pattern.lower()
    if fnmatchcase(t, p):
        return True
    if "." not in t and "." in p:  # unqualified: any schema may be the one on the search_path
        return fnmatchcase(t, p.rsplit(".", 1)[1])
    return False


def function_matches(function: str, pattern: str) -> bool:
    f, p = function.lower(), pattern.lower()
    return fnmatchcase(f, p) or ("." not in p and fnmatchcase(f.rsplit(".", 1)[-1], p))


# --------------------------------------------------------------------------------------------------
# Loading


def string_list(s: Section, key: str, *, allowed: Iterable[str] | None = None) -> list[str] | None:
    if s.raw(key) is None:
        return None
    values = s.items(key)
    if not values:
        raise ConfigError(f"{s.at(key)}: expected a non-empty list (omit the key to match anything)")
    allowed_set = frozenset(allowed) if allowed is not None else None
    for i, v in enumerate(values):
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{s.at(key)}[{i}]: expected a non-empty string")
        if allowed_set is not None and v not in allowed_set:
            raise ConfigError(f"{s.at(key)}[{i}]: unknown class {v!r} (known: {', '.join(sorted(allowed_set))})")
    return list(values)


def _match(s: Section) -> Match:
    kwargs: dict[str, Any] = {}
    for key in MATCH_KEYS:
        values = string_list(s, key, allowed=CLASSES if key == "classes" else None)
        if values is not None:
            kwargs[key] = tuple(values) if key in _GLOB_KEYS else frozenset(values)
    s.done()
    return Match(**kwargs)


def parse_rule(s: Section, names: set[str]) -> Rule:
    name = s.req_str("name")
    if name in names:
        raise ConfigError(f"{s.at('name')}: duplicate rule name {name!r}")
    if s.raw("match") is None:
        raise ConfigError(f"{s.at('match')}: required (use `match: {{}}` to match every statement)")
    match = _match(s.section("match"))
    action = s.req_str("action")
    if action not in ACTIONS:
        raise ConfigError(f"{s.at('action')}: must be one of {', '.join(ACTIONS)}, got {action!r}")
    message = s.string("message")
    approval = None
    approve_keys = ("approvers", "approvals", "expires", "mode", "timeout", "in_transaction")
    if action == "approve":
        approvers = string_list(s, "approvers")
        if not approvers:
            raise ConfigError(f"{s.at('approvers')}: required for action approve (groups that may approve)")
        mode = s.string("mode", "refuse") or "refuse"
        if mode not in ("refuse", "hold"):
            raise ConfigError(f"{s.at('mode')}: must be refuse or hold, got {mode!r}")
        in_transaction = s.string("in_transaction", "refuse") or "refuse"
        if in_transaction not in ("refuse", "hold"):
            raise ConfigError(f"{s.at('in_transaction')}: must be refuse or hold, got {in_transaction!r}")
        approval = ApprovalRequirement(
            approvers=tuple(approvers),
            approvals=s.integer("approvals", 1, minimum=1, maximum=10),
            expires=s.number("expires", 3600.0, minimum=1.0),
            mode="hold" if mode == "hold" else "refuse",
            timeout=s.number("timeout", 300.0, minimum=0.1),
            in_transaction="hold" if in_transaction == "hold" else "refuse",
        )
    else:
        for key in approve_keys:
            if s.raw(key) is not None:
                raise ConfigError(f"{s.at(key)}: only valid with action approve")
    if action == "deny" and message is None:
        message = "statement not allowed"
    s.done()
    names.add(name)
    checked: Action = "allow" if action == "allow" else "deny" if action == "deny" else "approve"
    return Rule(name, match, checked, message, approval, s.path)


def parse_policy(data: Any, source: Path | None = None, path: str = "") -> Policy:
    """Build a validated Policy from loaded YAML; errors name the offending field (policy.rules[2].action)."""
    if data is None:
        raise ConfigError(f"{path or 'policy'}: empty policy (expected rules: and default:)")
    root = Section(data, path)
    names: set[str] = set()
    rules = tuple(parse_rule(Section(item, f"{root.at('rules')}[{i}]"), names)
                  for i, item in enumerate(root.items("rules")))
    default = root.string("default", "deny")
    if default not in ("allow", "deny"):
        raise ConfigError(f"{root.at('default')}: must be allow or deny, got {default!r}")
    root.done()
    return Policy(rules, "allow" if default == "allow" else "deny", source)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    p = Path(path)
    data = load_yaml(p)
    try:
        return parse_policy(data, p)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


# --------------------------------------------------------------------------------------------------
# Static checks


def _pattern_covers(general: str, specific: str) -> bool:
    """Every name ``specific`` matches is matched by ``general`` (sound, not complete)."""
    g, s = general.lower(), specific.lower()
    if g == s or g == "*":
        return True
    if not any(c in s for c in "*?["):
        return fnmatchcase(s, g)
    if g.endswith("*") and not any(c in g[:-1] for c in "*?["):  # a prefix pattern
        return s.startswith(g[:-1])
    return False


def _covers(earlier: Match, later: Match) -> bool:
    """``earlier`` matches every statement ``later`` matches."""
    for key in MATCH_KEYS:
        e, l_ = getattr(earlier, key), getattr(later, key)
        if e is None:
            continue
        if l_ is None:
            return False
        if key in _GLOB_KEYS:
            if not all(any(_pattern_covers(g, s) for g in e) for s in l_):
                return False
        elif not set(l_) <= set(e):
            return False
    return True


def _same_effect(a: Rule, b: Rule) -> bool:
    return (a.action, a.message, a.approval) == (b.action, b.message, b.approval)


def check_policy(policy: Policy) -> list[str]:
    """Warnings: rules no statement can reach (shadowed by an earlier, broader rule) and conflicts."""
    problems: list[str] = []
    for j, later in enumerate(policy.rules):
        for earlier in policy.rules[:j]:
            if not _covers(earlier.match, later.match):
                continue
            if _covers(later.match, earlier.match) and not _same_effect(earlier, later):
                problems.append(f"{later.path}: rule {later.name!r} conflicts with rule {earlier.name!r}: same "
                                f"match, different action ({earlier.action} vs {later.action}); "
                                f"{earlier.name!r} wins, so {later.name!r} never applies")
            else:
                problems.append(f"{later.path}: rule {later.name!r} is unreachable: rule {earlier.name!r} "
                                "matches every statement it matches")
            break
    for rule in policy.rules:
        if not rule.match.keys():
            after = len(policy.rules) - policy.rules.index(rule) - 1
            problems.append(f"{rule.path}: rule {rule.name!r} matches every statement: the default "
                            f"{'and ' + str(after) + ' later rule(s) are' if after else 'is'} never used")
            break
    return problems

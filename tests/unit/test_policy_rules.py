"""The YAML policy: matching, first match wins, defaults, validation errors, static checks."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import yaml

from pgproxy.config import ConfigError
from pgproxy.identity import Identity
from pgproxy.policy.classify import classify
from pgproxy.policy.rules import check_policy, load_policy, parse_policy, table_matches

ROOT = Path(__file__).resolve().parents[2]


def ident(subject: str = "agent-1", groups: tuple[str, ...] = (), agent_id: str | None = None) -> Identity:
    return Identity(subject=subject, groups=groups, db_roles=("agent_reader",), agent_id=agent_id,
                    session_id=None, tool_call_id=None, token_id="t", issuer="i", expires_at=0.0,
                    claims=MappingProxyType({}))


def policy(text: str) -> Any:
    return parse_policy(yaml.safe_load(text))


def decide(p: Any, sql: str, identity: Identity | None = None, database: str = "app", role: str = "agent_reader"
           ) -> tuple[str, str]:
    d = p.decide(identity or ident(), classify(sql), database, role)
    return d.action, d.rule


def test_default_policy_file() -> None:
    p = load_policy(ROOT / "pgproxy" / "policy" / "default_policy.yaml")
    agent = ident(groups=("agents",))
    assert decide(p, "select * from t", agent) == ("allow", "default")
    assert decide(p, "DO $$ begin end $$", agent) == ("deny", "agents-no-code")
    assert decide(p, "copy t to program 'x'", agent) == ("deny", "agents-no-code")
    assert decide(p, "select pg_read_file('/etc/passwd')", agent) == ("deny", "agents-no-code")
    assert decide(p, "DO $$ begin end $$", ident(groups=("dev",))) == ("allow", "default")
    d = p.decide(agent, classify("drop table t"), "app", "r")
    assert (d.action, d.rule) == ("approve", "dba-approves-destructive")
    assert d.approval is not None and d.approval.approvers == ("dba",) and d.approval.mode == "refuse"
    assert decide(p, "grant select on t to x", agent)[0] == "approve"
    assert decide(p, "delete from t where id = 1", agent) == ("allow", "default")
    assert check_policy(p) == []


RULES = """
rules:
  - name: ops-anything
    match: {subjects: [ops-bot], databases: [app]}
    action: allow
  - name: shop-writes-need-approval
    match: {tables: ["shop.*"], classes: [write]}
    action: approve
    approvers: [dba, leads]
    approvals: 2
    expires: 60
    mode: hold
    timeout: 5
  - name: no-dblink
    match: {functions: ["dblink*"]}
    action: deny
    message: no remote calls
  - name: reader-role-read-only
    match: {roles: [agent_reader], classes: [write, ddl]}
    action: deny
  - name: agent-7
    match: {agent_ids: [a7], groups: [agents]}
    action: deny
    message: agent 7 is suspended
default: allow
"""


def test_matching_and_first_match_wins() -> None:
    p = policy(RULES)
    assert decide(p, "delete from shop.orders", ident("ops-bot")) == ("allow", "ops-anything")
    assert decide(p, "delete from shop.orders", ident("ops-bot"), database="other")[1] == \
        "shop-writes-need-approval"
    d = p.decide(ident(), classify("update shop.orders set x = 1 where id = 1"), "app", "agent_writer")
    assert d.action == "approve" and d.approval is not None
    assert (d.approval.approvers, d.approval.approvals, d.approval.expires, d.approval.mode, d.approval.timeout) \
        == (("dba", "leads"), 2, 60.0, "hold", 5.0)
    assert decide(p, "select dblink('x', 'y')") == ("deny", "no-dblink")
    assert p.decide(ident(), classify("select dblink('x','y')"), "app", "r").message == "no remote calls"
    assert decide(p, "insert into public.other values (1)", role="agent_reader") == ("deny", "reader-role-read-only")
    assert decide(p, "insert into public.other values (1)", role="agent_writer") == ("allow", "default")
    assert decide(p, "select 1", ident(groups=("agents",), agent_id="a7")) == ("deny", "agent-7")
    assert decide(p, "select 1", ident(groups=("agents",), agent_id="a8")) == ("allow", "default")
    assert decide(p, "select 1", ident(groups=("x",), agent_id="a7")) == ("allow", "default")


def test_unqualified_table_matches_any_schema() -> None:
    assert table_matches("orders", "shop.*")
    assert table_matches("shop.orders", "shop.*")
    assert not table_matches("public.orders", "shop.*")
    assert table_matches("Shop.Orders", "shop.orders")


def test_multi_statement_strictest_wins() -> None:
    p = policy(RULES)
    assert decide(p, "select 1; select dblink('a','b')") == ("deny", "no-dblink")
    assert decide(p, "select 1; delete from shop.x", role="w")[0] == "approve"
    assert decide(p, "select 1; delete from shop.x; select dblink('a','b')", role="w")[0] == "deny"


def test_default_deny_and_missing_default() -> None:
    assert decide(policy("rules: []\ndefault: deny"), "select 1") == ("deny", "default")
    assert decide(policy("rules: []"), "select 1")[0] == "deny"  # fail closed when unspecified
    assert decide(policy("default: allow"), "select 1") == ("allow", "default")


@pytest.mark.parametrize(("text", "error"), [
    ("rules: [{name: a, match: {}, action: maybe}]", "rules[0].action: must be one of allow, deny, approve"),
    ("rules: [{match: {}, action: allow}]", "rules[0].name: required"),
    ("rules: [{name: a, action: allow}]", "rules[0].match: required"),
    ("rules: [{name: a, match: {classes: [reads]}, action: allow}]", "rules[0].match.classes[0]: unknown class"),
    ("rules: [{name: a, match: {colour: [x]}, action: allow}]", "rules[0].match.colour: unknown setting"),
    ("rules: [{name: a, match: {groups: []}, action: allow}]", "rules[0].match.groups: expected a non-empty list"),
    ("rules: [{name: a, match: {groups: x}, action: allow}]", "rules[0].match.groups: expected a list"),
    ("rules: [{name: a, match: {}, action: approve}]", "rules[0].approvers: required"),
    ("rules: [{name: a, match: {}, action: approve, approvers: [d], mode: wait}]", "rules[0].mode: must be"),
    ("rules: [{name: a, match: {}, action: approve, approvers: [d], approvals: 0}]", "rules[0].approvals: must be"),
    ("rules: [{name: a, match: {}, action: deny, approvers: [d]}]", "rules[0].approvers: only valid with"),
    ("rules: [{name: a, match: {}, action: allow}, {name: a, match: {}, action: deny}]",
     "rules[1].name: duplicate rule name"),
    ("default: maybe", "default: must be allow or deny"),
    ("rulez: []", "rulez: unknown setting"),
])
def test_validation_errors(text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        policy(text)
    assert error in str(info.value)


def test_load_policy_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("rules: [{name: a, match: {}, action: nope}]\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: rules\[0\]\.action"):
        load_policy(f)
    with pytest.raises(ConfigError, match="No such file"):
        load_policy(tmp_path / "missing.yaml")
    f.write_text("rules: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_policy(f)


def test_unreachable_and_conflicting_rules() -> None:
    p = policy("""
rules:
  - {name: broad, match: {classes: [write, destructive]}, action: deny}
  - {name: narrow, match: {classes: [destructive], groups: [dba]}, action: allow}
  - {name: shop, match: {tables: ["shop.*"]}, action: deny}
  - {name: shop-orders, match: {tables: ["shop.orders*", "shop.items"]}, action: allow}
  - {name: other-tables, match: {tables: ["other.*"]}, action: allow}
  - {name: shop-again, match: {tables: ["shop.*"]}, action: allow}
  - {name: reachable, match: {classes: [read], groups: [dba]}, action: deny}
default: allow
""")
    problems = check_policy(p)
    joined = "\n".join(problems)
    assert "rule 'narrow' is unreachable: rule 'broad'" in joined
    assert "rule 'shop-orders' is unreachable: rule 'shop'" in joined
    assert "rule 'shop-again' conflicts with rule 'shop'" in joined
    assert "other-tables" not in joined and "reachable'" not in joined.replace("unreachable", "")
    assert len(problems) == 3


def test_match_everything_shadows_the_rest() -> None:
    p = policy("""
rules:
  - {name: all, match: {}, action: allow}
  - {name: never, match: {classes: [ddl]}, action: deny}
""")
    problems = check_policy(p)
    assert any("rule 'never' is unreachable" in x for x in problems)
    assert any("rule 'all' matches every statement" in x for x in problems)

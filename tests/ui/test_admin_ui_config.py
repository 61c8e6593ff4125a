"""The UI's settings and its pure pieces: config keys, roles from the policy, login sessions, CSRF."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from harness import AUDIENCE, ISSUER

from pgproxy.admin.server import AdminServer
from pgproxy.admin.ui import PageError, UiSessions, age, check_csrf, roles_from_config
from pgproxy.config import ConfigError, parse_config
from pgproxy.identity import DevKeys, Identity

POLICY = Path(__file__).parents[2] / "pgproxy" / "policy" / "default_policy.yaml"


def _data(dev_keys: DevKeys, tmp_path: Path, **admin: Any) -> dict[str, Any]:
    return {
        "listeners": [{"host": "127.0.0.1", "port": 0, "insecure_plaintext": True}],
        "identity": {"issuer": ISSUER, "audience": AUDIENCE, "algorithms": ["ES256"],
                     "jwks_file": str(dev_keys.jwks_file)},
        "upstream": {"credentials": [{"role": "*"}]},
        "approvals": {"store": "sqlite", "path": str(tmp_path / "a.sqlite")},
        "admin": {"host": "127.0.0.1", "port": 0, **admin},
        "policy": {"file": str(POLICY)},
        "audit": {"jsonl_path": str(tmp_path / "audit.jsonl")},
    }


def _identity(groups: tuple[str, ...], expires_at: float = 1000.0) -> Identity:
    return Identity(subject="someone", groups=groups, db_roles=(), agent_id=None, session_id=None,
                    tool_call_id=None, token_id="t", issuer="i", expires_at=expires_at, claims={})


def test_analysts_default_to_the_policy_approver_groups(dev_keys: DevKeys, tmp_path: Path) -> None:
    config = parse_config(_data(dev_keys, tmp_path), tmp_path)
    assert config.admin is not None and config.admin.ui and config.admin.analyst_groups is None
    roles = roles_from_config(config)
    assert roles.approver_groups == roles.analyst_groups == {"dba"}
    roles = roles_from_config(parse_config(_data(dev_keys, tmp_path, analyst_groups=["audit"]), tmp_path))
    assert roles.analyst_groups == {"audit"} and roles.approver_groups == {"dba"}
    assert roles.may_log_in(_identity(("audit",))) and not roles.is_approver(_identity(("audit",)))
    assert not roles.may_log_in(_identity(("agents",)))


@pytest.mark.parametrize("bad", ["dba", [""], [1], {"a": 1}])
def test_bad_analyst_groups_are_refused(dev_keys: DevKeys, tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"admin\.analyst_groups"):
        parse_config(_data(dev_keys, tmp_path, analyst_groups=bad), tmp_path)


async def test_ui_false_serves_only_the_api(dev_keys: DevKeys, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"admin\.ui: expected true or false"):
        parse_config(_data(dev_keys, tmp_path, ui="yes"), tmp_path)
    data = _data(dev_keys, tmp_path, ui=False)
    off = AdminServer.from_config(parse_config(data, tmp_path))
    on = AdminServer.from_config(parse_config(copy.deepcopy(_data(dev_keys, tmp_path)), tmp_path))
    try:
        paths = {r.canonical for r in on.app.router.resources()}
        assert {"/", "/ui", "/ui/login", "/ui/approvals", "/ui/sessions"} <= paths
        assert not {r.canonical for r in off.app.router.resources()} & {"/ui", "/", "/ui/login", "/ui/static"}
    finally:
        await off.close()
        await on.close()


def test_login_sessions_expire_and_are_bounded() -> None:
    sessions = UiSessions(limit=2)
    first = sessions.create("tok", _identity(("dba",), expires_at=100.0), now=50.0)
    assert sessions.get(first.sid, 99.0) is first and sessions.get(first.sid, 100.0) is None
    a, b, c = (sessions.create("tok", _identity(("dba",)), now=0.0) for _ in range(3))
    assert sessions.get(a.sid, 1.0) is None and sessions.get(c.sid, 1.0) is c and sessions.get(None, 1.0) is None
    assert c.expires_at == 1000.0 and len({a.csrf, b.csrf, c.csrf}) == 3
    check_csrf(c, {"csrf": c.csrf})
    for form in ({}, {"csrf": b.csrf}, {"csrf": ""}):
        with pytest.raises(PageError) as refused:
            check_csrf(c, form)
        assert refused.value.status == 403


def test_age() -> None:
    assert [age(s) for s in (-1, 5, 61, 7200, 90000)] == ["0 s", "5 s", "1 min", "2 h", "1 d"]

"""`pgproxy approvals ...` end to end: a config file, real approver tokens, both stores."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml
from approval_helpers import base_config_data, make_request, mint
from click.testing import CliRunner

from pgproxy.cli import main
from pgproxy.config import load_config
from pgproxy.identity import DevKeys
from pgproxy.policy.approval_factory import build_approval_store
from pgproxy.policy.approvals import ApprovalRequest

DSN_ENV = "PGPROXY_TEST_APPROVALS_DSN"


@pytest.fixture(params=["sqlite", "postgres"])
def config_file(request: pytest.FixtureRequest, tmp_path: Path, dev_keys: DevKeys,
                monkeypatch: pytest.MonkeyPatch) -> Path:
    if request.param == "sqlite":
        approvals: dict[str, Any] = {"path": "approvals.sqlite3"}
    else:
        monkeypatch.setenv(DSN_ENV, request.getfixturevalue("database").dsn())
        approvals = {"store": "postgres", "dsn_env": DSN_ENV, "schema": "apr_cli_" + secrets.token_hex(4)}
    path = tmp_path / "pgproxy.yaml"
    path.write_text(yaml.safe_dump(base_config_data(dev_keys, approvals=approvals)))
    monkeypatch.setenv("PGPROXY_CONFIG", str(path))
    monkeypatch.delenv("PGPROXY_APPROVER_TOKEN", raising=False)
    return path


def create(config_file: Path, **kwargs: Any) -> ApprovalRequest:
    async def go() -> ApprovalRequest:
        store = build_approval_store(load_config(config_file))
        try:
            return await store.create(make_request(**kwargs))
        finally:
            await store.close()
    return asyncio.run(go())


def get(config_file: Path, approval_id: str) -> ApprovalRequest | None:
    async def go() -> ApprovalRequest | None:
        store = build_approval_store(load_config(config_file))
        try:
            return await store.get(approval_id)
        finally:
            await store.close()
    return asyncio.run(go())


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(main, ["approvals", *args], env=env, catch_exceptions=False)


def test_list_show_approve_deny(config_file: Path, dev_keys: DevKeys) -> None:
    req = create(config_file, sql="DELETE FROM orders\nWHERE id = $1", params=["9"], quorum=2)
    alice = mint(dev_keys, "alice", ["dba"])
    result = run("list", "--status", "pending", "--token", alice)
    assert result.exit_code == 0, result.output
    assert req.id in result.output and "agent-1" in result.output

    result = run("show", req.id, env={"PGPROXY_APPROVER_TOKEN": alice})  # token from the environment
    assert result.exit_code == 0, result.output
    for text in ("DELETE FROM orders", "WHERE id = $1", "$1 = '9'", "writes-need-approval", "DELETE on t",
                 "agent-1", "pending", "2 needed from any of: dba, oncall", "decisions: none yet"):
        assert text in result.output, text
    assert "None" not in result.output and "[" not in result.output, result.output  # no Python reprs

    result = run("approve", req.id, "--reason", "checked", "--token", alice)
    assert result.exit_code == 0 and "request is now pending" in result.output, result.output
    result = run("approve", req.id, "--token", mint(dev_keys, "bob", ["oncall"]), "--json")
    assert result.exit_code == 0, result.output
    view = json.loads(result.output)
    assert view["status"] == "approved" and [d["approver"] for d in view["decisions"]] == ["alice", "bob"]
    stored = get(config_file, req.id)
    assert stored is not None and stored.status == "approved" and stored.decisions[0].reason == "checked"

    other = create(config_file, sql="TRUNCATE t")
    result = run("deny", other.id, "--reason", "no truncates", "--token", alice)
    assert result.exit_code == 0 and "request is now denied" in result.output
    result = run("show", other.id, "--token", alice)
    assert "denied   by alice: no truncates" in result.output


def test_rules_reported_as_errors(config_file: Path, dev_keys: DevKeys) -> None:
    req = create(config_file, subject="alice")
    result = run("approve", req.id, "--token", mint(dev_keys, "alice", ["dba"]))
    assert result.exit_code == 1 and "own request" in result.output
    result = run("approve", req.id, "--token", mint(dev_keys, "eve", ["devs"]))
    assert result.exit_code == 1 and "approver group" in result.output
    result = run("show", req.id, "--token", mint(dev_keys, "eve", ["devs"]))
    assert result.exit_code == 1 and "approver group" in result.output
    result = run("deny", "apr_missing", "--token", mint(dev_keys, "bob", ["dba"]))
    assert result.exit_code == 1 and "no approval request apr_missing" in result.output
    assert get(config_file, req.id).status == "pending"  # type: ignore[union-attr]


def test_token_required_and_verified(config_file: Path, dev_keys: DevKeys) -> None:
    req = create(config_file)
    result = run("approve", req.id)
    assert result.exit_code == 1 and "no approver token" in result.output
    result = run("approve", req.id, "--token", "forged.token.value")
    assert result.exit_code == 1 and "approver token refused" in result.output
    result = run("approve", req.id, "--token", mint(dev_keys, "alice", ["dba"], ttl=-5))
    assert result.exit_code == 1 and "approver token refused" in result.output
    result = run("approve", "--as", "alice", req.id)
    assert result.exit_code == 2  # no such option: identities come from verified tokens only
    assert get(config_file, req.id).status == "pending"  # type: ignore[union-attr]


def test_no_approvals_section(tmp_path: Path, dev_keys: DevKeys) -> None:
    path = tmp_path / "pgproxy.yaml"
    path.write_text(yaml.safe_dump(base_config_data(dev_keys)))
    result = run("list", "-c", str(path), "--token", mint(dev_keys, "alice", ["dba"]))
    assert result.exit_code == 1 and "approvals: not configured" in result.output

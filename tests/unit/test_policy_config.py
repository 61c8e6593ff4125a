"""The `policy:` config section, the server wiring and `pgproxy check` on a policy file."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from pgproxy.audit.sink import MemoryAuditSink
from pgproxy.cli import main
from pgproxy.config import ConfigError, parse_config
from pgproxy.policy.gate import PolicyGate

ROOT = Path(__file__).resolve().parents[2]


def base(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listeners": [{"host": "127.0.0.1", "port": 0, "insecure_plaintext": True}],
        "identity": {"issuer": "i", "audience": "a", "algorithms": ["HS256"], "hs256_secret_env": "PGPROXY_T_SECRET"},
        "upstream": {"credentials": [{"role": "*"}]},
        "audit": {"jsonl_path": str(tmp_path / "audit.jsonl")},
    }
    data.update(extra)
    return data


def test_policy_section(tmp_path: Path) -> None:
    assert parse_config(base(tmp_path), tmp_path).policy is None
    cfg = parse_config(base(tmp_path, policy={"file": str(ROOT / "pgproxy/policy/default_policy.yaml")}), tmp_path)
    assert cfg.policy is not None and cfg.policy.file.name == "default_policy.yaml" and not cfg.policy.audit_allowed
    with pytest.raises(ConfigError, match=r"policy\.file: file not found"):
        parse_config(base(tmp_path, policy={"file": "nope.yaml"}), tmp_path)
    with pytest.raises(ConfigError, match=r"policy\.file: required"):
        parse_config(base(tmp_path, policy={"audit_allowed": True}), tmp_path)
    with pytest.raises(ConfigError, match=r"policy\.rules: unknown setting"):
        policy = {"file": str(ROOT / "pgproxy/policy/default_policy.yaml"), "rules": []}
        parse_config(base(tmp_path, policy=policy), tmp_path)


def test_server_installs_the_gate_with_the_configured_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pgproxy.app import build_server

    monkeypatch.setenv("PGPROXY_T_SECRET", "s" * 32)

    data = base(tmp_path, policy={"file": str(ROOT / "pgproxy/policy/default_policy.yaml")},
                approvals={"store": "sqlite", "path": str(tmp_path / "a.sqlite")})

    async def build() -> tuple[Any, ...]:
        server = build_server(parse_config(data, tmp_path), audit=MemoryAuditSink())
        gate = server.gates[0]
        await server.close(0)
        return gate, server.approval_store

    gate, store = asyncio.run(build())
    assert isinstance(gate, PolicyGate) and gate.store is store and store is not None

    async def without() -> tuple[Any, ...]:
        server = build_server(parse_config(base(tmp_path), tmp_path), audit=MemoryAuditSink())
        return server.gates

    assert asyncio.run(without()) == ()


def _check(tmp_path: Path, policy_text: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("PGPROXY_T_SECRET", "s" * 32)
    (tmp_path / "policy.yaml").write_text(policy_text)
    config = tmp_path / "pgproxy.yaml"
    config.write_text(yaml.safe_dump(base(tmp_path, policy={"file": "policy.yaml"})))
    return CliRunner().invoke(main, ["check", "-c", str(config)])


def test_check_reports_shadowed_rules_as_warnings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _check(tmp_path, """
rules:
  - {name: writes, match: {classes: [write]}, action: deny}
  - {name: shop-writes, match: {classes: [write], tables: ["shop.*"]}, action: allow}
default: allow
""", monkeypatch)
    assert out.exit_code == 0, out.output
    assert "warning:" in out.output and "rule 'shop-writes' is unreachable: rule 'writes'" in out.output
    assert ": OK" in out.output


def test_check_fails_on_an_invalid_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _check(tmp_path, "rules: [{name: x, match: {}, action: perhaps}]\n", monkeypatch)
    assert out.exit_code == 1
    assert "pgproxy.yaml: policy.file:" in out.output and "rules[0].action: must be one of" in out.output

"""`pgproxy check` reports what `serve` would refuse at start, in one line each, exit 1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner

from pgproxy.cli import main
from pgproxy.identity import generate_dev_keys

POLICY_WITH_APPROVALS = """\
rules:
  - name: dba
    match: {classes: [destructive]}
    action: approve
    approvers: [dba]
default: allow
"""


def _config(tmp_path: Path, **extra: Any) -> Path:
    keys = generate_dev_keys(tmp_path / "keys")
    data: dict[str, Any] = {
        "listeners": [{"host": "127.0.0.1", "port": 0, "insecure_plaintext": True}],
        "identity": {"issuer": "i", "audience": "a", "algorithms": ["ES256"], "jwks_file": str(keys.jwks_file)},
        "upstream": {"credentials": [{"role": "*"}]},
        "audit": {"jsonl_path": str(tmp_path / "audit.jsonl")},
        **extra,
    }
    path = tmp_path / "pgproxy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_valid_config_passes(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["check", "-c", str(_config(tmp_path))])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith(": OK")


def test_unset_audit_store_dsn_fails(tmp_path: Path, monkeypatch: Any) -> None:
    from pgproxy.audit.keys import generate_key

    generate_key(tmp_path / "audit.key")
    monkeypatch.delenv("PGPROXY_NO_SUCH_STORE_DSN", raising=False)
    config = _config(tmp_path, audit={"dir": str(tmp_path / "log"), "signing_key_file": str(tmp_path / "audit.key"),
                                      "store_dsn_env": "PGPROXY_NO_SUCH_STORE_DSN"})
    result = CliRunner().invoke(main, ["check", "-c", str(config)])
    assert result.exit_code == 1
    assert "audit.store_dsn_env: environment variable PGPROXY_NO_SUCH_STORE_DSN is not set" in result.output


def test_unreadable_audit_key_and_missing_store_dsn_fail(tmp_path: Path, monkeypatch: Any) -> None:
    bad_key = tmp_path / "audit.key"
    bad_key.write_text("not a key")
    monkeypatch.delenv("PGPROXY_NO_SUCH_DSN", raising=False)
    config = _config(tmp_path, audit={"dir": str(tmp_path / "log"), "signing_key_file": str(bad_key)},
                     approvals={"store": "postgres", "dsn_env": "PGPROXY_NO_SUCH_DSN"})
    result = CliRunner().invoke(main, ["check", "-c", str(config)])
    assert result.exit_code == 1
    assert f"error: {config}: audit.signing_key_file:" in result.output
    assert f"error: {config}: approvals.dsn_env: environment variable PGPROXY_NO_SUCH_DSN is not set" in result.output


def test_approve_rules_without_an_approvals_section_warn(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY_WITH_APPROVALS)
    result = CliRunner().invoke(main, ["check", "-c", str(_config(tmp_path, policy={"file": str(policy)}))])
    assert result.exit_code == 0, result.output
    assert "warning: policy has approve rules but there is no approvals section" in result.output


def test_every_error_at_once_with_file_and_field(tmp_path: Path) -> None:
    config = _config(tmp_path, limits={"max_connections": 0}, logging={"format": "xml"})
    data = yaml.safe_load(config.read_text())
    data["listeners"][0]["port"] = "six"
    data["upstream"]["sslmode"] = "sometimes"
    data["identity"]["leeway_seconds"] = 600
    data["admin"] = {"port": 1, "colour": "red"}
    config.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["check", "-c", str(config)])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    expected = ["listeners[0].port:", "identity.leeway_seconds:", "upstream.sslmode:", "limits.max_connections:",
                "admin.colour: unknown setting", "logging.format:"]
    for field in expected:
        assert sum(f"error: {config}: {field}" in line for line in errors) == 1, (field, result.output)
    assert len(errors) == len(expected), result.output


def test_later_problems_name_their_file(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules: [{name: x, match: {}, action: explode}]\n")
    config = _config(tmp_path, policy={"file": str(policy)}, audit={"dir": str(tmp_path / "log")})
    result = CliRunner().invoke(main, ["check", "-c", str(config)])
    assert result.exit_code == 1
    assert f"error: {config}: audit.signing_key_file: required" in result.output
    config = _config(tmp_path, policy={"file": str(policy)})
    result = CliRunner().invoke(main, ["check", "-c", str(config)])
    assert result.exit_code == 1
    assert f"error: {config}: policy.file: {policy}" in result.output and "action" in result.output

"""The demo banner's commands work as printed, in a shell whose PATH does not hold the venv."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pgproxy.demo import DemoEnvironment, _demo_token, _print_banner, write_demo_config
from pgproxy.devdb import Database


def test_banner_commands_run_as_printed(database: Database, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_file, ca_file = write_demo_config(tmp_path, database, 0)
    env = DemoEnvironment(tmp_path, database, config_file, ca_file, 6432, _demo_token(config_file, 60))
    _print_banner(env, env.connection_env(), 6480)
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("export PGPROXY_CONFIG="))
    export, token, approvals = (line.strip() for line in lines[start:start + 3])
    assert token.startswith("PGPROXY_APPROVER_TOKEN=$(/") and token.endswith("&& export PGPROXY_APPROVER_TOKEN")
    list_command = approvals.split(";")[0]
    script = "\n".join([export, token, 'test -n "$PGPROXY_APPROVER_TOKEN"', list_command])
    # No venv on PATH, as after `make demo`: a bare `pgproxy` would not be found.
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "command not found" not in result.stderr
    audit = next(line.strip() for line in lines if line.strip().startswith("Audit:"))
    sessions = audit.removeprefix("Audit:").strip()
    (tmp_path / "audit").mkdir()
    result = subprocess.run(["bash", "-c", sessions], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin"})
    assert "command not found" not in result.stderr and "No such file" not in result.stderr, result.stderr

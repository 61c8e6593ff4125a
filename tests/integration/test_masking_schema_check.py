"""Masking rules that do not fit the live schema: `serve` refuses to start (a misspelt column would stay
unmasked) unless told otherwise, a reload with them is refused, and `pgproxy check` reports them by file
and field without needing --role on a config whose credentials only have '*'."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from click.testing import CliRunner
from harness import ProxyUnderTest

from pgproxy.cli import main
from pgproxy.config import load_config
from pgproxy.reload import ReloadError
from pgproxy.testing import RunningProxy

GOOD = "tables:\n  mschk.people:\n    columns:\n      email: email\n"
MISSPELT = "tables:\n  mschk.people:\n    columns:\n      emial: email\n"


@pytest.fixture(scope="module")
def people(proxy: ProxyUnderTest) -> None:
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as conn:
        conn.execute("create schema if not exists mschk; create table if not exists mschk.people (id int, email text);"
                     "grant usage on schema mschk to agent_reader; grant select on mschk.people to agent_reader;"
                     "truncate mschk.people; insert into mschk.people values (1, 'ann@example.com')")


def _config(proxy: ProxyUnderTest, tmp_path: Path, rules: str, **masking: Any) -> Path:
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir(exist_ok=True)
    (rules_dir / "people.yaml").write_text(rules)
    data = copy.deepcopy(proxy.config_data)
    # As in the demo: one '*' credential, the default role from the identity section.
    data["upstream"]["credentials"] = [c for c in data["upstream"]["credentials"] if c["role"] == "*"]
    data["identity"]["default_db_role"] = "agent_reader"
    data["audit"] = {"jsonl_path": str(tmp_path / "audit.jsonl")}
    data["masking"] = {"rules_dir": str(rules_dir), **masking}
    path = tmp_path / "pgproxy.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_serve_refuses_a_misspelt_column(proxy: ProxyUnderTest, people: None, tmp_path: Path) -> None:
    config = _config(proxy, tmp_path, MISSPELT)
    result = subprocess.run([sys.executable, "-m", "pgproxy", "serve", "-c", str(config)], capture_output=True,
                            text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result.stderr
    assert "do not match the live schema" in result.stderr
    assert "people.yaml: tables.mschk.people.columns.emial: column 'emial' does not exist" in result.stderr


def test_serve_starts_when_told_to_and_warns(proxy: ProxyUnderTest, people: None, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    with RunningProxy(load_config(_config(proxy, tmp_path, MISSPELT, allow_schema_mismatch=True))) as running:
        assert running.ports
    assert any("emial" in r.getMessage() and "allow_schema_mismatch" in r.getMessage() for r in caplog.records)


def test_reload_refuses_a_misspelt_column(proxy: ProxyUnderTest, people: None, tmp_path: Path) -> None:
    config = _config(proxy, tmp_path, GOOD)
    with RunningProxy(load_config(config)) as running:
        assert running.server is not None
        (tmp_path / "rules" / "people.yaml").write_text(MISSPELT)
        with pytest.raises(ReloadError, match="emial"):
            running.call(running.server.reload())
        with psycopg.connect(**proxy.conninfo(tls=False, token=proxy.token(), port=str(running.ports[1]))) as conn:
            # the rules in force are still the good ones
            assert conn.execute("select email from mschk.people").fetchall() == [("****@example.com",)]


def test_check_reads_the_live_schema_by_default(proxy: ProxyUnderTest, people: None, tmp_path: Path) -> None:
    good = CliRunner().invoke(main, ["check", "-c", str(_config(proxy, tmp_path, GOOD))])
    assert good.exit_code == 0, good.output
    bad = CliRunner().invoke(main, ["check", "-c", str(_config(proxy, tmp_path, MISSPELT))])
    assert bad.exit_code == 1
    assert "error: " in bad.output and "people.yaml: tables.mschk.people.columns.emial: column 'emial'" in bad.output
    assert CliRunner().invoke(main, ["check", "--offline", "-c", str(tmp_path / "pgproxy.yaml")]).exit_code == 0

"""The central audit store: shipped from the signed log without blocking sessions, caught up after an
outage without gaps, searchable, and checked against the signed roots."""

from __future__ import annotations

import contextlib
import copy
import secrets
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import yaml
from click.testing import CliRunner

from pgproxy.audit.keys import generate_key
from pgproxy.audit.logformat import iter_records
from pgproxy.cli import main
from pgproxy.config import parse_config
from pgproxy.testing import RunningProxy

STORE_ENV = "PGPROXY_TEST_AUDIT_STORE_DSN"
POLICY = """
rules:
  - name: no-drop
    match: {classes: [ddl]}
    action: deny
    message: no DDL here
default: allow
"""


def _run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture
def store_setup(proxy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], Path, str]:
    """(config data, config file, schema): a signed log shipped to a fresh schema of the test database."""
    generate_key(tmp_path / "audit.key")
    (tmp_path / "policy.yaml").write_text(POLICY)
    schema = f"audit_store_{secrets.token_hex(4)}"
    data = copy.deepcopy(proxy.config_data)
    data["audit"] = {"dir": str(tmp_path / "log"), "signing_key_file": str(tmp_path / "audit.key"),
                     "fsync": "always", "store_dsn_env": STORE_ENV, "store_schema": schema}
    data["policy"] = {"file": str(tmp_path / "policy.yaml"), "audit_allowed": True}
    config = tmp_path / "proxy.yaml"
    config.write_text(yaml.safe_dump(data))
    monkeypatch.setenv(STORE_ENV, proxy.database.dsn())
    return data, config, schema


def _serve(proxy: Any, data: dict[str, Any], *sessions: tuple[str, list[str]]) -> None:
    running = RunningProxy(parse_config(data, Path.cwd())).start()
    p = type(proxy)(running, proxy.audit, proxy.keys, proxy.tls, proxy.database, data)
    try:
        for subject, statements in sessions:
            with psycopg.connect(**p.conninfo(token=p.token(sub=subject, agent_id=f"{subject}-bot",
                                                            tool_call_id=f"call-{subject}")),
                                 autocommit=True) as conn:
                for sql in statements:
                    with contextlib.suppress(psycopg.errors.InsufficientPrivilege):  # the denied DDL
                        conn.execute(sql.encode())  # type: ignore[call-overload]
    finally:
        running.stop()


def _search(config: Path, *args: str) -> list[dict[str, Any]]:
    out = _run("audit", "search", "-c", str(config), "--json", *args)
    assert out.exit_code == 0, out.output
    return [orjson.loads(line) for line in out.output.splitlines() if line.startswith("{")]


def test_records_are_shipped_searchable_and_checked_against_the_signed_roots(
        proxy: Any, tmp_path: Path, store_setup: tuple[dict[str, Any], Path, str]) -> None:
    data, config, schema = store_setup
    _serve(proxy, data, ("agent-a", ["select 'alpha' from pg_class limit 1", "create table nope (x int)"]),
           ("agent-b", ["select 'beta'"]))
    log_records = [rec for _, rec in iter_records(tmp_path / "log")]
    with psycopg.connect(proxy.database.dsn()) as conn:
        seqs = [r[0] for r in conn.execute(f"SELECT seq FROM {schema}.records ORDER BY seq")]
        assert seqs == list(range(len(log_records)))  # every record, no gap
        assert conn.execute(f"SELECT count(*) FROM {schema}.checkpoints").fetchone()[0] >= 1  # type: ignore[index]
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = %s", (schema,))}
    assert {"records_subject", "records_agent", "records_tool_call", "records_tables", "records_classes",
            "records_doc", "records_ts", "records_decision"} <= indexes

    a = _search(config, "--subject", "agent-a", "--kind", "statement")
    assert [h["sql"] for h in a] == ["select 'alpha' from pg_class limit 1", "create table nope (x int)"]
    assert _search(config, "--agent", "agent-b-bot", "--kind", "statement")[0]["sql"] == "select 'beta'"
    assert {h["subject"] for h in _search(config, "--tool-call", "call-agent-b", "--kind", "session_start")} \
        == {"agent-b"}
    denied = _search(config, "--decision", "deny")
    assert [h["sql"] for h in denied] == ["create table nope (x int)"]
    assert [h["kind"] for h in _search(config, "--class", "ddl", "--subject", "agent-a")] == ["policy_decision"]
    assert [h["decision"] for h in _search(config, "--table", "pg_class")] == ["allow"]
    assert [h["sql"] for h in _search(config, "--text", "beta", "--kind", "statement")] == ["select 'beta'"]
    assert _search(config, "--since", "2000-01-01T00:00:00", "--until", "2000-01-02") == []
    assert len(_search(config, "--since", "2000-01-01T00:00:00", "--limit", "3")) == 3

    out = _run("audit", "check-store", "--config", str(config))
    assert out.exit_code == 0 and f"{len(log_records)} records" in out.output, out.output

    # A searchable column changed, a record rewritten, a row removed: each is reported.
    with psycopg.connect(proxy.database.dsn(), autocommit=True) as conn:
        conn.execute(f"UPDATE {schema}.records SET sql = 'select 1' WHERE sql = 'create table nope (x int)' "
                     "AND kind = 'statement'")
        conn.execute(f"UPDATE {schema}.records SET record = replace(record, 'beta', 'gamma') "
                     "WHERE sql = 'select ''beta''' AND kind = 'statement'")
        out = _run("audit", "check-store", "--config", str(config))
        assert out.exit_code == 1, out.output
        assert "searchable columns differ from its signed record" in out.output
        assert "hash chain broken" in out.output or "rows hash to" in out.output
        conn.execute(f"DELETE FROM {schema}.records WHERE seq = 1")
    out = _run("audit", "check-store", "--config", str(config))
    assert out.exit_code == 1 and "where record 1 belongs (rows deleted)" in out.output, out.output


def test_shipping_never_blocks_sessions_and_catches_up_after_an_outage(
        proxy: Any, tmp_path: Path, store_setup: tuple[dict[str, Any], Path, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    data, config, schema = store_setup
    down = proxy.database.dsn().replace(f":{proxy.database.port}/", ":1/")
    monkeypatch.setenv(STORE_ENV, down)  # the store is unreachable: sessions still run
    _serve(proxy, data, ("agent-a", ["select 1", "select 2"]))
    monkeypatch.setenv(STORE_ENV, proxy.database.dsn())
    _serve(proxy, data, ("agent-b", ["select 3"]))  # back: the earlier records are shipped first
    records = [rec for _, rec in iter_records(tmp_path / "log")]
    with psycopg.connect(proxy.database.dsn()) as conn:
        seqs = [r[0] for r in conn.execute(f"SELECT seq FROM {schema}.records ORDER BY seq")]
    assert seqs == list(range(len(records)))
    assert [h["sql"] for h in _search(config, "--kind", "statement")] == ["select 1", "select 2", "select 3"]
    out = _run("audit", "check-store", "--config", str(config))
    assert out.exit_code == 0, out.output

"""The approvals: and admin: config sections, and build_approval_store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pgproxy.config import AdminConfig, ApprovalsConfig, ConfigError, parse_config
from pgproxy.policy.approval_factory import build_approval_store
from pgproxy.policy.stores.postgres import PostgresApprovalStore
from pgproxy.policy.stores.sqlite import SQLiteApprovalStore


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    for name in ("server.crt", "server.key", "jwks.json"):
        (tmp_path / name).write_text("placeholder\n")
    return tmp_path


def config(**sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listeners": [{"host": "127.0.0.1", "port": 6432, "insecure_plaintext": True}],
        "identity": {"issuer": "https://issuer.example", "audience": "pgproxy", "algorithms": ["RS256"],
                     "jwks_file": "jwks.json"},
        "upstream": {"credentials": [{"role": "*", "password_env": "UPSTREAM_PW"}]},
    }
    data.update(sections)
    return data


def error_of(data: Any, base_dir: Path) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(data, base_dir)
    return str(exc.value)


def test_no_sections_by_default(base_dir: Path) -> None:
    cfg = parse_config(config(), base_dir)
    assert cfg.approvals is None and cfg.admin is None


def test_sqlite_defaults(base_dir: Path) -> None:
    cfg = parse_config(config(approvals={"path": "approvals.db"}), base_dir)
    assert cfg.approvals == ApprovalsConfig(store="sqlite", path=base_dir / "approvals.db")


def test_postgres_and_admin(base_dir: Path) -> None:
    cfg = parse_config(config(
        approvals={"store": "postgres", "dsn_env": "APPROVALS_DSN", "schema": "approvals_v1",
                   "webhook_url": "https://hooks.slack.example/T/B/x"},
        admin={"host": "0.0.0.0", "port": 8443, "tls": {"cert_file": "server.crt", "key_file": "server.key"}}),
        base_dir)
    assert cfg.approvals == ApprovalsConfig(store="postgres", dsn_env="APPROVALS_DSN", schema="approvals_v1",
                                            webhook_url="https://hooks.slack.example/T/B/x")
    assert cfg.admin is not None and cfg.admin.port == 8443 and cfg.admin.tls is not None
    assert parse_config(config(approvals={"path": "a.db"}, admin={}), base_dir).admin == AdminConfig()


@pytest.mark.parametrize(("sections", "message"), [
    ({"approvals": {"path": "a.db", "store": "redis"}}, "approvals.store: must be one of sqlite, postgres"),
    ({"approvals": {}}, "approvals.path: required with store sqlite"),
    ({"approvals": {"path": "a.db", "dsn_env": "X"}}, "approvals.dsn_env: only used with store postgres"),
    ({"approvals": {"path": "a.db", "schema": "s"}}, "approvals.schema: only used with store postgres"),
    ({"approvals": {"store": "postgres"}}, "approvals.dsn_env: required with store postgres"),
    ({"approvals": {"store": "postgres", "dsn_env": "X", "path": "a.db"}},
     "approvals.path: only used with store sqlite"),
    ({"approvals": {"store": "postgres", "dsn_env": "X", "schema": "bad-name; drop"}},
     "approvals.schema: must be a plain identifier"),
    ({"approvals": {"path": "a.db", "webhook_url": "http://hooks.example/x"}},
     "approvals.webhook_url: must be an https URL"),
    ({"approvals": {"path": "a.db", "default_expiry_seconds": 60}},
     "approvals.default_expiry_seconds: unknown setting"),
    ({"approvals": {"path": "a.db", "expiry": 5}}, "approvals.expiry: unknown setting"),
    ({"approvals": "yes"}, "approvals: expected a mapping"),
    ({"admin": {}}, "admin: needs an approvals section"),
    ({"approvals": {"path": "a.db"}, "admin": {"host": "0.0.0.0"}}, "admin.tls: required unless host is loopback"),
    ({"approvals": {"path": "a.db"}, "admin": {"port": 70000}}, "admin.port: must be between 0 and 65535"),
    ({"approvals": {"path": "a.db"}, "admin": {"tls": {"cert_file": "server.crt"}}},
     "admin.tls.key_file: required"),
    ({"approvals": {"path": "a.db"}, "admin": {"tls": {"cert_file": "nope.crt", "key_file": "server.key"}}},
     "admin.tls.cert_file: file not found"),
    ({"approvals": {"path": "a.db"}, "admin": {"listen": "x"}}, "admin.listen: unknown setting"),
])
def test_validation_errors(base_dir: Path, sections: dict[str, Any], message: str) -> None:
    assert error_of(config(**sections), base_dir).startswith(message)


def test_loopback_http_webhook_allowed(base_dir: Path) -> None:
    cfg = parse_config(config(approvals={"path": "a.db", "webhook_url": "http://127.0.0.1:9/hook"}), base_dir)
    assert cfg.approvals is not None and cfg.approvals.webhook_url == "http://127.0.0.1:9/hook"


def test_build_approval_store(base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config(config(approvals={"path": "a.db"}), base_dir)
    store = build_approval_store(cfg)
    assert isinstance(store, SQLiteApprovalStore) and store.path == base_dir / "a.db"
    pg = parse_config(config(approvals={"store": "postgres", "dsn_env": "TEST_APPROVALS_DSN", "schema": "apx"}),
                      base_dir)
    monkeypatch.delenv("TEST_APPROVALS_DSN", raising=False)
    with pytest.raises(ConfigError, match=r"approvals\.dsn_env: environment variable TEST_APPROVALS_DSN is not set"):
        build_approval_store(pg)
    monkeypatch.setenv("TEST_APPROVALS_DSN", "postgresql://u@127.0.0.1:1/db")
    pg_store = build_approval_store(pg)
    assert isinstance(pg_store, PostgresApprovalStore) and pg_store.schema == "apx"
    with pytest.raises(ConfigError, match="approvals: not configured"):
        build_approval_store(parse_config(config(), base_dir))

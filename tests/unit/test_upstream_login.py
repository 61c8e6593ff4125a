"""The proxy's own upstream login URL (side connections: impact estimates, schema checks)."""

from __future__ import annotations

import pytest

from pgproxy.config import ConfigError, UpstreamConfig, UpstreamCredential
from pgproxy.upstream_login import upstream_dsn


def test_dsn_quotes_role_and_password_and_brackets_ipv6(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGPROXY_TEST_PW", "p@ss/word")
    cfg = UpstreamConfig(host="::1", port=6543, sslmode="require",
                         credentials=(UpstreamCredential(role="*", password_env="PGPROXY_TEST_PW"),))
    assert upstream_dsn(cfg, "app user", "shop") == \
        "postgresql://app%20user:p%40ss%2Fword@[::1]:6543/shop?sslmode=require"


def test_dsn_uses_the_pinned_database_and_no_password_for_trust_logins() -> None:
    cfg = UpstreamConfig(database="pinned", credentials=(UpstreamCredential(role="reader"),))
    assert upstream_dsn(cfg, "reader", "asked") == "postgresql://reader@127.0.0.1:5432/pinned?sslmode=disable"


def test_dsn_refuses_a_role_without_credential() -> None:
    cfg = UpstreamConfig(credentials=(UpstreamCredential(role="reader"),))
    with pytest.raises(ConfigError, match="no credential for role 'writer'"):
        upstream_dsn(cfg, "writer", "shop")

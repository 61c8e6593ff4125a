"""The wire listener trusts an issuer through OpenID discovery (``identity.discovery: true``).

Real tokens from the real provider (tests/oidc/provider.mjs) log in through the real proxy; the
JWKS URL is never configured by hand.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from harness import ProxyUnderTest
from oidcprovider import CLI_CLIENT, OpenIDProvider, device_flow_tokens

from pgproxy.config import ConfigError, parse_config
from pgproxy.identity.discovery import DiscoveryError, fetch_metadata, parse_metadata


def _discovering(op: OpenIDProvider) -> Any:
    def mutate(data: dict[str, Any]) -> None:
        data["identity"] = {"issuer": op.issuer, "audience": CLI_CLIENT, "algorithms": ["RS256", "ES256"],
                            "discovery": True}
    return mutate


def test_provider_id_token_logs_in_through_discovered_keys(openid_provider: OpenIDProvider,
                                                           make_proxy: Any) -> None:
    proxy: ProxyUnderTest = make_proxy(_discovering(openid_provider))
    tokens = device_flow_tokens(openid_provider, CLI_CLIENT, "alice")
    with psycopg.connect(**proxy.conninfo(user="agent_reader", token=tokens["id_token"])) as conn:  # type: ignore[arg-type]
        assert conn.execute("SELECT current_user").fetchone() == ("agent_reader",)
    start = next(e for e in proxy.audit.events if e["event"] == "session_start")
    assert start["identity"]["subject"] == "alice"
    assert start["identity"]["issuer"] == openid_provider.issuer
    assert set(start["identity"]["groups"]) == {"dba", "staff"}
    assert tokens["id_token"] not in repr(proxy.audit.events)


def test_tokens_of_another_issuer_are_refused(openid_provider: OpenIDProvider, make_proxy: Any) -> None:
    proxy: ProxyUnderTest = make_proxy(_discovering(openid_provider))
    foreign = proxy.token(sub="alice", roles=("agent_reader",))  # signed by the test's own ES256 dev key
    with pytest.raises(psycopg.OperationalError, match=r"unknown key id|key does not match algorithm"):
        psycopg.connect(**proxy.conninfo(user="agent_reader", token=foreign))  # type: ignore[arg-type]


def test_extra_audiences_are_accepted_and_others_refused(openid_provider: OpenIDProvider, make_proxy: Any) -> None:
    def mutate(data: dict[str, Any]) -> None:
        _discovering(openid_provider)(data)
        data["identity"]["audience"] = "pgproxy"
    proxy: ProxyUnderTest = make_proxy(mutate)
    token = device_flow_tokens(openid_provider, CLI_CLIENT, "alice")["id_token"]  # aud: the CLI's client id
    with pytest.raises(psycopg.OperationalError, match="invalid audience"):
        psycopg.connect(**proxy.conninfo(user="agent_reader", token=token))  # type: ignore[arg-type]

    def also_cli(data: dict[str, Any]) -> None:
        mutate(data)
        data["identity"]["extra_audiences"] = [CLI_CLIENT]
    accepting: ProxyUnderTest = make_proxy(also_cli)
    with psycopg.connect(**accepting.conninfo(user="agent_reader", token=token)) as conn:  # type: ignore[arg-type]
        assert conn.execute("SELECT current_user").fetchone() == ("agent_reader",)


def test_metadata_is_fetched_and_checked(openid_provider: OpenIDProvider) -> None:
    meta = fetch_metadata(openid_provider.issuer)
    assert meta.jwks_uri == f"{openid_provider.issuer}/jwks"
    assert meta.device_authorization_endpoint == f"{openid_provider.issuer}/device/auth"
    with pytest.raises(DiscoveryError, match="names issuer"):
        fetch_metadata(openid_provider.issuer + "/")  # the document names the issuer without the slash


@pytest.mark.parametrize(("doc", "message"), [
    ('{"issuer": "https://a.test", "jwks_uri": "http://evil.test/jwks"}', "jwks_uri must be an https URL"),
    ('{"issuer": "https://a.test"}', "jwks_uri must be an https URL"),
    ('{"issuer": "https://b.test", "jwks_uri": "https://a.test/jwks"}', "names issuer 'https://b.test'"),
    ('[1]', "not a JSON object"),
    ('{', "not valid JSON"),
])
def test_bad_discovery_documents_are_refused(doc: str, message: str) -> None:
    with pytest.raises(DiscoveryError, match=message):
        parse_metadata("https://a.test", doc)


def test_discovery_config_needs_a_secure_issuer(proxy: ProxyUnderTest) -> None:
    data = dict(proxy.config_data)
    data["identity"] = {"issuer": "http://idp.example.com", "audience": "x", "algorithms": ["RS256"],
                        "discovery": True}
    with pytest.raises(ConfigError, match=r"identity\.issuer: discovery needs an https issuer"):
        parse_config(data, proxy.tls.ca_file.parent)
    data["identity"] = {**data["identity"], "issuer": "https://idp.example.com", "jwks_url": "https://x/jwks"}
    with pytest.raises(ConfigError, match="exactly one key source"):
        parse_config(data, proxy.tls.ca_file.parent)

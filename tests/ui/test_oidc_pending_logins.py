"""Logins started at the OpenID provider and not yet finished: bounded in number and in time.

A local discovery document (aiohttp on loopback) stands in for the provider; its token endpoint
refuses every code, so a login that is still pending ends with the provider's refusal, and one that
was dropped ends with "expired or was already used" before the provider is asked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from harness import FakeClock

from pgproxy.admin import oidc_login
from pgproxy.admin.oidc_login import PENDING_SECONDS, OidcLogin, OidcLoginError
from pgproxy.config import OidcLoginConfig

CALLBACK = "http://127.0.0.1/ui/oidc/callback"


@pytest.fixture
async def issuer() -> AsyncIterator[str]:
    base = ""

    async def discovery(request: web.Request) -> web.Response:
        return web.json_response({"issuer": base, "jwks_uri": f"{base}/jwks",
                                  "authorization_endpoint": f"{base}/authorize", "token_endpoint": f"{base}/token"})

    async def token(request: web.Request) -> web.Response:
        return web.json_response({"error": "invalid_grant"}, status=400)

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_post("/token", token)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield base
    await runner.cleanup()


async def _outcome(login: OidcLogin, state: str) -> str:
    with pytest.raises(OidcLoginError) as failed:
        await login.finish(state, state, "some-code")
    return str(failed.value)


async def test_a_pending_login_expires(issuer: str) -> None:
    clock = FakeClock()
    login = OidcLogin(OidcLoginConfig(issuer=issuer, client_id="pgproxy-ui"), now=clock)
    _, first = await login.start(CALLBACK)
    _, second = await login.start(CALLBACK)
    clock.advance(PENDING_SECONDS - 1)
    assert "refused the login" in await _outcome(login, first)  # still pending: the provider was asked
    clock.advance(2)
    assert "expired" in await _outcome(login, second)


async def test_the_oldest_pending_logins_are_dropped(issuer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oidc_login, "MAX_PENDING", 3)
    login = OidcLogin(OidcLoginConfig(issuer=issuer, client_id="pgproxy-ui"), now=FakeClock())
    states = [(await login.start(CALLBACK))[1] for _ in range(4)]
    assert "expired" in await _outcome(login, states[0])
    assert "refused the login" in await _outcome(login, states[1])

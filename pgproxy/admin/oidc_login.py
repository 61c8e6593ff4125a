"""Admin UI login through an OpenID provider: authorization code flow with PKCE (``admin.oidc``).

The provider's endpoints come from discovery on the issuer URL. Each login attempt gets a random
``state`` (also set in a cookie of the browser that started it), a ``nonce`` and a PKCE code verifier,
kept server side for ``PENDING_SECONDS``; the callback must present that state, from that browser,
once. The code is exchanged by authlib's OAuth client; the ID token is then verified like any token
(signature from the provider's discovered JWKS, ``iss``, ``aud`` = our client id, ``exp``) and must
carry the nonce. Groups come from ``groups_claim``. The UI then holds the ID token server side and
re-verifies it on every request, so the UI session ends when the ID token expires.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlencode

import httpx
from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError
from cachetools import TTLCache

from pgproxy.config import ClaimNames, IdentityConfig, OidcLoginConfig
from pgproxy.identity import Identity, TokenError, TokenVerifier
from pgproxy.identity.discovery import DiscoveryError, ProviderMetadata, discover
from pgproxy.identity.fetch import is_loopback_url

PENDING_SECONDS = 600.0
MAX_PENDING = 1000
# An Identity names at least one database role; a UI login never reaches a database with it.
UI_ONLY_ROLE = "pgproxy_admin_ui"
HTTP_TIMEOUT_SECONDS = 10.0


class OidcLoginError(Exception):
    """The login could not complete; the message is safe to show (it never holds a token or code)."""


@dataclass(frozen=True)
class _Pending:
    nonce: str
    code_verifier: str
    redirect_uri: str


class OidcLogin:
    """Starts and finishes authorization-code logins against one provider."""

    def __init__(self, config: OidcLoginConfig, *, now: Callable[[], float] = time.time) -> None:
        self.config = config
        self.verifier = TokenVerifier(IdentityConfig(
            issuer=config.issuer, audience=config.client_id, algorithms=config.algorithms, discovery=True,
            claims=ClaimNames(subject=config.subject_claim, groups=config.groups_claim),
            default_db_role=UI_ONLY_ROLE), now=now)
        self._secret = config.client_secret()  # read now: a missing variable fails at start, not at login
        # Logins started and not yet finished: the oldest are dropped past MAX_PENDING, all after PENDING_SECONDS.
        self._pending: TTLCache[str, _Pending] = TTLCache(maxsize=MAX_PENDING, ttl=PENDING_SECONDS, timer=now)
        self._metadata: ProviderMetadata | None = None

    async def metadata(self) -> ProviderMetadata:
        if self._metadata is None:
            try:
                meta = await discover(self.config.issuer, HTTP_TIMEOUT_SECONDS)
            except DiscoveryError as exc:
                raise OidcLoginError(f"the identity provider is unavailable: {exc}") from None
            if meta.authorization_endpoint is None or meta.token_endpoint is None:
                raise OidcLoginError("the identity provider publishes no authorization or token endpoint")
            self._metadata = meta
        return self._metadata

    def _client(self, redirect_uri: str) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=self.config.client_id, client_secret=self._secret,
            token_endpoint_auth_method="client_secret_basic" if self._secret else "none",
            scope=" ".join(self.config.scopes), redirect_uri=redirect_uri,
            code_challenge_method="S256", timeout=HTTP_TIMEOUT_SECONDS,
            trust_env=not is_loopback_url(self.config.issuer))

    async def start(self, redirect_uri: str) -> tuple[str, str]:
        """The provider's authorization URL to send the browser to, and the state to bind to it."""
        meta = await self.metadata()
        state = secrets.token_urlsafe(32)
        pending = _Pending(secrets.token_urlsafe(32), secrets.token_urlsafe(48), redirect_uri)
        self._pending[state] = pending
        async with self._client(redirect_uri) as client:
            url, _ = client.create_authorization_url(meta.authorization_endpoint, state=state,
                                                     code_verifier=pending.code_verifier, nonce=pending.nonce)
        return str(url), state

    async def finish(self, state: str, browser_state: str, code: str) -> tuple[Identity, str]:
        """The verified identity and ID token for the provider's answer to the login started as ``state``."""
        if not state or not hmac.compare_digest(state, browser_state):
            raise OidcLoginError("this login was not started in this browser (state mismatch): log in again")
        pending = self._pending.pop(state, None)
        if pending is None:
            raise OidcLoginError("this login has expired or was already used: log in again")
        meta = await self.metadata()
        try:
            async with self._client(pending.redirect_uri) as client:
                token = await client.fetch_token(meta.token_endpoint, code=code, code_verifier=pending.code_verifier)
        except OAuthError as exc:
            raise OidcLoginError(f"the identity provider refused the login: {exc.error}") from None
        except (httpx.HTTPError, ValueError) as exc:
            raise OidcLoginError(f"the identity provider could not be reached: {type(exc).__name__}") from None
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise OidcLoginError("the identity provider returned no ID token (is the openid scope granted?)")
        try:
            identity = await self.verifier.verify(id_token)
        except TokenError as exc:
            raise OidcLoginError(f"the ID token was refused: {exc.reason}") from None
        nonce = identity.claims.get("nonce")
        if not isinstance(nonce, str) or not hmac.compare_digest(nonce, pending.nonce):
            raise OidcLoginError("the ID token was refused: wrong nonce")
        return identity, id_token

    async def logout_url(self, id_token: str, after: str) -> str | None:
        """Where to send the browser to end the provider's session too (None: the provider has no such endpoint)."""
        if not self.config.provider_logout:
            return None
        meta = await self.metadata()
        if meta.end_session_endpoint is None:
            return None
        query = urlencode({"id_token_hint": id_token, "client_id": self.config.client_id,
                           "post_logout_redirect_uri": after})
        return f"{meta.end_session_endpoint}?{query}"

"""People at a terminal get their own token from their identity provider: ``pgproxy login`` / ``connect``.

:class:`PeopleLogin` runs the OAuth 2.0 device authorization grant (RFC 8628), or, where a browser
is at hand, the authorization code flow with PKCE answered on a loopback port (RFC 8252), with
authlib's OAuth client against the endpoints found by OpenID discovery, and keeps the answer in a
:class:`TokenCache`: one file per (issuer, client id), mode 0600 in a 0700 directory; a cache file
that others may read is refused, as ssh refuses such keys. :meth:`PeopleLogin.fresh_token` returns
the cached token while it has at least ``min_seconds`` left and otherwise redeems the refresh token.
The token used as the PostgreSQL password is the ID token (every provider issues one as a JWT) or,
with ``token_kind="access_token"``, the access token (where the provider issues JWT access tokens
for pgproxy's audience). Tokens never appear in exceptions or output of this module.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
from authlib.integrations.httpx_client import OAuth2Client, OAuthError

from pgproxy.identity.discovery import DiscoveryError, ProviderMetadata, fetch_metadata
from pgproxy.identity.fetch import is_loopback_url

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_SCOPES = ("openid", "offline_access", "profile", "email")
TOKEN_KINDS = ("id_token", "access_token")
CACHE_ENV = "PGPROXY_TOKEN_CACHE"
HTTP_TIMEOUT_SECONDS = 10.0


class LoginError(Exception):
    """Logging in or refreshing failed; the message says what to do (it never holds a token)."""


@dataclass(frozen=True)
class DeviceCode:
    """What the person must do: open ``verification_uri`` and enter ``user_code``."""

    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: float


def default_cache_dir() -> Path:
    """``$PGPROXY_TOKEN_CACHE``, else ``$XDG_CACHE_HOME/pgproxy/tokens``, else ``~/.cache/pgproxy/tokens``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pgproxy" / "tokens"


class TokenCache:
    """Token responses per (issuer, client id), each in its own owner-only file."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or default_cache_dir()

    def path(self, issuer: str, client_id: str) -> Path:
        digest = hashlib.sha256(f"{issuer}\0{client_id}".encode()).hexdigest()[:32]
        return self.directory / f"{digest}.json"

    def load(self, issuer: str, client_id: str) -> dict[str, Any] | None:
        path = self.path(issuer, client_id)
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if st.st_mode & 0o077:
            raise LoginError(f"{path} may be read by others (mode {st.st_mode & 0o777:o}): delete it and log in "
                             "again")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise LoginError(f"cannot read the token cache {path}: {exc}") from None
        if not isinstance(data, dict) or data.get("issuer") != issuer or data.get("client_id") != client_id:
            return None
        return data

    def store(self, issuer: str, client_id: str, tokens: Mapping[str, Any]) -> Path:
        """Write atomically: a fresh 0600 file renamed over the old one."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        path = self.path(issuer, client_id)
        temp = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({**tokens, "issuer": issuer, "client_id": client_id}, out)
        os.replace(temp, path)
        return path

    def delete(self, issuer: str, client_id: str) -> bool:
        try:
            self.path(issuer, client_id).unlink()
        except FileNotFoundError:
            return False
        return True


class _LoopbackCallback:
    """A one-shot HTTP server on 127.0.0.1 (OS-chosen port) that takes the provider's redirect."""

    def __init__(self) -> None:
        received: dict[str, str] = {}
        arrived = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if parts.path != "/callback" or arrived.is_set():
                    self.send_error(404)
                    return
                received.update({k: v[0] for k, v in parse_qs(parts.query).items()})
                arrived.set()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.end_headers()
                self.wfile.write(b"<!doctype html><title>pgproxy</title><h1 id='done'>pgproxy: login received</h1>"
                                 b"<p>You can close this window and go back to the terminal.</p>")

            def log_message(self, format: str, *args: Any) -> None:  # the query holds the code: never log it
                pass

        self._received, self._arrived = received, arrived
        self._server = HTTPServer(("127.0.0.1", 0), Handler)
        self.redirect_uri = f"http://127.0.0.1:{self._server.server_address[1]}/callback"
        self._thread = threading.Thread(target=self._server.serve_forever, name="pgproxy-login", daemon=True)

    def __enter__(self) -> _LoopbackCallback:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait(self, timeout: float) -> dict[str, str] | None:
        return dict(self._received) if self._arrived.wait(timeout) else None


def token_expiry(token: str) -> float | None:
    """The ``exp`` of a JWT read without verification (only to decide when to refresh), or None."""
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


class PeopleLogin:
    """One person's login at one provider with one (public) client."""

    def __init__(self, issuer: str, client_id: str, *, scopes: tuple[str, ...] = DEFAULT_SCOPES,
                 token_kind: str = "id_token", cache: TokenCache | None = None, client_secret: str | None = None,
                 now: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> None:
        if token_kind not in TOKEN_KINDS:
            raise ValueError(f"token kind must be one of {', '.join(TOKEN_KINDS)}")
        self.issuer = issuer
        self.client_id = client_id
        self.scopes = scopes
        self.token_kind = token_kind
        # Some providers (Google) give installed apps a "secret" that is not one; it goes in the POST body.
        self._client_secret = client_secret
        self.cache = cache or TokenCache()
        self._now = now
        self._sleep = sleep
        self._metadata: ProviderMetadata | None = None

    def metadata(self) -> ProviderMetadata:
        if self._metadata is None:
            try:
                self._metadata = fetch_metadata(self.issuer, HTTP_TIMEOUT_SECONDS)
            except DiscoveryError as exc:
                raise LoginError(str(exc)) from None
        return self._metadata

    def _client(self, *, scoped: bool = True, redirect_uri: str | None = None) -> OAuth2Client:
        """authlib's client; unscoped for refreshing (which then keeps the scopes first granted)."""
        return OAuth2Client(client_id=self.client_id, client_secret=self._client_secret,
                            token_endpoint_auth_method="client_secret_post" if self._client_secret else "none",
                            scope=" ".join(self.scopes) if scoped else None, timeout=HTTP_TIMEOUT_SECONDS,
                            redirect_uri=redirect_uri, code_challenge_method="S256",
                            trust_env=not is_loopback_url(self.issuer))

    def _token_endpoint(self) -> str:
        endpoint = self.metadata().token_endpoint
        if endpoint is None:
            raise LoginError(f"{self.issuer} publishes no token endpoint")
        return endpoint

    # ------------------------------------------------------------------------------------------
    # Device authorization grant

    def device_login(self, show: Callable[[DeviceCode], None]) -> Path:
        """Ask the provider for a device code, ``show`` it, poll until approved; returns the cache file."""
        meta = self.metadata()
        if meta.device_authorization_endpoint is None:
            raise LoginError(f"{self.issuer} does not offer the device authorization grant")
        token_endpoint = self._token_endpoint()
        with self._client() as client:
            try:
                form = {"client_id": self.client_id, "scope": " ".join(self.scopes)}
                if self._client_secret:
                    form["client_secret"] = self._client_secret
                answer = client.request("POST", meta.device_authorization_endpoint, withhold_token=True, data=form)
            except httpx.HTTPError as exc:
                raise LoginError(f"cannot reach {meta.device_authorization_endpoint}: {type(exc).__name__}") from None
            started = self._json(answer, "device authorization")
            device_code, user_code = started.get("device_code"), started.get("user_code")
            uri = started.get("verification_uri") or started.get("verification_url")  # Google says _url
            if not all(isinstance(v, str) and v for v in (device_code, user_code, uri)):
                raise LoginError("the provider's device authorization answer is incomplete")
            complete = started.get("verification_uri_complete")
            expires_in = float(started.get("expires_in") or 600)
            show(DeviceCode(str(user_code), str(uri), complete if isinstance(complete, str) else None, expires_in))
            interval = float(started.get("interval") or 5)
            deadline = self._now() + expires_in
            while True:
                self._sleep(interval)
                if self._now() > deadline:
                    raise LoginError("the device code expired before the login was approved: run pgproxy login again")
                try:
                    tokens = client.fetch_token(token_endpoint, grant_type=DEVICE_GRANT, device_code=device_code)
                except OAuthError as exc:
                    if exc.error == "authorization_pending":
                        continue
                    if exc.error == "slow_down":
                        interval += 5
                        continue
                    raise LoginError(f"the provider refused the login: {exc.error}") from None
                except httpx.HTTPError as exc:
                    raise LoginError(f"cannot reach {token_endpoint}: {type(exc).__name__}") from None
                return self._keep(dict(tokens))

    @staticmethod
    def _json(answer: httpx.Response, what: str) -> dict[str, Any]:
        try:
            body = answer.json()
        except ValueError:
            body = None
        if answer.status_code != 200 or not isinstance(body, dict):
            error = body.get("error") if isinstance(body, dict) else None
            raise LoginError(f"the provider refused the {what}: {error or f'HTTP {answer.status_code}'}")
        return body

    # ------------------------------------------------------------------------------------------
    # Authorization code flow with PKCE, answered on a loopback port (RFC 8252)

    def browser_login(self, open_url: Callable[[str], None], timeout: float = 300.0) -> Path:
        """Send the browser to the provider, take its answer on 127.0.0.1; returns the cache file."""
        meta = self.metadata()
        if meta.authorization_endpoint is None:
            raise LoginError(f"{self.issuer} publishes no authorization endpoint")
        token_endpoint = self._token_endpoint()
        state, nonce, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(48)
        with _LoopbackCallback() as callback, self._client(redirect_uri=callback.redirect_uri) as client:
            url, _ = client.create_authorization_url(meta.authorization_endpoint, state=state, code_verifier=verifier,
                                                     nonce=nonce)
            open_url(str(url))
            answer = callback.wait(timeout)
            if answer is None:
                raise LoginError(f"no answer from the browser within {int(timeout)} s: run pgproxy login again")
            if not hmac.compare_digest(answer.get("state", ""), state):
                raise LoginError("the provider's answer is for another login (state mismatch)")
            if "error" in answer:
                raise LoginError(f"the provider refused the login: {answer['error'][:200]}")
            try:
                tokens = dict(client.fetch_token(token_endpoint, code=answer.get("code", ""), code_verifier=verifier))
            except OAuthError as exc:
                raise LoginError(f"the provider refused the login: {exc.error}") from None
            except httpx.HTTPError as exc:
                raise LoginError(f"cannot reach {token_endpoint}: {type(exc).__name__}") from None
        try:  # straight from the token endpoint over TLS: only the nonce needs checking (OIDC Core 3.1.3.7)
            claims = jwt.decode(str(tokens.get("id_token")), options={"verify_signature": False})
        except jwt.PyJWTError:
            raise LoginError("the provider returned no usable ID token (is the openid scope granted?)") from None
        if not hmac.compare_digest(str(claims.get("nonce", "")), nonce):
            raise LoginError("the provider's ID token does not carry this login's nonce")
        return self._keep(tokens)

    # ------------------------------------------------------------------------------------------
    # Cached tokens

    def _keep(self, tokens: dict[str, Any]) -> Path:
        token = tokens.get(self.token_kind)
        if not isinstance(token, str) or not token:
            raise LoginError(f"the provider returned no {self.token_kind} (scopes: {' '.join(self.scopes)})")
        expires = token_expiry(token)
        if expires is None and isinstance(tokens.get("expires_in"), (int, float)):
            expires = self._now() + float(tokens["expires_in"])
        names = ("id_token", "access_token", "refresh_token", "token_type", "scope")
        kept: dict[str, Any] = {k: tokens[k] for k in names if k in tokens}
        kept["expires_at"] = expires
        return self.cache.store(self.issuer, self.client_id, kept)

    def fresh_token(self, min_seconds: float = 60.0) -> str:
        """The cached token if it is valid ``min_seconds`` longer, else a refreshed one; LoginError if neither."""
        cached = self.cache.load(self.issuer, self.client_id)
        if cached is None:
            raise LoginError(f"not logged in to {self.issuer}: run pgproxy login")
        token, expires = cached.get(self.token_kind), cached.get("expires_at")
        if isinstance(token, str) and isinstance(expires, (int, float)) and expires - self._now() > min_seconds:
            return token
        refresh = cached.get("refresh_token")
        if not isinstance(refresh, str):
            raise LoginError(f"the login at {self.issuer} has expired and cannot be refreshed: run pgproxy login")
        try:
            with self._client(scoped=False) as client:
                tokens = dict(client.refresh_token(self._token_endpoint(), refresh_token=refresh))
        except OAuthError as exc:
            raise LoginError(f"the login at {self.issuer} could not be refreshed ({exc.error}): "
                             "run pgproxy login") from None
        except httpx.HTTPError as exc:
            raise LoginError(f"cannot reach {self._token_endpoint()}: {type(exc).__name__}") from None
        tokens.setdefault("refresh_token", refresh)  # providers that do not rotate keep the old one valid
        self._keep(tokens)
        fresh = tokens.get(self.token_kind)
        assert isinstance(fresh, str)
        return fresh

    def logout(self) -> bool:
        """Forget the cached tokens."""
        return self.cache.delete(self.issuer, self.client_id)

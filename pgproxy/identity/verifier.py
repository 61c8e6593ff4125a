"""Verifies the JWT a caller sends as its PostgreSQL password and turns it into an Identity.

Only algorithms on the configured allowlist are accepted (never ``none``); HS* tokens are checked
only against the shared secret and asymmetric tokens only against JWKS keys whose type (and ``alg``,
if the key declares one) matches the token's algorithm, so an RSA public key can never be used as an
HMAC secret. Signing keys come from a JWKS file (reloaded when it changes), a JWKS URL (cached,
refreshed on an unknown ``kid`` at most every ``jwks_min_refresh_seconds``), the JWKS URL that the
issuer's OpenID discovery document names (``discovery: true``; looked up again when a JWKS fetch
fails) or an environment variable holding the HS256 secret.

A token that verified is remembered (keyed on the whole token) until its ``exp`` at the latest, so a
client that reconnects with the same token skips the signature check; the key it verified with is
still looked up for every use, exactly as for a new token, and the remembered result counts only if
that lookup yields the very same key: a JWKS rotation, a removed ``kid`` or a reloaded secret sends the
token through the full check again.

Refusals raise :class:`TokenError` with a short reason that is safe to show the client. This module
must never log or put into an exception the raw token or the secret; the cache of verified tokens
lives in memory only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cachetools import TLRUCache
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey, EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey, Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.exceptions import InvalidJTIError, InvalidSubjectError

from pgproxy.config import (
    ASYMMETRIC_ALGORITHMS,
    SYMMETRIC_ALGORITHMS,
    ConfigError,
    IdentityConfig,
)
from pgproxy.identity.claims import Identity, TokenError, identity_from_claims, valid_role_name
from pgproxy.identity.discovery import discover
from pgproxy.identity.fetch import MAX_DOCUMENT_BYTES, fetch_url

__all__ = ["MAX_TOKEN_BYTES", "TokenError", "TokenVerifier"]

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 16 * 1024
MAX_JWKS_BYTES = MAX_DOCUMENT_BYTES
MIN_HS_SECRET_BYTES = 32
MAX_VERIFIED_TOKENS = 4096

_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_OKP_CURVES = ("Ed25519", "Ed448")

PublicKey = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey


@dataclass(frozen=True)
class _Key:
    """One usable public key from a JWKS."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    key: PublicKey

    def compatible_with(self, alg: str) -> bool:
        """Whether this key may verify a token signed with ``alg`` (key type, curve and declared alg)."""
        if self.alg is not None and self.alg != alg:
            return False
        if alg.startswith(("RS", "PS")):
            return self.kty == "RSA" and isinstance(self.key, RSAPublicKey)
        if alg in _EC_CURVES:
            return (self.kty == "EC" and self.crv == _EC_CURVES[alg]
                    and isinstance(self.key, EllipticCurvePublicKey))
        if alg == "EdDSA":
            return self.kty == "OKP" and isinstance(self.key, (Ed25519PublicKey, Ed448PublicKey))
        return False


@dataclass(frozen=True)
class _Verified:
    """A token that verified, its header's (alg, kid) and the key it verified with."""

    identity: Identity
    alg: str
    kid: str | None
    key: bytes | PublicKey


def _public(key: Any) -> PublicKey:
    if isinstance(key, (RSAPrivateKey, EllipticCurvePrivateKey, Ed25519PrivateKey, Ed448PrivateKey)):
        key = key.public_key()
    if isinstance(key, (RSAPublicKey, EllipticCurvePublicKey, Ed25519PublicKey, Ed448PublicKey)):
        return key
    raise ValueError("not a supported public key")


def _jwk_to_key(jwk: Mapping[str, Any]) -> _Key | None:
    """A usable signing key from one JWK, or None for keys we must ignore (``oct``, ``use`` != sig...)."""
    kty, kid, alg, use, crv = (jwk.get(n) for n in ("kty", "kid", "alg", "use", "crv"))
    if kty not in ("RSA", "EC", "OKP"):
        return None  # "oct" (shared secrets) never verify anything from a JWKS
    if kid is not None and not isinstance(kid, str):
        return None
    if alg is not None and alg not in ASYMMETRIC_ALGORITHMS:
        return None
    if use is not None and use != "sig":
        return None
    if crv is not None and not isinstance(crv, str):
        return None
    data = dict(jwk)
    try:
        if kty == "RSA":
            key = _public(RSAAlgorithm.from_jwk(data))
        elif kty == "EC":
            key = _public(ECAlgorithm.from_jwk(data))
        else:
            key = _public(OKPAlgorithm.from_jwk(data))
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        return None
    return _Key(kid=kid, kty=kty, crv=crv, alg=alg, key=key)


def parse_jwks(data: bytes | str) -> list[_Key]:
    """The usable asymmetric signing keys in a JWKS document; ValueError if it isn't a JWKS at all."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ValueError("JWKS is not valid JSON") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("JWKS has no 'keys' list")
    keys = []
    for jwk in doc["keys"]:
        if isinstance(jwk, dict):
            key = _jwk_to_key(jwk)
            if key is not None:
                keys.append(key)
    return keys


def _token_id(token: str, claims: Mapping[str, Any]) -> str:
    jti = claims.get("jti")
    if isinstance(jti, str) and jti:
        return jti
    return "sha256:" + hashlib.sha256(token.encode("ascii")).hexdigest()[:16]


def _map_pyjwt_error(exc: jwt.PyJWTError) -> TokenError:
    """A short client-safe reason for a pyjwt exception (pyjwt's own messages are never passed on)."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return TokenError("token expired")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return TokenError("token not yet valid")
    if isinstance(exc, jwt.InvalidIssuerError):
        return TokenError("invalid issuer")
    if isinstance(exc, jwt.InvalidAudienceError):
        return TokenError("invalid audience")
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return TokenError(f"missing claim: {exc.claim}")
    if isinstance(exc, jwt.InvalidSignatureError):
        return TokenError("invalid signature")
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return TokenError("algorithm not allowed")
    if isinstance(exc, InvalidSubjectError):
        return TokenError("invalid claim: sub")
    if isinstance(exc, InvalidJTIError):
        return TokenError("invalid claim: jti")
    if isinstance(exc, jwt.InvalidIssuedAtError):
        return TokenError("invalid claim: iat")
    if isinstance(exc, jwt.InvalidKeyError):
        return TokenError("key does not match algorithm")
    if isinstance(exc, jwt.DecodeError):
        return TokenError("malformed token")
    return TokenError("invalid token")


def _check_times(claims: Mapping[str, Any], now: float, leeway: float) -> None:
    """exp (required), nbf and iat against ``now``.

    ``exp`` is a hard limit: a token is refused from its ``exp`` on, whatever the leeway. ``leeway``
    seconds of clock skew are allowed only for ``nbf`` and ``iat`` (an issuer whose clock runs ahead).
    """

    def numeric(name: str) -> float | None:
        value = claims.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TokenError(f"invalid claim: {name}")
        return float(value)

    exp = numeric("exp")
    if exp is None:
        raise TokenError("missing claim: exp")
    if exp <= now:
        raise TokenError("token expired")
    nbf = numeric("nbf")
    if nbf is not None and nbf > now + leeway:
        raise TokenError("token not yet valid")
    iat = numeric("iat")
    if iat is not None and iat > now + leeway:
        raise TokenError("token not yet valid")


class TokenVerifier:
    """Verifies tokens against the key source in an IdentityConfig.

    ``now`` supplies the current epoch time for exp/nbf/iat checks and the JWKS cache clocks.
    Construction validates the configuration and raises ConfigError on mistakes (mixed HS/asymmetric
    algorithms, a missing or short HS256 secret, an unreadable JWKS file...).
    """

    def __init__(self, config: IdentityConfig, *, now: Callable[[], float] = time.time) -> None:
        self._config = config
        self._now = now
        self._algorithms = self._check_algorithms(config)
        self._secret: bytes | None = None
        self._keys: list[_Key] | None = None
        # JWKS file: (mtime_ns, size, inode) of the version loaded.
        self._file_signature: tuple[int, int, int] | None = None
        # JWKS URL: time of the last successful fetch and of the last attempt.
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._inflight: asyncio.Task[None] | None = None
        # discovery: the jwks_uri of the issuer's discovery document, once fetched.
        self._jwks_uri: str | None = config.jwks_url
        # token -> what it verified as; an entry expires at the token's exp (on the ``now`` clock).
        self._verified: TLRUCache[str, _Verified] = TLRUCache(
            maxsize=MAX_VERIFIED_TOKENS, ttu=lambda _token, v, _now: v.identity.expires_at, timer=now)

        sources = [s for s in (config.jwks_file, config.jwks_url, config.hs256_secret_env) if s is not None]
        if len(sources) + config.discovery != 1:
            raise ConfigError("identity: set exactly one key source: jwks_file, jwks_url, discovery or "
                              "hs256_secret_env")
        if config.default_db_role is not None and not valid_role_name(config.default_db_role):
            raise ConfigError("identity.default_db_role: not a valid role name")
        if config.hs256_secret_env is not None:
            self._secret = self._load_secret(config.hs256_secret_env)
        elif config.jwks_file is not None:
            try:
                self._reload_file(config.jwks_file, initial=True)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"identity.jwks_file: {exc}") from None
            if not self._keys:
                raise ConfigError(f"identity.jwks_file: no usable signing keys in {config.jwks_file}")

    # ------------------------------------------------------------------------------------------
    # Configuration

    @staticmethod
    def _check_algorithms(config: IdentityConfig) -> frozenset[str]:
        algorithms = frozenset(config.algorithms)
        if not algorithms:
            raise ConfigError("identity.algorithms: required (an explicit allowlist)")
        unknown = algorithms - ASYMMETRIC_ALGORITHMS - SYMMETRIC_ALGORITHMS
        if unknown:
            raise ConfigError(f"identity.algorithms: unsupported algorithm {sorted(unknown)[0]!r}")
        symmetric = algorithms & SYMMETRIC_ALGORITHMS
        if config.hs256_secret_env is not None and symmetric != algorithms:
            raise ConfigError("identity.algorithms: an HS256 secret only verifies HS* algorithms")
        if config.hs256_secret_env is None and symmetric:
            raise ConfigError("identity.algorithms: HS* algorithms need hs256_secret_env; never mix them "
                              "with public keys (algorithm confusion)")
        return algorithms

    @staticmethod
    def _load_secret(env_name: str) -> bytes:
        value = os.environ.get(env_name)
        if value is None:
            raise ConfigError(f"identity.hs256_secret_env: environment variable {env_name} is not set")
        secret = value.encode("utf-8")
        if len(secret) < MIN_HS_SECRET_BYTES:
            raise ConfigError(f"identity.hs256_secret_env: the secret in {env_name} is {len(secret)} bytes; "
                              f"at least {MIN_HS_SECRET_BYTES} are required")
        return secret

    # ------------------------------------------------------------------------------------------
    # Public API

    async def verify(self, token: str) -> Identity:
        """Verify ``token`` and return its Identity, or raise TokenError with a client-safe reason.

        May fetch the JWKS URL (in a worker thread) when the cache is stale or the ``kid`` is unknown.
        """
        cached = self._verified.get(token)  # its header needs no second parse (pyjwt's costs ~0.3 ms)
        alg, kid = (cached.alg, cached.kid) if cached is not None else self._preparse(token)
        key: bytes | PublicKey
        if self._secret is not None:
            key = self._secret
        else:
            key = await self._select_key(alg, kid, allow_fetch=True)
        return self._decode_once(token, alg, kid, key, cached)

    def verify_cached_keys_only(self, token: str) -> Identity:
        """Like :meth:`verify` but never fetches the JWKS URL: only keys already cached are used.

        A JWKS file is still re-read if it changed (that is a local, cheap operation).
        """
        cached = self._verified.get(token)
        alg, kid = (cached.alg, cached.kid) if cached is not None else self._preparse(token)
        key: bytes | PublicKey = (self._secret if self._secret is not None
                                  else self._pick(self._current_keys(), alg, kid))
        return self._decode_once(token, alg, kid, key, cached)

    async def prefetch_keys(self) -> int:
        """Load the signing keys now (e.g. at start-up) and return how many are usable."""
        if self._secret is not None:
            return 1
        if self._fetches_keys:
            await self._refresh_url()
        return len(self._current_keys())

    @property
    def _fetches_keys(self) -> bool:
        return self._config.jwks_url is not None or self._config.discovery

    # ------------------------------------------------------------------------------------------
    # Token parsing and validation

    def _preparse(self, token: str) -> tuple[str, str | None]:
        """Size and shape checks before any cryptography; returns the header's (alg, kid)."""
        if not isinstance(token, str):
            raise TokenError("malformed token")
        if len(token) > MAX_TOKEN_BYTES or len(token.encode("utf-8", "surrogatepass")) > MAX_TOKEN_BYTES:
            raise TokenError("token too large")
        if not token or not token.isascii() or token.count(".") != 2:
            raise TokenError("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise TokenError("malformed token")
        if alg not in self._algorithms or alg.lower() == "none":
            raise TokenError("algorithm not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenError("malformed token")
        return alg, kid

    def _decode_once(self, token: str, alg: str, kid: str | None, key: bytes | PublicKey,
                     cached: _Verified | None) -> Identity:
        """:meth:`_decode`, or what it gave for this very token and key before (``cached``; only until exp)."""
        if cached is not None and cached.key is key and self._now() < cached.identity.expires_at:
            return cached.identity
        identity = self._decode(token, alg, key)
        self._verified[token] = _Verified(identity, alg, kid, key)
        return identity

    def _decode(self, token: str, alg: str, key: bytes | PublicKey) -> Identity:
        cfg = self._config
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=[cfg.audience, *cfg.extra_audiences] if cfg.extra_audiences else cfg.audience,
                issuer=cfg.issuer,
                options={
                    "require": ["exp", "iss", "aud"],
                    # Times are checked below against our own clock (``now``).
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "strict_aud": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise _map_pyjwt_error(exc) from None
        except (ValueError, TypeError):
            raise TokenError("malformed token") from None
        _check_times(claims, self._now(), cfg.leeway_seconds)
        return identity_from_claims(claims, cfg.claims, cfg.default_db_role, _token_id(token, claims))

    # ------------------------------------------------------------------------------------------
    # Key selection

    @staticmethod
    def _pick(keys: Sequence[_Key], alg: str, kid: str | None) -> PublicKey:
        """The key for (alg, kid) from ``keys``; TokenError when there is none or it is ambiguous."""
        if not keys:
            raise TokenError("signing keys unavailable")
        if kid is not None:
            matching = [k for k in keys if k.kid == kid]
            if not matching:
                raise TokenError("unknown key id")
            compatible = [k for k in matching if k.compatible_with(alg)]
            if not compatible:
                raise TokenError("key does not match algorithm")
            return compatible[0].key
        compatible = [k for k in keys if k.compatible_with(alg)]
        if not compatible:
            raise TokenError("key does not match algorithm")
        if len(compatible) > 1:
            raise TokenError("key id required")
        return compatible[0].key

    async def _select_key(self, alg: str, kid: str | None, *, allow_fetch: bool) -> PublicKey:
        if self._fetches_keys and allow_fetch:
            now = self._now()
            stale = self._fetched_at is None or now - self._fetched_at >= self._config.jwks_cache_seconds
            unknown_kid = kid is not None and not any(k.kid == kid for k in self._keys or ())
            if (stale or unknown_kid) and self._may_fetch(now):
                await self._refresh_url()
        return self._pick(self._current_keys(), alg, kid)

    def _current_keys(self) -> list[_Key]:
        if self._config.jwks_file is not None:
            self._maybe_reload_file(self._config.jwks_file)
        return self._keys or []

    # ------------------------------------------------------------------------------------------
    # JWKS file

    @staticmethod
    def _stat_signature(path: Path) -> tuple[int, int, int]:
        st = path.stat()
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _reload_file(self, path: Path, *, initial: bool = False) -> None:
        signature = self._stat_signature(path)
        if len(data := path.read_bytes()) > MAX_JWKS_BYTES:
            raise ValueError("JWKS file too large")
        self._file_signature = signature  # remember even a bad version, so it is reported once
        keys = parse_jwks(data)
        if not keys and not initial:
            raise ValueError("no usable signing keys")
        self._keys = keys
        log.info("loaded %d signing key(s) from %s", len(keys), path)

    def _maybe_reload_file(self, path: Path) -> None:
        try:
            if self._stat_signature(path) == self._file_signature:
                return
            self._reload_file(path)
        except (OSError, ValueError) as exc:
            log.warning("cannot reload JWKS file %s (keeping %d cached key(s)): %s",
                        path, len(self._keys or ()), exc)

    # ------------------------------------------------------------------------------------------
    # JWKS URL

    def _may_fetch(self, now: float) -> bool:
        if self._inflight is not None and not self._inflight.done():
            return True  # join the fetch already under way
        if self._attempted_at is None:
            return True
        return now - self._attempted_at >= self._config.jwks_min_refresh_seconds

    async def _refresh_url(self) -> None:
        """Fetch the JWKS URL; concurrent callers share one fetch. Never raises."""
        task = self._inflight
        if task is None or task.done():
            task = asyncio.ensure_future(self._fetch_and_store())
            self._inflight = task
        await asyncio.shield(task)

    async def _fetch_and_store(self) -> None:
        url = self._jwks_uri
        timeout = self._config.jwks_timeout_seconds
        self._attempted_at = self._now()
        try:
            if url is None:
                url = self._jwks_uri = (await discover(self._config.issuer, timeout)).jwks_uri
            body = await asyncio.wait_for(asyncio.to_thread(fetch_url, url, timeout), timeout)
            keys = parse_jwks(body)
            if not keys:
                raise ValueError("no usable signing keys")
        except Exception as exc:  # any failure just keeps the cached keys
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            log.warning("JWKS fetch from %s failed (keeping %d cached key(s)): %s",
                        url or self._config.issuer, len(self._keys or ()), reason)
            if self._config.discovery:
                self._jwks_uri = None  # the provider may have moved its keys: look them up again
            return
        self._keys = keys
        self._fetched_at = self._now()
        log.info("fetched %d signing key(s) from %s", len(keys), url)

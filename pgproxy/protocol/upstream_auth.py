"""Answer the upstream server's authentication challenges with the proxy's own credential.

A sans-I/O state machine: feed it each Authentication* message from the server, send whatever bytes
it returns. It supports SCRAM-SHA-256, md5, cleartext and trust. It never exposes the password:
errors name the method and role only.

SCRAM-SHA-256 (RFC 5802 / RFC 7677, without channel binding, as PostgreSQL's ``SCRAM-SHA-256``) is
driven here rather than by scramp's client because the expensive part of a login, the PBKDF2 that
turns the password into ClientKey and ServerKey, depends only on (password, salt, iterations): a
:class:`ScramKeyCache` keeps those keys so that only the first login per stored verifier pays for
it. Every exchange still uses fresh nonces and checks the server's signature (the server proves it
holds the verifier each time); a server whose password changed has a new salt, so the keys are
derived again and its refusal of the old password is what the caller sees.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from cachetools import LRUCache
from scramp import ScramException
from scramp.utils import saslprep

from .messages import (
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationOther,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    PasswordMessage,
    SASLInitialResponse,
    SASLResponse,
)

SCRAM_MECHANISM = "SCRAM-SHA-256"
MIN_ITERATIONS = 4096  # fewer would be a downgrade (and scramp, used before, refused them too)
MAX_ITERATIONS = 10_000_000  # a hostile server must not make a login cost minutes of CPU
NONCE_BYTES = 18
GS2_HEADER = "n,,"  # no channel binding, no authzid
CHANNEL_BINDING = base64.b64encode(GS2_HEADER.encode()).decode()  # "biws"

AuthMessage = (AuthenticationOk | AuthenticationCleartextPassword | AuthenticationMD5Password | AuthenticationSASL
               | AuthenticationSASLContinue | AuthenticationSASLFinal | AuthenticationOther)


class UpstreamAuthError(Exception):
    """The upstream login cannot proceed; the message is safe to log (never contains the password)."""


def md5_password(user: str, password: str, salt: bytes) -> str:
    """PostgreSQL's md5 response: 'md5' + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + user).encode()).hexdigest().encode()  # protocol-mandated md5
    return "md5" + hashlib.md5(inner + salt).hexdigest()


@dataclass(frozen=True)
class ScramKeys:
    """The keys derived from a password for one (salt, iterations): RFC 5802 ClientKey, StoredKey, ServerKey."""

    client_key: bytes
    stored_key: bytes
    server_key: bytes

    @classmethod
    def derive(cls, password: str, salt: bytes, iterations: int) -> ScramKeys:
        try:
            normalized = saslprep(password)
        except ScramException:  # PostgreSQL (and libpq) use a password that SASLprep refuses as it is
            normalized = password
        salted = hashlib.pbkdf2_hmac("sha256", normalized.encode(), salt, iterations)
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        return cls(client_key, hashlib.sha256(client_key).digest(), hmac.digest(salted, b"Server Key", "sha256"))


class ScramKeyCache:
    """Derived SCRAM keys per (role, password, salt, iterations), least recently used dropped first.

    Keyed on the password itself, so a changed credential file derives new keys; the cached keys are
    password equivalents and live only in this process's memory, like the password.
    """

    def __init__(self, maxsize: int = 256) -> None:
        self._keys: LRUCache[tuple[str, str, bytes, int], ScramKeys] = LRUCache(maxsize=maxsize)

    def keys(self, user: str, password: str, salt: bytes, iterations: int) -> ScramKeys:
        key = (user, password, salt, iterations)
        keys = self._keys.get(key)
        if keys is None:
            keys = self._keys[key] = ScramKeys.derive(password, salt, iterations)
        return keys

    def __len__(self) -> int:
        return len(self._keys)


def _attributes(message: bytes, what: str) -> dict[str, str]:
    """The ``k=v`` attributes of a SCRAM message; UpstreamAuthError when it is not one."""
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:
        raise UpstreamAuthError(f"invalid SCRAM {what} message from upstream") from None
    attributes: dict[str, str] = {}
    for part in text.split(","):
        name, eq, value = part.partition("=")
        if len(name) != 1 or not eq:
            raise UpstreamAuthError(f"invalid SCRAM {what} message from upstream")
        attributes.setdefault(name, value)
    if "e" in attributes:
        raise UpstreamAuthError(f"upstream SCRAM error: {attributes['e'][:100]}")
    return attributes


class _ScramExchange:
    """One SCRAM-SHA-256 client conversation (fresh nonce), with keys from ``cache``."""

    def __init__(self, user: str, password: str, cache: ScramKeyCache | None) -> None:
        self._user, self._password, self._cache = user, password, cache
        self._nonce = base64.b64encode(secrets.token_bytes(NONCE_BYTES)).decode()
        # PostgreSQL takes the user from the startup packet and ignores this one (RFC 5802 saslname escaping).
        saslname = user.replace("=", "=3D").replace(",", "=2C")
        self._client_first_bare = f"n={saslname},r={self._nonce}"
        self._server_signature: bytes | None = None

    def client_first(self) -> bytes:
        return (GS2_HEADER + self._client_first_bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        attributes = _attributes(server_first, "server-first")
        nonce, salt_b64, iterations_text = attributes.get("r", ""), attributes.get("s", ""), attributes.get("i", "")
        if not nonce.startswith(self._nonce) or len(nonce) <= len(self._nonce):
            raise UpstreamAuthError("invalid SCRAM server-first message: the server nonce does not extend ours")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
            iterations = int(iterations_text) if iterations_text.isdigit() else -1
        except (binascii.Error, ValueError):
            raise UpstreamAuthError("invalid SCRAM server-first message: bad salt") from None
        if not salt or not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
            raise UpstreamAuthError(f"invalid SCRAM server-first message: iteration count must be "
                                    f"{MIN_ITERATIONS}..{MAX_ITERATIONS}")
        keys = (self._cache.keys(self._user, self._password, salt, iterations) if self._cache is not None
                else ScramKeys.derive(self._password, salt, iterations))
        without_proof = f"c={CHANNEL_BINDING},r={nonce}"
        auth_message = f"{self._client_first_bare},{server_first.decode()},{without_proof}".encode()
        client_signature = hmac.digest(keys.stored_key, auth_message, "sha256")
        proof = (int.from_bytes(keys.client_key) ^ int.from_bytes(client_signature)).to_bytes(len(client_signature))
        self._server_signature = hmac.digest(keys.server_key, auth_message, "sha256")
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def check_server_final(self, server_final: bytes) -> None:
        """The server proved it holds our verifier, or UpstreamAuthError."""
        if self._server_signature is None:
            raise UpstreamAuthError("unexpected SASL final message from upstream")
        try:
            signature = base64.b64decode(_attributes(server_final, "server-final").get("v", ""), validate=True)
        except binascii.Error:
            signature = b""
        if not hmac.compare_digest(signature, self._server_signature):
            raise UpstreamAuthError("upstream SCRAM signature is invalid")


class UpstreamAuthenticator:
    """Drives one upstream login as ``user``; ``done`` becomes True on AuthenticationOk.

    ``scram_keys``, when given, supplies (and remembers) the derived SCRAM keys.
    """

    def __init__(self, user: str, password: str | None, scram_keys: ScramKeyCache | None = None) -> None:
        self.user = user
        self._password = password
        self._scram_keys = scram_keys
        self._scram: _ScramExchange | None = None
        self._scram_verified = False
        self.done = False
        self.method = "trust"

    def _need_password(self, method: str) -> str:
        self.method = method
        if self._password is None:
            raise UpstreamAuthError(f"upstream asks for {method} authentication for role {self.user!r} "
                                    "but no password is configured for it")
        return self._password

    def handle(self, msg: AuthMessage) -> bytes | None:
        """Return the bytes to send upstream in answer to ``msg`` (None when nothing is to be sent)."""
        if isinstance(msg, AuthenticationOk):
            if self._scram is not None and not self._scram_verified:
                raise UpstreamAuthError("upstream ended SCRAM without proving it knows the password")
            self.done = True
            return None
        if isinstance(msg, AuthenticationCleartextPassword):
            return PasswordMessage(self._need_password("password")).encode()
        if isinstance(msg, AuthenticationMD5Password):
            password = self._need_password("md5")
            return PasswordMessage(md5_password(self.user, password, msg.salt)).encode()
        if isinstance(msg, AuthenticationSASL):
            password = self._need_password(SCRAM_MECHANISM)
            if SCRAM_MECHANISM not in msg.mechanisms:
                raise UpstreamAuthError(f"upstream offers SASL mechanisms {list(msg.mechanisms)}; "
                                        f"only {SCRAM_MECHANISM} is supported")
            if self._scram is not None:
                raise UpstreamAuthError("upstream started SCRAM twice")
            self._scram = _ScramExchange(self.user, password, self._scram_keys)
            return SASLInitialResponse(SCRAM_MECHANISM, self._scram.client_first()).encode()
        if isinstance(msg, AuthenticationSASLContinue):
            if self._scram is None:
                raise UpstreamAuthError("unexpected SASL continuation from upstream")
            return SASLResponse(self._scram.client_final(msg.data)).encode()
        if isinstance(msg, AuthenticationSASLFinal):
            if self._scram is None:
                raise UpstreamAuthError("unexpected SASL final message from upstream")
            self._scram.check_server_final(msg.data)
            self._scram_verified = True
            return None
        raise UpstreamAuthError(f"upstream requested an unsupported authentication method (code {msg.code})")

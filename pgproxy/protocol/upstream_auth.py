"""Answer the upstream server's authentication challenges with the proxy's own credential.

A sans-I/O state machine: feed it each Authentication* message from the server, send whatever bytes
it returns. It supports SCRAM-SHA-256 (via scramp), md5, cleartext and trust. It never exposes the
password: errors name the method and role only.
"""

from __future__ import annotations

import hashlib

import scramp

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

AuthMessage = (AuthenticationOk | AuthenticationCleartextPassword | AuthenticationMD5Password | AuthenticationSASL
               | AuthenticationSASLContinue | AuthenticationSASLFinal | AuthenticationOther)


class UpstreamAuthError(Exception):
    """The upstream login cannot proceed; the message is safe to log (never contains the password)."""


def md5_password(user: str, password: str, salt: bytes) -> str:
    """PostgreSQL's md5 response: 'md5' + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + user).encode()).hexdigest().encode()  # protocol-mandated md5
    return "md5" + hashlib.md5(inner + salt).hexdigest()


class UpstreamAuthenticator:
    """Drives one upstream login as ``user``; ``done`` becomes True on AuthenticationOk."""

    def __init__(self, user: str, password: str | None) -> None:
        self.user = user
        self._password = password
        self._scram: scramp.ScramClient | None = None
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
            if self._scram is not None and self.method == SCRAM_MECHANISM and not self._scram_verified:
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
            self._scram = scramp.ScramClient([SCRAM_MECHANISM], self.user, password)
            self._scram_verified = False
            first = self._scram.get_client_first().encode()
            return SASLInitialResponse(SCRAM_MECHANISM, first).encode()
        if isinstance(msg, AuthenticationSASLContinue):
            if self._scram is None:
                raise UpstreamAuthError("unexpected SASL continuation from upstream")
            try:
                self._scram.set_server_first(msg.data.decode())
            except (scramp.ScramException, UnicodeDecodeError) as exc:
                raise UpstreamAuthError(f"invalid SCRAM server-first message: {exc}") from None
            return SASLResponse(self._scram.get_client_final().encode()).encode()
        if isinstance(msg, AuthenticationSASLFinal):
            if self._scram is None:
                raise UpstreamAuthError("unexpected SASL final message from upstream")
            try:
                self._scram.set_server_final(msg.data.decode())
            except (scramp.ScramException, UnicodeDecodeError) as exc:
                raise UpstreamAuthError(f"upstream SCRAM signature is invalid: {exc}") from None
            self._scram_verified = True
            return None
        raise UpstreamAuthError(f"upstream requested an unsupported authentication method (code {msg.code})")

    _scram_verified = False

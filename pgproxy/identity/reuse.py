"""Bearer tokens of callers that send their token with every request (HTTP and gRPC).

Checking a signature for each request would cost more than the rest of the proxying; the verifier
remembers each token that verified until its expiry (see :class:`TokenVerifier`), so a request with
a token seen before costs a cache look-up plus the same key look-up a new token gets.
"""

from __future__ import annotations

from .claims import Identity, TokenError
from .verifier import TokenVerifier


class VerifiedTokens:
    def __init__(self, verifier: TokenVerifier) -> None:
        self.verifier = verifier

    async def bearer(self, authorization: str | None, how: str) -> Identity:
        """The identity of an ``authorization`` value ``Bearer <JWT>``; TokenError with a reason for the
        caller otherwise (``how`` tells it how to send the token)."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TokenError(f"missing bearer token ({how})")
        try:
            return await self.verifier.verify(token.strip())
        except TokenError as exc:
            raise TokenError(f"invalid token: {exc.reason}") from None

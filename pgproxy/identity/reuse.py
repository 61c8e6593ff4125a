"""Verified tokens remembered for a short while, for callers that send their token with every request.

HTTP and gRPC callers send the token with each request or call; checking a signature each time would
cost more than the rest of the proxying. Only tokens that verified are kept, for up to
``REUSE_SECONDS`` and never past their expiry.
"""

from __future__ import annotations

import time

from .claims import Identity, TokenError
from .verifier import TokenVerifier

REUSE_SECONDS = 30.0
MAX_CACHED_TOKENS = 4096


class VerifiedTokens:
    def __init__(self, verifier: TokenVerifier) -> None:
        self.verifier = verifier
        self._verified: dict[str, tuple[Identity, float]] = {}  # token -> (identity, monotonic reuse limit)

    async def verify(self, token: str) -> Identity:
        """The identity of ``token`` (TokenError if it does not verify)."""
        now = time.monotonic()
        cached = self._verified.get(token)
        if cached is not None and now < cached[1] and time.time() < cached[0].expires_at:
            return cached[0]
        identity = await self.verifier.verify(token)
        if len(self._verified) >= MAX_CACHED_TOKENS:
            self._verified.clear()
        self._verified[token] = (identity, now + REUSE_SECONDS)
        return identity

    async def bearer(self, authorization: str | None, how: str) -> Identity:
        """The identity of an ``authorization`` value ``Bearer <JWT>``; TokenError with a reason for the
        caller otherwise (``how`` tells it how to send the token)."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TokenError(f"missing bearer token ({how})")
        try:
            return await self.verify(token.strip())
        except TokenError as exc:
            raise TokenError(f"invalid token: {exc.reason}") from None

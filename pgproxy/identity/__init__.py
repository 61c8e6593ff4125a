"""Caller identity: JWT verification, claim mapping and development token minting.

Nothing in this package may log, store or echo the raw token or any signing secret.
"""

from pgproxy.identity.claims import Identity, identity_from_claims
from pgproxy.identity.minting import DevKeys, generate_dev_keys, mint_token
from pgproxy.identity.verifier import TokenError, TokenVerifier

__all__ = [
    "DevKeys",
    "Identity",
    "TokenError",
    "TokenVerifier",
    "generate_dev_keys",
    "identity_from_claims",
    "mint_token",
]

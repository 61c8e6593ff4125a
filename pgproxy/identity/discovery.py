"""OpenID Connect discovery: an issuer URL's ``/.well-known/openid-configuration`` read and checked.

The document must name exactly the configured issuer (OpenID Connect Discovery 1.0, section 4.3),
otherwise a provider could vouch for another's tokens; every endpoint must be https (plain http only
on loopback). Used by the wire listener's TokenVerifier (``identity.discovery``), the admin UI's
OIDC login and ``pgproxy login``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from pgproxy.config import secure_url
from pgproxy.identity.fetch import fetch_url

WELL_KNOWN = "/.well-known/openid-configuration"


class DiscoveryError(Exception):
    """The provider's metadata could not be fetched or is unusable; the message says why."""


@dataclass(frozen=True)
class ProviderMetadata:
    """The endpoints pgproxy uses from a provider's discovery document."""

    issuer: str
    jwks_uri: str
    authorization_endpoint: str | None = None
    token_endpoint: str | None = None
    device_authorization_endpoint: str | None = None
    end_session_endpoint: str | None = None


def discovery_url(issuer: str) -> str:
    return issuer.rstrip("/") + WELL_KNOWN


def parse_metadata(issuer: str, body: bytes | str) -> ProviderMetadata:
    """The checked metadata in ``body``; DiscoveryError if it is not for ``issuer`` or unsafe."""
    try:
        doc: Any = json.loads(body)
    except (ValueError, RecursionError):
        raise DiscoveryError("discovery document is not valid JSON") from None
    if not isinstance(doc, dict):
        raise DiscoveryError("discovery document is not a JSON object")
    if doc.get("issuer") != issuer:
        raise DiscoveryError(f"discovery document names issuer {doc.get('issuer')!r}, expected {issuer!r}")

    def endpoint(name: str, *, required: bool = False) -> str | None:
        value = doc.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not secure_url(value):
            raise DiscoveryError(f"discovery document: {name} must be an https URL (plain http only for loopback)")
        return value

    jwks_uri = endpoint("jwks_uri", required=True)
    assert jwks_uri is not None
    return ProviderMetadata(
        issuer=issuer,
        jwks_uri=jwks_uri,
        authorization_endpoint=endpoint("authorization_endpoint"),
        token_endpoint=endpoint("token_endpoint"),
        device_authorization_endpoint=endpoint("device_authorization_endpoint"),
        end_session_endpoint=endpoint("end_session_endpoint"),
    )


def fetch_metadata(issuer: str, timeout: float = 5.0) -> ProviderMetadata:
    """Download and check ``issuer``'s discovery document (blocking)."""
    if not secure_url(issuer):
        raise DiscoveryError(f"issuer {issuer!r} must be an https URL (plain http only for loopback)")
    try:
        body = fetch_url(discovery_url(issuer), timeout)
    except OSError as exc:
        raise DiscoveryError(f"cannot fetch {discovery_url(issuer)}: {exc}") from None
    return parse_metadata(issuer, body)


async def discover(issuer: str, timeout: float = 5.0) -> ProviderMetadata:
    """:func:`fetch_metadata` in a worker thread, bounded by ``timeout``."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(fetch_metadata, issuer, timeout), timeout)
    except TimeoutError:
        raise DiscoveryError(f"fetching {discovery_url(issuer)} timed out") from None

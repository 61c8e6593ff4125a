"""Development signing keys and tokens for the demo and the tests.

``generate_dev_keys`` writes a private key (PKCS8 PEM, mode 0600) and the matching public JWKS;
``mint_token`` signs a token with that key. This is for local development only: the proxy's
``serve`` path never reads the private key, and this module must never log the key or a minted token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

PRIVATE_KEY_FILENAME = "dev-signing-key.pem"
JWKS_FILENAME = "jwks.json"

_EC_ALGORITHMS: dict[str, ec.EllipticCurve] = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(),
                                               "ES512": ec.SECP521R1()}
_CURVE_TO_ALG = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
# RFC 7638 §3.2: the required members of each key type, in lexicographic order.
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicSigningKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass(frozen=True)
class DevKeys:
    private_key_file: Path
    jwks_file: Path
    kid: str


def public_jwk(public_key: PublicSigningKey) -> dict[str, Any]:
    """The public JWK of an EC or RSA key, as pyjwt produces it (minus ``key_ops``: we set ``use``)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        jwk = dict(ECAlgorithm.to_jwk(public_key, as_dict=True))
    else:
        jwk = dict(RSAAlgorithm.to_jwk(public_key, as_dict=True))
    jwk.pop("key_ops", None)  # RFC 7517 4.3: "use" and "key_ops" should not be used together
    return jwk


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 JWK thumbprint (base64url, no padding) of an EC or RSA JWK.

    pyjwt has no thumbprint helper, so this follows RFC 7638 directly: the required members only,
    sorted, serialised without whitespace.
    """
    members = _THUMBPRINT_MEMBERS.get(str(jwk.get("kty")))
    if members is None:
        raise ValueError(f"unsupported key type for thumbprint: {jwk.get('kty')!r}")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _algorithm_for(key: SigningKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    alg = _CURVE_TO_ALG.get(key.curve.name)
    if alg is None:
        raise ValueError(f"unsupported EC curve {key.curve.name}")
    return alg


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also when the file already existed with looser permissions
        os.write(fd, data)
    finally:
        os.close(fd)


def generate_dev_keys(directory: Path, *, algorithm: str = "ES256") -> DevKeys:
    """Create ``dev-signing-key.pem`` (0600) and ``jwks.json`` in ``directory`` (created if needed).

    ``algorithm`` is ES256 (default), ES384, ES512 or RS256. Existing files are overwritten. The
    JWKS holds one public key with ``kid`` (its RFC 7638 thumbprint), ``alg`` and ``use: sig``.
    """
    key: SigningKey
    if algorithm in _EC_ALGORITHMS:
        key = ec.generate_private_key(_EC_ALGORITHMS[algorithm])
    elif algorithm == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        raise ValueError(f"unsupported algorithm {algorithm!r} (use ES256, ES384, ES512 or RS256)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private_file = directory / PRIVATE_KEY_FILENAME
    jwks_file = directory / JWKS_FILENAME
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    _write_private(private_file, pem)
    jwk = public_jwk(key.public_key())
    kid = jwk_thumbprint(jwk)
    jwk.update({"kid": kid, "alg": algorithm, "use": "sig"})
    jwks_file.write_text(json.dumps({"keys": [jwk]}, indent=2) + "\n")
    return DevKeys(private_key_file=private_file, jwks_file=jwks_file, kid=kid)


def load_signing_key(private_key_file: Path) -> SigningKey:
    """Load an unencrypted PEM private key (EC or RSA)."""
    key = serialization.load_pem_private_key(Path(private_key_file).read_bytes(), password=None)
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ValueError(f"{private_key_file}: only EC and RSA signing keys are supported")
    return key


def mint_token(
    private_key_file: Path,
    *,
    issuer: str,
    audience: str,
    subject: str,
    groups: Sequence[str] = (),
    db_role: str | Sequence[str] | None = None,
    ttl_seconds: float = 3600,
    not_before: float | None = None,
    extra_claims: Mapping[str, Any] | None = None,
    kid: str | None = None,
    now: float | None = None,
) -> str:
    """Sign a development token with the key in ``private_key_file``.

    The algorithm follows the key (EC P-256 -> ES256, RSA -> RS256); ``kid`` defaults to the key's
    RFC 7638 thumbprint, as written to the JWKS by :func:`generate_dev_keys`. Adds a random ``jti``,
    ``iat``, ``nbf`` (``not_before`` or now) and ``exp`` (now + ttl). ``groups`` and ``db_role`` are
    omitted when empty/None (they use the default claim names ``groups`` and ``db_role``).
    ``extra_claims`` are applied last and may override any of these.
    """
    key = load_signing_key(private_key_file)
    algorithm = _algorithm_for(key)
    if kid is None:
        kid = jwk_thumbprint(public_jwk(key.public_key()))
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "iat": int(issued),
        "nbf": int(issued if not_before is None else not_before),
        "exp": int(issued + ttl_seconds),
        "jti": secrets.token_urlsafe(16),
    }
    if groups:
        claims["groups"] = [groups] if isinstance(groups, str) else list(groups)
    if db_role is not None:
        claims["db_role"] = db_role if isinstance(db_role, str) else list(db_role)
    if extra_claims:
        claims.update(extra_claims)
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid})

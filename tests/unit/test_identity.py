"""Unit tests for pgproxy.identity: token verification, claim mapping and dev-token minting.

Real cryptography throughout (no mocks of pyjwt); JWKS URLs are served by a real http.server on
127.0.0.1. The raw token must never appear in a TokenError or in the logs.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from pgproxy.config import ClaimNames, ConfigError, IdentityConfig
from pgproxy.identity import (
    DevKeys,
    Identity,
    TokenError,
    TokenVerifier,
    generate_dev_keys,
    identity_from_claims,
    mint_token,
)
from pgproxy.identity import verifier as verifier_module
from pgproxy.identity.minting import jwk_thumbprint, load_signing_key

ISS = "https://issuer.example"
AUD = "pgproxy"
SECRET_ENV = "PGPROXY_TEST_HS_SECRET"
SECRET = "s" * 64


# ----------------------------------------------------------------------------------------------
# Helpers


class Clock:
    def __init__(self, t: float | None = None) -> None:
        self.t = time.time() if t is None else t

    def __call__(self) -> float:
        return self.t


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def std_claims(now: float | None = None, **overrides: Any) -> dict[str, Any]:
    now = time.time() if now is None else now
    claims: dict[str, Any] = {"iss": ISS, "aud": AUD, "sub": "alice", "iat": int(now), "nbf": int(now),
                              "exp": int(now + 600), "db_role": "reader"}
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def sign(keys: DevKeys, claims: Mapping[str, Any], *, alg: str | None = None,
         kid: str | None = "default") -> str:
    key = load_signing_key(keys.private_key_file)
    if alg is None:
        alg = "RS256" if "RSA" in type(key).__name__ else "ES256"
    headers = {"kid": keys.kid if kid == "default" else kid} if kid is not None else {}
    return jwt.encode(dict(claims), key, algorithm=alg, headers=headers)


def mint(keys: DevKeys, **kw: Any) -> str:
    kw.setdefault("db_role", "reader")
    return mint_token(keys.private_key_file, issuer=ISS, audience=AUD, subject="alice", **kw)


def config(**kw: Any) -> IdentityConfig:
    kw.setdefault("algorithms", ("ES256", "RS256"))
    return IdentityConfig(issuer=ISS, audience=AUD, **kw)


def unchecked(**kw: Any) -> IdentityConfig:
    """An identity section the config schema would refuse: the verifier must refuse it too."""
    kw.setdefault("algorithms", ("ES256", "RS256"))
    return IdentityConfig.model_construct(issuer=ISS, audience=AUD, **kw)


def jwks_of(*key_sets: DevKeys) -> dict[str, Any]:
    keys: list[Any] = []
    for ks in key_sets:
        keys.extend(json.loads(ks.jwks_file.read_text())["keys"])
    return {"keys": keys}


def write_jwks(path: Path, doc: Mapping[str, Any]) -> None:
    """Rewrite the JWKS and bump its mtime so the change is visible even on coarse-mtime filesystems."""
    old = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(json.dumps(doc))
    new = max(old + 1_000_000_000, time.time_ns())
    os.utime(path, ns=(new, new))


async def reason(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(TokenError) as info:
        await verifier.verify(token)
    assert token not in str(info.value) or len(token) < 8
    return info.value.reason


@pytest.fixture
def es_keys(tmp_path: Path) -> DevKeys:
    return generate_dev_keys(tmp_path / "es", algorithm="ES256")


@pytest.fixture
def rs_keys(tmp_path: Path) -> DevKeys:
    return generate_dev_keys(tmp_path / "rs", algorithm="RS256")


@pytest.fixture
def es_verifier(es_keys: DevKeys) -> TokenVerifier:
    return TokenVerifier(config(jwks_file=es_keys.jwks_file))


# ----------------------------------------------------------------------------------------------
# Valid tokens


async def test_es256_token_verifies(es_keys: DevKeys, es_verifier: TokenVerifier,
                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    token = mint(es_keys, groups=["eng", "ops"], extra_claims={"agent_id": "agent-7", "session_id": "s-1",
                                                                "tool_call_id": "call-9"})
    ident = await es_verifier.verify(token)
    assert isinstance(ident, Identity)
    assert ident.subject == "alice"
    assert ident.groups == ("eng", "ops")
    assert ident.db_roles == ("reader",)
    assert (ident.agent_id, ident.session_id, ident.tool_call_id) == ("agent-7", "s-1", "call-9")
    assert ident.issuer == ISS
    assert ident.expires_at == pytest.approx(time.time() + 3600, abs=5)
    assert ident.token_id == ident.claims["jti"]
    assert token not in caplog.text


async def test_rs256_token_verifies(rs_keys: DevKeys) -> None:
    verifier = TokenVerifier(config(jwks_file=rs_keys.jwks_file, algorithms=("RS256",)))
    token = mint(rs_keys)
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    ident = await verifier.verify(token)
    assert ident.subject == "alice"


async def test_eddsa_token_verifies_with_okp_jwk(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    jwk = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update({"kid": "ed", "alg": "EdDSA", "use": "sig"})
    path = tmp_path / "jwks.json"
    write_jwks(path, {"keys": [jwk]})
    verifier = TokenVerifier(config(jwks_file=path, algorithms=("EdDSA",)))
    token = jwt.encode(std_claims(), key, algorithm="EdDSA", headers={"kid": "ed"})
    assert (await verifier.verify(token)).subject == "alice"


async def test_hs256_secret_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    verifier = TokenVerifier(config(hs256_secret_env=SECRET_ENV, algorithms=("HS256",)))
    token = jwt.encode(std_claims(), SECRET, algorithm="HS256")
    assert (await verifier.verify(token)).subject == "alice"
    other = jwt.encode(std_claims(), "x" * 40, algorithm="HS256")
    assert await reason(verifier, other) == "invalid signature"
    hs384 = jwt.encode(std_claims(), SECRET, algorithm="HS384")
    assert await reason(verifier, hs384) == "algorithm not allowed"


def test_verify_cached_keys_only(es_keys: DevKeys, es_verifier: TokenVerifier) -> None:
    assert es_verifier.verify_cached_keys_only(mint(es_keys)).subject == "alice"


# ----------------------------------------------------------------------------------------------
# Configuration checks at construction


def test_hs256_secret_too_short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "short-secret")
    with pytest.raises(ConfigError, match="at least 32"):
        TokenVerifier(config(hs256_secret_env=SECRET_ENV, algorithms=("HS256",)))


def test_hs256_secret_env_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(ConfigError, match="not set"):
        TokenVerifier(config(hs256_secret_env=SECRET_ENV, algorithms=("HS256",)))


@pytest.mark.parametrize("algorithms", [("HS256",), ("RS256", "HS256"), ("none",), ()])
def test_jwks_refuses_hs_none_and_empty_allowlist(es_keys: DevKeys, algorithms: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError):
        TokenVerifier(unchecked(jwks_file=es_keys.jwks_file, algorithms=algorithms))


def test_secret_refuses_asymmetric_algorithms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    with pytest.raises(ConfigError):
        TokenVerifier(unchecked(hs256_secret_env=SECRET_ENV, algorithms=("HS256", "RS256")))


def test_exactly_one_key_source(es_keys: DevKeys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    with pytest.raises(ConfigError, match="exactly one"):
        TokenVerifier(unchecked(jwks_file=es_keys.jwks_file, jwks_url="http://127.0.0.1:1/jwks"))
    with pytest.raises(ConfigError, match="exactly one"):
        TokenVerifier(unchecked())


def test_jwks_file_without_usable_keys(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    write_jwks(path, {"keys": [{"kty": "oct", "k": b64url(b"k" * 32), "kid": "sym"}]})
    with pytest.raises(ConfigError, match="no usable signing keys"):
        TokenVerifier(config(jwks_file=path))
    path.write_text("not json")
    with pytest.raises(ConfigError, match=r"identity\.jwks_file"):
        TokenVerifier(config(jwks_file=path))


def test_invalid_default_db_role(es_keys: DevKeys) -> None:
    with pytest.raises(ConfigError, match="default_db_role"):
        TokenVerifier(config(jwks_file=es_keys.jwks_file, default_db_role="x" * 64))


# ----------------------------------------------------------------------------------------------
# Time claims


async def test_expired(es_keys: DevKeys) -> None:
    clock = Clock()
    verifier = TokenVerifier(config(jwks_file=es_keys.jwks_file, leeway_seconds=0), now=clock)
    token = mint(es_keys, ttl_seconds=60, now=clock.t)
    assert (await verifier.verify(token)).subject == "alice"
    clock.t += 61
    assert await reason(verifier, token) == "token expired"


async def test_not_yet_valid(es_keys: DevKeys) -> None:
    clock = Clock()
    verifier = TokenVerifier(config(jwks_file=es_keys.jwks_file, leeway_seconds=0), now=clock)
    token = mint(es_keys, not_before=clock.t + 120, now=clock.t)
    assert await reason(verifier, token) == "token not yet valid"
    clock.t += 121
    assert (await verifier.verify(token)).subject == "alice"


async def test_iat_in_future_is_not_yet_valid(es_keys: DevKeys) -> None:
    clock = Clock()
    verifier = TokenVerifier(config(jwks_file=es_keys.jwks_file, leeway_seconds=10), now=clock)
    token = sign(es_keys, std_claims(clock.t, iat=int(clock.t) + 300, nbf=None))
    assert await reason(verifier, token) == "token not yet valid"


async def test_leeway_honoured(es_keys: DevKeys) -> None:
    clock = Clock()
    verifier = TokenVerifier(config(jwks_file=es_keys.jwks_file, leeway_seconds=30), now=clock)
    token = mint(es_keys, ttl_seconds=60, now=clock.t)
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    clock.t = exp - 0.5
    assert (await verifier.verify(token)).subject == "alice"
    clock.t = exp  # exactly at exp: expiry is a hard limit, the leeway does not extend it
    assert await reason(verifier, token) == "token expired"
    clock.t = exp + 10  # expired 10 s ago, well within the 30 s leeway: still refused
    assert await reason(verifier, token) == "token expired"

    clock.t = time.time()
    early = mint(es_keys, not_before=clock.t + 20, now=clock.t)
    assert (await verifier.verify(early)).subject == "alice"
    later = mint(es_keys, not_before=clock.t + 40, now=clock.t)
    assert await reason(verifier, later) == "token not yet valid"


@pytest.mark.parametrize("value", ["tomorrow", True, [1], {"a": 1}])
async def test_non_numeric_exp(es_keys: DevKeys, es_verifier: TokenVerifier, value: Any) -> None:
    assert await reason(es_verifier, sign(es_keys, std_claims(exp=value))) == "invalid claim: exp"


# ----------------------------------------------------------------------------------------------
# Issuer, audience, required claims


async def test_wrong_issuer(es_keys: DevKeys, es_verifier: TokenVerifier) -> None:
    token = mint_token(es_keys.private_key_file, issuer="https://evil.example", audience=AUD, subject="a",
                       db_role="reader")
    assert await reason(es_verifier, token) == "invalid issuer"


async def test_wrong_audience(es_keys: DevKeys, es_verifier: TokenVerifier) -> None:
    token = mint_token(es_keys.private_key_file, issuer=ISS, audience="other-service", subject="a",
                       db_role="reader")
    assert await reason(es_verifier, token) == "invalid audience"


async def test_audience_list_containing_ours(es_keys: DevKeys, es_verifier: TokenVerifier) -> None:
    token = sign(es_keys, std_claims(aud=["other", AUD]))
    assert (await es_verifier.verify(token)).subject == "alice"


@pytest.mark.parametrize("claim", ["exp", "iss", "aud", "sub"])
async def test_missing_required_claim(es_keys: DevKeys, es_verifier: TokenVerifier, claim: str) -> None:
    token = sign(es_keys, std_claims(**{claim: None}))
    assert await reason(es_verifier, token) == f"missing claim: {claim}"


# ----------------------------------------------------------------------------------------------
# Algorithm and key attacks


async def test_alg_none_refused(es_keys: DevKeys, es_verifier: TokenVerifier) -> None:
    for alg in ("none", "None", "NONE"):
        header = b64url(json.dumps({"alg": alg, "typ": "JWT", "kid": es_keys.kid}).encode())
        payload = b64url(json.dumps(std_claims()).encode())
        assert await reason(es_verifier, f"{header}.{payload}.") == "algorithm not allowed"


async def test_hs256_with_rsa_public_key_as_secret_refused(rs_keys: DevKeys) -> None:
    """The classic algorithm-confusion attack: HMAC keyed with the server's public key PEM."""
    verifier = TokenVerifier(config(jwks_file=rs_keys.jwks_file, algorithms=("RS256",)))
    public_pem = load_signing_key(rs_keys.private_key_file).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": rs_keys.kid}).encode())
    payload = b64url(json.dumps(std_claims()).encode())
    signing_input = f"{header}.{payload}".encode()
    sig = b64url(hmac.new(public_pem, signing_input, hashlib.sha256).digest())
    token = f"{header}.{payload}.{sig}"
    assert await reason(verifier, token) == "algorithm not allowed"
    # And the same attack with the JWK's own modulus-bearing JSON as the secret.
    sig2 = b64url(hmac.new(rs_keys.jwks_file.read_bytes(), signing_input, hashlib.sha256).digest())
    assert await reason(verifier, f"{header}.{payload}.{sig2}") == "algorithm not allowed"


async def test_es256_token_against_rsa_only_jwks(es_keys: DevKeys, rs_keys: DevKeys) -> None:
    token = mint(es_keys)
    rsa_only = TokenVerifier(config(jwks_file=rs_keys.jwks_file, algorithms=("RS256",)))
    assert await reason(rsa_only, token) == "algorithm not allowed"
    both_algs = TokenVerifier(config(jwks_file=rs_keys.jwks_file, algorithms=("RS256", "ES256")))
    # kid pointing at the RSA key, and no kid at all: either way the RSA key can't verify ES256.
    for kid in (rs_keys.kid, None):
        assert await reason(both_algs, sign(es_keys, std_claims(), kid=kid)) == "key does not match algorithm"


async def test_jwk_declared_alg_must_match_token_alg(rs_keys: DevKeys) -> None:
    verifier = TokenVerifier(config(jwks_file=rs_keys.jwks_file, algorithms=("RS256", "PS256")))
    token = sign(rs_keys, std_claims(), alg="PS256")  # same RSA key, but its JWK says alg RS256
    assert await reason(verifier, token) == "key does not match algorithm"


async def test_ec_curve_must_match_algorithm(tmp_path: Path) -> None:
    keys = generate_dev_keys(tmp_path, algorithm="ES384")
    verifier = TokenVerifier(config(jwks_file=keys.jwks_file, algorithms=("ES256", "ES384")))
    assert (await verifier.verify(mint(keys))).subject == "alice"
    # A header claiming ES256 over the P-384 key: refused before any signature maths.
    key = load_signing_key(keys.private_key_file)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    header = b64url(json.dumps({"alg": "ES256", "kid": keys.kid, "typ": "JWT"}).encode())
    signing_input = f"{header}.{b64url(json.dumps(std_claims()).encode())}"
    sig = ECAlgorithm(ECAlgorithm.SHA384).sign(signing_input.encode(), key)
    forged = f"{signing_input}.{b64url(sig)}"
    assert await reason(verifier, forged) == "key does not match algorithm"


async def test_oct_key_in_jwks_ignored(tmp_path: Path, es_keys: DevKeys) -> None:
    doc = jwks_of(es_keys)
    doc["keys"].append({"kty": "oct", "k": b64url(SECRET.encode()), "kid": "sym", "alg": "HS256"})
    path = tmp_path / "jwks.json"
    write_jwks(path, doc)
    verifier = TokenVerifier(config(jwks_file=path))
    # Without kid: the oct key doesn't count, so exactly one compatible key remains.
    assert (await verifier.verify(sign(es_keys, std_claims(), kid=None))).subject == "alice"
    # A token naming the oct key's kid finds nothing.
    assert await reason(verifier, sign(es_keys, std_claims(), kid="sym")) == "unknown key id"


async def test_unknown_kid(es_keys: DevKeys, es_verifier: TokenVerifier) -> None:
    assert await reason(es_verifier, mint(es_keys, kid="no-such-key")) == "unknown key id"


async def test_no_kid_with_single_key_accepted(es_keys: DevKeys, es_verifier: TokenVerifier) -> None:
    assert (await es_verifier.verify(sign(es_keys, std_claims(), kid=None))).subject == "alice"


async def test_no_kid_with_two_keys_refused(tmp_path: Path, es_keys: DevKeys) -> None:
    second = generate_dev_keys(tmp_path / "second")
    path = tmp_path / "jwks.json"
    write_jwks(path, jwks_of(es_keys, second))
    verifier = TokenVerifier(config(jwks_file=path))
    assert await reason(verifier, sign(es_keys, std_claims(), kid=None)) == "key id required"
    assert (await verifier.verify(mint(es_keys))).subject == "alice"
    assert (await verifier.verify(mint(second))).subject == "alice"


async def test_signature_by_other_key_with_same_kid(tmp_path: Path, es_keys: DevKeys,
                                                    es_verifier: TokenVerifier) -> None:
    impostor = generate_dev_keys(tmp_path / "impostor")
    token = mint_token(impostor.private_key_file, issuer=ISS, audience=AUD, subject="alice",
                       db_role="reader", kid=es_keys.kid)
    assert await reason(es_verifier, token) == "invalid signature"


async def test_tampered_payload(es_keys: DevKeys, es_verifier: TokenVerifier) -> None:
    header, _, sig = mint(es_keys).split(".")
    payload = b64url(json.dumps(std_claims(sub="admin", db_role="postgres")).encode())
    assert await reason(es_verifier, f"{header}.{payload}.{sig}") == "invalid signature"


# ----------------------------------------------------------------------------------------------
# Garbage input


@pytest.mark.parametrize("token", [
    "", "garbage", "a.b.c", "a.b", "a.b.c.d.e", "....", "Bearer x.y.z", "ëëë.ëëë.ëëë",
    "eyJhbGciOiJFUzI1NiJ9", "e30.e30.", "W10.e30.",  # {} header (no alg); [] header
    b64url(b'{"alg":"ES256","kid":5}') + ".e30.",
])
async def test_garbage_is_malformed(es_verifier: TokenVerifier, token: str) -> None:
    assert await reason(es_verifier, token) == "malformed token"


async def test_payload_not_json(es_keys: DevKeys, es_verifier: TokenVerifier) -> None:
    key = load_signing_key(es_keys.private_key_file)
    header = b64url(json.dumps({"alg": "ES256", "kid": es_keys.kid, "typ": "JWT"}).encode())
    signing_input = f"{header}.{b64url(b'not json')}"
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    sig = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input.encode(), key)
    assert await reason(es_verifier, f"{signing_input}.{b64url(sig)}") == "malformed token"


async def test_huge_tokens_refused_before_parsing(es_verifier: TokenVerifier) -> None:
    assert await reason(es_verifier, "x" * (1024 * 1024)) == "token too large"
    assert await reason(es_verifier, "a." * 8193) == "token too large"
    assert await reason(es_verifier, "é" * 9000) == "token too large"  # 18000 UTF-8 bytes


# ----------------------------------------------------------------------------------------------
# Claim shapes and Identity


NAMES = ClaimNames()


def ident(claims: Mapping[str, Any], default: str | None = None, token_id: str = "tid") -> Identity:
    base = {"iss": ISS, "sub": "alice", "exp": 2_000_000_000}
    return identity_from_claims({**base, **claims}, NAMES, default, token_id)


def claim_error(claims: Mapping[str, Any], default: str | None = None) -> str:
    with pytest.raises(TokenError) as info:
        ident(claims, default)
    return info.value.reason


@pytest.mark.parametrize(("value", "expected"), [
    (["a", "b"], ("a", "b")),
    ("a b", ("a", "b")),
    ("a,b", ("a", "b")),
    (" a , b,,c  a ", ("a", "b", "c")),
    ("", ()),
    ([], ()),
    (None, ()),
    (["a", "a", "b"], ("a", "b")),
])
def test_groups_shapes(value: Any, expected: tuple[str, ...]) -> None:
    assert ident({"groups": value, "db_role": "r"}).groups == expected


@pytest.mark.parametrize("value", [5, {"a": 1}, ["a", 5], ["a", ""], [None], True])
def test_groups_junk(value: Any) -> None:
    assert claim_error({"groups": value, "db_role": "r"}) == "invalid claim: groups"


@pytest.mark.parametrize(("value", "default", "expected"), [
    ("reader", None, ("reader",)),
    (["writer", "reader"], None, ("writer", "reader")),
    (["writer", "writer"], None, ("writer",)),
    (None, "fallback", ("fallback",)),
    ("reader", "fallback", ("reader",)),
    ("Mixed Case-role.é", None, ("Mixed Case-role.é",)),
    ("x" * 63, None, ("x" * 63,)),
])
def test_db_role_shapes(value: Any, default: str | None, expected: tuple[str, ...]) -> None:
    claims = {} if value is None else {"db_role": value}
    assert ident(claims, default).db_roles == expected


def test_db_role_absent_without_default() -> None:
    assert claim_error({}) == "token carries no database role"
    assert claim_error({"db_role": []}, default="fallback") == "token carries no database role"


@pytest.mark.parametrize("value", [
    5, True, {"r": 1}, ["a", 5], "", ["ok", ""], "x" * 64, "é" * 32, "bad\x00role", "line\nbreak",
    "tab\there",
])
def test_db_role_junk(value: Any) -> None:
    assert claim_error({"db_role": value}) == "invalid claim: db_role"


@pytest.mark.parametrize("name", ["agent_id", "session_id", "tool_call_id"])
def test_optional_string_claims_junk(name: str) -> None:
    assert claim_error({"db_role": "r", name: 42}) == f"invalid claim: {name}"


def test_subject_junk() -> None:
    assert claim_error({"db_role": "r", "sub": 7}) == "invalid claim: sub"
    assert claim_error({"db_role": "r", "sub": ""}) == "invalid claim: sub"


def test_custom_claim_names() -> None:
    names = ClaimNames(subject="email", groups="roles", db_role="pg_roles", agent_id="azp")
    identity = identity_from_claims(
        {"iss": ISS, "exp": 2_000_000_000, "email": "a@example.com", "roles": "x y",
         "pg_roles": ["analyst"], "azp": "agent-1"}, names, None, "tid")
    assert (identity.subject, identity.groups, identity.db_roles, identity.agent_id) == (
        "a@example.com", ("x", "y"), ("analyst",), "agent-1")


def test_role_for() -> None:
    identity = ident({"db_role": ["analyst", "reader"]})
    assert identity.role_for("analyst") == "analyst"
    assert identity.role_for("reader") == "reader"
    assert identity.role_for("alice") == "analyst"  # the subject -> default role
    assert identity.role_for("") == "analyst"
    assert identity.role_for("postgres") is None
    assert identity.role_for("Analyst") is None


def test_claims_are_a_read_only_copy() -> None:
    source: dict[str, Any] = {"iss": ISS, "sub": "alice", "exp": 2_000_000_000, "db_role": "r",
                              "nested": {"k": [1, 2]}}
    identity = identity_from_claims(source, NAMES, None, "tid")
    source["sub"] = "mallory"
    source["nested"]["k"].append(3)
    assert identity.claims["sub"] == "alice"
    assert identity.claims["nested"]["k"] == (1, 2)
    with pytest.raises(TypeError):
        identity.claims["sub"] = "mallory"  # type: ignore[index]
    with pytest.raises(TypeError):
        identity.claims["nested"]["k"] = ()
    hash(identity)  # usable as a dict key despite the mapping field


async def test_token_id_from_jti_and_from_hash(es_keys: DevKeys, es_verifier: TokenVerifier) -> None:
    with_jti = sign(es_keys, std_claims(jti="my-jti-1"))
    assert (await es_verifier.verify(with_jti)).token_id == "my-jti-1"
    without = sign(es_keys, std_claims(jti=None))
    expected = "sha256:" + hashlib.sha256(without.encode()).hexdigest()[:16]
    identity = await es_verifier.verify(without)
    assert identity.token_id == expected
    assert len(identity.token_id) == len("sha256:") + 16


async def test_audit_fields_are_safe(es_keys: DevKeys, es_verifier: TokenVerifier) -> None:
    token = mint(es_keys, groups=["eng"], extra_claims={"agent_id": "a1"})
    fields = (await es_verifier.verify(token)).audit_fields()
    assert set(fields) == {"subject", "groups", "db_roles", "agent_id", "session_id", "tool_call_id",
                           "token_id", "issuer", "expires_at"}
    assert fields["groups"] == ["eng"] and fields["agent_id"] == "a1"
    dumped = json.dumps(fields)
    assert token not in dumped and token.split(".")[2] not in dumped


async def test_claim_errors_surface_through_verify(es_keys: DevKeys, es_verifier: TokenVerifier) -> None:
    no_role = sign(es_keys, std_claims(db_role=None))
    assert await reason(es_verifier, no_role) == "token carries no database role"
    assert await reason(es_verifier, sign(es_keys, std_claims(groups=[1]))) == "invalid claim: groups"
    assert await reason(es_verifier, sign(es_keys, std_claims(sub=5))) == "invalid claim: sub"


async def test_default_db_role_from_config(es_keys: DevKeys) -> None:
    verifier = TokenVerifier(config(jwks_file=es_keys.jwks_file, default_db_role="readonly"))
    assert (await verifier.verify(mint(es_keys, db_role=None))).db_roles == ("readonly",)


# ----------------------------------------------------------------------------------------------
# JWKS file rotation


async def test_jwks_file_rotation(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    old = generate_dev_keys(tmp_path / "old")
    new = generate_dev_keys(tmp_path / "new")
    path = tmp_path / "jwks.json"
    write_jwks(path, jwks_of(old))
    verifier = TokenVerifier(config(jwks_file=path))
    old_token, new_token = mint(old), mint(new)
    assert (await verifier.verify(old_token)).subject == "alice"
    assert await reason(verifier, new_token) == "unknown key id"

    write_jwks(path, jwks_of(new))
    assert (await verifier.verify(new_token)).subject == "alice"
    assert await reason(verifier, old_token) == "unknown key id"

    # A broken rewrite keeps the last good keys (and is logged without any token).
    caplog.set_level("WARNING")
    path.write_text("{ not json")
    os.utime(path, ns=(time.time_ns() + 5 * 10**9,) * 2)
    assert (await verifier.verify(new_token)).subject == "alice"
    assert "cannot reload JWKS file" in caplog.text
    assert new_token not in caplog.text


# ----------------------------------------------------------------------------------------------
# JWKS URL served by a real local HTTP server


class JWKSServer:
    def __init__(self) -> None:
        self.body = b'{"keys": []}'
        self.status = 200
        self.delay = 0.0
        self.hits = 0
        self._lock = threading.Lock()
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with state._lock:
                    state.hits += 1
                if state.delay:
                    time.sleep(state.delay)
                try:
                    self.send_response(state.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(state.body)))
                    self.end_headers()
                    self.wfile.write(state.body)
                except OSError:
                    pass  # the client gave up (timeout test)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            block_on_close = False

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.running = True

    def serve(self, *key_sets: DevKeys) -> None:
        self.body = json.dumps(jwks_of(*key_sets)).encode()

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)


@pytest.fixture
def jwks_server() -> Iterator[JWKSServer]:
    server = JWKSServer()
    yield server
    server.stop()


def url_verifier(server_url: str, clock: Clock, **kw: Any) -> TokenVerifier:
    kw.setdefault("jwks_cache_seconds", 300.0)
    kw.setdefault("jwks_min_refresh_seconds", 10.0)
    kw.setdefault("jwks_timeout_seconds", 2.0)
    return TokenVerifier(config(jwks_url=server_url, **kw), now=clock)


async def test_jwks_url_fetch_and_cache(jwks_server: JWKSServer, es_keys: DevKeys) -> None:
    jwks_server.serve(es_keys)
    clock = Clock()
    verifier = url_verifier(jwks_server.url, clock)
    assert jwks_server.hits == 0  # no network in the constructor
    for _ in range(3):
        assert (await verifier.verify(mint(es_keys, now=clock.t))).subject == "alice"
    assert jwks_server.hits == 1
    clock.t += 299
    await verifier.verify(mint(es_keys, now=clock.t))
    assert jwks_server.hits == 1
    clock.t += 2  # cache (300 s) now stale
    await verifier.verify(mint(es_keys, now=clock.t))
    assert jwks_server.hits == 2


async def test_jwks_url_prefetch(jwks_server: JWKSServer, es_keys: DevKeys, rs_keys: DevKeys) -> None:
    jwks_server.serve(es_keys, rs_keys)
    clock = Clock()
    verifier = url_verifier(jwks_server.url, clock)
    assert await verifier.prefetch_keys() == 2
    assert verifier.verify_cached_keys_only(mint(rs_keys, now=clock.t)).subject == "alice"
    assert jwks_server.hits == 1


async def test_jwks_url_refresh_on_unknown_kid(jwks_server: JWKSServer, es_keys: DevKeys,
                                               tmp_path: Path) -> None:
    rotated = generate_dev_keys(tmp_path / "rotated")
    jwks_server.serve(es_keys)
    clock = Clock()
    verifier = url_verifier(jwks_server.url, clock)
    await verifier.verify(mint(es_keys, now=clock.t))
    assert jwks_server.hits == 1
    jwks_server.serve(es_keys, rotated)
    clock.t += 11  # past the minimum refresh interval, well inside the cache lifetime
    assert (await verifier.verify(mint(rotated, now=clock.t))).subject == "alice"
    assert jwks_server.hits == 2


async def test_remembered_token_follows_the_fetched_keys(jwks_server: JWKSServer, es_keys: DevKeys,
                                                         tmp_path: Path) -> None:
    # A token that verified is remembered, but only with the key it verified with: once the provider
    # drops that key and the cached keys go stale, the next fetch decides, not the remembered result.
    jwks_server.serve(es_keys)
    clock = Clock()
    verifier = url_verifier(jwks_server.url, clock)
    token = mint(es_keys, now=clock.t, ttl_seconds=3600)
    assert (await verifier.verify(token)).subject == "alice"
    jwks_server.serve(generate_dev_keys(tmp_path / "rotated"))
    clock.t += 299
    assert (await verifier.verify(token)).subject == "alice"  # the cached keys are still fresh
    clock.t += 2
    assert await reason(verifier, token) == "unknown key id"
    assert jwks_server.hits == 2


async def test_jwks_url_min_refresh_interval(jwks_server: JWKSServer, es_keys: DevKeys) -> None:
    jwks_server.serve(es_keys)
    clock = Clock()
    verifier = url_verifier(jwks_server.url, clock, jwks_min_refresh_seconds=10.0)
    await verifier.verify(mint(es_keys, now=clock.t))
    assert jwks_server.hits == 1
    # Unknown kids right after a fetch: no new fetch until the interval has passed.
    for i in range(5):
        assert await reason(verifier, mint(es_keys, kid=f"probe-{i}", now=clock.t)) == "unknown key id"
    assert jwks_server.hits == 1
    clock.t += 10
    assert await reason(verifier, mint(es_keys, kid="probe-x", now=clock.t)) == "unknown key id"
    assert jwks_server.hits == 2
    assert await reason(verifier, mint(es_keys, kid="probe-y", now=clock.t)) == "unknown key id"
    assert jwks_server.hits == 2


async def test_jwks_url_concurrent_refreshes_coalesce(jwks_server: JWKSServer, es_keys: DevKeys) -> None:
    jwks_server.serve(es_keys)
    jwks_server.delay = 0.3
    clock = Clock()
    verifier = url_verifier(jwks_server.url, clock)
    tokens = [mint(es_keys, now=clock.t) for _ in range(10)]
    results = await asyncio.gather(*(verifier.verify(t) for t in tokens))
    assert [r.subject for r in results] == ["alice"] * 10
    assert jwks_server.hits == 1


async def test_jwks_url_down_with_cached_keys(jwks_server: JWKSServer, es_keys: DevKeys,
                                              caplog: pytest.LogCaptureFixture) -> None:
    jwks_server.serve(es_keys)
    clock = Clock()
    verifier = url_verifier(jwks_server.url, clock)
    await verifier.verify(mint(es_keys, now=clock.t))
    jwks_server.stop()
    caplog.set_level("WARNING")
    clock.t += 1000  # cache stale: a refetch is attempted, fails, cached keys keep working
    token = mint(es_keys, now=clock.t)
    assert (await verifier.verify(token)).subject == "alice"
    assert "JWKS fetch" in caplog.text and token not in caplog.text
    clock.t += 20
    assert await reason(verifier, mint(es_keys, kid="other", now=clock.t)) == "unknown key id"


async def test_jwks_url_bad_document_keeps_cached_keys(jwks_server: JWKSServer, es_keys: DevKeys) -> None:
    jwks_server.serve(es_keys)
    clock = Clock()
    verifier = url_verifier(jwks_server.url, clock)
    await verifier.verify(mint(es_keys, now=clock.t))
    for body, status in ((b"<html>oops</html>", 200), (b'{"keys": []}', 200), (b"{}", 500)):
        jwks_server.body, jwks_server.status = body, status
        clock.t += 400
        assert (await verifier.verify(mint(es_keys, now=clock.t))).subject == "alice"


async def test_jwks_url_down_with_no_keys(es_keys: DevKeys) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clock = Clock()
    verifier = url_verifier(f"http://127.0.0.1:{port}/jwks.json", clock)
    token = mint(es_keys, now=clock.t)
    assert await reason(verifier, token) == "signing keys unavailable"
    with pytest.raises(TokenError, match="signing keys unavailable"):
        verifier.verify_cached_keys_only(token)


async def test_jwks_url_timeout(jwks_server: JWKSServer, es_keys: DevKeys) -> None:
    jwks_server.serve(es_keys)
    jwks_server.delay = 3.0
    clock = Clock()
    # 1 s: short of the slow answer, long enough for the prompt one below on a loaded machine.
    verifier = url_verifier(jwks_server.url, clock, jwks_timeout_seconds=1.0)
    # Given up at 1 s: a fetch that waited for the 3 s answer would get the keys and verify the token.
    assert await reason(verifier, mint(es_keys, now=clock.t)) == "signing keys unavailable"
    assert jwks_server.hits == 1
    # Within the minimum refresh interval the dead endpoint isn't hammered.
    assert await reason(verifier, mint(es_keys, now=clock.t)) == "signing keys unavailable"
    assert jwks_server.hits == 1
    # Once it answers promptly again, the next allowed attempt recovers.
    jwks_server.delay = 0.0
    clock.t += 10
    assert (await verifier.verify(mint(es_keys, now=clock.t))).subject == "alice"


def test_parse_jwks_skips_unusable_keys(es_keys: DevKeys) -> None:
    good = jwks_of(es_keys)["keys"][0]
    doc = {"keys": [
        good,
        {"kty": "oct", "k": "c2VjcmV0"},
        {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"},  # not a point
        {**good, "kid": "enc", "use": "enc"},
        {**good, "kid": "hs", "alg": "HS256"},
        {**good, "kid": 7},
        "not-a-dict",
        {"kty": "RSA"},
    ]}
    keys = verifier_module.parse_jwks(json.dumps(doc))
    assert [k.kid for k in keys] == [es_keys.kid]
    with pytest.raises(ValueError):
        verifier_module.parse_jwks("[]")


# ----------------------------------------------------------------------------------------------
# Minting


@pytest.mark.parametrize("algorithm", ["ES256", "RS256"])
def test_generate_dev_keys(tmp_path: Path, algorithm: str) -> None:
    keys = generate_dev_keys(tmp_path / "keys", algorithm=algorithm)
    assert keys.private_key_file.name == "dev-signing-key.pem"
    assert stat.S_IMODE(keys.private_key_file.stat().st_mode) == 0o600
    assert keys.private_key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8
    doc = json.loads(keys.jwks_file.read_text())
    (jwk,) = doc["keys"]
    assert jwk["kid"] == keys.kid and jwk["alg"] == algorithm and jwk["use"] == "sig"
    assert "d" not in jwk and "p" not in jwk  # public only
    assert jwk["kid"] == jwk_thumbprint(jwk)
    token = mint_token(keys.private_key_file, issuer=ISS, audience=AUD, subject="bob")
    header = jwt.get_unverified_header(token)
    assert header["alg"] == algorithm and header["kid"] == keys.kid


def test_generate_dev_keys_tightens_existing_file_mode(tmp_path: Path) -> None:
    (tmp_path / "dev-signing-key.pem").write_text("old")
    os.chmod(tmp_path / "dev-signing-key.pem", 0o644)
    keys = generate_dev_keys(tmp_path)
    assert stat.S_IMODE(keys.private_key_file.stat().st_mode) == 0o600


def test_generate_dev_keys_rejects_unknown_algorithm(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_dev_keys(tmp_path, algorithm="HS256")


def test_jwk_thumbprint_rfc7638_example() -> None:
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
             "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368"
             "QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2"
             "NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_mint_token_claims(es_keys: DevKeys) -> None:
    now = 1_700_000_000.0
    token = mint_token(es_keys.private_key_file, issuer=ISS, audience=AUD, subject="carol",
                       groups=["g1", "g2"], db_role=["analyst", "reader"], ttl_seconds=120,
                       not_before=now - 5, extra_claims={"agent_id": "agent-1"}, now=now)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["iss"] == ISS and claims["aud"] == AUD and claims["sub"] == "carol"
    assert claims["iat"] == int(now) and claims["nbf"] == int(now - 5) and claims["exp"] == int(now + 120)
    assert claims["groups"] == ["g1", "g2"] and claims["db_role"] == ["analyst", "reader"]
    assert claims["agent_id"] == "agent-1"
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16
    other = mint_token(es_keys.private_key_file, issuer=ISS, audience=AUD, subject="carol", now=now)
    assert jwt.decode(other, options={"verify_signature": False})["jti"] != claims["jti"]
    assert "groups" not in jwt.decode(other, options={"verify_signature": False})
    assert "db_role" not in jwt.decode(other, options={"verify_signature": False})


async def test_mint_token_explicit_kid(es_keys: DevKeys, es_verifier: TokenVerifier) -> None:
    token = mint(es_keys, kid=es_keys.kid)
    assert jwt.get_unverified_header(token)["kid"] == es_keys.kid
    assert (await es_verifier.verify(token)).subject == "alice"

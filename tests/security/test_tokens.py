"""Who gets in: the token matrix (each refusal is 28P01 with a short reason while a valid client keeps
working), TLS enforcement, expiry during a session, token secrecy in the audit, startup time-outs,
malformed startup packets and forged CancelRequests.

Raw-protocol helpers here are written from the protocol documentation, independently of pgproxy's codec.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pg8000.native
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from pg8000.exceptions import DatabaseError
from rawwire import parse_fields, read_message, startup_packet

from pgproxy.identity import generate_dev_keys, mint_token

pytestmark = pytest.mark.timeout(60)

ISSUER = "https://issuer.test"
AUDIENCE = "pgproxy-test"
PROTOCOL_3_0 = 196608
CANCEL_REQUEST_CODE = 80877102
SSL_REQUEST_CODE = 80877103


# ------------------------------------------------------------------------------------------------
# helpers


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "tok-test", "iat": now, "nbf": now, "exp": now + 600,
            "db_role": ["agent_reader"], "jti": secrets.token_hex(8)}
    base.update(overrides)
    return base


def hand_built(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes] | None) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = b64url(sign(signing_input.encode())) if sign else ""
    return f"{signing_input}.{signature}"


def client_context(proxy: Any) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(proxy.tls.ca_file))


def pg8000_connect(proxy: Any, password: str, *, user: str = "agent_reader", tls: bool = True,
                   port: int | None = None) -> pg8000.native.Connection:
    return pg8000.native.Connection(user=user, host="127.0.0.1",
                                    port=port or (proxy.port if tls else proxy.plain_port),
                                    database=proxy.database.database, password=password, timeout=10,
                                    ssl_context=client_context(proxy) if tls else False)


def refusal(proxy: Any, password: str, **kwargs: Any) -> dict[str, str]:
    """Connect with pg8000 expecting a FATAL; returns the ErrorResponse fields."""
    with pytest.raises(DatabaseError) as info:
        pg8000_connect(proxy, password, **kwargs).close()
    fields: dict[str, str] = info.value.args[0]
    assert fields["S"] == "FATAL"
    return fields


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    return data


def open_raw(proxy: Any, *, tls: bool, timeout: float = 5) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port if tls else proxy.plain_port), timeout=timeout)
    if not tls:
        return sock
    sock.sendall(struct.pack("!II", 8, SSL_REQUEST_CODE))
    assert sock.recv(1) == b"S"
    return client_context(proxy).wrap_socket(sock, server_hostname="127.0.0.1")


def token_exp(token: str) -> float:
    return float(jwt.decode(token, options={"verify_signature": False})["exp"])


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def bystander(proxy: Any) -> Iterator[psycopg.Connection[Any]]:
    """A valid session open for the whole module: every refusal must leave it working."""
    with psycopg.connect(proxy.dsn(application_name="tokt_bystander"), autocommit=True, connect_timeout=10) as c:
        yield c


@pytest.fixture
def still_working(bystander: psycopg.Connection[Any]) -> Iterator[None]:
    pid = bystander.info.backend_pid
    yield
    assert bystander.execute("select pg_backend_pid(), 'ok'").fetchone() == (pid, "ok")


@pytest.fixture(scope="module")
def other_es256_keys(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return generate_dev_keys(tmp_path_factory.mktemp("tokt-other-keys"))


# ------------------------------------------------------------------------------------------------
# the identity matrix


def test_valid_token_gets_in(proxy: Any, still_working: None) -> None:
    conn = pg8000_connect(proxy, proxy.token(sub="tok-ok"))
    try:
        assert conn.run("select current_user") == [["agent_reader"]]
    finally:
        conn.close()


MATRIX: list[tuple[str, Callable[[Any], str], str]] = [
    ("expired", lambda p: p.token(ttl=-30), "token expired"),
    ("not_yet_valid", lambda p: p.token(nbf=int(time.time()) + 3600), "token not yet valid"),
    ("wrong_iss", lambda p: p.token(iss="https://evil.test"), "invalid issuer"),
    ("wrong_aud", lambda p: p.token(aud="someone-else"), "invalid audience"),
    ("alg_none", lambda p: hand_built({"alg": "none", "typ": "JWT"}, claims(), None), "algorithm not allowed"),
    ("alg_none_uppercase", lambda p: hand_built({"alg": "None", "typ": "JWT"}, claims(), None),
     "algorithm not allowed"),
    ("missing_exp", lambda p: p.token(exp=None), "missing claim: exp"),
    ("no_db_role", lambda p: p.token(roles=()), "token carries no database role"),
    ("garbage", lambda p: "this is not a jwt", "malformed token"),
    ("three_dots_garbage", lambda p: "a.b.c", "malformed token"),
    ("empty", lambda p: "", "malformed token"),
    ("too_large", lambda p: p.token(padding="x" * 20_000), "token too large"),
]


@pytest.mark.parametrize(("make", "reason"), [m[1:] for m in MATRIX], ids=[m[0] for m in MATRIX])
def test_refused_tokens(proxy: Any, still_working: None, make: Callable[[Any], str], reason: str) -> None:
    token = make(proxy)
    fields = refusal(proxy, token)
    assert fields["C"] == "28P01"
    assert fields["M"] == f'password authentication failed for user "agent_reader": {reason}'
    failures = [e for e in proxy.events("auth_failed") if e["reason"] == reason]
    assert failures and failures[-1]["user"] == "agent_reader"


def test_unknown_kid(proxy: Any, still_working: None, other_es256_keys: Any) -> None:
    token = mint_token(other_es256_keys.private_key_file, issuer=ISSUER, audience=AUDIENCE, subject="tok-kid",
                       db_role=["agent_reader"], ttl_seconds=600)
    assert jwt.get_unverified_header(token)["kid"] == other_es256_keys.kid != proxy.keys.kid
    fields = refusal(proxy, token)
    assert (fields["C"], fields["M"]) == ("28P01", 'password authentication failed for user "agent_reader": '
                                                   "unknown key id")


def test_known_kid_wrong_key(proxy: Any, still_working: None, other_es256_keys: Any) -> None:
    token = mint_token(other_es256_keys.private_key_file, issuer=ISSUER, audience=AUDIENCE, subject="tok-kid",
                       db_role=["agent_reader"], ttl_seconds=600, kid=proxy.keys.kid)
    fields = refusal(proxy, token)
    assert (fields["C"], fields["M"]) == ("28P01", 'password authentication failed for user "agent_reader": '
                                                   "invalid signature")


def test_tampered_payload(proxy: Any, still_working: None) -> None:
    header, _payload, signature = proxy.token().split(".")
    forged = b64url(json.dumps(claims(db_role=[proxy.database.superuser])).encode())
    fields = refusal(proxy, f"{header}.{forged}.{signature}")
    assert fields["C"] == "28P01"
    assert fields["M"].endswith(": invalid signature")


def test_hs256_signed_with_rsa_public_key(proxy: Any, make_proxy: Callable[..., Any], tmp_path: Path,
                                          still_working: None) -> None:
    rsa_keys = generate_dev_keys(tmp_path / "rsa", algorithm="RS256")

    def rsa_only(data: dict[str, Any]) -> None:
        data["identity"]["jwks_file"] = str(rsa_keys.jwks_file)
        data["identity"]["algorithms"] = ["RS256"]

    rsa_proxy = make_proxy(rsa_only)
    # Control: a genuine RS256 token from that key is accepted.
    good = mint_token(rsa_keys.private_key_file, issuer=ISSUER, audience=AUDIENCE, subject="tok-rsa",
                      db_role=["agent_reader"], ttl_seconds=600)
    conn = pg8000_connect(rsa_proxy, good)
    try:
        assert conn.run("select 1") == [[1]]
    finally:
        conn.close()
    # The attack: HMAC-SHA256 keyed with the public key PEM that anyone can read from the JWKS.
    private = serialization.load_pem_private_key(rsa_keys.private_key_file.read_bytes(), password=None)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(jwt.InvalidKeyError):  # pyjwt itself refuses to do this, so build it by hand
        jwt.encode(claims(), pem, algorithm="HS256")
    forged = hand_built({"alg": "HS256", "typ": "JWT", "kid": rsa_keys.kid}, claims(),
                        lambda msg: hmac.new(pem, msg, hashlib.sha256).digest())
    fields = refusal(rsa_proxy, forged)
    assert (fields["C"], fields["M"]) == ("28P01", 'password authentication failed for user "agent_reader": '
                                                   "algorithm not allowed")
    # A JWK whose alg says RS256 never verifies an ES256 token either.
    es_token = proxy.token()
    fields = refusal(rsa_proxy, es_token)
    assert fields["M"].endswith(": algorithm not allowed")


def test_one_megabyte_password(proxy: Any, still_working: None) -> None:
    sock = open_raw(proxy, tls=True)
    try:
        sock.sendall(startup_packet("agent_reader", proxy.database.database))
        assert read_message(sock) == ("R", struct.pack("!I", 3))  # AuthenticationCleartextPassword
        password = b"x" * (1 << 20)
        with contextlib.suppress(OSError):  # the proxy closes without reading it all
            sock.sendall(b"p" + struct.pack("!I", 4 + len(password) + 1) + password + b"\x00")
        reply = read_until_closed(sock)
    finally:
        sock.close()
    # Refused on the message length alone (the token is never parsed): one FATAL, then the close.
    assert reply[:1] == b"E", reply[:100]
    fields = parse_fields(reply[5:])
    assert fields["S"] == "FATAL"
    assert fields["C"] in ("54000", "08P01")  # program_limit_exceeded / protocol_violation
    # And the proxy keeps serving.
    conn = pg8000_connect(proxy, proxy.token())
    try:
        assert conn.run("select 'served'") == [["served"]]
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------
# transport, expiry, audit


def test_plaintext_to_tls_listener_is_refused_before_the_password(proxy: Any, still_working: None) -> None:
    fields = refusal(proxy, proxy.token(), port=proxy.port, tls=False)
    assert fields["C"] == "28000"
    assert "requires an encrypted connection" in fields["M"]
    # The raw exchange: the proxy answers the StartupMessage with the error, never with a password request.
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw:
        raw.sendall(startup_packet("agent_reader", proxy.database.database))
        kind, body = read_message(raw)
        assert kind == "E"
        assert parse_fields(body)["C"] == "28000"
        assert read_until_closed(raw) == b""
    # libpq with sslmode=disable sees the same.
    with pytest.raises(psycopg.OperationalError, match="requires an encrypted connection"):
        psycopg.connect(proxy.dsn(sslmode="disable"), connect_timeout=10)


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
def test_token_expiring_during_the_session(proxy: Any, still_working: None, tls: bool) -> None:
    token = proxy.token(sub="tok-short", ttl=2)
    app = f"tokt_expiry_{tls}"
    with psycopg.connect(proxy.dsn(token=token, tls=tls, application_name=app), connect_timeout=10) as conn:
        assert conn.execute("select 'before'").fetchone() == ("before",)
        time.sleep(max(0.0, token_exp(token) - time.time()) + 0.5)
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("select 'after'")
        assert info.value.sqlstate == "28000"
        assert info.value.diag.severity == "FATAL"
        assert "token expired" in str(info.value)
    session = next(e["session"] for e in proxy.events("session_start") if e.get("application_name") == app)
    statements = [e["sql"] for e in proxy.events("statement") if e["session"] == session]
    assert "select 'after'" not in statements  # never reached the upstream
    ends = [e for e in proxy.events("session_end") if e["session"] == session]
    assert len(ends) == 1 and "token expired" in ends[0]["reason"]


def test_expiry_is_a_hard_limit_whatever_the_leeway(make_proxy: Callable[..., Any]) -> None:
    """With 30 s of leeway for clock skew, a token expired 10 s ago is refused, and a session ends at exp."""

    def leeway(data: dict[str, Any]) -> None:
        data["identity"]["leeway_seconds"] = 30

    p = make_proxy(leeway)
    with pytest.raises(psycopg.OperationalError, match="token expired"):
        psycopg.connect(p.dsn(tls=False, token=p.token(ttl=-10)), connect_timeout=10)
    token = p.token(sub="tok-hard-exp", ttl=2)
    with psycopg.connect(p.dsn(tls=False, token=token), connect_timeout=10) as conn:
        conn.execute("select 1")
        time.sleep(max(0.0, token_exp(token) - time.time()) + 0.5)  # past exp, far inside the leeway
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("select 'after'")
        assert info.value.sqlstate == "28000" and "token expired" in str(info.value)


def test_token_expiring_during_a_running_statement(proxy: Any, still_working: None) -> None:
    # The statement under way when the token expires completes; the session ends before the next one.
    token = proxy.token(sub="tok-short-busy", ttl=2)
    with psycopg.connect(proxy.dsn(token=token), connect_timeout=10) as conn:
        remaining = token_exp(token) - time.time()
        assert remaining > 0.3
        row = conn.execute("select pg_sleep(%s), 'finished'", [remaining + 0.5]).fetchone()
        assert row == ("", "finished")
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("select 'after'")
        assert info.value.sqlstate == "28000"
        assert "token expired" in str(info.value)


def test_raw_token_never_in_audit(proxy: Any, still_working: None) -> None:
    good = proxy.token(sub="tok-audit")
    bad = proxy.token(sub="tok-audit-bad", aud="someone-else")
    conn = pg8000_connect(proxy, good)
    conn.run("select 'audited'")
    conn.close()
    refusal(proxy, bad)
    fingerprint = "sha256:" + hashlib.sha256(bad.encode()).hexdigest()[:16]
    failed = [e for e in proxy.events("auth_failed") if e.get("token") == fingerprint]
    assert len(failed) == 1
    assert failed[0]["reason"] == "invalid audience"
    assert failed[0]["user"] == "agent_reader"
    dumped = json.dumps(proxy.events(), default=str)
    for token in (good, bad):
        assert token not in dumped
        assert token.split(".")[2] not in dumped  # not even the signature
    assert '"tok-audit"' in dumped  # the verified subject is recorded instead


# ------------------------------------------------------------------------------------------------
# startup robustness


def test_startup_timeout(make_proxy: Callable[..., Any]) -> None:
    quick = make_proxy(lambda data: data["limits"].update(startup_timeout_seconds=1))
    silent: dict[str, socket.socket] = {}
    silent["plain_nothing"] = socket.create_connection(("127.0.0.1", quick.plain_port), timeout=5)
    silent["tls_after_handshake"] = open_raw(quick, tls=True)
    silent["half_startup_packet"] = socket.create_connection(("127.0.0.1", quick.port), timeout=5)
    silent["half_startup_packet"].sendall(startup_packet("agent_reader", "postgres")[:10])
    silent["ssl_request_no_hello"] = socket.create_connection(("127.0.0.1", quick.port), timeout=5)
    silent["ssl_request_no_hello"].sendall(struct.pack("!II", 8, SSL_REQUEST_CODE))
    assert silent["ssl_request_no_hello"].recv(1) == b"S"
    replies: dict[str, bytes] = {}
    try:
        # Meanwhile, a real client connects and outlives the startup timeout.
        with psycopg.connect(quick.dsn(), connect_timeout=10) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
            for name, sock in silent.items():
                sock.settimeout(10)
                try:
                    replies[name] = read_until_closed(sock)
                except TimeoutError:
                    raise AssertionError(f"{name}: still open 10 s after a 1 s startup timeout") from None
            assert conn.execute("select 2").fetchone() == (2,)
    finally:
        for sock in silent.values():
            sock.close()
    for name in ("plain_nothing", "half_startup_packet"):  # plaintext: the FATAL is readable as is
        reply = replies[name]
        assert reply[:1] == b"E", (name, reply)
        fields = parse_fields(reply[5:])
        assert fields["S"] == "FATAL"
        assert fields["C"] == "08006"
        assert "timeout" in fields["M"]
    tls_reply = replies["tls_after_handshake"]
    assert tls_reply == b"" or parse_fields(tls_reply[5:])["S"] == "FATAL"
    assert quick.events("session_start") and not quick.events("auth_failed")


@pytest.mark.parametrize(("packet", "sqlstate", "message"), [
    (struct.pack("!I", 3), "08P01", "invalid length of startup packet: 3"),
    (struct.pack("!II", 200_000, PROTOCOL_3_0), "08P01", "invalid length of startup packet: 200000"),
    (struct.pack("!I", 7) + b"\x00\x03\x00", "08P01", "invalid length of startup packet: 7"),
    (struct.pack("!II", 8, 1234), "0A000", "unsupported frontend protocol 0.1234"),
    (startup_packet("agent_reader", "postgres")[:-1] + b"x", "08P01", "invalid startup packet layout"),
], ids=["length_3", "length_200000", "length_7", "bad_version", "no_terminator"])
def test_malformed_startup_packet(proxy: Any, still_working: None, packet: bytes, sqlstate: str,
                                  message: str) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(packet)
        reply = read_until_closed(sock)
    assert reply[:1] == b"E", reply
    length = struct.unpack("!I", reply[1:5])[0]
    assert len(reply) == 1 + length  # one message, then close
    fields = parse_fields(reply[5:])
    assert (fields["S"], fields["C"]) == ("FATAL", sqlstate)
    assert message in fields["M"]


def test_cancel_request_with_wrong_key_is_ignored(proxy: Any, still_working: None) -> None:
    with psycopg.connect(proxy.dsn(), connect_timeout=10) as victim:
        pid = victim.info.backend_pid
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["row"] = victim.execute("select pg_sleep(1.5), 'done'").fetchone()
            except psycopg.Error as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=run)
        worker.start()
        time.sleep(0.3)
        for target_pid, key in ((pid, secrets.randbits(32)), (pid, 0), (pid + 100_000, secrets.randbits(32))):
            for tls in (False, True):
                sock = open_raw(proxy, tls=tls)
                sock.sendall(struct.pack("!IIII", 16, CANCEL_REQUEST_CODE, target_pid, key))
                assert read_until_closed(sock) == b""  # no answer: just a close, as PostgreSQL does
                sock.close()
        worker.join(5)
        assert not worker.is_alive()
        assert outcome == {"row": ("", "done")}, outcome  # a cancel that landed would be a QueryCanceled error
        assert victim.execute("select 'alive'").fetchone() == ("alive",)

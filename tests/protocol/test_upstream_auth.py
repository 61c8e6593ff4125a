"""UpstreamAuthenticator: the proxy's own login to the upstream server.

SCRAM-SHA-256 is checked against a real SCRAM server (scramp's ScramServer) playing PostgreSQL's part;
md5 against the well-known formula; cleartext, trust and unsupported methods directly.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
import scramp

from pgproxy.protocol.messages import (
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
from pgproxy.protocol.upstream_auth import (
    SCRAM_MECHANISM,
    ScramKeyCache,
    UpstreamAuthenticator,
    UpstreamAuthError,
    md5_password,
)

USER = "app_owner"
PASSWORD = "s3cr3t-Pässwörd!"


def body(message: bytes, type_byte: bytes = b"p") -> bytes:
    """The body of one encoded message, after checking its header."""
    assert message[:1] == type_byte
    assert int.from_bytes(message[1:5], "big") == len(message) - 1
    return message[5:]


class ScramServerSide:
    """PostgreSQL's half of SCRAM-SHA-256, with a stored verifier for ``PASSWORD``."""

    def __init__(self, password: str = PASSWORD) -> None:
        self.mech = scramp.ScramMechanism(SCRAM_MECHANISM)
        self.info = self.mech.make_auth_info(password, iteration_count=4096)  # a new salt per verifier

    def client_first(self, message: bytes) -> bytes:
        """Start an exchange (a new connection to the same server)."""
        self.server = self.mech.make_server(lambda _username: self.info)
        initial = SASLInitialResponse.decode(body(message))
        assert initial.mechanism == SCRAM_MECHANISM
        assert initial.data is not None
        self.server.set_client_first(initial.data.decode())
        return self.server.get_server_first().encode()

    def client_final(self, message: bytes) -> bytes:
        self.server.set_client_final(SASLResponse.decode(body(message)).data.decode())
        return self.server.get_server_final().encode()


def scram_until_final(auth: UpstreamAuthenticator, server: ScramServerSide) -> bytes:
    """Run the exchange up to the server's final message (not yet given to ``auth``)."""
    first = auth.handle(AuthenticationSASL((SCRAM_MECHANISM,)))
    assert first is not None
    server_first = server.client_first(first)
    final = auth.handle(AuthenticationSASLContinue(server_first))
    assert final is not None
    return server.client_final(final)


# --------------------------------------------------------------------------------------------------
# SCRAM-SHA-256


def test_scram_full_exchange() -> None:
    auth = UpstreamAuthenticator(USER, PASSWORD)
    server = ScramServerSide()
    first = auth.handle(AuthenticationSASL(("SCRAM-SHA-256-PLUS", SCRAM_MECHANISM)))
    assert first is not None
    initial = SASLInitialResponse.decode(body(first))
    assert initial.mechanism == SCRAM_MECHANISM
    assert initial.data is not None and initial.data.startswith(b"n,,")  # no channel binding
    assert not auth.done
    assert auth.method == SCRAM_MECHANISM

    final = auth.handle(AuthenticationSASLContinue(server.client_first(first)))
    assert final is not None
    assert SASLResponse.decode(body(final)).data.startswith(b"c=biws,r=")
    assert not auth.done

    server_final = server.client_final(final)  # the server accepts the client proof
    assert server_final.startswith(b"v=")
    assert auth.handle(AuthenticationSASLFinal(server_final)) is None
    assert not auth.done
    assert auth.handle(AuthenticationOk()) is None
    assert auth.done


def test_scram_wrong_password_is_rejected_by_the_server() -> None:
    auth = UpstreamAuthenticator(USER, "not-the-password")
    server = ScramServerSide()
    first = auth.handle(AuthenticationSASL((SCRAM_MECHANISM,)))
    assert first is not None
    final = auth.handle(AuthenticationSASLContinue(server.client_first(first)))
    assert final is not None
    with pytest.raises(scramp.ScramException):
        server.client_final(final)
    assert not auth.done


def test_scram_server_error_in_final_message_raises() -> None:
    auth = UpstreamAuthenticator(USER, "not-the-password")
    server = ScramServerSide()
    first = auth.handle(AuthenticationSASL((SCRAM_MECHANISM,)))
    assert first is not None
    final = auth.handle(AuthenticationSASLContinue(server.client_first(first)))
    assert final is not None
    with pytest.raises(scramp.ScramException):
        server.client_final(final)
    with pytest.raises(UpstreamAuthError) as exc:
        auth.handle(AuthenticationSASLFinal(b"e=invalid-proof"))
    assert "not-the-password" not in str(exc.value)
    assert not auth.done


def test_scram_bad_server_signature_raises() -> None:
    auth = UpstreamAuthenticator(USER, PASSWORD)
    server_final = scram_until_final(auth, ScramServerSide())
    signature = bytearray(base64.b64decode(server_final[2:]))
    signature[0] ^= 0x01
    forged = b"v=" + base64.b64encode(bytes(signature))
    with pytest.raises(UpstreamAuthError) as exc:
        auth.handle(AuthenticationSASLFinal(forged))
    assert PASSWORD not in str(exc.value)
    assert not auth.done
    # And the login cannot be completed afterwards.
    with pytest.raises(UpstreamAuthError):
        auth.handle(AuthenticationOk())
    assert not auth.done


def test_scram_signature_from_a_server_with_another_password_raises() -> None:
    # An impostor that accepts any proof cannot produce the right ServerSignature.
    auth = UpstreamAuthenticator(USER, PASSWORD)
    real = ScramServerSide()
    first = auth.handle(AuthenticationSASL((SCRAM_MECHANISM,)))
    assert first is not None
    auth.handle(AuthenticationSASLContinue(real.client_first(first)))
    impostor_signature = base64.b64encode(hashlib.sha256(b"guess").digest())
    with pytest.raises(UpstreamAuthError):
        auth.handle(AuthenticationSASLFinal(b"v=" + impostor_signature))


def test_scram_garbage_final_raises() -> None:
    auth = UpstreamAuthenticator(USER, PASSWORD)
    scram_until_final(auth, ScramServerSide())
    with pytest.raises(UpstreamAuthError):
        auth.handle(AuthenticationSASLFinal(b"\xff\xfe not utf-8"))


def test_authentication_ok_before_scram_final_raises() -> None:
    auth = UpstreamAuthenticator(USER, PASSWORD)
    server = ScramServerSide()
    first = auth.handle(AuthenticationSASL((SCRAM_MECHANISM,)))
    assert first is not None
    auth.handle(AuthenticationSASLContinue(server.client_first(first)))
    with pytest.raises(UpstreamAuthError):
        auth.handle(AuthenticationOk())
    assert not auth.done


def test_authentication_ok_right_after_sasl_start_raises() -> None:
    auth = UpstreamAuthenticator(USER, PASSWORD)
    auth.handle(AuthenticationSASL((SCRAM_MECHANISM,)))
    with pytest.raises(UpstreamAuthError):
        auth.handle(AuthenticationOk())
    assert not auth.done


def test_invalid_server_first_raises() -> None:
    auth = UpstreamAuthenticator(USER, PASSWORD)
    auth.handle(AuthenticationSASL((SCRAM_MECHANISM,)))
    with pytest.raises(UpstreamAuthError):
        # The server nonce must extend the client's.
        auth.handle(AuthenticationSASLContinue(b"r=someoneelse,s=c2FsdA==,i=4096"))


def test_sasl_messages_out_of_order_raise() -> None:
    with pytest.raises(UpstreamAuthError):
        UpstreamAuthenticator(USER, PASSWORD).handle(AuthenticationSASLContinue(b"r=x,s=c2FsdA==,i=4096"))
    with pytest.raises(UpstreamAuthError):
        UpstreamAuthenticator(USER, PASSWORD).handle(AuthenticationSASLFinal(b"v=AAAA"))


def test_sasl_without_scram_sha_256_raises() -> None:
    auth = UpstreamAuthenticator(USER, PASSWORD)
    with pytest.raises(UpstreamAuthError) as exc:
        auth.handle(AuthenticationSASL(("SCRAM-SHA-256-PLUS", "OAUTHBEARER")))
    assert PASSWORD not in str(exc.value)


# --------------------------------------------------------------------------------------------------
# md5, cleartext, trust


def test_md5() -> None:
    salt = b"\x01\x02\xfe\xff"
    auth = UpstreamAuthenticator(USER, PASSWORD)
    out = auth.handle(AuthenticationMD5Password(salt))
    assert out is not None
    sent = PasswordMessage.decode(body(out)).password
    inner = hashlib.md5((PASSWORD + USER).encode("utf-8")).hexdigest()
    expected = "md5" + hashlib.md5(inner.encode("ascii") + salt).hexdigest()
    assert sent == expected
    assert len(sent) == 35
    assert auth.method == "md5"
    assert not auth.done
    assert auth.handle(AuthenticationOk()) is None
    assert auth.done


def test_md5_known_vector() -> None:
    # md5("password" + "postgres") is the classic pg_authid value md532e12f215ba27cb750c9e093ce4b5127.
    assert hashlib.md5(b"passwordpostgres").hexdigest() == "32e12f215ba27cb750c9e093ce4b5127"
    salt = b"abcd"
    expected = "md5" + hashlib.md5(b"32e12f215ba27cb750c9e093ce4b5127" + salt).hexdigest()
    assert md5_password("postgres", "password", salt) == expected


def test_cleartext() -> None:
    auth = UpstreamAuthenticator(USER, PASSWORD)
    out = auth.handle(AuthenticationCleartextPassword())
    assert out == PasswordMessage(PASSWORD).encode()
    assert PasswordMessage.decode(body(out)).password == PASSWORD
    assert auth.method == "password"
    assert not auth.done
    auth.handle(AuthenticationOk())
    assert auth.done


def test_trust() -> None:
    auth = UpstreamAuthenticator(USER, None)
    assert auth.handle(AuthenticationOk()) is None
    assert auth.done
    assert auth.method == "trust"


@pytest.mark.parametrize(
    "challenge",
    [
        AuthenticationCleartextPassword(),
        AuthenticationMD5Password(b"salt"),
        AuthenticationSASL((SCRAM_MECHANISM,)),
    ],
    ids=["cleartext", "md5", "scram"],
)
def test_missing_password_raises_without_leaking(challenge: object) -> None:
    auth = UpstreamAuthenticator(USER, None)
    with pytest.raises(UpstreamAuthError) as exc:
        auth.handle(challenge)  # type: ignore[arg-type]
    text = str(exc.value)
    assert USER in text
    assert "password" in text.lower()
    assert PASSWORD not in text
    assert not auth.done


@pytest.mark.parametrize("code", [2, 7, 8, 9])
def test_unsupported_methods_raise(code: int) -> None:
    auth = UpstreamAuthenticator(USER, PASSWORD)
    with pytest.raises(UpstreamAuthError) as exc:
        auth.handle(AuthenticationOther(code))
    assert str(code) in str(exc.value)
    assert PASSWORD not in str(exc.value)
    assert not auth.done


# --------------------------------------------------------------------------------------------------
# Derived SCRAM keys kept per (role, password, salt, iterations)


def scram_login(auth: UpstreamAuthenticator, server: ScramServerSide) -> None:
    """A whole SCRAM exchange that must succeed."""
    auth.handle(AuthenticationSASLFinal(scram_until_final(auth, server)))
    auth.handle(AuthenticationOk())
    assert auth.done


def test_scram_keys_are_derived_once_per_verifier(monkeypatch: pytest.MonkeyPatch) -> None:
    server, other_server = ScramServerSide(), ScramServerSide()  # their verifiers are made before counting
    derivations: list[int] = []
    real_pbkdf2 = hashlib.pbkdf2_hmac

    def counting_pbkdf2(name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
        derivations.append(iterations)
        return real_pbkdf2(name, password, salt, iterations)

    monkeypatch.setattr(hashlib, "pbkdf2_hmac", counting_pbkdf2)
    cache = ScramKeyCache()
    for _ in range(3):  # each exchange has fresh nonces and the server checks each proof
        scram_login(UpstreamAuthenticator(USER, PASSWORD, cache), server)
    assert derivations == [4096]
    assert len(cache) == 1
    scram_login(UpstreamAuthenticator(USER, PASSWORD, cache), other_server)  # another salt: derived again
    assert derivations == [4096, 4096]


def test_cached_keys_still_check_the_server_signature() -> None:
    cache = ScramKeyCache()
    scram_login(UpstreamAuthenticator(USER, PASSWORD, cache), ScramServerSide())
    auth = UpstreamAuthenticator(USER, PASSWORD, cache)
    real = ScramServerSide()
    first = auth.handle(AuthenticationSASL((SCRAM_MECHANISM,)))
    assert first is not None
    auth.handle(AuthenticationSASLContinue(real.client_first(first)))
    with pytest.raises(UpstreamAuthError):
        auth.handle(AuthenticationSASLFinal(b"v=" + base64.b64encode(hashlib.sha256(b"guess").digest())))
    with pytest.raises(UpstreamAuthError):
        auth.handle(AuthenticationOk())
    assert not auth.done


def test_cached_keys_do_not_survive_a_password_change() -> None:
    cache = ScramKeyCache()
    scram_login(UpstreamAuthenticator(USER, PASSWORD, cache), ScramServerSide())
    changed = ScramServerSide("a-new-password")  # the server's role got a new password (new verifier)
    with pytest.raises(scramp.ScramException):
        scram_until_final(UpstreamAuthenticator(USER, PASSWORD, cache), changed)
    scram_login(UpstreamAuthenticator(USER, "a-new-password", cache), changed)  # the new credential works


@pytest.mark.parametrize("iterations", [b"1", b"4095", b"10000001", b"x", b""])
def test_scram_iteration_count_out_of_bounds_raises(iterations: bytes) -> None:
    auth = UpstreamAuthenticator(USER, PASSWORD)
    first = auth.handle(AuthenticationSASL((SCRAM_MECHANISM,)))
    assert first is not None
    nonce = SASLInitialResponse.decode(body(first)).data.split(b"r=")[1]  # type: ignore[union-attr]
    with pytest.raises(UpstreamAuthError):
        auth.handle(AuthenticationSASLContinue(b"r=" + nonce + b"srv,s=c2FsdA==,i=" + iterations))

"""Development TLS material and ``ssl.SSLContext`` helpers.

What for: a throwaway CA plus a server certificate (for the demo, the tests and the dev PostgreSQL of
``pgproxy.devdb``), and the two context builders the gateway uses on its client-facing side
(``server_context``) and its upstream side (``client_context``).

Must never: be used to mint certificates for production (keys are unencrypted files, 30-day validity,
no revocation); silently weaken verification (an unknown ``sslmode`` is an error, and only
``require``/``allow``/``prefer`` skip verification, exactly as libpq documents); write a private key
with permissions wider than 0600.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "SSLMODES",
    "DevTLS",
    "client_context",
    "generate_dev_ca_and_cert",
    "server_context",
]

#: libpq's sslmode values, weakest first.
SSLMODES: tuple[str, ...] = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

_VALIDITY = _dt.timedelta(days=30)
_CLOCK_SKEW = _dt.timedelta(minutes=5)


@dataclass(frozen=True)
class DevTLS:
    """Paths of the files written by :func:`generate_dev_ca_and_cert` (all PEM)."""

    ca_file: Path
    cert_file: Path
    key_file: Path
    ca_key_file: Path


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: fast to generate, accepted by OpenSSL (PostgreSQL), Python's ssl and libpq.
    return ec.generate_private_key(ec.SECP256R1())


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)  # in case the umask or an odd filesystem widened it


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(path, 0o644)


def _san_entries(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in hostnames:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def generate_dev_ca_and_cert(
    directory: Path, hostnames: Sequence[str] = ("localhost", "127.0.0.1", "::1")
) -> DevTLS:
    """Create a dev CA and a server certificate signed by it in ``directory``.

    Writes ``ca.crt``, ``ca.key``, ``server.crt`` and ``server.key``; keys are mode 0600. IP literals in
    ``hostnames`` become IPAddress SAN entries, everything else DNSName entries; the first hostname is
    also the subject CN. Valid for 30 days.
    """
    if not hostnames:
        raise ValueError("at least one hostname is required")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.UTC)
    not_before = now - _CLOCK_SKEW
    not_after = now + _VALIDITY

    ca_key = _new_key()
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pgproxy development"),
            x509.NameAttribute(NameOID.COMMON_NAME, "pgproxy dev CA"),
        ]
    )
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = _new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pgproxy development"),
                    x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0]),
                ]
            )
        )
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_san_entries(hostnames)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    tls = DevTLS(
        ca_file=directory / "ca.crt",
        cert_file=directory / "server.crt",
        key_file=directory / "server.key",
        ca_key_file=directory / "ca.key",
    )
    _write_cert(tls.ca_file, ca_cert)
    _write_private_key(tls.ca_key_file, ca_key)
    _write_cert(tls.cert_file, cert)
    _write_private_key(tls.key_file, key)
    return tls


def server_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server-side context (TLS 1.2 or newer) presenting ``cert_file``/``key_file``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    return ctx


def client_context(sslmode: str, ca_file: Path | None = None) -> ssl.SSLContext | None:
    """A client-side context for a libpq ``sslmode``; ``None`` for ``disable``.

    * ``verify-full``: chain verified against ``ca_file`` (system store if ``None``) and the host name
      checked — pass ``server_hostname`` when wrapping (asyncpg does this from the host it dials).
    * ``verify-ca``: chain verified, host name not checked.
    * ``require`` (and ``allow``/``prefer``, whose fallback to plaintext is the caller's business):
      encryption only, no verification.
    """
    if sslmode not in SSLMODES:
        raise ValueError(f"unknown sslmode {sslmode!r}; expected one of {', '.join(SSLMODES)}")
    if sslmode == "disable":
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if sslmode in ("verify-ca", "verify-full"):
        ctx.check_hostname = sslmode == "verify-full"
        ctx.verify_mode = ssl.CERT_REQUIRED
        if ca_file is not None:
            ctx.load_verify_locations(cafile=str(ca_file))
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx

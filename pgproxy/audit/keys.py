"""Ed25519 checkpoint keys: generation, loading, key ids, and the checkpoint signature input.

Private keys are PKCS#8 PEM files created with mode 0600; public keys are SubjectPublicKeyInfo PEM
files (``FILE.pub``). A key id is the hex of the first 16 bytes of SHA-256 over the raw 32-byte public key.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

CHECKPOINT_PREFIX = b"pgproxy-audit-checkpoint/v1\n"


class KeyError_(Exception):
    """A key file is missing, unreadable or not an Ed25519 key."""


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(raw_public(key)).digest()[:16].hex()


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_key(out: Path) -> tuple[Path, str]:
    """Write a new private key to ``out`` (0600, refusing to overwrite) and ``out.pub``; returns (pub, key id)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyError_(f"{out}: already exists; refusing to overwrite a signing key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = out.with_name(out.name + ".pub")
    pub.write_bytes(public_pem(key.public_key()))
    return pub, key_id(key.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyError_(f"{path}: cannot read signing key: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyError_(f"{path}: not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyError_(f"{path}: not an Ed25519 key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyError_(f"{path}: cannot read public key: {exc.strerror}") from None
    try:
        if b"PRIVATE KEY" in data:
            return load_private_key(path).public_key()
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyError_(f"{path}: not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyError_(f"{path}: not an Ed25519 key")
    return key


def public_from_raw_hex(text: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))


def signature_input(log_id: str, tree_size: int, root_hex: str, timestamp_ms: int) -> bytes:
    """The exact bytes an Ed25519 checkpoint signature covers."""
    return CHECKPOINT_PREFIX + f"{log_id}\n{tree_size}\n{root_hex}\n{timestamp_ms}\n".encode("ascii")


@dataclass(frozen=True)
class Checkpoint:
    log_id: str
    tree_size: int
    root: str  # hex
    timestamp_ms: int
    key_id: str
    signature: str  # hex

    def to_json(self) -> dict[str, Any]:
        return {"log_id": self.log_id, "tree_size": self.tree_size, "root": self.root,
                "timestamp_ms": self.timestamp_ms, "key_id": self.key_id, "signature": self.signature}

    @classmethod
    def from_json(cls, data: Any) -> Checkpoint:
        if not isinstance(data, dict):
            raise ValueError("checkpoint is not an object")
        try:
            cp = cls(str(data["log_id"]), int(data["tree_size"]), str(data["root"]), int(data["timestamp_ms"]),
                     str(data["key_id"]), str(data["signature"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed checkpoint: {exc}") from None
        return cp

    def verify(self, keys: dict[str, Ed25519PublicKey]) -> str | None:
        """None when the signature verifies with the named key, else the reason it does not."""
        key = keys.get(self.key_id)
        if key is None:
            return f"signed by unknown key id {self.key_id}"
        try:
            key.verify(bytes.fromhex(self.signature),
                       signature_input(self.log_id, self.tree_size, self.root, self.timestamp_ms))
        except (InvalidSignature, ValueError):
            return f"bad signature (key id {self.key_id})"
        return None


def sign_checkpoint(key: Ed25519PrivateKey, log_id: str, tree_size: int, root_hex: str,
                    timestamp_ms: int) -> Checkpoint:
    sig = key.sign(signature_input(log_id, tree_size, root_hex, timestamp_ms)).hex()
    return Checkpoint(log_id, tree_size, root_hex, timestamp_ms, key_id(key.public_key()), sig)

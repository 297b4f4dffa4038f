"""The Ed25519 ceremony-signing key: created in the vault, used only to seal.

The private key never leaves this module except into the vault. Verifiers
need only the public key. The key record carries it and the lab publishes it
as PEM, so a transcript can be checked on a machine without the vault.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from trekeys.errors import IntegrityError, RecordError
from trekeys.records import KeyKind, KeyRecord, KeyState
from trekeys.vault import Vault

SIGNING_KEY_ID = "tre/ceremony-signing"


def vault_private_key(vault: Vault, reason: str) -> Ed25519PrivateKey:
    # The only place where the ceremony-signing key's bytes are handled.
    raw = vault.read_secret(SIGNING_KEY_ID, reason)
    return Ed25519PrivateKey.from_private_bytes(raw)


def create_signing_key(vault: Vault, *, cryptoperiod_days: int = 730) -> KeyRecord:
    """Create the Ed25519 ceremony-signing key in the vault and return its record.

    Raises:
        RecordError: the key already exists.
    """
    private_key = Ed25519PrivateKey.generate()
    raw = private_key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    public_raw = private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    record = KeyRecord(
        id=SIGNING_KEY_ID,
        kind=KeyKind.SIGNING,
        purpose="Signs the sealed transcripts of key ceremonies.",
        owner="tre",
        custodian="Information Security Manager",
        cryptoperiod_days=cryptoperiod_days,
        fingerprint=hashlib.sha256(public_raw).hexdigest(),
        algorithm="ed25519",
        strength_bits=128,
        locations=["vault"],
        attributes={"public_key": base64.b64encode(public_raw).decode("ascii")},
    )
    record.transition(KeyState.ACTIVE, "created to seal ceremony transcripts")
    vault.add(record, raw)
    return record


def signing_public_key(vault: Vault) -> bytes:
    """Return the raw public key of the ceremony-signing key, from its record.

    Raises:
        RecordError: the record holds no public key.
    """
    record = vault.get(SIGNING_KEY_ID)
    encoded = record.attributes.get("public_key")
    if not encoded:
        raise RecordError(f"key {SIGNING_KEY_ID} has no public key in its record.")
    return base64.b64decode(encoded)


def public_key_pem(public_raw: bytes) -> str:
    """Return a raw Ed25519 public key as PEM, to publish beside the transcripts."""
    key = Ed25519PublicKey.from_public_bytes(public_raw)
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public_key_pem(path: Path) -> bytes:
    """Read an Ed25519 public key from a PEM file and return its raw bytes.

    Raises:
        IntegrityError: the file holds no Ed25519 public key.
    """
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise IntegrityError(
            f"{path} is not a readable PEM public key; export it again with "
            "'trekeys ceremony public-key'."
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise IntegrityError(f"{path} is not an Ed25519 public key.")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

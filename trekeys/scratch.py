"""Scratch keys for dry-run ceremonies: a throwaway CA key made in the vault.

A dry run on the demo TRE must change real state to be worth anything, but
never a key that something depends on. These keys live under ``scratch/``,
protect nothing, and are destroyed at the end of the dry run, leaving a
tombstone so that the audit trail still shows them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trekeys.errors import DestinationExistsError, RecordError
from trekeys.records import KeyKind, KeyRecord, KeyState, utcnow
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

SCRATCH_PREFIX = "scratch/"


def create_scratch_ca(vault: Vault, key_id: str, common_name: str) -> KeyRecord:
    """Create a P-256 CA key and its self-signed certificate in the vault.

    The certificate is kept as the entry's ``certificate.pem`` attachment.

    Raises:
        RecordError: `key_id` is not under ``scratch/`` or already exists.
    """
    if not key_id.startswith(SCRATCH_PREFIX):
        raise RecordError(
            f"scratch key id {key_id!r} must start with {SCRATCH_PREFIX!r} so that it "
            "can never be mistaken for a key in service."
        )

    private_key = ec.generate_private_key(ec.SECP256R1())
    now = utcnow()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(private_key, hashes.SHA256())
    )
    der = certificate.public_bytes(serialization.Encoding.DER)
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")

    record = KeyRecord(
        id=key_id,
        kind=KeyKind.TLS_CA,
        purpose="Scratch CA key of a dry-run ceremony; protects nothing.",
        owner="tre",
        expires=now + timedelta(days=1),
        fingerprint=hashlib.sha256(der).hexdigest(),
        algorithm="ecdsa-p256",
        strength_bits=128,
        locations=["vault"],
        attributes={"subject": common_name, "serial": str(certificate.serial_number)},
    )
    record.transition(KeyState.ACTIVE, "scratch key for a dry-run ceremony")
    vault.add(record, key_pem, attachments={"certificate.pem": pem})
    logger.info("created scratch CA key %s", key_id)
    return record


def export_certificate(vault: Vault, key_id: str, path: Path) -> Path:
    """Write the certificate of a CA key in the vault to a new file `path`.

    Raises:
        DestinationExistsError: `path` exists.
        RecordError: the key has no certificate.
    """
    path = Path(path)
    if path.exists():
        raise DestinationExistsError(path)
    _write_new(path, vault.read_attachment(key_id, "certificate.pem"))
    return path


def destroy_scratch_key(vault: Vault, key_id: str, reason: str) -> KeyRecord:
    """Deactivate and destroy a scratch key; its record stays as a tombstone.

    Raises:
        RecordError: `key_id` is not a scratch key.
    """
    if not key_id.startswith(SCRATCH_PREFIX):
        raise RecordError(
            f"{key_id} is not a scratch key; destroy keys in service with the "
            "key-destruction ceremony."
        )
    if vault.get(key_id).state is not KeyState.DEACTIVATED:
        vault.transition(key_id, KeyState.DEACTIVATED, reason)
    return vault.destroy(key_id, reason)


def _write_new(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)

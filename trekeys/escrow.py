"""Escrow keys and file passphrases of TRE users, as vault records.

Each user has an OpenPGP escrow key pair (``files/<user>``): its secret key
lives only in the vault, its public key in the escrow keyring. A TRE may also
store a user's passphrase (``files/<user>/passphrase``); the demo lab does,
so that drills prove both ways into a file. The escrow record lists the
ciphertexts that trekeys made with it, with paths relative to the lab folder
when they lie inside it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from zxcvbn import zxcvbn

from trekeys import pgpfile
from trekeys.errors import CredentialError, RecordError
from trekeys.lab import Lab
from trekeys.records import KeyKind, KeyRecord, KeyState
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

ESCROW_ROLE = "escrow"
PASSPHRASE_ROLE = "passphrase"
ESCROW_CRYPTOPERIOD_DAYS = 730


def escrow_home(lab: Lab) -> Path:
    """Return the GNUPGHOME that contains the escrow public keys of the lab."""
    return lab.root / "keyrings" / "escrow"


def create_escrow_key(
    lab: Lab,
    vault: Vault,
    user: str,
    *,
    key_id: str | None = None,
    state: KeyState = KeyState.ACTIVE,
) -> KeyRecord:
    """Create a user's escrow key, store it in the vault and its public key in the
    escrow keyring."""
    key_id = key_id or f"files/{user}"
    escrow = pgpfile.generate_escrow_key(f"trekeys escrow {key_id}")
    pgpfile.import_key(escrow_home(lab), escrow.public)
    record = KeyRecord(
        id=key_id,
        kind=KeyKind.FILE_KEY,
        purpose=f"Escrow key that recovers the files {user} encrypts (policy 4.1.2).",
        owner=f"user:{user}",
        state=state,
        cryptoperiod_days=ESCROW_CRYPTOPERIOD_DAYS,
        fingerprint=escrow.fingerprint,
        algorithm="OpenPGP Ed25519 with Curve25519 (ECDH) encryption subkey",
        strength_bits=128,
        protects=[f"files:{user}"],
        locations=["vault", f"public key in {lab_reference(lab, escrow_home(lab))}"],
        attributes={
            "role": ESCROW_ROLE,
            "user": user,
            "encryption_key_id": escrow.encryption_key_id,
            "files": "[]",
        },
    )
    if state is KeyState.ACTIVE:
        record.activated = record.created
    vault.add(record, escrow.secret, attachments={"public.asc": escrow.public.encode()})
    return record


def store_passphrase(
    vault: Vault,
    user: str,
    passphrase: str,
    *,
    key_id: str | None = None,
    state: KeyState = KeyState.ACTIVE,
) -> KeyRecord:
    """Store a user's file passphrase in the vault (policy 4.1.2: the key manager
    stores the keys that users' passphrases operate)."""
    estimate = zxcvbn(passphrase)
    record = KeyRecord(
        id=key_id or f"files/{user}/passphrase",
        kind=KeyKind.FILE_KEY,
        purpose=f"Passphrase with which {user} encrypts their files.",
        owner=f"user:{user}",
        custodian=f"user {user} and TRE System Administrators",
        state=state,
        algorithm="OpenPGP passphrase (iterated and salted S2K, AES-256)",
        # zxcvbn's guess estimate in bits, capped by the AES-256 session key.
        strength_bits=min(256, int(float(estimate["guesses_log10"]) * 3.3219)),
        protects=[f"files:{user}"],
        locations=["vault", f"memory of {user}"],
        attributes={"role": PASSPHRASE_ROLE, "user": user},
    )
    if state is KeyState.ACTIVE:
        record.activated = record.created
    vault.add(record, passphrase)
    return record


def find_user_key(vault: Vault, user: str, role: str) -> KeyRecord | None:
    """Return the active escrow or passphrase record of `user`, or None."""
    for record in vault.find(kind=KeyKind.FILE_KEY.value, owner=f"user:{user}"):
        if record.attributes.get("role") == role and record.state is KeyState.ACTIVE:
            return record
    return None


def protected_files(lab: Lab, record: KeyRecord) -> list[Path]:
    """Return the ciphertexts that trekeys encrypted for an escrow record."""
    return [
        resolve_reference(lab, ref) for ref in json.loads(record.attributes["files"])
    ]


def require_escrow_key(vault: Vault, user: str) -> KeyRecord:
    record = find_user_key(vault, user, ESCROW_ROLE)
    if record is None:
        raise RecordError(
            f"user {user} has no active escrow key in the vault; create one with "
            f"'trekeys files create-key {user}'."
        )
    return record


def escrow_key_for(vault: Vault, recipients: list[str], source: Path) -> KeyRecord:
    for record in vault.find(kind=KeyKind.FILE_KEY.value):
        if record.attributes.get("encryption_key_id") in recipients:
            return record
    raise CredentialError(
        f"{source} is encrypted to OpenPGP key "
        f"{', '.join(recipients) or 'none (passphrase only)'}, and no escrow key in "
        "the vault matches; check that the file comes from this TRE."
    )


def remember_file(lab: Lab, vault: Vault, record: KeyRecord, path: Path) -> None:
    files = json.loads(record.attributes.get("files", "[]"))
    reference = lab_reference(lab, path)
    if reference not in files:
        files.append(reference)
        record.attributes["files"] = json.dumps(files)
        vault.update(record, operation="protect-file", detail=reference)


def lab_reference(lab: Lab, path: Path) -> str:
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(lab.root))
    except ValueError:
        return str(resolved)


def resolve_reference(lab: Lab, reference: str) -> Path:
    path = Path(reference)
    return path if path.is_absolute() else lab.root / path


def user_summary(lab: Lab, vault: Vault, user: str) -> dict[str, Any]:
    """Return a user's active escrow and passphrase key ids and protected files."""
    escrow = find_user_key(vault, user, ESCROW_ROLE)
    passphrase = find_user_key(vault, user, PASSPHRASE_ROLE)
    return {
        "user": user,
        "escrow key": escrow.id if escrow else "none",
        "passphrase key": passphrase.id if passphrase else "none",
        "files": [str(p) for p in protected_files(lab, escrow)] if escrow else [],
    }

"""Key destruction: remove a key's material for good and keep its tombstone.

NIST SP 800-57 Part 1 lets a key be destroyed from pre-activation or once it
is deactivated (or compromised); an active or suspended key must first be
taken out of use. Destruction removes the material and every attachment from
the vault entry, and the record stays as a tombstone so that the audit trail,
the inventory and the compromise analysis still see the key.

`verify_destroyed` checks the result in the saved KDBX file itself, opened
with pykeepass, not only in trekeys' own record.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from pykeepass import PyKeePass

from trekeys.errors import PolicyError, RecordError
from trekeys.inventory import build_inventory
from trekeys.lab import Lab
from trekeys.records import KeyKind, KeyRecord, KeyState, utcnow
from trekeys.vault import ENCODING_PROPERTY, ID_PROPERTY, Vault

logger = logging.getLogger(__name__)

SCRATCH_ATTACHMENT = "wrapped-copy.bin"
_DESTROYABLE = {KeyState.PRE_ACTIVATION, KeyState.DEACTIVATED, KeyState.COMPROMISED}


@dataclass
class DestructionCheck:
    """One verified property of a destroyed key."""

    check: str
    passed: bool
    detail: str


def scratch_key_id() -> str:
    """Return a new id for a scratch key, unique to this second and a random tag."""
    stamp = utcnow().strftime("%Y%m%dt%H%M%S")
    return f"scratch/destruction-drill-{stamp}-{secrets.token_hex(2)}"


def create_scratch_key(vault: Vault, key_id: str | None = None) -> KeyRecord:
    """Create an active 256-bit scratch key with one attachment, for a drill.

    The material never leaves this function; the record's fingerprint is a key
    check value (a SHA-256 of the key under a fixed label), which identifies
    the key without revealing it.
    """
    key_id = key_id or scratch_key_id()
    material = secrets.token_bytes(32)
    record = KeyRecord(
        id=key_id,
        kind=KeyKind.WRAPPING,
        purpose="Scratch key created by the key destruction drill, to be destroyed.",
        owner="tre",
        algorithm="aes256-wrap",
        strength_bits=256,
        cryptoperiod_days=1,
        fingerprint=hashlib.sha256(b"trekeys-kcv" + material).hexdigest()[:16],
        locations=["vault"],
        attributes={"drill": "key-destruction"},
    )
    vault.add(
        record,
        material,
        attachments={SCRATCH_ATTACHMENT: secrets.token_bytes(48)},
    )
    vault.transition(key_id, KeyState.ACTIVE, "scratch key in service for the drill")
    return vault.get(key_id)


def has_material(vault: Vault, key_id: str) -> bool:
    """Return whether the vault still stores material for `key_id` (read, not shown)."""
    try:
        vault.read_secret(key_id, "destruction drill: check the material is present")
    except RecordError:
        return False
    return True


def destroy_key(vault: Vault, key_id: str, reason: str) -> KeyRecord:
    """Destroy a key's material and attachments, keeping its record as a tombstone.

    Raises:
        PolicyError: the key is active or suspended; deactivate it first.
        StateTransitionError: the key is already destroyed.
    """
    record = vault.get(key_id)
    if record.state in (KeyState.ACTIVE, KeyState.SUSPENDED):
        raise PolicyError(
            f"key {key_id} is {record.state.value}; deactivate it "
            "('trekeys key set-state ... deactivated') before destroying it."
        )
    if record.state not in _DESTROYABLE and not record.is_tombstone:
        raise PolicyError(f"key {key_id} cannot be destroyed from {record.state}.")
    return vault.destroy(key_id, reason)


def verify_destroyed(lab: Lab, vault: Vault, key_id: str) -> list[DestructionCheck]:
    """Check a destroyed key's tombstone, the KDBX file, the audit log and inventory.

    Call it on a vault opened after the destruction was saved.
    """
    record = vault.get(key_id)
    rows = [
        DestructionCheck(
            "record is a tombstone", record.is_tombstone, f"state {record.state}"
        ),
        DestructionCheck(
            "fingerprint kept for the audit trail",
            bool(record.fingerprint),
            record.fingerprint,
        ),
        DestructionCheck(
            "history records the destruction",
            any(h.get("to", "").startswith("destroyed") for h in record.history),
            "; ".join(f"{h['from']} -> {h['to']}" for h in record.history),
        ),
        DestructionCheck(
            "trekeys refuses to read the material",
            not has_material(vault, key_id),
            "read_secret raises RecordError",
        ),
    ]
    rows.extend(_check_kdbx_entry(lab, key_id))
    rows.append(_check_audit(vault, key_id))
    rows.append(_check_inventory(vault, key_id))
    return rows


def _check_kdbx_entry(lab: Lab, key_id: str) -> list[DestructionCheck]:
    """Open the saved KDBX file with pykeepass and look at the entry directly."""
    credentials = lab.credentials()
    keepass = PyKeePass(
        str(lab.vault_path),
        password=credentials.password,
        keyfile=str(credentials.keyfile) if credentials.keyfile else None,
    )
    entries = [
        e for e in keepass.entries if e.get_custom_property(ID_PROPERTY) == key_id
    ]
    if len(entries) != 1:
        return [DestructionCheck("KDBX entry found", False, f"{len(entries)} entries")]

    entry = entries[0]
    old_passwords = [h for h in entry.history if h.password]
    return [
        DestructionCheck(
            "KDBX entry holds no material",
            not entry.password
            and entry.get_custom_property(ENCODING_PROPERTY) == "destroyed",
            "password field empty, encoding 'destroyed'",
        ),
        DestructionCheck(
            "KDBX entry history holds no material",
            not old_passwords,
            f"{len(entry.history)} history items, {len(old_passwords)} with material",
        ),
        DestructionCheck(
            "attachments gone",
            not entry.attachments,
            f"{len(entry.attachments)} attachments",
        ),
    ]


def _check_audit(vault: Vault, key_id: str) -> DestructionCheck:
    entries = [
        e
        for e in vault.audit_log.entries()
        if e.get("key_id") == key_id and e.get("operation") == "destroy"
    ]
    detail = (
        f"entry {entries[-1]['seq']} by {entries[-1]['actor']} ({entries[-1]['role']})"
        if entries
        else "no destroy entry"
    )
    return DestructionCheck("audit log records the destruction", bool(entries), detail)


def _check_inventory(vault: Vault, key_id: str) -> DestructionCheck:
    rows = [row for row in build_inventory(vault) if row.id == key_id]
    state = rows[0].state if rows else "missing"
    passed = state in (KeyState.DESTROYED.value, KeyState.DESTROYED_COMPROMISED.value)
    return DestructionCheck(
        "inventory shows the tombstone", passed, f"inventory state {state}"
    )


def as_rows(checks: list[DestructionCheck]) -> list[dict[str, Any]]:
    """Return the checks as table rows for a runbook."""
    return [
        {"check": c.check, "result": "PASS" if c.passed else "FAIL", "detail": c.detail}
        for c in checks
    ]

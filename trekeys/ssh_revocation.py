"""Evidence that a revoked SSH key stays revoked: in the KRL, dropped on restore.

A user key revoked after a backup was made is still in that backup's
authorized_keys. Restores drop it because it is listed in the TRE's key
revocation list (KRL). `check_revocation_on_restore` finds the newest backup
that still contains a revoked key and restores that user's folder into a
scratch folder to show that the key is left out.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from trekeys import backup as backups
from trekeys import gpgkeys
from trekeys.lab import Lab
from trekeys.records import KeyKind, KeyRecord
from trekeys.restore import read_backup_members, restore_backup
from trekeys.ssh import (
    AUTHORIZED_KEYS,
    create_user_key,
    parse_authorized_keys,
    revoke_ssh_key,
    revoked_fingerprints,
)
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

# Lab configuration entry naming the demo user key that `revoke_demo_key` revokes.
DEMO_KEY_SETTING = "demo_revoked_ssh_key"


@dataclass
class RevocationOnRestore:
    """The KRL and restore evidence for one revoked user key.

    Attributes:
        backup: reference of the newest backup whose authorized_keys still
            contains the key, or "" when no backup does.
        in_restored: whether the key is in the restored authorized_keys.
        dropped: the authorized_keys lines the restore left out.
    """

    key_id: str
    in_krl: bool
    backup: str = ""
    in_restored: bool = False
    dropped: list[str] = field(default_factory=list)


def revoked_user_keys(vault: Vault) -> list[KeyRecord]:
    """Return the SSH user keys that the vault marks revoked."""
    return [
        r
        for r in vault.find(kind=KeyKind.SSH.value)
        if r.attributes.get("revoked") and r.attributes.get("user")
    ]


def find_backup_with_key(
    lab: Lab, vault: Vault, record: KeyRecord, *, key_id: str = gpgkeys.ADMIN_KEY_ID
) -> backups.Backup | None:
    """Return the newest backup where the key's user has the key in authorized_keys.

    The backups are decrypted with `key_id` and only that authorized_keys file
    is read.
    """
    instance, user = record.attributes["instance"], record.attributes["user"]
    member = f"{user}/{AUTHORIZED_KEYS}"
    for candidate in reversed(backups.list_backups(lab, instance)):
        members = read_backup_members(
            lab, vault, candidate, key_id=key_id, wanted=lambda name: name == member
        )
        for data in members.values():
            if record.fingerprint in {
                k.fingerprint for k in parse_authorized_keys(data)
            }:
                return candidate
    return None


def check_revocation_on_restore(
    lab: Lab, vault: Vault, key_id: str, *, decrypt_with: str = gpgkeys.ADMIN_KEY_ID
) -> RevocationOnRestore:
    """Restore the key's user from a backup that still lists the key, and check it.

    The restore goes into a scratch folder under the lab's work folder, which
    is removed afterwards.
    """
    record = vault.get(key_id)
    result = RevocationOnRestore(
        key_id, record.fingerprint in revoked_fingerprints(lab)
    )
    found = find_backup_with_key(lab, vault, record, key_id=decrypt_with)
    if found is None:
        return result

    user = record.attributes["user"]
    lab.work_dir.mkdir(mode=0o700, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="ssh-revocation-", dir=lab.work_dir))
    try:
        target = scratch / "restored"
        report = restore_backup(
            lab, vault, found, key_id=decrypt_with, target=target, user=user
        )
        restored = parse_authorized_keys((target / user / AUTHORIZED_KEYS).read_bytes())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    result.backup = found.reference
    result.in_restored = record.fingerprint in {k.fingerprint for k in restored}
    result.dropped = list(report.removed_ssh_keys)
    return result


# The demo TRE


def create_demo_key(lab: Lab, vault: Vault) -> None:
    """Give the first user of the first instance a second key, to be revoked later."""
    instance, users = next(iter(lab.instances.items()))
    key_id = f"ssh/{instance}/{users[0]}-old-laptop"
    create_user_key(lab, vault, instance, users[0], key_id=key_id)
    lab.config[DEMO_KEY_SETTING] = key_id


def revoke_demo_key(lab: Lab, vault: Vault, instance: str) -> None:
    """Revoke the demo's old-laptop key if it belongs to `instance`."""
    key_id = lab.config.get(DEMO_KEY_SETTING)
    if not key_id or key_id not in vault:
        return
    record = vault.get(key_id)
    if record.attributes.get("instance") != instance or record.attributes.get(
        "revoked"
    ):
        return
    revoke_ssh_key(lab, vault, key_id, reason="laptop lost", compromised=True)
    logger.info("demo TRE: revoked %s between two backups of %s", key_id, instance)

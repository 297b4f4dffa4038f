"""Encrypted home-directory backups, each encrypted to exactly three keys.

A backup of a project instance's ``home`` folder is a tar stream piped into
``gpg --encrypt`` and written as ``<name>.tar.gpg`` in the backup store. The
recipients are the instance key, the TRE admin key and the TRE admin offline
key (policy 4.1.4), each pinned by the full fingerprint of its encryption
subkey, so keyring trust settings play no part. Before writing, trekeys checks
each recipient itself: a missing, expired or revoked key, or one without an
encryption subkey, stops the backup.

The tar stream ends with a manifest member (`INNER_MANIFEST`) holding every
file's path, size and SHA-256. Beside the archive, ``<name>.manifest.json``
contains what can be checked without decrypting: the recipients, the archive's
size and SHA-256, the SHA-256 of the inner manifest and the restore tests.
File names stay inside the encryption.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trekeys import gpgkeys
from trekeys.archive import CHUNK as CHUNK
from trekeys.archive import INNER_MANIFEST as INNER_MANIFEST
from trekeys.archive import (
    file_sha256,
    write_encrypted_archive,
    write_json_atomically,
)
from trekeys.errors import (
    DestinationExistsError,
    IntegrityError,
    LabError,
    PolicyError,
    RecipientError,
    RecipientMismatchError,
)
from trekeys.lab import Lab
from trekeys.openpgp import read_message_header
from trekeys.records import KeyRecord, KeyState, utcnow
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

ARCHIVE_SUFFIX = ".tar.gpg"
MANIFEST_SUFFIX = ".manifest.json"
DEFAULT_KEEP = 5
ROLES = (gpgkeys.ROLE_INSTANCE, gpgkeys.ROLE_ADMIN, gpgkeys.ROLE_OFFLINE)


@dataclass(frozen=True)
class Recipient:
    """A recipient key of a backup, pinned by its encryption subkey."""

    key_id: str
    role: str
    fingerprint: str
    subkey: str

    @property
    def subkey_id(self) -> str:
        """The 8-byte key id that OpenPGP session-key packets carry."""
        return self.subkey[-16:]


@dataclass
class Backup:
    """One encrypted backup in the backup store and its manifest."""

    instance: str
    name: str
    archive: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def reference(self) -> str:
        """The typed reference that key records use in `protects`."""
        return f"backup:{self.instance}/{self.name}"

    @property
    def manifest_path(self) -> Path:
        return self.archive.with_name(self.name + MANIFEST_SUFFIX)

    @property
    def recipients(self) -> list[Recipient]:
        return [Recipient(**r) for r in self.manifest["recipients"]]

    @property
    def passed_restore_test(self) -> bool:
        """Whether a restore test with all three keys has passed."""
        return any(t.get("passed") for t in self.manifest.get("restore_tests", []))


# Paths and listing


def store_dir(lab: Lab, instance: str) -> Path:
    """Return the backup store folder of one project instance."""
    return lab.backup_media / "homes" / instance


def home_dir(lab: Lab, instance: str) -> Path:
    """Return the home folder of a project instance that backups copy."""
    return lab.instance_dir(instance) / "home"


def list_backups(lab: Lab, instance: str) -> list[Backup]:
    """Return the backups of `instance`, oldest first."""
    folder = store_dir(lab, instance)
    if not folder.is_dir():
        return []
    found = []
    for manifest_path in sorted(folder.glob("*" + MANIFEST_SUFFIX)):
        name = manifest_path.name.removesuffix(MANIFEST_SUFFIX)
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
        found.append(Backup(instance, name, folder / (name + ARCHIVE_SUFFIX), data))
    return sorted(found, key=lambda b: (b.manifest["created"], b.name))


def find_backup(lab: Lab, instance: str, name: str | None = None) -> Backup:
    """Return the backup `name` of `instance`, or its newest when `name` is empty.

    Raises:
        LabError: there is no such backup.
    """
    backups = list_backups(lab, instance)
    if not name:
        if not backups:
            raise LabError(
                f"instance {instance} has no backups in {store_dir(lab, instance)}; "
                f"make one with 'trekeys backup create {instance}'."
            )
        return backups[-1]
    for backup in backups:
        if backup.name == name:
            return backup
    raise LabError(
        f"no backup {name!r} of instance {instance}; list them with "
        f"'trekeys backup list {instance}'."
    )


# Recipients


def select_recipients(lab: Lab, vault: Vault, instance: str) -> list[Recipient]:
    """Return the three recipients of `instance`'s backups, each checked.

    Raises:
        RecipientError: a recipient is missing from the vault or the public
            keyring, is not active, is expired or revoked, or cannot encrypt.
    """
    recipients = []
    for role in ROLES:
        record = _recipient_record(vault, role, instance)
        status = gpgkeys.inspect_public_key(
            gpgkeys.public_home(lab), record.fingerprint
        )
        if status.problem:
            raise RecipientError(record.id, record.fingerprint, status.problem)
        recipients.append(
            Recipient(record.id, role, record.fingerprint, status.encryption_subkey)
        )
    return recipients


def _recipient_record(vault: Vault, role: str, instance: str) -> KeyRecord:
    candidates = [
        r
        for r in vault.find(kind="gpg")
        if r.attributes.get("gpg_role") == role
        and (role != gpgkeys.ROLE_INSTANCE or r.attributes.get("instance") == instance)
    ]
    active = [r for r in candidates if r.state is KeyState.ACTIVE]
    expected = {
        gpgkeys.ROLE_INSTANCE: f"gpg/instance-{instance}",
        gpgkeys.ROLE_ADMIN: gpgkeys.ADMIN_KEY_ID,
        gpgkeys.ROLE_OFFLINE: gpgkeys.OFFLINE_KEY_ID,
    }[role]
    if not candidates:
        raise RecipientError(expected, "", "missing from the vault")
    if not active:
        newest = max(candidates, key=lambda r: r.created)
        raise RecipientError(newest.id, newest.fingerprint, f"{newest.state.value}")
    if len(active) > 1:
        raise PolicyError(
            f"{len(active)} active {role} keys for instance {instance} "
            f"({', '.join(r.id for r in active)}); deactivate all but one."
        )
    return active[0]


def verify_recipients(archive: Path, expected: list[Recipient]) -> None:
    """Check that `archive` is encrypted to exactly `expected`, from its packets.

    Raises:
        RecipientMismatchError: other or more key ids, a passphrase session
            key, or encrypted data without modification detection.
        IntegrityError: the file is not an encrypted OpenPGP message.
    """
    header = read_message_header(archive)
    found = sorted(header.key_ids)
    wanted = sorted(r.subkey_id for r in expected)
    if found != wanted or header.passphrase_packets or not header.integrity_protected:
        raise RecipientMismatchError(
            f"backup {archive} is encrypted to key ids {', '.join(found) or 'none'}"
            f" ({header.passphrase_packets} passphrase packets) but must be "
            f"encrypted to exactly {', '.join(wanted)}; do not rely on it and make "
            "a new backup."
        )


# Writing a backup


def create_backup(
    lab: Lab,
    vault: Vault,
    instance: str,
    *,
    source: Path | None = None,
    name: str | None = None,
) -> Backup:
    """Back up the home folder of `instance` to its three recipients.

    Returns:
        The new backup, written under a temporary name and renamed after its
        recipients were verified.

    Raises:
        RecipientError: a recipient key cannot be used (see `select_recipients`).
        RecipientMismatchError: the written archive lists other recipients.
        DestinationExistsError: a backup of that name exists.
    """
    recipients = select_recipients(lab, vault, instance)
    source = source or home_dir(lab, instance)
    if not source.is_dir():
        raise LabError(f"home folder {source} of instance {instance} is missing.")
    folder = store_dir(lab, instance)
    folder.mkdir(parents=True, exist_ok=True)
    name = name or _new_name(folder)
    archive = folder / (name + ARCHIVE_SUFFIX)
    if archive.exists() or archive.with_name(name + MANIFEST_SUFFIX).exists():
        raise DestinationExistsError(archive)

    partial = folder / f".{name}.partial"
    try:
        stats = write_encrypted_archive(
            source, partial, [r.subkey for r in recipients], gpgkeys.public_home(lab)
        )
        verify_recipients(partial, recipients)
        manifest = {
            "instance": instance,
            "name": name,
            "created": utcnow().isoformat(),
            "source": str(source),
            "recipients": [r.__dict__ for r in recipients],
            "archive_bytes": partial.stat().st_size,
            "archive_sha256": file_sha256(partial),
            **stats,
            "restore_tests": [],
        }
        write_json_atomically(folder / (name + MANIFEST_SUFFIX), manifest)
        os.replace(partial, archive)
    finally:
        partial.unlink(missing_ok=True)

    backup = Backup(instance, name, archive, manifest)
    for recipient in recipients:
        record = vault.get(recipient.key_id)
        record.protects.append(backup.reference)
        vault.update(record, operation="backup", detail=backup.reference)
    logger.info("backed up %s to %s (%d files)", instance, archive, stats["file_count"])
    return backup


def _new_name(folder: Path) -> str:
    base = "home-" + utcnow().strftime("%Y%m%d-%H%M%S")
    name, counter = base, 1
    while (folder / (name + MANIFEST_SUFFIX)).exists() or (
        folder / (name + ARCHIVE_SUFFIX)
    ).exists():
        counter += 1
        name = f"{base}-{counter}"
    return name


def verify_archive_file(backup: Backup) -> None:
    """Check a backup's size, SHA-256 and recipients without decrypting it.

    Raises:
        IntegrityError: the archive is missing, truncated or changed.
        RecipientMismatchError: it is encrypted to other keys.
    """
    archive = backup.archive
    if not archive.is_file():
        raise IntegrityError(
            f"backup archive {archive} is missing; restore from another backup."
        )
    size = archive.stat().st_size
    if size != backup.manifest["archive_bytes"]:
        raise IntegrityError(
            f"backup archive {archive} has {size} bytes but its manifest records "
            f"{backup.manifest['archive_bytes']}: it is truncated or replaced, so "
            "restore from another backup."
        )
    if file_sha256(archive) != backup.manifest["archive_sha256"]:
        raise IntegrityError(
            f"backup archive {archive} does not match the SHA-256 in its manifest: "
            "it was changed, so restore from another backup."
        )
    verify_recipients(archive, backup.recipients)


# Retention


def prune_backups(
    lab: Lab, vault: Vault, instance: str, *, keep: int = DEFAULT_KEEP
) -> list[str]:
    """Delete all but the newest `keep` backups of `instance`.

    The newest backup that passed a restore test with all three keys is never
    deleted, even when it is older than the newest `keep`, so that one proven
    backup always remains.

    Returns:
        The names of the deleted backups.

    Raises:
        PolicyError: `keep` is less than 1.
    """
    if keep < 1:
        raise PolicyError(
            f"keeping {keep} backups would delete every backup of {instance}; "
            "keep at least 1."
        )
    backups = list_backups(lab, instance)
    kept = {b.name for b in backups[-keep:]}
    tested = [b for b in backups if b.passed_restore_test]
    if tested:
        kept.add(tested[-1].name)

    removed = []
    for backup in backups:
        if backup.name in kept:
            continue
        backup.archive.unlink(missing_ok=True)
        backup.manifest_path.unlink()
        _forget_backup(vault, backup)
        removed.append(backup.name)
        logger.info("deleted backup %s (retention %d)", backup.reference, keep)
    return removed


def _forget_backup(vault: Vault, backup: Backup) -> None:
    for recipient in backup.recipients:
        if recipient.key_id not in vault:
            continue
        record = vault.get(recipient.key_id)
        if backup.reference in record.protects:
            record.protects.remove(backup.reference)
            vault.update(record, operation="backup-deleted", detail=backup.reference)


# The demo TRE


DEMO_FILES = {
    "README.txt": "Project notes for the {instance} instance, kept by {user}.\n",
    "analysis/summary.csv": "cohort,n,mean\nA,120,4.2\nB,98,3.9\n",
    "analysis/model.py": "# {user}'s model\nCOEFFICIENTS = [0.1, 0.2, 0.3]\n",
    ".bashrc": "export PS1='{user}@{instance}$ '\n",
}


def create_demo_home(lab: Lab, instance: str, user: str) -> Path:
    """Create a user's home folder with a few files, if it does not exist."""
    home = home_dir(lab, instance) / user
    if home.exists():
        return home
    for relative, text in DEMO_FILES.items():
        path = home / relative
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.write_text(text.format(instance=instance, user=user), encoding="utf-8")
    (home / "data.bin").write_bytes(os.urandom(64 * 1024))
    return home


def build_lab(lab: Lab, vault: Vault) -> None:
    """Create the backup keys and two backups of every instance's home folder."""
    from trekeys.ssh_revocation import revoke_demo_key

    gpgkeys.create_backup_keys(lab, vault)
    for instance, users in lab.instances.items():
        for user in users:
            create_demo_home(lab, instance, user)
        create_backup(lab, vault, instance)
        # The older backup keeps the revoked key, so restores must drop it.
        revoke_demo_key(lab, vault, instance)
        # A change between the two backups, as between two nightly runs.
        first = home_dir(lab, instance) / users[0] / "analysis" / "results.txt"
        first.write_text("results of the second day\n", encoding="utf-8")
        create_backup(lab, vault, instance)

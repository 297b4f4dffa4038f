"""Rotate backup and SSH keys, and find what an old or compromised key opens.

Rotating a GPG key makes a new key of the same role in the same GnuPG home
and takes the old one out of use. The old key becomes deactivated, or
compromised with a revocation certificate that is generated, imported and
stored in the vault.
Existing backups stay encrypted to the old key until they are re-encrypted to
the new set of recipients, which `reencrypt_backup` does without writing
plaintext to disk. Rotating an SSH key revokes and replaces it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any, cast

from trekeys import backup as backups
from trekeys import gpgkeys
from trekeys.errors import IntegrityError, KeyringMissingError, PolicyError
from trekeys.lab import Lab
from trekeys.records import KeyKind, KeyRecord, KeyState, utcnow
from trekeys.ssh import next_key_id, rotate_ssh_key
from trekeys.vault import Vault

logger = logging.getLogger(__name__)


def rotate_key(
    lab: Lab,
    vault: Vault,
    key_id: str,
    *,
    reason: str,
    compromised: bool,
    reencrypt: bool = False,
) -> list[str]:
    """Replace a GPG backup key or an SSH key and take the old one out of use.

    Args:
        reason: why, for the record history and the revocation certificate.
        compromised: mark the old key compromised (GPG: with a revocation
            certificate) rather than deactivated.
        reencrypt: re-encrypt the old key's backups to the new recipients.

    Returns:
        The ids of the new keys.

    Raises:
        PolicyError: the key is neither a GPG backup key nor an SSH key.
    """
    record = vault.get(key_id)
    if record.kind is KeyKind.SSH:
        return rotate_ssh_key(
            lab, vault, key_id, reason=reason, compromised=compromised
        )
    if record.kind is not KeyKind.GPG or "gpg_role" not in record.attributes:
        raise PolicyError(
            f"key {key_id} is a {record.kind.value} key; rotate_key handles GPG "
            "backup keys and SSH keys only."
        )
    return [_rotate_gpg(lab, vault, key_id, reason, compromised, reencrypt)]


def _rotate_gpg(
    lab: Lab,
    vault: Vault,
    key_id: str,
    reason: str,
    compromised: bool,
    reencrypt: bool,
) -> str:
    old = vault.get(key_id)
    home = gpgkeys.home_of(lab, old)
    if not home.is_dir():
        raise KeyringMissingError(home, key_id)

    new_id = next_key_id(vault, key_id)
    gpgkeys.create_gpg_key(
        lab,
        vault,
        new_id,
        role=old.attributes["gpg_role"],
        home=home,
        owner=old.owner,
        purpose=old.purpose,
        custodian=old.custodian,
        instance=old.attributes.get("instance", ""),
    )
    if compromised:
        gpgkeys.issue_revocation(lab, vault, key_id, reason, compromised=True)
        vault.transition(key_id, KeyState.COMPROMISED, reason)
    else:
        vault.transition(key_id, KeyState.DEACTIVATED, reason)
    gpgkeys.stop_agent(home)

    old = vault.get(key_id)
    old.attributes["replaced_by"] = new_id
    vault.update(old, operation="rotate", detail=f"replaced by {new_id}: {reason}")
    affected = find_backups_for_key(lab, vault, key_id)
    logger.info(
        "rotated GPG key %s to %s; %d backups are encrypted to the old key",
        key_id,
        new_id,
        len(affected),
    )
    if reencrypt:
        for backup in affected:
            reencrypt_backup(lab, vault, backup)
    return new_id


def find_backups_for_key(lab: Lab, vault: Vault, key_id: str) -> list[backups.Backup]:
    """Return every backup in the store that is encrypted to `key_id`."""
    fingerprint = vault.get(key_id).fingerprint
    return [
        backup
        for instance in lab.instances
        for backup in backups.list_backups(lab, instance)
        if any(r.fingerprint == fingerprint for r in backup.recipients)
    ]


def recipients_status(
    lab: Lab, vault: Vault, backup: backups.Backup
) -> list[dict[str, Any]]:
    """Return, for each recipient of `backup`, whether it can still open it.

    A recipient can open the backup while its record is not a tombstone and
    its secret key is in its GnuPG home or in the vault. A compromised key
    can still open it, which is why its backups must be re-encrypted.
    """
    rows = []
    for recipient in backup.recipients:
        row: dict[str, Any] = {
            "key_id": recipient.key_id,
            "role": recipient.role,
            "state": "missing from the vault",
            "in GnuPG home": False,
            "in vault": False,
            "can open": False,
        }
        if recipient.key_id in vault:
            record = vault.get(recipient.key_id)
            row["state"] = record.state.value
            row["in GnuPG home"] = _home_holds_secret(lab, record)
            row["in vault"] = not record.is_tombstone and (
                gpgkeys.SECRET_KEY_ATTACHMENT in vault.attachment_names(record.id)
            )
            row["can open"] = row["in GnuPG home"] or row["in vault"]
        rows.append(row)
    return rows


def _home_holds_secret(lab: Lab, record: KeyRecord) -> bool:
    home = gpgkeys.home_of(lab, record)
    if not home.is_dir():
        return False
    secret = gpgkeys.gpg_for(home, key_id=record.id).list_keys(
        secret=True, keys=[record.fingerprint]
    )
    gpgkeys.stop_agent(home)
    return any(k["fingerprint"] == record.fingerprint for k in secret)


def reencrypt_backup(
    lab: Lab,
    vault: Vault,
    backup: backups.Backup,
    *,
    key_id: str = gpgkeys.ADMIN_KEY_ID,
) -> backups.Backup:
    """Re-encrypt a backup to the current recipients of its instance.

    The archive is decrypted with `key_id` (the admin key by default) and
    piped straight into a new encryption, so no plaintext reaches the disk.
    The new archive replaces the old one only after its recipients are
    verified and its plaintext digest equals the old one.
    """
    recipients = backups.select_recipients(lab, vault, backup.instance)
    backups.verify_archive_file(backup)
    partial = backup.archive.with_name(f".{backup.name}.reencrypt")
    try:
        digest = _pipe_reencrypt(lab, vault, backup, key_id, recipients, partial)
        backups.verify_recipients(partial, recipients)
        check = _plaintext_digest(lab, vault, partial, backup, key_id)
        if check != digest:
            raise IntegrityError(
                f"re-encrypted backup {backup.reference} does not decrypt to the "
                "same plaintext; the original was kept."
            )
        old_keys = [r.key_id for r in backup.recipients]
        manifest = dict(backup.manifest)
        manifest["recipients"] = [r.__dict__ for r in recipients]
        manifest["archive_bytes"] = partial.stat().st_size
        manifest["archive_sha256"] = backups.file_sha256(partial)
        manifest.setdefault("history", []).append(
            {"at": utcnow().isoformat(), "reencrypted_from": old_keys}
        )
        os.replace(partial, backup.archive)
        backups.write_json_atomically(backup.manifest_path, manifest)
    finally:
        partial.unlink(missing_ok=True)

    backup.manifest = manifest
    _move_protects(vault, backup, old_keys, [r.key_id for r in recipients])
    logger.info(
        "re-encrypted %s to %s", backup.reference, [r.key_id for r in recipients]
    )
    return backup


def _move_protects(
    vault: Vault, backup: backups.Backup, old_keys: list[str], new_keys: list[str]
) -> None:
    for key_id in set(old_keys) - set(new_keys):
        record = vault.get(key_id)
        if backup.reference in record.protects:
            record.protects.remove(backup.reference)
            vault.update(record, operation="reencrypt", detail=backup.reference)
    for key_id in set(new_keys) - set(old_keys):
        record = vault.get(key_id)
        record.protects.append(backup.reference)
        vault.update(record, operation="reencrypt", detail=backup.reference)


def _decrypt_process(
    lab: Lab, vault: Vault, archive: Path, key_id: str, fd: int, status: Any
) -> subprocess.Popen[bytes]:
    home = gpgkeys.open_home(gpgkeys.home_of(lab, vault.get(key_id)), key_id=key_id)
    command = gpgkeys.gpg_command(
        home,
        "--pinentry-mode",
        "loopback",
        "--passphrase-fd",
        str(fd),
        "--output",
        "-",
        "--decrypt",
        str(archive),
    )
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=status, pass_fds=(fd,)
    )


def _pipe_reencrypt(
    lab: Lab,
    vault: Vault,
    backup: backups.Backup,
    key_id: str,
    recipients: list[backups.Recipient],
    output: Path,
) -> str:
    passphrase = gpgkeys.read_passphrase(
        vault, key_id, f"re-encrypt {backup.reference}"
    )
    public = gpgkeys.open_home(gpgkeys.public_home(lab))
    recipient_args = [a for r in recipients for a in ("--recipient", r.subkey + "!")]
    encrypt = gpgkeys.gpg_command(
        public,
        "--trust-model",
        "always",
        "--output",
        str(output),
        *recipient_args,
        "--encrypt",
    )
    digest = hashlib.sha256()
    with gpgkeys.passphrase_fd(passphrase) as fd, tempfile.TemporaryFile() as status:
        decrypting = _decrypt_process(lab, vault, backup.archive, key_id, fd, status)
        encrypting = subprocess.Popen(encrypt, stdin=subprocess.PIPE, stderr=status)
        source = cast(IO[bytes], decrypting.stdout)
        sink = cast(IO[bytes], encrypting.stdin)
        try:
            while chunk := source.read(backups.CHUNK):
                digest.update(chunk)
                sink.write(chunk)
        finally:
            sink.close()
            source.close()
            codes = (decrypting.wait(), encrypting.wait())
        if codes != (0, 0):
            status.seek(0)
            gpgkeys.raise_for_gpg(
                f"re-encrypt {backup.reference}",
                status.read().decode(errors="replace"),
                max(codes),
                public,
            )
    return digest.hexdigest()


def _plaintext_digest(
    lab: Lab, vault: Vault, archive: Path, backup: backups.Backup, key_id: str
) -> str:
    passphrase = gpgkeys.read_passphrase(vault, key_id, f"check {backup.reference}")
    digest = hashlib.sha256()
    with gpgkeys.passphrase_fd(passphrase) as fd, tempfile.TemporaryFile() as status:
        process = _decrypt_process(lab, vault, archive, key_id, fd, status)
        source = cast(IO[bytes], process.stdout)
        while chunk := source.read(backups.CHUNK):
            digest.update(chunk)
        source.close()
        if process.wait() != 0:
            return ""
    return digest.hexdigest()

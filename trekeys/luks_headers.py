"""Header backups and file manifests of LUKS2 volumes, kept in the vault.

A header backup (``cryptsetup luksHeaderBackup``) contains the keyslots, so
with a passphrase it gives back the volume key even after the live header is
damaged. Each backup is verified against the live header as soon as it is
made (UUID, keyslots, digests, segments), attached to the volume key record
with its SHA-256, and copied to the backup media. A backup whose keyslots
differ from the live header's is stale, and the record's
``header_backup_stale`` attribute says so for the inventory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from trekeys.errors import CredentialError, DestinationExistsError, HeaderBackupError
from trekeys.lab import Lab
from trekeys.luks2meta import LuksHeader, read_header
from trekeys.luks_device import backup_header
from trekeys.records import KeyRecord, utcnow
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

HEADER_ATTACHMENT = "luks-header.img"
MANIFEST_ATTACHMENT = "manifest.json"


def volume_path(lab: Lab, record: KeyRecord) -> Path:
    """Return the device or image of a volume key record (relative to the lab)."""
    device = Path(record.attributes["device"])
    return device if device.is_absolute() else lab.root / device


def relative_to_lab(lab: Lab, path: Path) -> str:
    path = path.resolve()
    return (
        str(path.relative_to(lab.root)) if path.is_relative_to(lab.root) else str(path)
    )


# Header backups


def refresh_header_backup(lab: Lab, vault: Vault, volume_id: str) -> Path:
    """Back up the live header, verify it, and store it in the vault and on media.

    The backup is written to a temporary file, checked against the live header
    (UUID, keyslots, digests and segments), then attached to the volume key
    record and copied to the backup media folder. The record's earlier backup
    file on the media is kept.

    Returns:
        The path of the copy on the backup media.
    """
    record = vault.get(volume_id)
    device = volume_path(lab, record)
    live = read_header(device)

    with tempfile.TemporaryDirectory(prefix="trekeys-header-") as scratch:
        backup = Path(scratch) / HEADER_ATTACHMENT
        backup_header(device, backup)
        data = backup.read_bytes()
        verify_header_backup(backup, live.uuid, expected_fingerprint=live.fingerprint())

    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    instance = record.owner.removeprefix("instance:")
    media = (
        lab.backup_media
        / "luks-headers"
        / instance
        / f"{live.uuid}-{stamp}-seq{live.seqid}.img"
    )
    if media.exists():
        raise DestinationExistsError(media)
    media.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = media.with_name(f".{media.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(0o600)
    os.replace(tmp, media)

    vault.add_attachment(volume_id, HEADER_ATTACHMENT, data)
    record.attributes.update(
        {
            "header_backup_sha256": hashlib.sha256(data).hexdigest(),
            "header_backup_file": relative_to_lab(lab, media),
            "header_backup_created": utcnow().isoformat(),
            "header_fingerprint": live.fingerprint(),
            "header_backup_stale": "false",
        }
    )
    record.locations = [
        loc for loc in record.locations if not loc.startswith("header backup")
    ] + [f"header backup {relative_to_lab(lab, media)}"]
    vault.update(record, operation="header-backup", detail=f"LUKS {live.uuid}")
    logger.info("backed up the LUKS header of %s (%s)", volume_id, live.uuid)
    return media


def verify_header_backup(
    backup: Path,
    uuid: str,
    *,
    expected_sha256: str | None = None,
    expected_fingerprint: str | None = None,
) -> LuksHeader:
    """Check a header backup before it is used: intact, and of the right volume.

    Raises:
        HeaderBackupError: it is truncated, corrupt, of another volume, or its
            hash or keyslots differ from what the vault recorded.
        NotLuksError: it is not a LUKS header at all.
    """
    if expected_sha256 is not None:
        actual = hashlib.sha256(backup.read_bytes()).hexdigest()
        if actual != expected_sha256:
            raise HeaderBackupError(
                f"header backup {backup} has SHA-256 {actual[:16]}..., not the "
                f"{expected_sha256[:16]}... recorded in the vault; use another copy."
            )
    header = read_header(backup, both_copies=True)
    if header.uuid != uuid:
        raise HeaderBackupError(
            f"header backup {backup} belongs to LUKS volume {header.uuid}, not "
            f"{uuid}; find the backup of the right volume."
        )
    size = backup.stat().st_size
    if size < header.metadata_end:
        raise HeaderBackupError(
            f"header backup {backup} is truncated ({size} of {header.metadata_end} "
            "bytes); use another copy."
        )
    if (
        expected_fingerprint is not None
        and header.fingerprint() != expected_fingerprint
    ):
        raise HeaderBackupError(
            f"header backup {backup} has other keyslots than the live header of "
            f"{uuid}; make a new backup with 'trekeys volume backup-header'."
        )
    return header


def check_header_backup_current(lab: Lab, vault: Vault, volume_id: str) -> bool:
    """Compare the stored header backup with the live header; flag it when stale.

    Sets the record's ``header_backup_stale`` attribute, which the inventory
    shows, and returns whether the backup is current.
    """
    record = vault.get(volume_id)
    live = read_header(volume_path(lab, record))
    current = record.attributes.get("header_fingerprint") == live.fingerprint()
    flag = "false" if current else "true"
    if record.attributes.get("header_backup_stale") != flag:
        record.attributes["header_backup_stale"] = flag
        vault.update(record, operation="header-check", detail=f"stale={flag}")
    if not current:
        logger.warning("the header backup of %s is stale", volume_id)
    return current


def export_header_backup(vault: Vault, volume_id: str, target: Path) -> LuksHeader:
    """Write the vault's header backup of `volume_id` to the new file `target`.

    The copy is verified against the UUID and SHA-256 recorded in the vault.
    """
    record = vault.get(volume_id)
    if target.exists():
        raise DestinationExistsError(target)
    data = vault.read_attachment(volume_id, HEADER_ATTACHMENT)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return verify_header_backup(
        target,
        record.attributes["uuid"],
        expected_sha256=record.attributes.get("header_backup_sha256"),
    )


def read_escrowed_volume_key(vault: Vault, volume_id: str, reason: str) -> bytes:
    """Return the escrowed volume key after checking it against the header backup.

    Raises:
        CredentialError: the key does not match the volume's digest.
    """
    record = vault.get(volume_id)
    volume_key = vault.read_secret(volume_id, reason)
    with tempfile.TemporaryDirectory(prefix="trekeys-header-") as folder:
        header = export_header_backup(vault, volume_id, Path(folder) / "header.img")
    if not header.check_volume_key(volume_key):
        raise CredentialError(
            f"the escrowed volume key {volume_id} does not match the digest of LUKS "
            f"volume {record.attributes['uuid']}; the escrow is wrong, recover with "
            "the recovery passphrase instead."
        )
    return volume_key


# Manifests of the files on a volume


def build_manifest(folder: Path) -> list[dict[str, object]]:
    """Return path, size and SHA-256 of every file under `folder`, sorted by path."""
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        entries.append(
            {
                "path": path.relative_to(folder).as_posix(),
                "size": path.stat().st_size,
                "sha256": digest.hexdigest(),
            }
        )
    return entries


def store_manifest(
    vault: Vault, volume_id: str, manifest: list[dict[str, object]]
) -> None:
    """Attach a file manifest to a volume key record."""
    data = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
    vault.add_attachment(volume_id, MANIFEST_ATTACHMENT, data)
    record = vault.get(volume_id)
    record.attributes["manifest_sha256"] = hashlib.sha256(data).hexdigest()
    record.attributes["manifest_files"] = str(len(manifest))
    vault.update(record, operation="store-manifest", detail=f"{len(manifest)} files")


def read_manifest(vault: Vault, volume_id: str) -> list[dict[str, object]]:
    """Return the file manifest stored with a volume key record."""
    return list(json.loads(vault.read_attachment(volume_id, MANIFEST_ATTACHMENT)))

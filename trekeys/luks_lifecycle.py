"""Lifecycle of volume keys: replace a keyslot, re-encrypt, destroy a volume.

- A recovery passphrase or boot key is replaced by adding a keyslot for the
  new secret, testing it, and removing the old keyslot. The old record is
  marked deactivated (superseded) or compromised.
- After a compromise of the volume key, ``cryptsetup reencrypt`` moves the
  data to a new volume key offline. The old key stays in the vault, marked
  compromised, until the new key is verified against the header digest and
  the volume's files; only then is its material destroyed.
- Destroying a volume erases its keyslots (``luksErase``), overwrites the
  header and keyslot areas, removes the boot key file and header backups,
  and leaves tombstone records.

Each change refreshes the header backup, and backups that no longer match
the live header are renamed with a ``.superseded`` suffix on the media.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from pathlib import Path

from trekeys.cryptsetup import KdfSettings
from trekeys.errors import IntegrityError, PolicyError, RecordError
from trekeys.lab import Lab
from trekeys.luks import (
    MANIFEST_ATTACHMENT,
    current_key,
    key_fingerprint,
    new_passphrase,
    read_manifest,
    refresh_header_backup,
    volume_path,
    write_boot_key,
)
from trekeys.luks2meta import LuksHeader, read_header
from trekeys.luks_device import (
    add_keyslot,
    dump_volume_key,
    erase_keyslots,
    extract_ext4,
    kill_keyslot,
    reencrypt,
    verify_key,
)
from trekeys.records import KeyKind, KeyRecord, KeyState
from trekeys.vault import Vault

logger = logging.getLogger(__name__)


def _instance_of(record: KeyRecord) -> str:
    return record.owner.removeprefix("instance:")


def _next_id(vault: Vault, base: str) -> str:
    number = 2
    while f"{base}-{number}" in vault:
        number += 1
    return f"{base}-{number}"


def _base_id(record: KeyRecord) -> str:
    instance = _instance_of(record)
    return f"{instance}/{record.kind.value}"


def _kdf_of(record: KeyRecord) -> KdfSettings:
    description = record.attributes.get("keyslot_kdf", "")
    return (
        KdfSettings.test()
        if description.startswith("test-strength")
        else (KdfSettings.production())
    )


def _retire(
    vault: Vault, record: KeyRecord, successor: str, reason: str, *, compromised: bool
) -> None:
    record.attributes["superseded_by"] = successor
    vault.update(record, operation="supersede", detail=successor)
    target = KeyState.COMPROMISED if compromised else KeyState.DEACTIVATED
    vault.transition(record.id, target, f"{reason}; superseded by {successor}")


def _supersede_media_backups(lab: Lab, volume: KeyRecord) -> None:
    """Rename the volume's header backups on the media that are now out of date."""
    folder = lab.backup_media / "luks-headers" / _instance_of(volume)
    for path in folder.glob(f"{volume.attributes['uuid']}-*.img"):
        os.replace(path, path.with_name(path.name + ".superseded"))


def replace_keyslot_secret(
    lab: Lab, vault: Vault, key_id: str, *, reason: str, compromised: bool = False
) -> str:
    """Replace a recovery passphrase or boot key with a new secret in a new keyslot.

    Returns:
        The key id of the new secret.
    """
    old = vault.get(key_id)
    if old.kind not in (KeyKind.LUKS_PASSPHRASE, KeyKind.LUKS_BOOT_KEY):
        raise RecordError(f"key {key_id} is a {old.kind.value}, not a keyslot secret.")
    instance = _instance_of(old)
    volume = current_key(vault, instance, KeyKind.LUKS_VOLUME)
    device = volume_path(lab, volume)
    kdf = _kdf_of(volume)

    old_secret = vault.read_secret(key_id, f"keyslot replacement: {reason}")
    is_passphrase = old.kind is KeyKind.LUKS_PASSPHRASE
    new_secret = new_passphrase().encode() if is_passphrase else secrets.token_bytes(64)
    slot = add_keyslot(device, old_secret, new_secret, kdf=kdf)
    verify_key(device, new_secret, slot=slot)
    kill_keyslot(device, int(old.attributes["keyslot"]), new_secret)

    new_id = _next_id(vault, _base_id(old))
    record = KeyRecord(
        id=new_id,
        kind=old.kind,
        purpose=old.purpose,
        owner=old.owner,
        state=KeyState.ACTIVE,
        cryptoperiod_days=old.cryptoperiod_days,
        algorithm=f"LUKS2 keyslot, {kdf.describe()}",
        strength_bits=old.strength_bits,
        protects=[f"key:{volume.id}"],
        locations=list(old.locations),
        attributes={**old.attributes, "keyslot": str(slot), "replaces": key_id},
    )
    if not is_passphrase:
        write_boot_key(
            lab.root / old.attributes["boot_key_file"], new_secret, replace=True
        )
    vault.add(record, new_secret.decode() if is_passphrase else new_secret)
    _retire(vault, old, new_id, reason, compromised=compromised)

    _supersede_media_backups(lab, volume)
    refresh_header_backup(lab, vault, volume.id)
    logger.info("replaced keyslot secret %s with %s", key_id, new_id)
    return new_id


def rotate_volume_key(
    lab: Lab, vault: Vault, key_id: str, *, reason: str, compromised: bool = True
) -> str:
    """Re-encrypt a volume under a new volume key and escrow it.

    The volume must be offline (not mapped). Only the recovery passphrase's
    keyslot survives ``cryptsetup reencrypt``; the boot key is added back to
    a new keyslot afterwards.

    Returns:
        The key id of the new volume key.

    Raises:
        IntegrityError: the new key does not verify; the old key is kept.
    """
    old = vault.get(key_id)
    instance = _instance_of(old)
    passphrase = current_key(vault, instance, KeyKind.LUKS_PASSPHRASE)
    boot = current_key(vault, instance, KeyKind.LUKS_BOOT_KEY)
    device = volume_path(lab, old)
    kdf = _kdf_of(old)
    if compromised and old.state is KeyState.ACTIVE:
        vault.transition(key_id, KeyState.COMPROMISED, reason)

    secret = vault.read_secret(passphrase.id, f"volume key rotation: {reason}")
    header = reencrypt(device, secret, int(passphrase.attributes["keyslot"]), kdf=kdf)
    passphrase_slot = int(next(iter(header.keyslots)))
    boot_secret = vault.read_secret(boot.id, f"volume key rotation: {reason}")
    boot_slot = add_keyslot(device, secret, boot_secret, kdf=kdf)
    new_key = dump_volume_key(device, secret)

    header = read_header(device)
    old_key = vault.read_secret(key_id, "volume key rotation: compare")
    if not header.check_volume_key(new_key) or new_key == old_key:
        raise IntegrityError(
            f"the re-encrypted volume {device} does not verify under a new key; "
            f"{key_id} is kept, inspect the volume with 'cryptsetup luksDump'."
        )
    _verify_files(lab, vault, old, device, new_key)

    new_id = _add_successor(vault, old, header, new_key)
    for record, slot in ((passphrase, passphrase_slot), (boot, boot_slot)):
        record.attributes["keyslot"] = str(slot)
        record.protects = [f"key:{new_id}"]
        vault.update(record, operation="rewrap", detail=f"keyslot {slot} of {new_id}")
    if vault.get(key_id).state is KeyState.ACTIVE:
        vault.transition(
            key_id, KeyState.DEACTIVATED, f"{reason}; replaced by {new_id}"
        )
    vault.destroy(key_id, f"volume re-encrypted under {new_id} and verified")

    _supersede_media_backups(lab, old)
    refresh_header_backup(lab, vault, new_id)
    logger.info("re-encrypted the volume of %s under %s", instance, new_id)
    return new_id


def _verify_files(
    lab: Lab, vault: Vault, old: KeyRecord, device: Path, new_key: bytes
) -> None:
    """Decrypt the re-encrypted volume and compare its files, when a manifest exists."""
    if MANIFEST_ATTACHMENT not in vault.attachment_names(old.id):
        return
    from trekeys.luks_recovery import compare_with_manifest, decrypt_segment

    segment = read_header(device).data_segment()
    lab.work_dir.mkdir(mode=0o700, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lab.work_dir, prefix="luks-verify-") as tmp:
        image = Path(tmp) / "decrypted.img"
        decrypt_segment(device, new_key, segment, image)
        extract_ext4(image, Path(tmp) / "files")
        compare_with_manifest(Path(tmp) / "files", read_manifest(vault, old.id))


def _add_successor(
    vault: Vault, old: KeyRecord, header: LuksHeader, new_key: bytes
) -> str:
    segment = header.data_segment()
    new_id = _next_id(vault, _base_id(old))
    attributes = {
        key: value
        for key, value in old.attributes.items()
        if not key.startswith(("header_", "last_recovery"))
    }
    attributes.update(
        {
            "sector_size": str(segment.sector_size),
            "data_offset": str(segment.offset),
            "iv_tweak": str(segment.iv_tweak),
            "cipher": segment.cipher,
            "replaces": old.id,
        }
    )
    record = KeyRecord(
        id=new_id,
        kind=KeyKind.LUKS_VOLUME,
        purpose=old.purpose,
        owner=old.owner,
        state=KeyState.ACTIVE,
        cryptoperiod_days=old.cryptoperiod_days,
        fingerprint=key_fingerprint(new_key),
        algorithm=segment.cipher,
        strength_bits=len(new_key) * 4,
        protects=list(old.protects),
        locations=["vault", "LUKS2 keyslots of the volume"],
        attributes=attributes,
    )
    vault.add(record, new_key)
    if MANIFEST_ATTACHMENT in vault.attachment_names(old.id):
        vault.add_attachment(
            new_id,
            MANIFEST_ATTACHMENT,
            vault.read_attachment(old.id, MANIFEST_ATTACHMENT),
        )
    return new_id


def destroy_volume(
    lab: Lab, vault: Vault, instance: str, *, confirm_uuid: str, reason: str
) -> list[str]:
    """Erase an instance's volume for good and leave tombstone records.

    Args:
        confirm_uuid: the volume's LUKS UUID, typed by the operator, because
            the data cannot be recovered afterwards.

    Returns:
        The key ids that were destroyed.

    Raises:
        PolicyError: `confirm_uuid` is not the volume's UUID; nothing changes.
    """
    volume = current_key(vault, instance, KeyKind.LUKS_VOLUME)
    uuid = volume.attributes["uuid"]
    if confirm_uuid != uuid:
        raise PolicyError(
            f"destroying the volume of {instance} needs its LUKS UUID {uuid} as "
            "confirmation; nothing was changed."
        )
    device = volume_path(lab, volume)
    header = read_header(device)

    # Tombstones first: a refused state change must leave the disk untouched.
    destroyed = []
    boot_key_files = []
    for record in vault.find(owner=f"instance:{instance}"):
        if not record.kind.value.startswith("luks-") or record.is_tombstone:
            continue
        if record.state is KeyState.ACTIVE:
            vault.transition(record.id, KeyState.DEACTIVATED, reason)
        vault.destroy(record.id, reason)
        destroyed.append(record.id)
        if "boot_key_file" in record.attributes:
            boot_key_files.append(lab.root / record.attributes["boot_key_file"])

    erase_keyslots(device)
    with device.open("r+b") as handle:
        handle.write(bytes(header.metadata_end))
        handle.flush()
        os.fsync(handle.fileno())
    for path in boot_key_files:
        path.unlink(missing_ok=True)
    folder = lab.backup_media / "luks-headers" / instance
    for path in folder.glob(f"{uuid}-*"):
        path.unlink()
    vault.record_operation("destroy-volume", volume.id, "success", f"LUKS {uuid}")
    logger.info("destroyed the volume of %s (LUKS %s)", instance, uuid)
    return destroyed


def rotate_key(
    lab: Lab, vault: Vault, key_id: str, *, reason: str, compromised: bool
) -> list[str]:
    """Do the lifecycle step that replaces `key_id`; return the new key ids.

    A recovery passphrase or boot key gets a new secret in a new keyslot. A
    volume key is replaced by re-encrypting the volume.

    Raises:
        RecordError: `key_id` is not a LUKS key.
    """
    record = vault.get(key_id)
    if record.kind in (KeyKind.LUKS_PASSPHRASE, KeyKind.LUKS_BOOT_KEY):
        return [
            replace_keyslot_secret(
                lab, vault, key_id, reason=reason, compromised=compromised
            )
        ]
    if record.kind is KeyKind.LUKS_VOLUME:
        return [
            rotate_volume_key(
                lab, vault, key_id, reason=reason, compromised=compromised
            )
        ]
    raise RecordError(
        f"key {key_id} is a {record.kind.value}; trekeys.luks rotates only LUKS "
        "volume keys, passphrases and boot keys."
    )

"""Storage volumes: LUKS2 provisioning, volume-key escrow and header backups.

Each project instance has one LUKS2 volume with two keyslots: the boot key,
a key file that the instance's virtual machine unlocks the volume with at
boot, and the recovery passphrase that the key manager holds (policy 4.1.1).
The vault stores both, the volume key itself, the LUKS UUID and segment
metadata, a verified header backup and, for demo volumes, a manifest of the
files on the volume. Recovery lives in `trekeys.luks_recovery` and key
rotation in `trekeys.luks_lifecycle`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from trekeys.cryptsetup import KdfSettings
from trekeys.errors import (
    CredentialError,
    DestinationExistsError,
    HeaderBackupError,
    RecordError,
    VolumeError,
)
from trekeys.lab import Lab
from trekeys.luks2meta import LuksHeader, read_header
from trekeys.luks_device import (
    DEFAULT_KEYSLOTS_BYTES,
    DEFAULT_SECTOR_SIZE,
    add_keyslot,
    build_ext4_image,
    dump_volume_key,
    encrypt_in_place,
    format_volume,
    reduce_size,
    verify_key,
)
from trekeys.luks_headers import (
    HEADER_ATTACHMENT,
    MANIFEST_ATTACHMENT,
    build_manifest,
    check_header_backup_current,
    export_header_backup,
    read_escrowed_volume_key,
    read_manifest,
    refresh_header_backup,
    relative_to_lab,
    store_manifest,
    verify_header_backup,
    volume_path,
)
from trekeys.records import KeyKind, KeyRecord, KeyState
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

__all__ = [
    "HEADER_ATTACHMENT",
    "MANIFEST_ATTACHMENT",
    "VolumeKeys",
    "build_lab",
    "build_manifest",
    "check_header_backup_current",
    "current_key",
    "destroy_volume",
    "export_header_backup",
    "key_ids",
    "known_instances",
    "provision_volume",
    "read_escrowed_volume_key",
    "read_manifest",
    "refresh_header_backup",
    "rotate_key",
    "store_manifest",
    "verify_header_backup",
    "volume_path",
]

VOLUME_CRYPTOPERIOD_DAYS = 730
PASSPHRASE_CRYPTOPERIOD_DAYS = 365


@dataclass(frozen=True)
class VolumeKeys:
    """The key ids of one instance's volume."""

    volume: str
    passphrase: str
    boot_key: str


def key_ids(instance: str) -> VolumeKeys:
    """Return the key ids that a newly provisioned volume of `instance` gets."""
    return VolumeKeys(
        f"{instance}/luks-volume",
        f"{instance}/luks-passphrase",
        f"{instance}/luks-boot-key",
    )


def current_key(vault: Vault, instance: str, kind: KeyKind) -> KeyRecord:
    """Return the active key of `kind` for `instance`'s volume.

    Raises:
        VolumeError: no volume was ever provisioned for `instance`; the message
            lists the instances that have one.
        RecordError: the instance has no active key of that kind, or several.
    """
    owner = f"instance:{instance}"
    found = vault.find(kind=kind.value, owner=owner, state="active")
    if not found and not vault.find(kind=KeyKind.LUKS_VOLUME.value, owner=owner):
        raise VolumeError(
            f"no volume for instance {instance}; known instances: "
            f"{', '.join(known_instances(vault)) or 'none'}. Check the name, or run "
            f"'trekeys volume provision {instance} --device PATH' to create one."
        )
    if len(found) != 1:
        raise RecordError(
            f"instance {instance} has {len(found)} active {kind.value} keys, not one; "
            "run 'trekeys inventory --owner instance:" + instance + "' to inspect them."
        )
    return found[0]


def known_instances(vault: Vault) -> list[str]:
    """Return the sorted names of the instances that have an active volume."""
    volumes = vault.find(kind=KeyKind.LUKS_VOLUME.value, state="active")
    owners = {volume.owner for volume in volumes}
    return sorted(
        owner.removeprefix("instance:")
        for owner in owners
        if owner.startswith("instance:")
    )


def new_passphrase() -> str:
    """Return a recovery passphrase of 200 random bits in groups of five letters."""
    alphabet = "abcdefghijkmnpqrstuvwxyz23456789"
    letters = "".join(secrets.choice(alphabet) for _ in range(40))
    return "-".join(letters[i : i + 5] for i in range(0, 40, 5))


def key_fingerprint(volume_key: bytes) -> str:
    """Return a public check value of a volume key (not the key)."""
    return hashlib.sha256(b"trekeys-luks-volume-key" + volume_key).hexdigest()[:16]


def provision_volume(
    lab: Lab,
    vault: Vault,
    instance: str,
    device: Path,
    *,
    kdf: KdfSettings | None = None,
    source_dir: Path | None = None,
    fs_bytes: int = 16 * 1024 * 1024,
    sector_size: int = DEFAULT_SECTOR_SIZE,
    keyslots_bytes: int = DEFAULT_KEYSLOTS_BYTES,
    boot_key_file: Path | None = None,
) -> VolumeKeys:
    """Create an instance's LUKS2 volume and escrow its keys and header backup.

    With `source_dir`, `device` is a new image file holding an ext4 file
    system of those files, encrypted in place, and a manifest of the files is
    stored. Without it, `device` is formatted empty; it must not already hold
    a LUKS header.

    Raises:
        DestinationExistsError: the image, or the boot key file, exists.
        VolumeError: `device` already contains a LUKS volume.
        RecordError: the instance already has volume keys in the vault.
    """
    kdf = kdf or KdfSettings.production()
    ids = key_ids(instance)
    for key_id in (ids.volume, ids.passphrase, ids.boot_key):
        if key_id in vault:
            raise RecordError(
                f"key {key_id} already exists; rotate the instance's keys instead of "
                "provisioning its volume again."
            )
    boot_key_file = boot_key_file or lab.instance_dir(instance) / "boot.key"
    if boot_key_file.exists():
        raise DestinationExistsError(boot_key_file)
    if source_dir is not None and device.exists():
        raise DestinationExistsError(device)

    boot_key = secrets.token_bytes(64)
    passphrase = new_passphrase()
    manifest: list[dict[str, object]] | None = None
    if source_dir is not None:
        manifest = build_manifest(source_dir)
    try:
        header = _create_volume(
            device, boot_key, source_dir, fs_bytes, kdf, sector_size, keyslots_bytes
        )
        boot_slot = int(next(iter(header.keyslots)))
        passphrase_slot = add_keyslot(device, boot_key, passphrase.encode(), kdf=kdf)
        volume_key = dump_volume_key(device, passphrase.encode())
    except BaseException:
        # An image that this call created is useless without its keys.
        if source_dir is not None:
            device.unlink(missing_ok=True)
        raise
    write_boot_key(boot_key_file, boot_key)

    header = read_header(device)
    _add_records(
        lab,
        vault,
        instance,
        device,
        header,
        volume_key,
        passphrase,
        boot_key,
        boot_slot=boot_slot,
        passphrase_slot=passphrase_slot,
        boot_key_file=boot_key_file,
        kdf=kdf,
    )
    if manifest is not None:
        store_manifest(vault, ids.volume, manifest)
    refresh_header_backup(lab, vault, ids.volume)
    logger.info("provisioned LUKS2 volume %s for instance %s", header.uuid, instance)
    return ids


def _create_volume(
    device: Path,
    boot_key: bytes,
    source_dir: Path | None,
    fs_bytes: int,
    kdf: KdfSettings,
    sector_size: int,
    keyslots_bytes: int,
) -> LuksHeader:
    """Format `device`, or build it from `source_dir` and encrypt it in place."""
    if source_dir is None:
        _check_not_luks(device)
        return format_volume(
            device,
            boot_key,
            kdf=kdf,
            sector_size=sector_size,
            keyslots_bytes=keyslots_bytes,
        )

    build_ext4_image(source_dir, device, fs_bytes, reduce_size(keyslots_bytes))
    return encrypt_in_place(
        device,
        boot_key,
        kdf=kdf,
        sector_size=sector_size,
        keyslots_bytes=keyslots_bytes,
    )


def _check_not_luks(device: Path) -> None:
    with device.open("rb") as handle:
        if handle.read(6) == b"LUKS\xba\xbe":
            raise VolumeError(
                f"{device} already contains a LUKS volume; destroy it with 'trekeys "
                "volume destroy' or choose another device."
            )


def write_boot_key(path: Path, boot_key: bytes, *, replace: bool = False) -> None:
    """Write the boot key file that the instance's VM reads, mode 0600, atomically.

    Raises:
        DestinationExistsError: the file exists and `replace` is False.
    """
    if path.exists() and not replace:
        raise DestinationExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(boot_key)
    os.replace(tmp, path)


def _add_records(
    lab: Lab,
    vault: Vault,
    instance: str,
    device: Path,
    header: LuksHeader,
    volume_key: bytes,
    passphrase: str,
    boot_key: bytes,
    *,
    boot_slot: int,
    passphrase_slot: int,
    boot_key_file: Path,
    kdf: KdfSettings,
) -> None:
    ids = key_ids(instance)
    segment = header.data_segment()
    owner = f"instance:{instance}"
    vault.add(
        KeyRecord(
            id=ids.volume,
            kind=KeyKind.LUKS_VOLUME,
            purpose=f"Volume key of the LUKS2 storage volume of instance {instance}.",
            owner=owner,
            state=KeyState.ACTIVE,
            cryptoperiod_days=VOLUME_CRYPTOPERIOD_DAYS,
            fingerprint=key_fingerprint(volume_key),
            algorithm=segment.cipher,
            strength_bits=len(volume_key) * 4,
            protects=[f"volume:{instance}"],
            locations=["vault", "LUKS2 keyslots of the volume"],
            attributes={
                "uuid": header.uuid,
                "cipher": segment.cipher,
                "sector_size": str(segment.sector_size),
                "data_offset": str(segment.offset),
                "iv_tweak": str(segment.iv_tweak),
                "key_size": str(len(volume_key) * 8),
                "device": relative_to_lab(lab, device),
                "keyslot_kdf": kdf.describe(),
            },
        ),
        volume_key,
    )
    for key_id, kind, secret, slot, purpose in (
        (
            ids.passphrase,
            KeyKind.LUKS_PASSPHRASE,
            passphrase,
            passphrase_slot,
            "Recovery passphrase held by the key manager",
        ),
        (
            ids.boot_key,
            KeyKind.LUKS_BOOT_KEY,
            boot_key,
            boot_slot,
            "Key file the virtual machine unlocks the volume with at boot",
        ),
    ):
        record = KeyRecord(
            id=key_id,
            kind=kind,
            purpose=f"{purpose} (instance {instance}).",
            owner=owner,
            state=KeyState.ACTIVE,
            cryptoperiod_days=PASSPHRASE_CRYPTOPERIOD_DAYS,
            algorithm=f"LUKS2 keyslot, {kdf.describe()}",
            strength_bits=200 if kind is KeyKind.LUKS_PASSPHRASE else 256,
            protects=[f"key:{ids.volume}"],
            locations=["vault"],
            attributes={"uuid": header.uuid, "keyslot": str(slot)},
        )
        if kind is KeyKind.LUKS_BOOT_KEY:
            record.attributes["boot_key_file"] = relative_to_lab(lab, boot_key_file)
            record.locations.append(
                f"instance boot key file {record.attributes['boot_key_file']}"
            )
        vault.add(record, secret)


# Checks that runbooks call by key id, so that they never hold key material.


def verify_keyslot_secret(lab: Lab, vault: Vault, key_id: str) -> bool:
    """Return whether the passphrase or boot key `key_id` opens its keyslot."""
    record = vault.get(key_id)
    volume = current_key(
        vault, record.owner.removeprefix("instance:"), KeyKind.LUKS_VOLUME
    )
    secret = vault.read_secret(key_id, "keyslot check")
    try:
        verify_key(
            volume_path(lab, volume), secret, slot=int(record.attributes["keyslot"])
        )
    except CredentialError:
        return False
    return True


def verify_volume_key(lab: Lab, vault: Vault, volume_id: str) -> bool:
    """Return whether the escrowed volume key matches the live header's digest."""
    header = read_header(volume_path(lab, vault.get(volume_id)))
    return header.check_volume_key(vault.read_secret(volume_id, "escrow check"))


def describe_volume(lab: Lab, vault: Vault, instance: str) -> dict[str, str]:
    """Return the facts about an instance's volume that a report shows."""
    record = current_key(vault, instance, KeyKind.LUKS_VOLUME)
    header = read_header(volume_path(lab, record))
    segment = header.data_segment()
    return {
        "instance": instance,
        "volume key": record.id,
        "LUKS UUID": header.uuid,
        "cipher": segment.cipher,
        "key bits": record.attributes.get("key_size", ""),
        "sector size": str(segment.sector_size),
        "data offset": str(segment.offset),
        "keyslots": ", ".join(sorted(header.keyslots, key=int)),
        "keyslot KDF": record.attributes.get("keyslot_kdf", ""),
        "header backup": record.attributes.get("header_backup_file", ""),
        "header backup stale": record.attributes.get("header_backup_stale", ""),
    }


def is_luks(device: Path) -> bool:
    """Return whether `device` starts with a readable LUKS2 header."""
    try:
        read_header(device)
    except (VolumeError, HeaderBackupError):
        return False
    return True


# Entry points that other capabilities call through this module.


def rotate_key(
    lab: Lab, vault: Vault, key_id: str, *, reason: str, compromised: bool
) -> list[str]:
    """Replace a LUKS key by its lifecycle step; see `trekeys.luks_lifecycle`."""
    from trekeys.luks_lifecycle import rotate_key as rotate

    return rotate(lab, vault, key_id, reason=reason, compromised=compromised)


def destroy_volume(
    lab: Lab, vault: Vault, instance: str, *, confirm_uuid: str, reason: str
) -> list[str]:
    """Erase an instance's volume; see `trekeys.luks_lifecycle.destroy_volume`."""
    from trekeys.luks_lifecycle import destroy_volume as destroy

    return destroy(lab, vault, instance, confirm_uuid=confirm_uuid, reason=reason)


def build_lab(lab: Lab, vault: Vault) -> None:
    """Build the demo TRE's volumes; see `trekeys.luks_lab.build_lab`."""
    from trekeys.luks_lab import build_lab as build

    build(lab, vault)

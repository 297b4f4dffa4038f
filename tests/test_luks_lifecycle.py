"""Lifecycle of volume keys: keyslot replacement, re-encryption, destruction."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from trekeys.errors import CredentialError, NotLuksError, PolicyError, RecordError
from trekeys.lab import Lab
from trekeys.luks import check_header_backup_current, destroy_volume, rotate_key
from trekeys.luks2meta import read_header
from trekeys.luks_device import verify_key
from trekeys.luks_recovery import run_recovery_drill
from trekeys.records import KeyState


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_passphrase_change_replaces_keyslot(full_lab: Lab) -> None:
    device = full_lab.instance_dir("alpha") / "volume.img"
    media = full_lab.backup_media / "luks-headers" / "alpha"
    first_backups = sorted(media.glob("*.img"))
    with full_lab.open_vault() as vault:
        old_secret = vault.read_secret("alpha/luks-passphrase", "test")

        new_ids = rotate_key(
            full_lab, vault, "alpha/luks-passphrase", reason="annual", compromised=False
        )
        old = vault.get("alpha/luks-passphrase")
        new = vault.get(new_ids[0])
        new_secret = vault.read_secret(new.id, "test")
        current = check_header_backup_current(full_lab, vault, "alpha/luks-volume")

    assert new_ids == ["alpha/luks-passphrase-2"]
    assert old.state is KeyState.DEACTIVATED
    assert old.attributes["superseded_by"] == new.id
    assert new.state is KeyState.ACTIVE
    assert new_secret != old_secret
    verify_key(device, new_secret, slot=int(new.attributes["keyslot"]))
    with pytest.raises(CredentialError):
        verify_key(device, old_secret)
    assert current
    assert all(not path.exists() for path in first_backups)
    assert all(
        path.with_name(path.name + ".superseded").exists() for path in first_backups
    )


def test_compromised_boot_key_is_replaced(full_lab: Lab) -> None:
    device = full_lab.instance_dir("alpha") / "volume.img"
    boot_file = full_lab.instance_dir("alpha") / "boot.key"
    old_file = boot_file.read_bytes()
    with full_lab.open_vault() as vault:
        (new_id,) = rotate_key(
            full_lab,
            vault,
            "alpha/luks-boot-key",
            reason="VM image leaked",
            compromised=True,
        )
        old = vault.get("alpha/luks-boot-key")
        new_secret = vault.read_secret(new_id, "test")

    assert old.state is KeyState.COMPROMISED
    assert boot_file.read_bytes() == new_secret
    assert new_secret != old_file
    assert boot_file.stat().st_mode & 0o777 == 0o600
    verify_key(device, new_secret)
    with pytest.raises(CredentialError):
        verify_key(device, old_file)


def test_volume_key_rotation_reencrypts(full_lab: Lab) -> None:
    device = full_lab.instance_dir("alpha") / "volume.img"
    with full_lab.open_vault() as vault:
        old_key = vault.read_secret("alpha/luks-volume", "test")
        boot_key = vault.read_secret("alpha/luks-boot-key", "test")

        (new_id,) = rotate_key(
            full_lab, vault, "alpha/luks-volume", reason="key exposed", compromised=True
        )
        new_key = vault.read_secret(new_id, "test")
        old = vault.get("alpha/luks-volume")
        passphrase = vault.get("alpha/luks-passphrase")
        outcome = run_recovery_drill(full_lab, vault, "alpha")

    header = read_header(device)
    assert old.state is KeyState.DESTROYED_COMPROMISED
    assert old.is_tombstone
    assert header.check_volume_key(new_key)
    assert not header.check_volume_key(old_key)
    assert passphrase.protects == [f"key:{new_id}"]
    verify_key(device, boot_key)
    assert outcome.files_from_passphrase == outcome.files_from_escrow > 0


def test_rotate_rejects_other_kinds(full_lab: Lab) -> None:
    with full_lab.open_vault() as vault:
        with pytest.raises(RecordError, match="rotates only LUKS"):
            rotate_key(
                full_lab, vault, "tre/vault-master", reason="t", compromised=False
            )


def test_destroy_needs_the_uuid(full_lab: Lab) -> None:
    device = full_lab.instance_dir("beta") / "volume.img"
    before = sha256_of(device)
    with full_lab.open_vault() as vault:
        with pytest.raises(PolicyError, match="needs its LUKS UUID"):
            destroy_volume(
                full_lab, vault, "beta", confirm_uuid="not-it", reason="closed"
            )
        state = vault.get("beta/luks-volume").state

    assert sha256_of(device) == before
    assert state is KeyState.ACTIVE


def test_destroy_erases_volume_and_keeps_tombstones(full_lab: Lab) -> None:
    device = full_lab.instance_dir("beta") / "volume.img"
    uuid = read_header(device).uuid
    with full_lab.open_vault() as vault:
        destroyed = destroy_volume(
            full_lab, vault, "beta", confirm_uuid=uuid, reason="project closed"
        )
    with full_lab.open_vault() as vault:
        records = [vault.get(key_id) for key_id in destroyed]
        operations = [e["operation"] for e in vault.audit_log.entries()]

    assert sorted(destroyed) == [
        "beta/luks-boot-key",
        "beta/luks-passphrase",
        "beta/luks-volume",
    ]
    assert all(record.state is KeyState.DESTROYED for record in records)
    assert "destroy-volume" in operations
    with pytest.raises(NotLuksError):
        read_header(device)
    with device.open("rb") as handle:
        assert handle.read(2 * 1024 * 1024) == bytes(2 * 1024 * 1024)
    assert not (full_lab.instance_dir("beta") / "boot.key").exists()
    assert list((full_lab.backup_media / "luks-headers" / "beta").iterdir()) == []

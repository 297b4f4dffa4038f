"""Provisioning, escrow and header backups of LUKS2 volumes, with real cryptsetup."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from pathlib import Path

import pytest

from trekeys import cryptsetup
from trekeys.cryptsetup import KdfSettings
from trekeys.errors import (
    CredentialError,
    DestinationExistsError,
    HeaderBackupError,
    NotLuksError,
    RecordError,
    ToolError,
    ToolMissingError,
    UnsupportedVolumeError,
)
from trekeys.inventory import build_inventory
from trekeys.lab import Lab
from trekeys.luks import (
    HEADER_ATTACHMENT,
    check_header_backup_current,
    provision_volume,
    refresh_header_backup,
    rotate_key,
    verify_header_backup,
    volume_path,
)
from trekeys.luks2meta import read_header
from trekeys.luks_device import (
    SMALL_KEYSLOTS_BYTES,
    add_keyslot,
    backup_header,
    format_volume,
    verify_key,
)
from trekeys.luks_recovery import run_recovery_drill


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lab_volumes_have_escrowed_keys(full_lab: Lab) -> None:
    with full_lab.open_vault() as vault:
        volume = vault.get("alpha/luks-volume")
        passphrase = vault.read_secret("alpha/luks-passphrase", "test")
        boot_record = vault.get("alpha/luks-boot-key")
        boot_key = vault.read_secret("alpha/luks-boot-key", "test")
        escrowed = vault.read_secret("alpha/luks-volume", "test")
        manifest = json.loads(vault.read_attachment(volume.id, "manifest.json"))
        header_data = vault.read_attachment(volume.id, HEADER_ATTACHMENT)
    device = full_lab.instance_dir("alpha") / "volume.img"
    header = read_header(device)
    boot_file = full_lab.root / boot_record.attributes["boot_key_file"]

    assert volume.attributes["uuid"] == header.uuid
    assert volume.attributes["cipher"] == "aes-xts-plain64"
    assert volume.attributes["sector_size"] == "4096"
    assert volume.attributes["data_offset"] == str(header.data_segment().offset)
    assert volume.attributes["key_size"] == "512"
    assert volume.protects == ["volume:alpha"]
    assert boot_record.protects == ["key:alpha/luks-volume"]
    assert header.check_volume_key(escrowed)
    assert boot_file.read_bytes() == boot_key
    assert boot_file.stat().st_mode & 0o777 == 0o600
    assert len(header.keyslots) == 2
    verify_key(device, passphrase)
    verify_key(device, boot_key, slot=int(boot_record.attributes["keyslot"]))
    assert {entry["path"] for entry in manifest} >= {
        "cohort/participants.csv",
        "analysis/results/summary.txt",
        "analysis/model.bin",
    }
    assert (
        hashlib.sha256(header_data).hexdigest()
        == (volume.attributes["header_backup_sha256"])
    )
    media = full_lab.root / volume.attributes["header_backup_file"]
    assert media.read_bytes() == header_data


def live_secrets(vault, prefix: str) -> set[bytes]:
    """Return the material of every key under `prefix` that is not a tombstone."""
    return {
        vault.read_secret(key_id, "test")
        for key_id in vault.ids()
        if key_id.startswith(prefix) and not vault.get(key_id).is_tombstone
    }


def test_no_secret_in_any_cryptsetup_argv(full_lab: Lab, tmp_path: Path) -> None:
    calls: list[list[str]] = []
    cryptsetup.ARGV_OBSERVERS.append(calls.append)
    try:
        with full_lab.open_vault() as vault:
            provision_volume(
                full_lab,
                vault,
                "gamma",
                tmp_path / "gamma.img",
                kdf=KdfSettings.test(),
                source_dir=full_lab.instance_dir("alpha") / "data",
                fs_bytes=4 * 1024 * 1024,
                keyslots_bytes=SMALL_KEYSLOTS_BYTES,
            )
            secrets = live_secrets(vault, "gamma/")
            run_recovery_drill(full_lab, vault, "gamma")
            rotate_key(
                full_lab, vault, "gamma/luks-passphrase", reason="t", compromised=False
            )
            rotate_key(
                full_lab, vault, "gamma/luks-volume", reason="t", compromised=True
            )
            secrets |= live_secrets(vault, "gamma/")
    finally:
        cryptsetup.ARGV_OBSERVERS.remove(calls.append)

    forms = set()
    for secret in secrets:
        forms |= {secret.hex(), base64.b64encode(secret).decode()}
        if secret.isascii():
            forms.add(secret.decode())
    commands = {call[1] for call in calls if call[0].endswith("cryptsetup")}
    assert {"luksAddKey", "reencrypt", "open", "luksDump"} <= commands
    # The first volume key, passphrase and boot key, then their successors.
    assert len(secrets) == 5
    for call in calls:
        joined = " ".join(call)
        for form in forms:
            assert form not in joined
    leftovers = list(Path(tempfile.gettempdir()).glob("trekeys-*/secret"))
    assert leftovers == []


def test_provision_refuses_existing_instance(full_lab: Lab, tmp_path: Path) -> None:
    target = tmp_path / "again.img"
    with full_lab.open_vault() as vault:
        with pytest.raises(RecordError, match="alpha/luks-volume already exists"):
            provision_volume(full_lab, vault, "alpha", target, kdf=KdfSettings.test())

    assert not target.exists()


def test_provision_refuses_existing_luks_device(full_lab: Lab) -> None:
    device = full_lab.instance_dir("alpha") / "volume.img"
    before = sha256_of(device)
    with full_lab.open_vault() as vault:
        with pytest.raises(Exception, match="already contains a LUKS volume"):
            provision_volume(
                full_lab,
                vault,
                "delta",
                device,
                kdf=KdfSettings.test(),
                boot_key_file=full_lab.root / "delta.key",
            )

    assert sha256_of(device) == before
    assert not (full_lab.root / "delta.key").exists()


def test_provision_empty_device(full_lab: Lab, tmp_path: Path) -> None:
    device = tmp_path / "blank.img"
    device.write_bytes(bytes(8 * 1024 * 1024))
    with full_lab.open_vault() as vault:
        ids = provision_volume(
            full_lab,
            vault,
            "delta",
            device,
            kdf=KdfSettings.test(),
            sector_size=512,
            keyslots_bytes=SMALL_KEYSLOTS_BYTES,
        )
        record = vault.get(ids.volume)
        key = vault.read_secret(ids.volume, "test")

    assert read_header(device).data_segment().sector_size == 512
    assert read_header(device).check_volume_key(key)
    assert record.attributes["header_backup_stale"] == "false"


def test_wrong_passphrase_is_rejected(full_lab: Lab) -> None:
    device = full_lab.instance_dir("alpha") / "volume.img"
    before = sha256_of(device)

    with pytest.raises(CredentialError, match="does not unlock any keyslot"):
        verify_key(device, b"not-the-passphrase")

    assert sha256_of(device) == before


def test_stale_header_backup_is_flagged(full_lab: Lab) -> None:
    with full_lab.open_vault() as vault:
        device = volume_path(full_lab, vault.get("alpha/luks-volume"))
        passphrase = vault.read_secret("alpha/luks-passphrase", "test")
        assert check_header_backup_current(full_lab, vault, "alpha/luks-volume")
        add_keyslot(device, passphrase, b"an extra key", kdf=KdfSettings.test())

        current = check_header_backup_current(full_lab, vault, "alpha/luks-volume")
        flags = {row.id: row.flags for row in build_inventory(vault)}

    assert not current
    assert "stale-header-backup" in flags["alpha/luks-volume"]


def test_refreshed_backup_clears_stale_flag(full_lab: Lab) -> None:
    with full_lab.open_vault() as vault:
        device = volume_path(full_lab, vault.get("alpha/luks-volume"))
        passphrase = vault.read_secret("alpha/luks-passphrase", "test")
        add_keyslot(device, passphrase, b"an extra key", kdf=KdfSettings.test())
        check_header_backup_current(full_lab, vault, "alpha/luks-volume")

        refresh_header_backup(full_lab, vault, "alpha/luks-volume")
        current = check_header_backup_current(full_lab, vault, "alpha/luks-volume")
        record = vault.get("alpha/luks-volume")

    assert current
    assert record.attributes["header_backup_stale"] == "false"


@pytest.fixture
def header_backups(full_lab: Lab, tmp_path: Path) -> dict[str, Path]:
    """Good, truncated, corrupt and foreign header backups of alpha's volume."""
    alpha = full_lab.instance_dir("alpha") / "volume.img"
    beta = full_lab.instance_dir("beta") / "volume.img"
    good = tmp_path / "good.img"
    backup_header(alpha, good)
    truncated = tmp_path / "truncated.img"
    truncated.write_bytes(good.read_bytes()[:20000])
    corrupt = tmp_path / "corrupt.img"
    data = bytearray(good.read_bytes())
    header = read_header(good)
    for copy_start in (0, header.hdr_size):
        data[copy_start + 5000] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    foreign = tmp_path / "foreign.img"
    backup_header(beta, foreign)
    return {
        "good": good,
        "truncated": truncated,
        "corrupt": corrupt,
        "foreign": foreign,
    }


def test_header_backup_checks(full_lab: Lab, header_backups: dict[str, Path]) -> None:
    uuid = read_header(full_lab.instance_dir("alpha") / "volume.img").uuid

    assert verify_header_backup(header_backups["good"], uuid).uuid == uuid
    with pytest.raises(HeaderBackupError, match="truncated"):
        verify_header_backup(header_backups["truncated"], uuid)
    with pytest.raises(HeaderBackupError, match="fails its checksum"):
        verify_header_backup(header_backups["corrupt"], uuid)
    with pytest.raises(HeaderBackupError, match=f"not {uuid}"):
        verify_header_backup(header_backups["foreign"], uuid)


def test_not_luks_device_is_rejected(tmp_path: Path) -> None:
    device = tmp_path / "plain.img"
    device.write_bytes(b"an ext4 image, maybe" + bytes(100000))
    before = sha256_of(device)

    with pytest.raises(NotLuksError, match="not a LUKS volume"):
        read_header(device)
    with pytest.raises(NotLuksError, match="contains no LUKS header"):
        verify_key(device, b"any key")

    assert sha256_of(device) == before


def test_luks1_volume_is_refused_clearly(tmp_path: Path) -> None:
    device = tmp_path / "luks1.img"
    device.write_bytes(bytes(4 * 1024 * 1024))
    cryptsetup.run_tool(
        "cryptsetup",
        [
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks1",
            *KdfSettings.test().arguments(),
            "--key-file=-",
            str(device),
        ],
        stdin=b"passphrase",
    )
    before = sha256_of(device)

    with pytest.raises(UnsupportedVolumeError, match="LUKS1 volume"):
        read_header(device)

    assert sha256_of(device) == before


def test_cryptsetup_missing(
    full_lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = full_lab.instance_dir("alpha") / "volume.img"
    before = sha256_of(device)
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))

    with pytest.raises(ToolMissingError, match="cryptsetup is not installed"):
        verify_key(device, b"any key")
    with pytest.raises(ToolMissingError, match="cryptsetup-bin"):
        format_volume(tmp_path / "x.img", b"k", kdf=KdfSettings.test(), sector_size=512)

    assert sha256_of(device) == before


def test_backup_header_never_overwrites(full_lab: Lab, tmp_path: Path) -> None:
    target = tmp_path / "existing.img"
    target.write_bytes(b"keep me")

    with pytest.raises(DestinationExistsError, match="already exists"):
        backup_header(full_lab.instance_dir("alpha") / "volume.img", target)

    assert target.read_bytes() == b"keep me"


def test_secret_file_is_private_and_removed() -> None:
    with cryptsetup.secret_file(b"secret bytes") as path:
        mode = path.stat().st_mode & 0o777
        folder_mode = path.parent.stat().st_mode & 0o777
        content = path.read_bytes()

    assert mode == 0o600
    assert folder_mode == 0o700
    assert content == b"secret bytes"
    assert not path.exists()
    assert not path.parent.exists()
    assert os.environ.get("PATH")


def test_failed_provision_removes_new_image(full_lab: Lab, tmp_path: Path) -> None:
    source = tmp_path / "too-big"
    source.mkdir()
    (source / "large.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    image = tmp_path / "small.img"

    with full_lab.open_vault() as vault:
        with pytest.raises(ToolError, match="mke2fs"):
            provision_volume(
                full_lab,
                vault,
                "epsilon",
                image,
                kdf=KdfSettings.test(),
                source_dir=source,
                fs_bytes=1024 * 1024,
                keyslots_bytes=SMALL_KEYSLOTS_BYTES,
            )

    assert not image.exists()
    assert (source / "large.bin").stat().st_size == 3 * 1024 * 1024
    with full_lab.open_vault() as vault:
        assert "epsilon/luks-volume" not in vault

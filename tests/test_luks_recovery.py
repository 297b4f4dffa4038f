"""The volume recovery drill and file recovery, on copies of the demo volumes."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from trekeys.errors import (
    CredentialError,
    DestinationExistsError,
    HeaderBackupError,
    IntegrityError,
    ManifestMismatchError,
)
from trekeys.lab import Lab
from trekeys.luks import (
    HEADER_ATTACHMENT,
    MANIFEST_ATTACHMENT,
    build_manifest,
    read_escrowed_volume_key,
)
from trekeys.luks_recovery import RecoveryDrill, recover_files, run_recovery_drill


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def scratch_folders(lab: Lab) -> list[Path]:
    return list(lab.work_dir.glob("luks-drill-*")) if lab.work_dir.exists() else []


def test_drill_recovers_both_ways(full_lab: Lab) -> None:
    live = full_lab.instance_dir("alpha") / "volume.img"
    before = sha256_of(live)

    with full_lab.open_vault() as vault:
        outcome = run_recovery_drill(full_lab, vault, "alpha", report="run-1")
        record = vault.get("alpha/luks-volume")
        passphrase = vault.get("alpha/luks-passphrase")

    files = len(build_manifest(full_lab.instance_dir("alpha") / "data"))
    assert outcome.files_from_passphrase == files
    assert outcome.files_from_escrow == files
    assert outcome.live_unchanged
    assert sha256_of(live) == before
    assert record.attributes["last_recovery_proof"] == outcome.proved_at
    assert record.attributes["last_recovery_report"] == "run-1"
    assert passphrase.attributes["last_recovery_proof"] == outcome.proved_at
    assert scratch_folders(full_lab) == []


def test_destroyed_header_stops_opening(full_lab: Lab) -> None:
    with full_lab.open_vault() as vault:
        drill = RecoveryDrill.start(full_lab, vault, "beta")
        try:
            copy = drill.copy_volume()
            gone = drill.destroy_header(copy)
            drill.restore_header(copy)
            drill.test_passphrase(copy)
            matches = drill.recover_volume_key(copy)
        finally:
            removed = drill.cleanup()

    assert gone
    assert matches
    assert removed


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "foreign"])
def test_restore_refuses_bad_backup_before_writing(full_lab: Lab, damage: str) -> None:
    with full_lab.open_vault() as vault:
        good = vault.read_attachment("alpha/luks-volume", HEADER_ATTACHMENT)
        if damage == "truncated":
            bad = good[:30000]
        elif damage == "corrupt":
            # Flip bytes in the primary copy's JSON area only.
            bad = good[:4200] + bytes(b ^ 0xFF for b in good[4200:4300]) + good[4300:]
        else:
            bad = vault.read_attachment("beta/luks-volume", HEADER_ATTACHMENT)
        vault.add_attachment("alpha/luks-volume", HEADER_ATTACHMENT, bad)
        record = vault.get("alpha/luks-volume")
        # Record the damaged file's hash, so that the structural checks must catch it.
        record.attributes["header_backup_sha256"] = hashlib.sha256(bad).hexdigest()
        vault.update(record)

        drill = RecoveryDrill.start(full_lab, vault, "alpha")
        try:
            copy = drill.copy_volume()
            drill.destroy_header(copy)
            destroyed = sha256_of(copy)
            with pytest.raises(HeaderBackupError, match="header"):
                drill.restore_header(copy)
            after = sha256_of(copy)
        finally:
            drill.cleanup()

    assert after == destroyed
    assert scratch_folders(full_lab) == []


def test_restore_refuses_backup_with_wrong_hash(full_lab: Lab) -> None:
    with full_lab.open_vault() as vault:
        record = vault.get("alpha/luks-volume")
        record.attributes["header_backup_sha256"] = "0" * 64
        vault.update(record)
        drill = RecoveryDrill.start(full_lab, vault, "alpha")
        try:
            copy = drill.copy_volume()
            before = sha256_of(copy)
            with pytest.raises(HeaderBackupError, match="recorded in the vault"):
                drill.restore_header(copy)
            after = sha256_of(copy)
        finally:
            drill.cleanup()

    assert after == before


def test_escrowed_key_not_matching_digest(full_lab: Lab) -> None:
    live = full_lab.instance_dir("alpha") / "volume.img"
    before = sha256_of(live)
    with full_lab.open_vault() as vault:
        vault.put_secret("alpha/luks-volume", os.urandom(64), reason="test")

        with pytest.raises(CredentialError, match="does not match the digest"):
            read_escrowed_volume_key(vault, "alpha/luks-volume", "test")
        with pytest.raises(CredentialError, match="differs from the one"):
            run_recovery_drill(full_lab, vault, "alpha")

    assert sha256_of(live) == before
    assert scratch_folders(full_lab) == []


def test_wrong_escrowed_passphrase(full_lab: Lab) -> None:
    with full_lab.open_vault() as vault:
        vault.put_secret("alpha/luks-passphrase", "not-the-passphrase", reason="test")

        with pytest.raises(CredentialError, match="does not unlock any keyslot"):
            run_recovery_drill(full_lab, vault, "alpha")

    assert scratch_folders(full_lab) == []


def test_manifest_mismatch_names_files(full_lab: Lab) -> None:
    live = full_lab.instance_dir("alpha") / "volume.img"
    before = sha256_of(live)
    with full_lab.open_vault() as vault:
        manifest = json.loads(
            vault.read_attachment("alpha/luks-volume", MANIFEST_ATTACHMENT)
        )
        for entry in manifest:
            if entry["path"] == "cohort/participants.csv":
                entry["sha256"] = "0" * 64
        manifest = [e for e in manifest if e["path"] != "README.txt"]
        manifest.append({"path": "secret-plans.txt", "size": 1, "sha256": "0" * 64})
        vault.add_attachment(
            "alpha/luks-volume", MANIFEST_ATTACHMENT, json.dumps(manifest).encode()
        )

        with pytest.raises(ManifestMismatchError) as caught:
            run_recovery_drill(full_lab, vault, "alpha")

    message = str(caught.value)
    assert "missing: secret-plans.txt" in message
    assert "changed: cohort/participants.csv" in message
    assert "unexpected: README.txt" in message
    assert caught.value.changed == ["cohort/participants.csv"]
    assert sha256_of(live) == before
    assert scratch_folders(full_lab) == []


def test_recover_files_into_new_folder(full_lab: Lab, tmp_path: Path) -> None:
    target = tmp_path / "recovered"
    with full_lab.open_vault() as vault:
        count = recover_files(full_lab, vault, "beta", target)

    original = build_manifest(full_lab.instance_dir("beta") / "data")
    assert count == len(original)
    assert build_manifest(target) == original
    assert scratch_folders(full_lab) == []


def test_recover_files_never_overwrites(full_lab: Lab, tmp_path: Path) -> None:
    target = tmp_path / "recovered"
    target.mkdir()
    (target / "keep.txt").write_text("mine")

    with full_lab.open_vault() as vault:
        with pytest.raises(DestinationExistsError, match="already exists"):
            recover_files(full_lab, vault, "beta", target)

    assert (target / "keep.txt").read_text() == "mine"


def test_stale_scratch_is_removed_at_start(full_lab: Lab) -> None:
    leftover = full_lab.work_dir / "luks-drill-alpha-old"
    leftover.mkdir(parents=True)
    (leftover / "files.decrypted.img").write_bytes(b"plaintext")

    with full_lab.open_vault() as vault:
        RecoveryDrill.start(full_lab, vault, "alpha").cleanup()

    assert not leftover.exists()


def test_drill_scratch_data_is_private(full_lab: Lab) -> None:
    with full_lab.open_vault() as vault:
        drill = RecoveryDrill.start(full_lab, vault, "beta")
        try:
            copy = drill.copy_volume()
            drill.use_escrowed_volume_key()
            folder = drill.decrypt_and_extract(copy)
            scratch_modes = {
                path: stat.S_IMODE(path.lstat().st_mode)
                for path in [drill.scratch, *drill.scratch.rglob("*")]
            }
        finally:
            drill.cleanup()

    assert any(path.is_relative_to(folder) for path in scratch_modes)
    assert scratch_modes[drill.scratch] == 0o700
    for path, mode in scratch_modes.items():
        assert mode & 0o077 == 0, f"{path} has mode {mode:o}"


def test_proof_needs_a_proven_step(full_lab: Lab) -> None:
    with full_lab.open_vault() as vault:
        drill = RecoveryDrill.start(full_lab, vault, "beta")
        try:
            with pytest.raises(IntegrityError, match="has proved nothing yet"):
                drill.record_proof("run-1")
        finally:
            drill.cleanup()
        record = vault.get("beta/luks-volume")

    assert "last_recovery_report" not in record.attributes


def test_failed_recovery_leaves_no_folder(full_lab: Lab, tmp_path: Path) -> None:
    restores = tmp_path / "restores"
    with full_lab.open_vault() as vault:
        vault.put_secret("beta/luks-volume", os.urandom(64), reason="test")

        with pytest.raises(CredentialError, match="does not match the digest"):
            recover_files(full_lab, vault, "beta", restores / "out")

    assert list(restores.iterdir()) == []
    assert scratch_folders(full_lab) == []

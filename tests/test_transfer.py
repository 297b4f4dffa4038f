"""Transfer MAC keys and folder manifests."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
from pathlib import Path

import pytest

from trekeys import transfer
from trekeys.drills import run_drills
from trekeys.errors import (
    CredentialError,
    DestinationExistsError,
    IntegrityError,
    PolicyError,
    TransferManifestError,
)
from trekeys.lab import Lab, create_lab
from trekeys.records import KeyState

CHANNEL = "alpha-import"


@pytest.fixture(scope="module")
def lab_template(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    template = create_lab(tmp_path_factory.mktemp("transfer") / "lab", steps=[])
    with template.open_vault() as vault:
        transfer.create_channel_key(vault, CHANNEL, owner="instance:alpha")
    return template


@pytest.fixture
def lab(lab_template: Lab, tmp_path: Path) -> Lab:
    shutil.copytree(lab_template.root, tmp_path / "lab")
    return Lab.load(tmp_path / "lab")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "outgoing" / "batch-7"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.csv").write_text("id,value\n1,2\n")
    (root / "sub" / "b.bin").write_bytes(os.urandom(3 << 20))
    (root / "sub" / "deeper" / "empty.txt").write_bytes(b"")
    return root


@pytest.fixture
def manifest(lab: Lab, folder: Path) -> Path:
    with lab.open_vault() as vault:
        return transfer.create_manifest(vault, CHANNEL, folder)


def test_manifest_lists_every_file(lab, folder, manifest):
    body = json.loads(manifest.read_text())
    assert [f["path"] for f in body["files"]] == [
        "a.csv",
        "sub/b.bin",
        "sub/deeper/empty.txt",
    ]
    assert body["files"][1]["size"] == 3 << 20
    assert body["key_id"] == "mac/alpha-import"
    assert len(body["mac"]) == 64


def test_file_hmac_is_hmac_sha256_of_content(lab, folder, manifest):
    with lab.open_vault() as vault:
        key = vault.read_secret("mac/alpha-import", "test")
    file_key = hmac.new(key, b"trekeys manifest file mac", hashlib.sha256).digest()
    expected = hmac.new(file_key, (folder / "a.csv").read_bytes(), "sha256")
    body = json.loads(manifest.read_text())
    assert body["files"][0]["hmac"] == expected.hexdigest()


def test_unchanged_folder_verifies(lab, folder, manifest):
    with lab.open_vault() as vault:
        report = transfer.verify_manifest(vault, manifest, folder)
        record = vault.get("mac/alpha-import")
    assert report.ok
    assert report.files == 3
    assert "manifest:alpha-import/batch-7" in record.protects


def test_changes_are_named(lab, folder, manifest):
    (folder / "a.csv").write_text("id,value\n1,3\n")
    (folder / "sub" / "deeper" / "empty.txt").unlink()
    (folder / "added.txt").write_text("smuggled")
    manifest_before = manifest.read_bytes()
    with lab.open_vault() as vault:
        with pytest.raises(TransferManifestError, match="added: added.txt") as caught:
            transfer.verify_manifest(vault, manifest, folder)
    error = caught.value
    assert error.added == ["added.txt"]
    assert error.removed == ["sub/deeper/empty.txt"]
    assert error.changed == ["a.csv"]
    assert "removed: sub/deeper/empty.txt" in str(error)
    assert "changed: a.csv" in str(error)
    assert manifest.read_bytes() == manifest_before
    assert (folder / "added.txt").read_text() == "smuggled"


def test_same_size_change_detected(lab, folder, manifest):
    data = bytearray((folder / "sub" / "b.bin").read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / "sub" / "b.bin").write_bytes(bytes(data))
    with lab.open_vault() as vault:
        report = transfer.compare_manifest(vault, manifest, folder)
    assert report.changed == ["sub/b.bin"]
    assert report.added == report.removed == []


@pytest.mark.parametrize(
    "edit",
    [
        lambda body: body["files"][0].update(size=999),
        lambda body: body["files"].pop(),
        lambda body: body.update(channel="beta-import"),
        lambda body: body.update(mac="0" * 64),
    ],
    ids=["size", "dropped-file", "channel", "mac"],
)
def test_edited_manifest_fails_mac(lab, folder, manifest, edit):
    body = json.loads(manifest.read_text())
    edit(body)
    manifest.write_text(json.dumps(body))
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with lab.open_vault() as vault:
        with pytest.raises(IntegrityError, match="MAC of manifest .* is invalid"):
            transfer.verify_manifest(vault, manifest, folder)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_garbage_manifest_rejected(lab, folder, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with lab.open_vault() as vault:
        with pytest.raises(IntegrityError, match="is not a trekeys manifest"):
            transfer.verify_manifest(vault, bad, folder)


def test_existing_manifest_not_overwritten(lab, folder, manifest):
    before = manifest.read_bytes()
    with lab.open_vault() as vault:
        with pytest.raises(DestinationExistsError, match="already exists"):
            transfer.create_manifest(vault, CHANNEL, folder)
        transfer.create_manifest(vault, CHANNEL, folder, overwrite=True)
    assert json.loads(manifest.read_text())["files"] == json.loads(before)["files"]


def test_manifest_inside_folder_is_skipped(lab, folder):
    inside = folder / "MANIFEST.json"
    with lab.open_vault() as vault:
        transfer.create_manifest(vault, CHANNEL, folder, inside)
        report = transfer.verify_manifest(vault, inside, folder)
    assert report.files == 3


def test_symbolic_link_rejected(lab, folder, tmp_path):
    (folder / "link").symlink_to(tmp_path)
    with lab.open_vault() as vault:
        with pytest.raises(PolicyError, match="symbolic link"):
            transfer.create_manifest(vault, CHANNEL, folder)
    assert not folder.with_name("batch-7.manifest.json").exists()


def test_rotation_keeps_old_manifests_verifiable(lab, folder, manifest, tmp_path):
    with lab.open_vault() as vault:
        new_ids = transfer.rotate_key(
            lab, vault, "mac/alpha-import", reason="yearly", compromised=False
        )
        assert vault.get("mac/alpha-import").state is KeyState.DEACTIVATED
        assert transfer.verify_manifest(vault, manifest, folder).ok
        second = transfer.create_manifest(
            vault, CHANNEL, folder, tmp_path / "second.json"
        )
    assert new_ids == ["mac/alpha-import.v2"]
    assert json.loads(second.read_text())["key_id"] == "mac/alpha-import.v2"


def test_compromised_key_verifies_nothing(lab, folder, manifest):
    with lab.open_vault() as vault:
        transfer.rotate_key(
            lab, vault, "mac/alpha-import", reason="key leaked", compromised=True
        )
        assert vault.get("mac/alpha-import").state is KeyState.COMPROMISED
        with pytest.raises(CredentialError, match="which is compromised"):
            transfer.verify_manifest(vault, manifest, folder)


def test_lab_has_signed_demo_transfer(full_lab):
    with full_lab.open_vault() as vault:
        for instance in full_lab.instances:
            folder = (
                transfer.transfers_dir(full_lab, instance) / "import-cohort-2026-12"
            )
            manifest = folder.with_name(folder.name + ".manifest.json")
            assert transfer.verify_manifest(vault, manifest, folder).files == 4


def test_transfer_manifests_notebook_passes_twice(full_lab, tmp_path):
    for attempt in range(2):
        run = run_drills(
            full_lab.root, tmp_path / f"reports-{attempt}", names=["transfer-manifests"]
        )
        assert run.passed, run.drills[0].error


def test_cli_verify_names_changed_file(lab, folder, manifest):
    from click.testing import CliRunner

    from trekeys.cli import main

    (folder / "a.csv").write_text("changed\n")
    result = CliRunner().invoke(
        main, ["transfer", "verify", "--lab", str(lab.root), str(manifest), str(folder)]
    )
    assert result.exit_code == 1
    assert "changed: a.csv" in result.output

"""Backups encrypted to three keys: recipients, restores, bad input and retention."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from trekeys import backup, gpgkeys, restore, rotation
from trekeys.cli import main
from trekeys.drills import run_drills
from trekeys.errors import (
    DestinationExistsError,
    IntegrityError,
    KeyringMissingError,
    PolicyError,
    RecipientError,
    RecipientMismatchError,
)
from trekeys.lab import Lab
from trekeys.openpgp import read_message_header
from trekeys.records import KeyState
from trekeys.vault import Vault


def stop_agents(lab: Lab) -> None:
    for home in [*(lab.root / "keyrings").glob("*"), gpgkeys.offline_home(lab)]:
        gpgkeys.stop_agent(home)


@pytest.fixture
def lab(full_lab: Lab) -> Iterator[Lab]:
    yield full_lab
    stop_agents(full_lab)


@pytest.fixture
def vault(lab: Lab) -> Iterator[Vault]:
    with lab.open_vault() as opened:
        yield opened


def store_listing(lab: Lab, instance: str = "alpha") -> list[str]:
    return sorted(p.name for p in backup.store_dir(lab, instance).iterdir())


def home_files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file()
    }


def test_lab_has_two_backups_per_instance(lab: Lab) -> None:
    for instance in lab.instances:
        assert len(backup.list_backups(lab, instance)) >= 2


def test_archive_lists_exactly_three_recipients(lab: Lab, vault: Vault) -> None:
    latest = backup.find_backup(lab, "alpha")
    listing = subprocess.run(
        gpgkeys.gpg_command(
            gpgkeys.open_home(gpgkeys.public_home(lab)),
            "--list-only",
            "--list-packets",
            str(latest.archive),
        ),
        capture_output=True,
        text=True,
        check=False,
    )
    from_gpg = sorted(
        line.split("keyid ")[1].strip()
        for line in listing.stdout.splitlines()
        if ":pubkey enc packet:" in line
    )
    expected = sorted(
        vault.get(r.key_id).fingerprint and r.subkey[-16:] for r in latest.recipients
    )
    assert from_gpg == expected
    assert [r.key_id for r in latest.recipients] == [
        "gpg/instance-alpha",
        "gpg/admin",
        "gpg/admin-offline",
    ]
    backup.verify_archive_file(latest)


def test_recipients_record_protects_backups(lab: Lab, vault: Vault) -> None:
    for latest in (backup.find_backup(lab, i) for i in lab.instances):
        for recipient in latest.recipients:
            assert latest.reference in vault.get(recipient.key_id).protects


def test_standard_gpg_and_tar_restore_backup(lab: Lab, tmp_path: Path) -> None:
    latest = backup.find_backup(lab, "alpha")
    with lab.open_vault() as vault:
        passphrase = gpgkeys.read_passphrase(vault, gpgkeys.ADMIN_KEY_ID, "test")
    home = gpgkeys.open_home(gpgkeys.admin_home(lab))
    with gpgkeys.passphrase_fd(passphrase) as fd:
        plain = subprocess.run(
            gpgkeys.gpg_command(
                home,
                "--pinentry-mode",
                "loopback",
                "--passphrase-fd",
                str(fd),
                "--decrypt",
                str(latest.archive),
            ),
            capture_output=True,
            pass_fds=(fd,),
            check=True,
        ).stdout
    (tmp_path / "plain.tar").write_bytes(plain)
    with tarfile.open(tmp_path / "plain.tar") as tar:
        tar.extractall(tmp_path / "out", filter="data")
    restored = home_files(tmp_path / "out")
    restored.pop(backup.INNER_MANIFEST)
    assert restored == home_files(backup.home_dir(lab, "alpha"))


def test_restore_with_each_key_matches_home(lab: Lab, vault: Vault) -> None:
    latest = backup.find_backup(lab, "alpha")
    originals = home_files(backup.home_dir(lab, "alpha"))
    for recipient in latest.recipients:
        target = lab.work_dir / recipient.key_id.replace("/", "-")
        report = restore.restore_backup(
            lab, vault, latest, key_id=recipient.key_id, target=target
        )
        assert report.passed
        assert home_files(target) == originals
        assert report.files == sum(1 for name in originals)


def test_drill_records_passing_restore_test(lab: Lab, vault: Vault) -> None:
    latest = backup.find_backup(lab, "beta")
    reports = restore.drill_restore(lab, vault, latest, work_dir=lab.work_dir)
    assert [r.passed for r in reports] == [True, True, True]
    assert backup.find_backup(lab, "beta").passed_restore_test
    assert not any(lab.work_dir.iterdir())


def test_restore_single_user(lab: Lab, vault: Vault) -> None:
    latest = backup.find_backup(lab, "alpha")
    target = lab.work_dir / "bob-only"
    restore.restore_backup(
        lab, vault, latest, key_id="gpg/admin", target=target, user="bob"
    )
    assert sorted(p.name for p in target.iterdir()) == ["bob"]
    assert home_files(target / "bob") == home_files(
        backup.home_dir(lab, "alpha") / "bob"
    )


def test_restore_refuses_existing_target(lab: Lab, vault: Vault) -> None:
    target = lab.work_dir / "existing"
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("live data")
    with pytest.raises(DestinationExistsError, match="already exists"):
        restore.restore_backup(
            lab,
            vault,
            backup.find_backup(lab, "alpha"),
            key_id="gpg/admin",
            target=target,
        )
    assert (target / "keep.txt").read_text() == "live data"
    assert [p.name for p in target.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [("expired", "expired"), ("revoked", "revoked"), ("missing", "missing")],
)
def test_backup_refuses_bad_recipient(
    lab: Lab, vault: Vault, breakage: str, reason: str
) -> None:
    key_id = "gpg/instance-alpha"
    record = vault.get(key_id)
    public = gpgkeys.open_home(gpgkeys.public_home(lab))
    if breakage == "revoked":
        certificate = vault.read_attachment(key_id, gpgkeys.REVOCATION_ATTACHMENT)
        gpgkeys.import_public_key(public, certificate)
    elif breakage == "missing":
        subprocess.run(
            gpgkeys.gpg_command(public, "--yes", "--delete-keys", record.fingerprint),
            check=True,
            capture_output=True,
        )
    else:
        record.fingerprint = make_expired_key(lab, public)
        vault.update(record)
    before = store_listing(lab)

    with pytest.raises(RecipientError, match=f"{key_id} .* is {reason}"):
        backup.create_backup(lab, vault, "alpha")
    assert store_listing(lab) == before


def make_expired_key(lab: Lab, public: Path) -> str:
    """Make a key that expired in 2020 and import its public key into `public`."""
    home = lab.root / "keyrings" / "expired"
    gpgkeys.open_home(home, create=True)
    command = gpgkeys.gpg_command(
        home,
        "--faked-system-time",
        "20200101T000000!",
        "--passphrase-fd",
        "0",
        "--pinentry-mode",
        "loopback",
        "--quick-gen-key",
        "expired <expired@tre.internal>",
        "ed25519",
        "sign",
        "1d",
    )
    subprocess.run(command, input=b"\n", check=True, capture_output=True)
    gpg = gpgkeys.gpg_for(home)
    fingerprint = str(gpg.list_keys()[0]["fingerprint"])
    gpgkeys.import_public_key(public, gpg.export_keys(fingerprint))
    gpgkeys.stop_agent(home)
    return fingerprint


def test_backup_refuses_key_without_encryption_subkey(lab: Lab, vault: Vault) -> None:
    public = gpgkeys.open_home(gpgkeys.public_home(lab))
    home = gpgkeys.open_home(lab.root / "keyrings" / "signonly", create=True)
    subprocess.run(
        gpgkeys.gpg_command(
            home,
            "--passphrase-fd",
            "0",
            "--pinentry-mode",
            "loopback",
            "--quick-gen-key",
            "sign only <s@tre.internal>",
            "ed25519",
            "sign",
            "1y",
        ),
        input=b"\n",
        check=True,
        capture_output=True,
    )
    gpg = gpgkeys.gpg_for(home)
    fingerprint = str(gpg.list_keys()[0]["fingerprint"])
    gpgkeys.import_public_key(public, gpg.export_keys(fingerprint))
    gpgkeys.stop_agent(home)
    record = vault.get("gpg/admin")
    record.fingerprint = fingerprint
    vault.update(record)
    before = store_listing(lab)

    with pytest.raises(RecipientError, match="gpg/admin .* encryption subkey"):
        backup.create_backup(lab, vault, "alpha")
    assert store_listing(lab) == before


def test_restore_refuses_truncated_archive(lab: Lab, vault: Vault) -> None:
    latest = backup.find_backup(lab, "alpha")
    data = latest.archive.read_bytes()
    latest.archive.write_bytes(data[: len(data) // 2])
    target = lab.work_dir / "truncated"

    with pytest.raises(IntegrityError, match="truncated"):
        restore.restore_backup(lab, vault, latest, key_id="gpg/admin", target=target)
    assert not target.exists()
    assert not lab.work_dir.exists() or not any(lab.work_dir.iterdir())


def test_restore_refuses_tampered_archive(lab: Lab, vault: Vault) -> None:
    latest = backup.find_backup(lab, "alpha")
    data = bytearray(latest.archive.read_bytes())
    data[-40] ^= 0x01
    latest.archive.write_bytes(bytes(data))
    target = lab.work_dir / "tampered"

    with pytest.raises(IntegrityError, match="SHA-256"):
        backup.verify_archive_file(latest)
    with pytest.raises(IntegrityError, match="modified"):
        restore.restore_backup(lab, vault, latest, key_id="gpg/admin", target=target)
    assert not target.exists()
    assert not any(lab.work_dir.iterdir())


def test_restore_refuses_wrong_recipient_set(lab: Lab, vault: Vault) -> None:
    latest = backup.find_backup(lab, "alpha")
    two = [r.subkey for r in latest.recipients[1:]]
    original = latest.archive.read_bytes()
    backup.write_encrypted_archive(
        backup.home_dir(lab, "alpha"),
        lab.root / "two.gpg",
        two,
        gpgkeys.public_home(lab),
    )
    os.replace(lab.root / "two.gpg", latest.archive)
    target = lab.work_dir / "wrong"

    with pytest.raises(RecipientMismatchError, match="must be encrypted to exactly"):
        restore.restore_backup(lab, vault, latest, key_id="gpg/admin", target=target)
    assert not target.exists()
    assert original != latest.archive.read_bytes()


def test_restore_needs_offline_gnupghome(lab: Lab, vault: Vault) -> None:
    latest = backup.find_backup(lab, "alpha")
    offline = gpgkeys.offline_home(lab)
    offline.rename(lab.offline_media / "unmounted")
    target = lab.work_dir / "offline"

    with pytest.raises(KeyringMissingError, match="offline media"):
        restore.restore_backup(
            lab, vault, latest, key_id="gpg/admin-offline", target=target
        )
    assert not target.exists()
    reports = restore.drill_restore(lab, vault, latest, work_dir=lab.work_dir)
    failed = [r for r in reports if not r.passed]
    assert [r.key_id for r in failed] == ["gpg/admin-offline"]
    assert "gnupg" in failed[0].error
    assert not backup.find_backup(lab, "alpha").passed_restore_test
    assert (lab.offline_media / "unmounted" / "pubring.kbx").exists()


def test_retention_keeps_last_tested_backup(lab: Lab, vault: Vault) -> None:
    oldest = backup.list_backups(lab, "alpha")[0]
    restore.drill_restore(lab, vault, oldest, work_dir=lab.work_dir)
    for _ in range(3):
        backup.create_backup(lab, vault, "alpha")
    names = [b.name for b in backup.list_backups(lab, "alpha")]

    removed = backup.prune_backups(lab, vault, "alpha", keep=2)

    remaining = [b.name for b in backup.list_backups(lab, "alpha")]
    assert remaining == [names[0], *names[-2:]]
    assert removed == names[1:-2]
    for name in removed:
        assert not (backup.store_dir(lab, "alpha") / (name + ".tar.gpg")).exists()
        assert f"backup:alpha/{name}" not in vault.get("gpg/admin").protects


def test_retention_refuses_keeping_none(lab: Lab, vault: Vault) -> None:
    before = store_listing(lab)
    with pytest.raises(PolicyError, match="keep at least 1"):
        backup.prune_backups(lab, vault, "alpha", keep=0)
    assert store_listing(lab) == before


def test_rotation_reports_and_reencrypts_backups(lab: Lab, vault: Vault) -> None:
    old_id = "gpg/instance-alpha"
    affected = [b.name for b in rotation.find_backups_for_key(lab, vault, old_id)]
    assert affected == [b.name for b in backup.list_backups(lab, "alpha")]

    new_ids = rotation.rotate_key(
        lab, vault, old_id, reason="laptop stolen", compromised=True, reencrypt=True
    )

    assert new_ids == ["gpg/instance-alpha.2"]
    assert vault.get(old_id).state.value == "compromised"
    assert gpgkeys.ISSUED_REVOCATION_ATTACHMENT in vault.attachment_names(old_id)
    status = gpgkeys.inspect_public_key(
        gpgkeys.public_home(lab), vault.get(old_id).fingerprint
    )
    assert status.problem == "revoked"
    assert rotation.find_backups_for_key(lab, vault, old_id) == []
    latest = backup.find_backup(lab, "alpha")
    assert latest.recipients[0].key_id == "gpg/instance-alpha.2"
    report = restore.restore_backup(
        lab, vault, latest, key_id="gpg/instance-alpha.2", target=lab.work_dir / "n"
    )
    assert report.passed


def test_rotation_without_reencrypt_keeps_old_recipient(lab: Lab, vault: Vault) -> None:
    rotation.rotate_key(
        lab, vault, "gpg/instance-beta", reason="cryptoperiod", compromised=False
    )
    old = backup.find_backup(lab, "beta")
    rows = {r["key_id"]: r for r in rotation.recipients_status(lab, vault, old)}
    assert rows["gpg/instance-beta"]["state"] == "deactivated"
    assert rows["gpg/instance-beta"]["can open"] is True
    new = backup.create_backup(lab, vault, "beta")
    assert new.recipients[0].key_id == "gpg/instance-beta.2"


def test_restore_drill_notebook_passes(lab: Lab, tmp_path: Path) -> None:
    result = run_drills(lab.root, tmp_path / "reports", names=["backup-restore-drill"])
    assert result.passed, [d.error for d in result.drills]
    again = run_drills(lab.root, tmp_path / "reports", names=["backup-restore-drill"])
    assert again.passed, [d.error for d in again.drills]


def test_restore_drill_covers_every_instance(lab: Lab, tmp_path: Path) -> None:
    result = run_drills(lab.root, tmp_path / "reports", names=["backup-restore-drill"])

    drill = result.drills[0]
    assert drill.outcome == "passed", drill.error
    names = {c["name"] for c in drill.checks}
    for instance in lab.instances:
        newest = backup.find_backup(lab, instance)
        assert len(newest.recipients) == 3
        for recipient in newest.recipients:
            assert f"{instance}: backup restores with {recipient.key_id}" in names
        tests = newest.manifest["restore_tests"]
        assert tests[-1]["at"] >= result.started
        assert set(tests[-1]["keys"].values()) == {"passed"}


def test_restore_drill_one_instance(lab: Lab, tmp_path: Path) -> None:
    result = run_drills(
        lab.root,
        tmp_path / "reports",
        names=["backup-restore-drill"],
        parameters={"instance": "beta"},
    )

    drill = result.drills[0]
    assert drill.outcome == "passed", drill.error
    restored = {
        c["name"].split(":")[0] for c in drill.checks if "restores" in c["name"]
    }
    assert restored == {"beta"}


def test_backup_refuses_deactivated_only_key(lab: Lab, vault: Vault) -> None:
    vault.transition("gpg/admin", KeyState.DEACTIVATED, "test")
    before = store_listing(lab)
    with pytest.raises(RecipientError, match="gpg/admin .* is deactivated"):
        backup.create_backup(lab, vault, "alpha")
    assert store_listing(lab) == before


def test_header_reader_rejects_plain_file(lab: Lab) -> None:
    plain = lab.root / "plain.txt"
    plain.write_text("not encrypted")
    with pytest.raises(IntegrityError, match="not a readable OpenPGP"):
        read_message_header(plain)


def test_copied_lab_uses_its_own_agent(lab: Lab, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(lab.root, copy, symlinks=True)
    original = gpgkeys.open_home(gpgkeys.admin_home(lab))
    copied = gpgkeys.open_home(copy / "keyrings" / "admin")
    assert (original / "S.gpg-agent").read_text() != (
        copied / "S.gpg-agent"
    ).read_text()
    gpgkeys.stop_agent(copied)


def test_drill_notebook_names_failing_key(lab: Lab, tmp_path: Path) -> None:
    gpgkeys.stop_agent(gpgkeys.offline_home(lab))
    gpgkeys.offline_home(lab).rename(lab.offline_media / "unmounted")
    result = run_drills(lab.root, tmp_path / "reports", names=["backup-restore-drill"])
    assert not result.passed
    failed = [c for c in result.drills[0].checks if not c["passed"]]
    assert [c["name"] for c in failed] == [
        "alpha: backup restores with gpg/admin-offline"
    ]
    assert "offline media" in failed[0]["detail"]


def test_cli_lists_and_verifies_backups(lab: Lab) -> None:
    runner = CliRunner()
    listed = runner.invoke(main, ["backup", "list", "--lab", str(lab.root)])
    assert listed.exit_code == 0
    assert listed.output.count("backup:alpha/") == 2
    verified = runner.invoke(
        main, ["backup", "verify", "alpha", "--lab", str(lab.root)]
    )
    assert verified.exit_code == 0
    assert "match the manifest" in verified.output


def test_cli_restore_refuses_existing_target(lab: Lab) -> None:
    target = lab.root / "existing"
    target.mkdir()
    result = CliRunner().invoke(
        main,
        [
            "backup",
            "restore",
            "alpha",
            "--key",
            "gpg/admin",
            "--target",
            str(target),
            "--lab",
            str(lab.root),
        ],
    )
    assert result.exit_code == 1
    assert "already exists" in result.output


def test_restore_rejects_member_outside_target(lab: Lab, vault: Vault) -> None:
    latest = backup.find_backup(lab, "alpha")
    crafted = lab.root / "crafted.tar"
    with tarfile.open(crafted, "w") as tar:
        evil = lab.root / "evil.txt"
        evil.write_text("outside")
        tar.add(evil, arcname="../evil.txt")
    _replace_archive(lab, latest, crafted)
    target = lab.work_dir / "restore" / "target"

    with pytest.raises(IntegrityError, match="points outside the restore folder"):
        restore.restore_backup(lab, vault, latest, key_id="gpg/admin", target=target)
    assert not target.exists()
    assert not (lab.work_dir / "restore" / "evil.txt").exists()
    assert not (lab.work_dir / "evil.txt").exists()


def test_restore_rejects_gnu_long_name_member(lab: Lab, vault: Vault) -> None:
    latest = backup.find_backup(lab, "alpha")
    crafted = lab.root / "crafted-long.tar"
    note = lab.root / "note.txt"
    note.write_text("long name")
    with tarfile.open(crafted, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.add(note, arcname="user0/" + "n" * 120)
    _replace_archive(lab, latest, crafted)
    target = lab.work_dir / "restore-long" / "target"

    with pytest.raises(IntegrityError, match="restore from another backup"):
        restore.restore_backup(lab, vault, latest, key_id="gpg/admin", target=target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def _replace_archive(lab: Lab, latest: backup.Backup, crafted: Path) -> None:
    command = gpgkeys.gpg_command(
        gpgkeys.public_home(lab),
        "--trust-model",
        "always",
        "--yes",
        "--output",
        str(latest.archive),
    )
    for recipient in latest.recipients:
        command += ["--recipient", recipient.subkey + "!"]
    subprocess.run([*command, "--encrypt", str(crafted)], check=True)
    # Whoever can write the archive can also edit the manifest beside it.
    latest.manifest["archive_bytes"] = latest.archive.stat().st_size
    backup.write_json_atomically(latest.manifest_path, latest.manifest)

"""SSH key pairs: OpenSSH format, inventory from backups, revocation, rotation."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from trekeys import backup, gpgkeys, restore, rotation, ssh, ssh_revocation
from trekeys.drills import run_drills
from trekeys.errors import PolicyError
from trekeys.lab import Lab
from trekeys.vault import Vault


@pytest.fixture
def lab(full_lab: Lab) -> Iterator[Lab]:
    yield full_lab
    for home in [
        *(full_lab.root / "keyrings").glob("*"),
        gpgkeys.offline_home(full_lab),
    ]:
        gpgkeys.stop_agent(home)


@pytest.fixture
def vault(lab: Lab) -> Iterator[Vault]:
    with lab.open_vault() as opened:
        yield opened


def authorized_keys(lab: Lab, instance: str, user: str) -> Path:
    return backup.home_dir(lab, instance) / user / ".ssh" / "authorized_keys"


def test_fingerprint_matches_ssh_keygen(lab: Lab, vault: Vault, tmp_path: Path) -> None:
    record = vault.get("ssh/alpha/alice")
    public = tmp_path / "alice.pub"
    public.write_bytes(vault.read_attachment(record.id, ssh.PUBLIC_KEY_ATTACHMENT))
    listed = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(public)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert listed.split()[1] == record.fingerprint
    assert record.protects == ["account:alpha/alice"]


def test_private_key_is_openssh_format(vault: Vault, tmp_path: Path) -> None:
    private = tmp_path / "key"
    private.write_bytes(vault.read_secret("ssh/beta/carol", "test"))
    private.chmod(0o600)
    assert private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(private)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[1]
    assert derived in vault.get("ssh/beta/carol").attributes["public_key"]


def test_host_key_installed_private(lab: Lab, vault: Vault) -> None:
    folder = lab.instance_dir("alpha") / "etc" / "ssh"
    key = folder / "ssh_host_ed25519_key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (folder / "ssh_host_ed25519_key.pub").read_text().strip() == (
        vault.get("ssh/alpha/host").attributes["public_key"]
    )


def test_inventory_lists_every_account(lab: Lab, vault: Vault) -> None:
    entries = ssh.build_access_inventory(lab, vault)
    found = {(e.instance, e.account, e.key_id) for e in entries}
    assert found == {
        ("alpha", "alice", "ssh/alpha/alice"),
        ("alpha", "bob", "ssh/alpha/bob"),
        ("beta", "carol", "ssh/beta/carol"),
    }
    assert not any(e.revoked for e in entries)


def test_inventory_flags_unknown_key(lab: Lab, vault: Vault, tmp_path: Path) -> None:
    subprocess.run(
        [
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "stray",
            "-f",
            str(tmp_path / "stray"),
        ],
        check=True,
    )
    stray = (tmp_path / "stray.pub").read_text()
    with open(authorized_keys(lab, "alpha", "bob"), "a") as handle:
        handle.write('from="10.0.0.0/8" ' + stray)
    backup.create_backup(lab, vault, "alpha")

    entries = ssh.build_access_inventory(lab, vault)
    unknown = [e for e in entries if e.key_id == "unknown"]
    assert [(e.account, e.comment) for e in unknown] == [("bob", "stray")]


def test_revoked_key_in_krl_and_dropped_on_restore(lab: Lab, vault: Vault) -> None:
    old_backup = backup.find_backup(lab, "alpha")
    record = ssh.revoke_ssh_key(
        lab, vault, "ssh/alpha/alice", reason="laptop stolen", compromised=True
    )
    assert record.state.value == "compromised"
    assert record.attributes["revoked"]

    public = lab.work_dir / "alice.pub"
    public.parent.mkdir(parents=True)
    public.write_text(record.attributes["public_key"] + "\n")
    query = subprocess.run(
        ["ssh-keygen", "-Q", "-f", str(ssh.krl_path(lab)), str(public)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "REVOKED" in query.stdout
    assert record.fingerprint in ssh.revoked_fingerprints(lab)
    assert authorized_keys(lab, "alpha", "alice").read_text() == ""

    report = restore.restore_backup(
        lab, vault, old_backup, key_id="gpg/admin", target=lab.work_dir / "r"
    )
    restored = lab.work_dir / "r" / "alice" / ".ssh" / "authorized_keys"
    assert record.fingerprint.split(":")[1] not in restored.read_text()
    assert "alice@alpha" not in restored.read_text()
    assert len(report.removed_ssh_keys) == 1
    bob = lab.work_dir / "r" / "bob" / ".ssh" / "authorized_keys"
    assert "bob@alpha" in bob.read_text()


def test_rotate_ssh_key_replaces_authorized_key(lab: Lab, vault: Vault) -> None:
    old = vault.get("ssh/beta/carol")
    new_ids = rotation.rotate_key(
        lab, vault, "ssh/beta/carol", reason="cryptoperiod ended", compromised=False
    )
    assert new_ids == ["ssh/beta/carol.2"]
    new = vault.get("ssh/beta/carol.2")
    lines = authorized_keys(lab, "beta", "carol").read_text().splitlines()
    assert lines == [new.attributes["public_key"]]
    assert vault.get(old.id).state.value == "deactivated"
    assert old.fingerprint in ssh.revoked_fingerprints(lab)
    assert new.protects == ["account:beta/carol"]


def test_rotate_refuses_other_kinds(lab: Lab, vault: Vault) -> None:
    with pytest.raises(PolicyError, match="GPG backup keys and SSH keys only"):
        rotation.rotate_key(
            lab, vault, "tre/vault-master", reason="test", compromised=False
        )
    assert vault.get("tre/vault-master").state.value == "active"


def test_ssh_inventory_notebook_passes(lab: Lab, tmp_path: Path) -> None:
    result = run_drills(lab.root, tmp_path / "reports", names=["ssh-inventory"])
    assert result.passed, [d.error for d in result.drills]
    again = run_drills(lab.root, tmp_path / "reports", names=["ssh-inventory"])
    assert again.passed, [d.error for d in again.drills]


DEMO_KEY = "ssh/alpha/alice-old-laptop"


def test_demo_revoked_key_only_in_older_backup(lab: Lab, vault: Vault) -> None:
    record = vault.get(DEMO_KEY)
    older, newest = backup.list_backups(lab, "alpha")

    assert record.attributes["revoked"]
    assert record.fingerprint in ssh.revoked_fingerprints(lab)
    assert record.fingerprint not in authorized_keys(lab, "alpha", "alice").read_text()
    assert ssh_revocation.find_backup_with_key(lab, vault, record) == older
    entries = ssh.build_access_inventory(lab, vault)
    assert DEMO_KEY not in {e.key_id for e in entries}
    assert newest.name in {e.backup for e in entries}


def test_revocation_applied_on_restore(lab: Lab, vault: Vault) -> None:
    result = ssh_revocation.check_revocation_on_restore(lab, vault, DEMO_KEY)

    assert result.in_krl is True
    assert result.backup == backup.list_backups(lab, "alpha")[0].reference
    assert result.in_restored is False
    assert len(result.dropped) == 1
    assert "alice@alpha" in result.dropped[0]
    assert list(lab.work_dir.glob("ssh-revocation-*")) == []


def test_ssh_inventory_notebook_names_revoked_key(lab: Lab, tmp_path: Path) -> None:
    result = run_drills(lab.root, tmp_path / "reports", names=["ssh-inventory"])

    drill = result.drills[0]
    assert drill.outcome == "passed", drill.error
    details = {c["name"]: c["detail"] for c in drill.checks}
    assert details["KRL lists every revoked key"] == DEMO_KEY
    restore_check = f"{DEMO_KEY} is dropped when an older backup is restored"
    assert details[restore_check].startswith("backup:alpha/")

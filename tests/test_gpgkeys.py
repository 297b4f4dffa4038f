"""GPG backup keys: records, where secret keys live, and gpg failures."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from trekeys import backup, gpgkeys, restore
from trekeys.errors import AgentError, ToolMissingError
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


def secret_fingerprints(home: Path) -> set[str]:
    return {k["fingerprint"] for k in gpgkeys.gpg_for(home).list_keys(secret=True)}


def test_records_name_algorithm_expiry_and_locations(lab: Lab, vault: Vault) -> None:
    for key_id in ["gpg/admin", "gpg/admin-offline", "gpg/instance-alpha"]:
        record = vault.get(key_id)
        assert record.state.value == "active"
        assert len(record.fingerprint) == 40
        assert record.algorithm == "ed25519/cv25519"
        assert record.expires is not None
        assert any("GnuPG home" in place for place in record.locations)
        assert any(ref.startswith("backup:") for ref in record.protects)
    offline = vault.get("gpg/admin-offline")
    assert offline.custodian == "Information Security Manager"
    assert offline.attributes["gnupghome"] == "offline-media/gnupg"


def test_offline_secret_key_stays_on_offline_media(lab: Lab, vault: Vault) -> None:
    offline = vault.get("gpg/admin-offline").fingerprint
    assert offline in secret_fingerprints(gpgkeys.offline_home(lab))
    assert secret_fingerprints(gpgkeys.public_home(lab)) == set()
    assert offline not in secret_fingerprints(gpgkeys.admin_home(lab))
    public = {
        k["fingerprint"] for k in gpgkeys.gpg_for(gpgkeys.public_home(lab)).list_keys()
    }
    assert offline in public


def test_vault_copy_of_secret_key_decrypts_backup(
    lab: Lab, vault: Vault, tmp_path: Path
) -> None:
    """The secret key export in the vault alone restores a backup."""
    home = tmp_path / "g"
    gpgkeys.open_home(home, create=True)
    gpg = gpgkeys.gpg_for(home)
    exported = vault.read_attachment("gpg/admin-offline", gpgkeys.SECRET_KEY_ATTACHMENT)
    passphrase = gpgkeys.read_passphrase(vault, "gpg/admin-offline", "test")
    result = gpg.import_keys(exported.decode(), passphrase=passphrase)
    assert result.sec_imported == 1
    archive = backup.find_backup(lab, "beta").archive
    with open(archive, "rb") as handle:
        decrypted = gpg.decrypt_file(handle, passphrase=passphrase)
    gpgkeys.stop_agent(home)
    assert decrypted.ok
    assert b"carol/README.txt" in decrypted.data


def test_exported_secret_key_is_passphrase_protected(vault: Vault) -> None:
    exported = vault.read_attachment("gpg/admin", gpgkeys.SECRET_KEY_ATTACHMENT)
    passphrase = gpgkeys.read_passphrase(vault, "gpg/admin", "test")
    assert exported.startswith(b"-----BEGIN PGP PRIVATE KEY BLOCK-----")
    assert passphrase.encode() not in exported


def test_agent_socket_folder_is_short_and_private(lab: Lab) -> None:
    home = gpgkeys.open_home(gpgkeys.admin_home(lab))
    redirect = (home / "S.gpg-agent").read_text()
    socket = Path(redirect.split("socket=")[1].strip())
    assert len(str(socket)) < 100
    assert stat.S_IMODE(os.stat(socket.parent).st_mode) == 0o700


def test_gpg_missing_raises_tool_missing(
    lab: Lab, vault: Vault, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    before = sorted(p.name for p in backup.store_dir(lab, "alpha").iterdir())
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolMissingError, match="gpg is not installed.*gnupg"):
        backup.create_backup(lab, vault, "alpha")
    assert sorted(p.name for p in backup.store_dir(lab, "alpha").iterdir()) == before


def test_agent_not_starting_raises_agent_error(lab: Lab, vault: Vault) -> None:
    """A non-empty folder where the agent's socket belongs stops it binding."""
    gpgkeys.stop_agent(gpgkeys.admin_home(lab))
    home = gpgkeys.open_home(gpgkeys.admin_home(lab))
    redirect = (home / "S.gpg-agent").read_text()
    blocker = Path(redirect.split("socket=")[1].strip())
    blocker.mkdir()
    (blocker / "occupied").write_text("")
    target = lab.work_dir / "agent"
    try:
        with pytest.raises(AgentError, match="gpg-agent did not start"):
            restore.restore_backup(
                lab,
                vault,
                backup.find_backup(lab, "alpha"),
                key_id="gpg/admin",
                target=target,
            )
    finally:
        shutil.rmtree(blocker)
    assert not target.exists()


def test_passphrase_never_in_gpg_argv(
    lab: Lab, vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrapper in front of gpg logs every argv; no passphrase may show up."""
    real = gpgkeys.gpg_binary()
    log = tmp_path / "argv.log"
    wrapper = tmp_path / "bin" / "gpg"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}:{os.environ['PATH']}")

    backup.create_backup(lab, vault, "alpha")
    restore.drill_restore(
        lab, vault, backup.find_backup(lab, "alpha"), work_dir=lab.work_dir
    )
    gpgkeys.create_instance_key(lab, vault, "alpha", key_id="gpg/instance-alpha.9")

    logged = log.read_text()
    assert "--decrypt" in logged
    for key_id in [
        "gpg/admin",
        "gpg/admin-offline",
        "gpg/instance-alpha",
        "gpg/instance-alpha.9",
    ]:
        assert gpgkeys.read_passphrase(vault, key_id, "test") not in logged

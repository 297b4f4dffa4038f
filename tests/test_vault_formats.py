"""The vault stays a plain KDBX4 file: KeePassXC reads it, trekeys never rewrites
vaults made elsewhere, and 10,000 records still list in keepassxc-cli."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from kdbx31_file import write_kdbx31
from pykeepass import create_database

from trekeys.errors import VaultReadOnlyError
from trekeys.inventory import build_inventory
from trekeys.lab import write_keyfile
from trekeys.records import KeyKind, KeyRecord
from trekeys.vault import KdfSettings, Vault, VaultCredentials, list_generations

pytestmark = pytest.mark.skipif(
    shutil.which("keepassxc-cli") is None, reason="keepassxc-cli is not installed"
)

TEXT = "O'Brien's \"volume\" — ключ"


def _keepassxc(
    *args: str, password: str, keyfile: Path | None = None
) -> subprocess.CompletedProcess[str]:
    command = ["keepassxc-cli", args[0], "-q"]
    if keyfile is not None:
        command += ["--key-file", str(keyfile)]
    return subprocess.run(
        [*command, *args[1:]],
        input=password + "\n",
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


@pytest.fixture
def keyfile_vault(tmp_path: Path) -> tuple[Path, VaultCredentials]:
    keyfile = tmp_path / "vault.keyx"
    write_keyfile(keyfile)
    credentials = VaultCredentials(bytes(range(32)), keyfile)
    path = tmp_path / "vault.kdbx"
    with Vault.create(path, credentials, kdf=KdfSettings.test()) as vault:
        record = KeyRecord(
            id="alpha/luks-volume",
            kind=KeyKind.LUKS_VOLUME,
            purpose=TEXT,
            owner="instance:alpha",
            attributes={"luks_uuid": "0c6e1f2a", "label": TEXT},
        )
        vault.add(record, b"\x00\x01volume key", attachments={"header.img": b"H" * 64})
    return path, credentials


def test_keepassxc_lists_and_shows_entry(
    keyfile_vault: tuple[Path, VaultCredentials],
) -> None:
    path, credentials = keyfile_vault
    entry_path = "/luks-volume/instance-alpha/alpha/luks-volume"

    listing = _keepassxc(
        "ls",
        "-R",
        "-f",
        str(path),
        password=credentials.password,
        keyfile=credentials.keyfile,
    )
    shown = _keepassxc(
        "show",
        "-a",
        "trekeys.record",
        "-a",
        "Notes",
        "-a",
        "UserName",
        str(path),
        entry_path,
        password=credentials.password,
        keyfile=credentials.keyfile,
    )

    assert listing.returncode == 0, listing.stderr
    assert "luks-volume/instance-alpha/alpha/luks-volume" in listing.stdout.splitlines()
    assert shown.returncode == 0, shown.stderr
    record_json, notes, username = shown.stdout.splitlines()
    record = json.loads(record_json)
    assert record["id"] == "alpha/luks-volume"
    assert record["attributes"] == {"luks_uuid": "0c6e1f2a", "label": TEXT}
    assert notes == TEXT
    assert username == "instance:alpha"


def test_keepassxc_rejects_missing_keyfile(
    keyfile_vault: tuple[Path, VaultCredentials],
) -> None:
    path, credentials = keyfile_vault

    result = _keepassxc("ls", str(path), password=credentials.password)

    assert result.returncode != 0


def test_keepassxc_made_vault_opens_read_only(tmp_path: Path) -> None:
    credentials = VaultCredentials(bytes(range(32)))
    path = tmp_path / "foreign.kdbx"
    created = subprocess.run(
        ["keepassxc-cli", "db-create", "-q", "-p", "-t", "100", str(path)],
        input=f"{credentials.password}\n{credentials.password}\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert created.returncode == 0, created.stderr
    added = subprocess.run(
        ["keepassxc-cli", "mkdir", "-q", str(path), "Made elsewhere"],
        input=credentials.password + "\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert added.returncode == 0, added.stderr
    before = path.read_bytes()

    with Vault.open(path, credentials) as vault:
        assert vault.read_only
        kdf = vault.kdf_description
        with pytest.raises(VaultReadOnlyError, match="not made by trekeys"):
            vault.add(KeyRecord(id="a/b", kind=KeyKind.MAC, purpose="p", owner="tre"))
        with pytest.raises(VaultReadOnlyError, match="open read-only"):
            vault.update_meta(schema=1)

    assert path.read_bytes() == before
    assert not list_generations(path)
    assert kdf.startswith("AES-KDF")


def test_pykeepass_made_kdbx4_opens_read_only(tmp_path: Path) -> None:
    credentials = VaultCredentials(bytes(range(32)))
    path = tmp_path / "foreign4.kdbx"
    create_database(str(path), password=credentials.password).save()
    before = path.read_bytes()

    with Vault.open(path, credentials) as vault:
        assert vault.read_only
        assert vault.kdf_description.startswith("Argon2d, ")
        with pytest.raises(VaultReadOnlyError, match="not made by trekeys"):
            vault.add(KeyRecord(id="a/b", kind=KeyKind.MAC, purpose="p", owner="tre"))

    assert path.read_bytes() == before


def test_kdbx31_vault_opens_read_only(tmp_path: Path) -> None:
    credentials = VaultCredentials(bytes(range(32)))
    path = tmp_path / "old.kdbx"
    write_kdbx31(path, credentials.password)
    listed = _keepassxc("ls", str(path), password=credentials.password)
    assert listed.stdout.split() == ["legacy"]
    before = path.read_bytes()

    with Vault.open(path, credentials) as vault:
        assert vault.read_only
        assert vault.kdf_description.startswith("AES-KDF")
        with pytest.raises(VaultReadOnlyError, match="not KDBX4"):
            vault.add(KeyRecord(id="a/b", kind=KeyKind.MAC, purpose="p", owner="tre"))

    assert path.read_bytes() == before


@pytest.mark.slow
def test_ten_thousand_records_list_in_keepassxc(
    vault_path: Path, credentials: VaultCredentials
) -> None:
    count = 10_000
    generations_before = len(list_generations(vault_path))
    with Vault.open(vault_path, credentials) as vault:
        for number in range(count):
            vault.add(
                KeyRecord(
                    id=f"inst{number % 250}/key-{number}",
                    kind=KeyKind.FILE_KEY if number % 2 else KeyKind.LUKS_VOLUME,
                    purpose="scale test",
                    owner=f"instance:inst{number % 250}",
                    cryptoperiod_days=365,
                ),
                b"k" * 32,
            )

    # A bulk session saves once, so it leaves exactly one new generation.
    assert len(list_generations(vault_path)) == generations_before + 1
    listing = _keepassxc(
        "ls", "-R", "-f", str(vault_path), password=credentials.password
    )
    assert listing.returncode == 0, listing.stderr
    entries = [line for line in listing.stdout.splitlines() if "/key-" in line]
    assert len(entries) == count
    with Vault.open(vault_path, credentials, read_only=True) as vault:
        assert len(vault.ids()) == count
        assert vault.get("inst7/key-9757").owner == "instance:inst7"
        rows = build_inventory(vault, kind="file-key", owner="instance:inst3")
        assert len(rows) == 40
        assert all(row.kind == "file-key" for row in rows)

"""The vault on disk: credentials, corruption, generations, crashes and writers."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trekeys.errors import (
    CredentialError,
    RecordError,
    RecordNotFoundError,
    VaultCorruptError,
    VaultError,
    VaultLockedError,
    VaultReadOnlyError,
)
from trekeys.generations import describe_generations, restore_generation
from trekeys.lab import write_keyfile
from trekeys.records import KeyKind, KeyRecord
from trekeys.vault import KdfSettings, Vault, VaultCredentials, list_generations

WRITER = """
import sys, time
from pathlib import Path
from trekeys.records import KeyRecord
from trekeys.vault import Vault, VaultCredentials

path, prefix, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
credentials = VaultCredentials(bytes(range(32)))
for number in range(count):
    with Vault.open(path, credentials, lock_timeout=120) as vault:
        vault.add(KeyRecord(id=f"{prefix}/{number}", kind="mac", purpose="t",
                            owner="tre"), b"x" * 32)
    print(number, flush=True)
"""


def _record(key_id: str, **values) -> KeyRecord:
    return KeyRecord(
        id=key_id, kind=KeyKind.MAC, purpose="test key", owner="tre", **values
    )


def _add_one(path: Path, credentials: VaultCredentials, key_id: str) -> None:
    with Vault.open(path, credentials) as vault:
        vault.add(_record(key_id), b"material of " + key_id.encode())


def test_missing_keyfile_rejected(tmp_path: Path) -> None:
    keyfile = tmp_path / "vault.keyx"
    write_keyfile(keyfile)
    credentials = VaultCredentials(bytes(range(32)), keyfile)
    path = tmp_path / "vault.kdbx"
    Vault.create(path, credentials, kdf=KdfSettings.test()).close()
    keyfile.rename(tmp_path / "elsewhere.keyx")
    before = path.read_bytes()

    with pytest.raises(CredentialError, match="key file .* is missing; mount"):
        Vault.open(path, credentials)

    assert path.read_bytes() == before


def test_wrong_keyfile_rejected(tmp_path: Path) -> None:
    keyfile, other = tmp_path / "vault.keyx", tmp_path / "other.keyx"
    write_keyfile(keyfile)
    write_keyfile(other)
    path = tmp_path / "vault.kdbx"
    Vault.create(
        path, VaultCredentials(bytes(range(32)), keyfile), kdf=KdfSettings.test()
    ).close()
    before = path.read_bytes()

    with pytest.raises(CredentialError, match="do not open vault"):
        Vault.open(path, VaultCredentials(bytes(range(32)), other))
    with pytest.raises(CredentialError, match="do not open vault"):
        Vault.open(path, VaultCredentials(bytes(range(32))))

    assert path.read_bytes() == before


def test_wrong_master_secret_rejected(vault_path: Path) -> None:
    with pytest.raises(CredentialError, match="check the custody shares"):
        Vault.open(vault_path, VaultCredentials(bytes(32)))


def test_missing_vault_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(VaultError, match="does not exist"):
        Vault.open(tmp_path / "none.kdbx", VaultCredentials(bytes(32)))


@pytest.mark.parametrize("damage", ["truncate-half", "truncate-header", "empty"])
def test_truncated_vault_rejected_previous_generation_opens(
    vault_path: Path, credentials: VaultCredentials, damage: str
) -> None:
    _add_one(vault_path, credentials, "keep/one")
    _add_one(vault_path, credentials, "keep/two")
    data = vault_path.read_bytes()
    cut = {"truncate-half": len(data) // 2, "truncate-header": 40, "empty": 0}[damage]
    vault_path.write_bytes(data[:cut])

    with pytest.raises(
        VaultCorruptError, match="truncated or corrupt; open the newest"
    ):
        Vault.open(vault_path, credentials)

    newest = list_generations(vault_path)[0]
    with Vault.open(newest, credentials, read_only=True) as previous:
        assert "keep/one" in previous
        assert "keep/two" not in previous


@pytest.mark.parametrize("where", [0, 20, 120, -200, -40, -1])
def test_flipped_byte_detected(
    vault_path: Path, credentials: VaultCredentials, where: int
) -> None:
    _add_one(vault_path, credentials, "keep/one")
    data = bytearray(vault_path.read_bytes())
    data[where] ^= 0x01
    vault_path.write_bytes(bytes(data))

    with pytest.raises(VaultCorruptError, match="truncated or corrupt") as caught:
        Vault.open(vault_path, credentials)

    assert caught.value.path == vault_path
    newest = list_generations(vault_path)[0]
    with Vault.open(newest, credentials, read_only=True) as previous:
        assert previous.ids() == []
        assert previous.meta["schema"] == 1


def test_restore_generation_recovers_corrupt_vault(
    vault_path: Path, credentials: VaultCredentials
) -> None:
    _add_one(vault_path, credentials, "keep/one")
    _add_one(vault_path, credentials, "keep/two")
    corrupt = vault_path.read_bytes()[:-100]
    vault_path.write_bytes(corrupt)
    before = len(list_generations(vault_path))

    restored = restore_generation(vault_path, "1", credentials)

    with Vault.open(vault_path, credentials) as vault:
        assert "keep/one" in vault
        assert vault.audit_log.verify(vault.meta["audit_head"]) > 0
        assert vault.audit_log.entries()[-1]["operation"] == "restore-generation"
    kept = [g.path.read_bytes() for g in describe_generations(vault_path)]
    assert corrupt in kept
    assert restored.exists()
    assert len(list_generations(vault_path)) == before + 1


def test_restore_unknown_generation_rejected(
    vault_path: Path, credentials: VaultCredentials
) -> None:
    with pytest.raises(VaultError, match="no generation '99'"):
        restore_generation(vault_path, "99", credentials)


def test_generations_are_pruned(
    vault_path: Path, credentials: VaultCredentials
) -> None:
    for number in range(13):
        _add_one(vault_path, credentials, f"gen/{number}")

    assert len(list_generations(vault_path)) == 10


def test_sigkill_during_saves_leaves_openable_vault(
    vault_path: Path, credentials: VaultCredentials
) -> None:
    rng = random.Random(9)
    saved_before = 0
    for round_number in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(vault_path), f"r{round_number}", "200"],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(rng.uniform(0.3, 1.2))
        child.send_signal(signal.SIGKILL)
        output, _ = child.communicate()
        reported = len(output.split())

        with Vault.open(vault_path, credentials) as vault:
            ids = [i for i in vault.ids() if i.startswith(f"r{round_number}/")]
        # Every save the child reported is there; one more may have landed
        # between its rename and its print.
        assert reported <= len(ids) <= reported + 1
        assert sorted(ids, key=lambda i: int(i.split("/")[1])) == [
            f"r{round_number}/{n}" for n in range(len(ids))
        ]
        saved_before += len(ids)

    assert saved_before > 0
    assert not list(vault_path.parent.glob(".vault.kdbx.*.tmp"))


def test_two_processes_saving_lose_nothing(
    vault_path: Path, credentials: VaultCredentials
) -> None:
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(vault_path), prefix, "8"],
            stdout=subprocess.DEVNULL,
        )
        for prefix in ("first", "second")
    ]
    for writer in writers:
        assert writer.wait(timeout=300) == 0

    with Vault.open(vault_path, credentials) as vault:
        for prefix in ("first", "second"):
            for number in range(8):
                assert f"{prefix}/{number}" in vault
        assert vault.audit_log.verify(vault.meta["audit_head"]) >= 16


def test_failed_session_discards_changes_keeps_audit(
    vault_path: Path, credentials: VaultCredentials
) -> None:
    with pytest.raises(RecordError, match="already exists"):
        with Vault.open(vault_path, credentials) as vault:
            vault.add(_record("a/one"))
            vault.add(_record("a/one"))

    with Vault.open(vault_path, credentials) as vault:
        assert "a/one" not in vault
        assert vault.audit_log.verify(vault.meta["audit_head"]) >= 1


def test_same_title_in_two_groups_both_kept(
    vault_path: Path, credentials: VaultCredentials
) -> None:
    with Vault.open(vault_path, credentials) as vault:
        for instance in ("alpha", "beta"):
            vault.add(
                KeyRecord(
                    id=f"{instance}/luks-volume",
                    kind=KeyKind.LUKS_VOLUME,
                    purpose="volume key",
                    owner=f"instance:{instance}",
                ),
                b"k" * 64,
                title="LUKS volume key",
            )

    with Vault.open(vault_path, credentials) as vault:
        assert vault.get("alpha/luks-volume").owner == "instance:alpha"
        assert vault.get("beta/luks-volume").owner == "instance:beta"
        with pytest.raises(RecordError, match="ambiguous") as caught:
            vault.find_by_title("LUKS volume key")
        assert "alpha/luks-volume, beta/luks-volume" in str(caught.value)
        with pytest.raises(RecordNotFoundError, match="no key record"):
            vault.find_by_title("no such title")


QUOTED_TEXT = "O'Brien's \"primary\" key — ключ 鍵 <&> \\ ✓"


def test_quotes_and_non_ascii_round_trip(
    vault_path: Path, credentials: VaultCredentials
) -> None:
    record = _record(
        "users/o-brien",
        attributes={"label": QUOTED_TEXT, "it's": 'say "hi"'},
        locations=[QUOTED_TEXT],
    )
    record.purpose = QUOTED_TEXT
    with Vault.open(vault_path, credentials) as vault:
        vault.add(record, QUOTED_TEXT, title=QUOTED_TEXT)

    with Vault.open(vault_path, credentials) as vault:
        again = vault.get("users/o-brien")
        assert again.purpose == QUOTED_TEXT
        assert again.attributes == {"label": QUOTED_TEXT, "it's": 'say "hi"'}
        assert again.locations == [QUOTED_TEXT]
        assert vault.read_secret("users/o-brien", "test") == QUOTED_TEXT.encode()
        assert vault.find_by_title(QUOTED_TEXT).id == "users/o-brien"


def test_read_only_vault_rejects_changes(
    vault_path: Path, credentials: VaultCredentials
) -> None:
    before = vault_path.read_bytes()

    with Vault.open(vault_path, credentials, read_only=True) as vault:
        with pytest.raises(VaultReadOnlyError, match="open read-only"):
            vault.add(_record("a/b"))

    assert vault_path.read_bytes() == before


def test_rekey_with_new_kdf_changes_salt_and_settings(
    vault_path: Path, credentials: VaultCredentials
) -> None:
    new = VaultCredentials(bytes(range(1, 33)))
    stronger = KdfSettings(time_cost=2, memory_kib=16 * 1024, parallelism=2)
    with Vault.open(vault_path, credentials) as vault:
        vault.add(_record("a/b"), b"secret")
        salt = vault._kp.database_salt
        vault.rekey(new, kdf=stronger, detail="test")

    with pytest.raises(CredentialError):
        Vault.open(vault_path, credentials)
    with Vault.open(vault_path, new) as vault:
        assert vault._kp.database_salt != salt
        assert vault.kdf_description == "Argon2id, 2 iterations, 16 MiB, 2 lanes"
        assert vault.read_secret("a/b", "test") == b"secret"
    for generation in list_generations(vault_path):
        with pytest.raises(CredentialError):
            Vault.open(generation, credentials, read_only=True)


def test_stale_temporary_removed_on_open(
    vault_path: Path, credentials: VaultCredentials
) -> None:
    stale = vault_path.with_name(f".{vault_path.name}.999999.tmp")
    stale.write_bytes(b"half a save")

    Vault.open(vault_path, credentials).close()

    assert not stale.exists()


def test_kdf_tune_reaches_target() -> None:
    settings = KdfSettings.tune(0.2, memory_kib=16 * 1024)

    assert settings.time_cost >= 3
    assert 0.05 < settings.measure_seconds() < 0.8


def test_production_kdf_is_strong() -> None:
    settings = KdfSettings.production()

    assert settings.memory_kib >= 256 * 1024
    assert settings.time_cost >= 3


def test_vault_files_are_private(
    vault_path: Path, credentials: VaultCredentials
) -> None:
    _add_one(vault_path, credentials, "a/b")

    generations = vault_path.parent / f"{vault_path.stem}-generations"
    assert vault_path.stat().st_mode & 0o077 == 0
    assert generations.stat().st_mode & 0o077 == 0


def test_locked_vault_raises_after_timeout(
    vault_path: Path, credentials: VaultCredentials
) -> None:
    with Vault.open(vault_path, credentials):
        with pytest.raises(VaultLockedError, match="locked by another trekeys"):
            Vault.open(vault_path, credentials, lock_timeout=0.2)


@pytest.mark.parametrize(
    ("edited", "expected"),
    [("{not json", "is not valid JSON"), ('{"id": "other/key"}', "does not describe")],
)
def test_record_edited_outside_trekeys_rejected(
    vault_path: Path, credentials: VaultCredentials, edited: str, expected: str
) -> None:
    with Vault.open(vault_path, credentials) as vault:
        vault.add(_record("a/b"), b"secret")
        vault._entries["a/b"].set_custom_property("trekeys.record", edited)
        vault._records.clear()

    with Vault.open(vault_path, credentials, read_only=True) as vault:
        with pytest.raises(RecordError, match=expected):
            vault.get("a/b")
        assert "a/b" in vault.ids()


def test_restore_with_wrong_credentials_changes_nothing(
    vault_path: Path, credentials: VaultCredentials
) -> None:
    _add_one(vault_path, credentials, "keep/one")
    before = vault_path.read_bytes()
    generations = list_generations(vault_path)

    with pytest.raises(CredentialError, match="do not open vault"):
        restore_generation(vault_path, "1", VaultCredentials(bytes(32)))

    assert vault_path.read_bytes() == before
    assert list_generations(vault_path) == generations

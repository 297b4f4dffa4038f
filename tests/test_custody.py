"""Custody shares: splitting, combining, every bad share, and re-splitting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trekeys.custody import (
    Custodian,
    check_each_share,
    combine_shares,
    generate_master_secret,
    master_fingerprint,
    read_share_file,
    split_master_secret,
    write_share_file,
)
from trekeys.errors import CredentialError, ShareError
from trekeys.lab import VAULT_MASTER_ID, Lab, create_lab
from trekeys.records import KeyState
from trekeys.resplit import lab_custodians, resplit_and_prove, resplit_lab_custody
from trekeys.vault import list_generations

ROLES = [
    Custodian("TRE System Administrator", "Sam"),
    Custodian("Information Security Manager", "Isla"),
    Custodian("Operations Manager", "Omar"),
]


def _flip_word(mnemonic: str, index: int) -> str:
    words = mnemonic.split()
    words[index] = "academic" if words[index] != "academic" else "acid"
    return " ".join(words)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def test_two_of_three_rebuilds_master_from_any_pair() -> None:
    master = generate_master_secret()
    shares = list(split_master_secret(master, ROLES, 2).shares.values())

    for pair in ([0, 1], [0, 2], [1, 2]):
        assert combine_shares(shares[i] for i in pair) == master


def test_one_of_two_opens_with_either_share() -> None:
    master = generate_master_secret()
    shares = list(split_master_secret(master, ROLES[:2], 1).shares.values())

    assert combine_shares([shares[0]]) == master
    assert combine_shares([shares[1]]) == master
    assert combine_shares(shares) == master


def test_threshold_above_custodians_rejected() -> None:
    with pytest.raises(ShareError, match="threshold of 4 is invalid for 3"):
        split_master_secret(generate_master_secret(), ROLES, 4)


def test_too_few_shares_rejected() -> None:
    shares = list(
        split_master_secret(generate_master_secret(), ROLES, 2).shares.values()
    )

    with pytest.raises(ShareError, match="too few custody shares"):
        combine_shares(shares[:1])


def test_bad_checksum_rejected() -> None:
    shares = list(
        split_master_secret(generate_master_secret(), ROLES, 2).shares.values()
    )

    with pytest.raises(ShareError, match="bad checksum"):
        combine_shares([shares[0], _flip_word(shares[1], 6)])


def test_shares_from_two_splits_rejected() -> None:
    first = list(
        split_master_secret(generate_master_secret(), ROLES, 2).shares.values()
    )
    second = list(
        split_master_secret(generate_master_secret(), ROLES, 2).shares.values()
    )

    with pytest.raises(ShareError, match="different splits"):
        combine_shares([first[0], second[1]])


def test_no_shares_rejected() -> None:
    with pytest.raises(ShareError, match="no custody shares"):
        combine_shares([])


def test_share_file_round_trip_and_mode(tmp_path: Path) -> None:
    split = split_master_secret(generate_master_secret(), ROLES, 2)
    path = tmp_path / "isla.share"

    write_share_file(path, ROLES[1], split.shares[ROLES[1]])

    assert read_share_file(path) == split.shares[ROLES[1]]
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        write_share_file(path, ROLES[1], split.shares[ROLES[1]])


def test_missing_share_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ShareError, match="missing; ask its custodian"):
        read_share_file(tmp_path / "gone.share")


def test_check_each_share_finds_one_bad_share(tmp_path: Path) -> None:
    master = generate_master_secret()
    split = split_master_secret(master, ROLES, 2)
    other = split_master_secret(generate_master_secret(), ROLES, 2)
    files = []
    for custodian, mnemonic in split.shares.items():
        if custodian is ROLES[2]:
            mnemonic = other.shares[custodian]
        path = tmp_path / f"{custodian.slug}.share"
        write_share_file(path, custodian, mnemonic)
        files.append(path)

    rows = check_each_share(files, 2, master_fingerprint(master))

    assert [row["valid"] for row in rows] == [True, True, False]
    assert "another split" in rows[2]["detail"]


def test_bad_share_does_not_open_lab(bare_lab: Lab) -> None:
    files = bare_lab.share_files()
    broken = bare_lab.root / "broken.share"
    broken.write_text(_flip_word(read_share_file(files[0]), 3) + "\n")
    before = _snapshot(bare_lab.root / "portable-device")

    with pytest.raises(ShareError, match="bad checksum"):
        bare_lab.open_vault([broken, files[1]])

    assert _snapshot(bare_lab.root / "portable-device") == before


def test_wrong_share_of_right_shape_rejected(bare_lab: Lab, tmp_path: Path) -> None:
    # Shares of a same-sized split of another secret: the checksum passes but
    # the vault does not open, and the message does not say which part failed.
    other = split_master_secret(generate_master_secret(), ROLES, 2)
    paths = []
    for custodian, mnemonic in list(other.shares.items())[:2]:
        path = tmp_path / f"{custodian.slug}.share"
        write_share_file(path, custodian, mnemonic)
        paths.append(path)

    with pytest.raises(CredentialError, match="do not open vault") as caught:
        bare_lab.open_vault(paths)

    assert "share" in str(caught.value)
    assert bare_lab.open_vault().ids() == [VAULT_MASTER_ID]


def test_resplit_makes_old_shares_useless(bare_lab: Lab, tmp_path: Path) -> None:
    old_copies = []
    for path in bare_lab.share_files():
        copy = tmp_path / path.name
        copy.write_bytes(path.read_bytes())
        old_copies.append(copy)
    with bare_lab.open_vault() as vault:
        old_split = vault.meta["custody"]["split"]
        old_salt = vault._kp.database_salt

        result = resplit_lab_custody(bare_lab, vault, reason="test re-split")

    assert result.old_split == old_split
    assert result.new_split != old_split
    with pytest.raises(CredentialError, match="do not open vault"):
        bare_lab.open_vault(old_copies[:2])
    for generation in list_generations(bare_lab.vault_path):
        assert generation.read_bytes() == bare_lab.vault_path.read_bytes()

    with bare_lab.open_vault() as vault:
        assert vault._kp.database_salt != old_salt
        assert vault.meta["custody"]["split"] == result.new_split
        assert vault.meta["custody"]["history"][0]["split"] == old_split
        master = vault.get(VAULT_MASTER_ID)
        assert master.attributes["split"] == result.new_split
        assert master.attributes["previous_split"] == old_split
        history = vault._entries[VAULT_MASTER_ID].history
        assert len(history) == 1
        assert old_split in history[0].get_custom_property("trekeys.record")
        tombstone = vault.get(result.tombstone_id)
        assert tombstone.state is KeyState.DESTROYED
        assert vault.audit_log.verify(vault.meta["audit_head"]) > 0
        operations = [e["operation"] for e in vault.audit_log.entries()]
        assert "resplit-custody" in operations
        assert "rekey-vault" in operations
        rows = bare_lab.check_each_share(vault)
    assert [row["valid"] for row in rows] == [True, True, True]
    assert not list(bare_lab.custodians_dir.glob(".resplit-*"))


def test_resplit_custodian_leaves(bare_lab: Lab) -> None:
    remaining = lab_custodians(bare_lab)[:2]
    leaving = bare_lab.custodians_dir / "operations-manager.share"

    with bare_lab.open_vault() as vault:
        result = resplit_lab_custody(
            bare_lab, vault, custodians=remaining, threshold=1, reason="Omar left"
        )

    assert result.removed_share_files == [leaving]
    assert not leaving.exists()
    reloaded = Lab.load(bare_lab.root)
    assert reloaded.threshold == 1
    assert [c.role for c in lab_custodians(reloaded)] == [c.role for c in remaining]
    for path in reloaded.share_files():
        with reloaded.open_vault([path]) as vault:
            assert VAULT_MASTER_ID in vault


def test_resplit_failure_leaves_vault_and_shares(bare_lab: Lab) -> None:
    before_vault = bare_lab.vault_path.read_bytes()
    before_shares = _snapshot(bare_lab.custodians_dir)

    with pytest.raises(ShareError, match="threshold of 5"):
        with bare_lab.open_vault() as vault:
            resplit_lab_custody(bare_lab, vault, threshold=5, reason="bad")

    assert _snapshot(bare_lab.custodians_dir) == before_shares
    with bare_lab.open_vault(read_only=True) as vault:
        assert vault.ids() == [VAULT_MASTER_ID]
    assert bare_lab.vault_path.read_bytes() == before_vault


def test_lab_with_one_of_two_custody(tmp_path: Path) -> None:
    lab = create_lab(tmp_path / "lab", steps=[], threshold=1, custodians=ROLES[:2])

    for path in lab.share_files():
        with lab.open_vault([path]) as vault:
            assert vault.get(VAULT_MASTER_ID).attributes["threshold"] == "1"


def test_resplit_and_prove_on_lab(bare_lab: Lab) -> None:
    with bare_lab.open_vault() as vault:
        first = resplit_and_prove(bare_lab, vault, reason="drill")
    with bare_lab.open_vault() as vault:
        second = resplit_and_prove(bare_lab, vault, reason="drill again")

    for proof in (first, second):
        assert proof.old_shares_rejected
        assert proof.generations_reject_old_shares
        assert proof.new_shares_open
        assert [row["valid"] for row in proof.share_checks] == [True, True, True]
    assert second.result.old_split == first.result.new_split


def test_resplit_failed_save_keeps_old_shares(
    bare_lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection: the rename that would publish the re-keyed vault fails,
    # as on a full or failing device.
    before_vault = bare_lab.vault_path.read_bytes()
    before_shares = _snapshot(bare_lab.custodians_dir)
    real_replace = os.replace

    def failing_replace(source, target) -> None:
        if Path(target) == bare_lab.vault_path:
            raise OSError(28, "No space left on device")
        real_replace(source, target)

    monkeypatch.setattr("trekeys.vault.os.replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        with bare_lab.open_vault() as vault:
            resplit_lab_custody(bare_lab, vault, reason="device full")
    monkeypatch.undo()

    assert _snapshot(bare_lab.custodians_dir) == before_shares
    assert bare_lab.vault_path.read_bytes() == before_vault
    with bare_lab.open_vault(read_only=True) as vault:
        assert vault.ids() == [VAULT_MASTER_ID]

"""The vault refuses to hide audit gaps and forgets destroyed keys everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from trekeys.audit import Actor, AuditLog, make_entry
from trekeys.errors import AuditError, CredentialError, ShareError
from trekeys.lab import Lab
from trekeys.records import KeyKind, KeyRecord, KeyState
from trekeys.vault import list_generations

SECRET = b"destroy-me-0123456789abcdef-material"


def add_scratch_key(lab: Lab) -> None:
    with lab.open_vault() as vault:
        vault.add(
            KeyRecord(id="scratch/mac", kind=KeyKind.MAC, purpose="test", owner="tre"),
            SECRET,
        )


def test_deleted_audit_log_blocks_next_change(bare_lab: Lab) -> None:
    add_scratch_key(bare_lab)
    log = AuditLog(bare_lab.vault_path.with_name("vault-audit.jsonl"))
    log.path.unlink()
    before = bare_lab.vault_path.read_bytes()

    with pytest.raises(AuditError, match="deleted, truncated or replaced"):
        with bare_lab.open_vault() as vault:
            vault.transition("scratch/mac", KeyState.ACTIVE, "go")

    assert bare_lab.vault_path.read_bytes() == before


def test_truncated_audit_log_blocks_next_change(bare_lab: Lab) -> None:
    add_scratch_key(bare_lab)
    log = AuditLog(bare_lab.vault_path.with_name("vault-audit.jsonl"))
    lines = log.path.read_text().splitlines(keepends=True)
    log.path.write_text("".join(lines[:-1]))

    with pytest.raises(AuditError, match="does not contain the last entry"):
        with bare_lab.open_vault() as vault:
            vault.transition("scratch/mac", KeyState.ACTIVE, "go")

    with bare_lab.open_vault() as vault:
        assert vault.get("scratch/mac").state is KeyState.PRE_ACTIVATION


def test_unsaved_entries_are_noted_in_log(bare_lab: Lab) -> None:
    add_scratch_key(bare_lab)
    log = AuditLog(bare_lab.vault_path.with_name("vault-audit.jsonl"))
    sequence, previous = log.tail()
    actor = Actor("TRE System Administrators", "crashed session")
    log.append([make_entry(previous, sequence + 1, actor, "create", "x", "success")])

    with bare_lab.open_vault() as vault:
        vault.transition("scratch/mac", KeyState.ACTIVE, "go")

    with bare_lab.open_vault() as vault:
        count = vault.audit_log.verify(vault.meta["audit_head"])
        operations = [e["operation"] for e in vault.audit_log.entries()]
    assert count == len(operations)
    assert "unsaved-entries" in operations
    note = operations.index("unsaved-entries")
    assert operations[note - 1] == "create"


def test_destroy_removes_material_from_generations(bare_lab: Lab) -> None:
    add_scratch_key(bare_lab)
    with bare_lab.open_vault() as vault:
        vault.transition("scratch/mac", KeyState.ACTIVE, "go")
    assert list_generations(bare_lab.vault_path)

    with bare_lab.open_vault() as vault:
        vault.transition("scratch/mac", KeyState.DEACTIVATED, "retired")
        vault.destroy("scratch/mac", "end of cryptoperiod")

    assert list_generations(bare_lab.vault_path) == []
    with bare_lab.open_vault() as vault:
        assert vault.get("scratch/mac").state is KeyState.DESTROYED
        assert "scratch/mac" in vault


def test_saved_vault_file_is_private(bare_lab: Lab) -> None:
    add_scratch_key(bare_lab)
    files = [bare_lab.vault_path, *list_generations(bare_lab.vault_path)]
    modes = {Path(f).name: Path(f).stat().st_mode & 0o777 for f in files}
    assert all(mode == 0o600 for mode in modes.values()), modes


def test_share_file_that_is_folder_raises(bare_lab: Lab) -> None:
    folder = bare_lab.root / "folder.share"
    folder.mkdir()

    with pytest.raises(ShareError, match="cannot be read as text"):
        bare_lab.open_vault([folder, bare_lab.share_files()[0]])


def test_binary_share_file_raises(bare_lab: Lab) -> None:
    binary = bare_lab.root / "binary.share"
    binary.write_bytes(bytes(range(256)))

    with pytest.raises(ShareError, match="cannot be read as text"):
        bare_lab.open_vault([binary, bare_lab.share_files()[0]])


def test_bad_checksum_names_share_file(bare_lab: Lab) -> None:
    good = bare_lab.share_files()[0]
    broken = bare_lab.root / "broken.share"
    words = good.read_text().splitlines()[-1].split()
    words[5] = "academic" if words[5] != "academic" else "acid"
    broken.write_text(" ".join(words) + "\n")

    with pytest.raises(ShareError, match="broken.share has a bad checksum"):
        bare_lab.open_vault([broken, bare_lab.share_files()[1]])


@pytest.mark.parametrize("damage", ["folder", "binary"])
def test_unreadable_audit_log_raises(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "audit.jsonl"
    if damage == "folder":
        path.mkdir()
    else:
        path.write_bytes(b"\xff\xfe\x00garbage\n")

    with pytest.raises(AuditError, match="audit log"):
        AuditLog(path).verify()


def test_unfinished_resplit_names_staged_shares(bare_lab: Lab) -> None:
    staged = bare_lab.custodians_dir / ".resplit-abcd"
    staged.mkdir()
    wrong = bare_lab.root / "wrong.share"
    other = bare_lab.root / "other.share"
    from trekeys.custody import Custodian, generate_master_secret, split_master_secret

    split = split_master_secret(
        generate_master_secret(), [Custodian("a", "a"), Custodian("b", "b")], 2
    )
    words = list(split.shares.values())
    wrong.write_text(words[0] + "\n")
    other.write_text(words[1] + "\n")

    with pytest.raises(
        CredentialError, match=r"re-split did not finish.*\.resplit-abcd"
    ):
        bare_lab.open_vault([wrong, other])

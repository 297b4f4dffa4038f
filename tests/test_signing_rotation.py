"""Rotating the report-signing key keeps earlier runs verifiable, or not."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from test_drills import write_notebook

from trekeys.cli import main
from trekeys.drills import run_drills
from trekeys.errors import IntegrityError, PolicyError
from trekeys.lab import VAULT_MASTER_ID, Lab
from trekeys.records import KeyState
from trekeys.signing import SIGNING_KEY_ID, rotate_key, signer_of_run


def signed_run(lab: Lab, tmp_path: Path, name: str) -> Path:
    books = tmp_path / f"books-{name}"
    write_notebook(books, "10-ok", "x = 1")
    run = run_drills(lab.root, tmp_path / "reports", notebooks_folder=books)
    return run.folder


def verify(lab: Lab, folder: Path):
    return CliRunner().invoke(
        main, ["report", "verify", str(folder), "--lab", str(lab.root)]
    )


def test_run_signed_before_rotation_still_verifies(bare_lab: Lab, tmp_path: Path):
    before = signed_run(bare_lab, tmp_path, "before")
    with bare_lab.open_vault() as vault:
        old_fingerprint = vault.get(SIGNING_KEY_ID).fingerprint
        rotate_key(bare_lab, vault, SIGNING_KEY_ID, reason="due", compromised=False)
    after = signed_run(bare_lab, tmp_path, "after")

    with bare_lab.open_vault() as vault:
        current = vault.get(SIGNING_KEY_ID)
        retired = vault.get(f"{SIGNING_KEY_ID}/retired-1")
        assert signer_of_run(vault, before.name).id == retired.id
        assert signer_of_run(vault, after.name).id == SIGNING_KEY_ID
    assert current.fingerprint != old_fingerprint
    assert retired.fingerprint == old_fingerprint
    assert retired.state is KeyState.DEACTIVATED
    assert verify(bare_lab, before).exit_code == 0
    assert verify(bare_lab, after).exit_code == 0


def test_run_signed_by_compromised_key_fails(bare_lab: Lab, tmp_path: Path):
    before = signed_run(bare_lab, tmp_path, "before")
    with bare_lab.open_vault() as vault:
        rotate_key(bare_lab, vault, SIGNING_KEY_ID, reason="leak", compromised=True)

    result = verify(bare_lab, before)

    assert result.exit_code == 1
    assert "marked compromised" in result.output
    with bare_lab.open_vault() as vault, pytest.raises(IntegrityError):
        signer_of_run(vault, before.name)


def test_rotate_rejects_other_kinds(bare_lab: Lab):
    with bare_lab.open_vault() as vault, pytest.raises(PolicyError, match="not an"):
        rotate_key(bare_lab, vault, VAULT_MASTER_ID, reason="x", compromised=False)

"""Recovery proofs: written to the key record only by a passing drill's report."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import nbformat
import pytest

from trekeys.destruction import create_scratch_key
from trekeys.drills import run_drills
from trekeys.errors import RecordError
from trekeys.inventory import build_inventory
from trekeys.lab import Lab
from trekeys.records import KeyState, utcnow
from trekeys.runbook import (
    PROOF_ATTRIBUTE,
    PROOF_REPORT_ATTRIBUTE,
    record_recovery_proof,
)
from trekeys.signing import SIGNING_KEY_ID, ensure_signing_key

PROVE = (
    "from trekeys import runbook\n"
    "lab = runbook.load_lab(lab_dir)\n"
    "with runbook.open_vault(lab) as vault:\n"
    f"    print(runbook.record_recovery_proof(vault, '{SIGNING_KEY_ID}', 'test'))"
)


def write_notebook(folder: Path, name: str, *sources: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    parameters = nbformat.v4.new_code_cell('lab_dir = "lab"')
    parameters.metadata["tags"] = ["parameters"]
    cells = [parameters, *[nbformat.v4.new_code_cell(s) for s in sources]]
    notebook = nbformat.v4.new_notebook(cells=cells)
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(notebook, folder / f"{name}.ipynb")


@pytest.fixture
def proving_lab(bare_lab: Lab) -> Lab:
    """A bare lab whose report-signing key was last proven 400 days ago."""
    with bare_lab.open_vault() as vault:
        record = ensure_signing_key(vault)
        old = (utcnow() - timedelta(days=400)).isoformat()
        record.attributes[PROOF_ATTRIBUTE] = old
        record.attributes[PROOF_REPORT_ATTRIBUTE] = "an old report"
        vault.update(record)
    return bare_lab


def signing_record(lab: Lab):
    with lab.open_vault(read_only=True) as vault:
        return vault.get(SIGNING_KEY_ID), build_inventory(vault)


def test_passing_drill_records_proof(proving_lab: Lab, tmp_path: Path):
    books = tmp_path / "books"
    write_notebook(books, "10-prove", PROVE)

    run = run_drills(proving_lab.root, tmp_path / "reports", notebooks_folder=books)

    assert run.passed, run.drills[0].error
    record, inventory = signing_record(proving_lab)
    report = f"{run.folder.name}/prove.ipynb"
    assert record.attributes[PROOF_REPORT_ATTRIBUTE] == report
    assert record.attributes[PROOF_ATTRIBUTE] >= run.started
    row = next(r for r in inventory if r.id == SIGNING_KEY_ID)
    assert "recovery-proof-overdue" not in row.flags
    assert run.drills[0].recovery_proofs[0]["recorded"] is True


def test_failing_drill_records_no_proof(proving_lab: Lab, tmp_path: Path):
    books = tmp_path / "books"
    write_notebook(books, "10-prove", PROVE, "raise RuntimeError('later step broke')")

    run = run_drills(proving_lab.root, tmp_path / "reports", notebooks_folder=books)

    assert not run.passed
    record, inventory = signing_record(proving_lab)
    assert record.attributes[PROOF_REPORT_ATTRIBUTE] == "an old report"
    row = next(r for r in inventory if r.id == SIGNING_KEY_ID)
    assert "recovery-proof-overdue" in row.flags
    proof = run.drills[0].recovery_proofs[0]
    assert proof["recorded"] is False
    assert "did not pass" in proof["note"]


def test_interactive_proof_written_at_once(proving_lab: Lab, monkeypatch):
    monkeypatch.delenv("TREKEYS_PROOFS_FILE", raising=False)
    with proving_lab.open_vault() as vault:
        message = record_recovery_proof(vault, SIGNING_KEY_ID, "by hand")
    record, _ = signing_record(proving_lab)
    assert "recorded: interactive run by" in message
    assert record.attributes[PROOF_REPORT_ATTRIBUTE].startswith("interactive run by")


def test_proof_of_destroyed_key_rejected(proving_lab: Lab):
    with proving_lab.open_vault() as vault:
        scratch = create_scratch_key(vault)
        vault.transition(scratch.id, KeyState.DEACTIVATED, "end")
        vault.destroy(scratch.id, "test")
    with proving_lab.open_vault() as vault:
        with pytest.raises(RecordError, match="cannot be proven recoverable"):
            record_recovery_proof(vault, scratch.id)

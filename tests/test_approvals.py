"""Pinned runbooks: approvals by hash and commit, and drift flagged in reports."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nbformat
import pytest
from click.testing import CliRunner

from trekeys.approvals import (
    APPROVED,
    CHANGED,
    NOT_APPROVED,
    approve_runbooks,
    pin_runbooks,
)
from trekeys.cli import main
from trekeys.drills import discover_notebooks, run_drills
from trekeys.errors import DrillError
from trekeys.lab import Lab


def git(folder: Path, *arguments: str) -> str:
    return subprocess.run(
        ["git", "-C", str(folder), *arguments],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with one committed runbook in notebooks/."""
    root = tmp_path / "repo"
    books = root / "notebooks"
    books.mkdir(parents=True)
    parameters = nbformat.v4.new_code_cell('lab_dir = "lab"')
    parameters.metadata["tags"] = ["parameters"]
    notebook = nbformat.v4.new_notebook(
        cells=[parameters, nbformat.v4.new_code_cell("steps = 2")]
    )
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(notebook, books / "10-tiny.ipynb")
    git(root, "init", "-q")
    git(root, "config", "user.email", "ism@tre.example")
    git(root, "config", "user.name", "Isla Manager")
    git(root, "add", ".")
    git(root, "commit", "-qm", "Add the tiny runbook")
    return books


def edit_runbook(books: Path) -> None:
    path = books / "10-tiny.ipynb"
    notebook = nbformat.read(path, as_version=4)
    notebook.cells[1].source = "steps = 3  # edited after approval"
    nbformat.write(notebook, path)


def test_approval_pins_hash_and_commit(repo: Path):
    rows = approve_runbooks(discover_notebooks(repo), "Isla Manager", "ISM")

    head = git(repo, "rev-parse", "HEAD").strip()
    stored = json.loads((repo / "approvals.json").read_text())["runbooks"]
    assert rows[0]["git_commit"] == head
    assert stored["10-tiny.ipynb"]["git_commit"] == head
    assert stored["10-tiny.ipynb"]["approved_by"] == "Isla Manager"
    assert pin_runbooks(discover_notebooks(repo))["tiny"].status == APPROVED


def test_unapproved_runbook_flagged(repo: Path):
    pin = pin_runbooks(discover_notebooks(repo))["tiny"]
    assert pin.status == NOT_APPROVED
    assert pin.git_commit == git(repo, "rev-parse", "HEAD").strip()


def test_changed_runbook_flagged_in_report(repo: Path, bare_lab: Lab, tmp_path: Path):
    approve_runbooks(discover_notebooks(repo), "Isla Manager", "ISM")
    edit_runbook(repo)

    run = run_drills(bare_lab.root, tmp_path / "reports", notebooks_folder=repo)

    pin = run.drills[0].runbook
    assert pin["status"] == CHANGED
    assert pin["uncommitted"] is True
    assert "-steps = 2" in pin["changes"]
    assert "+steps = 3  # edited after approval" in pin["changes"]
    evidence = nbformat.read(run.folder / "tiny.ipynb", as_version=4).cells[0].source
    assert "**CHANGED SINCE APPROVAL" in evidence
    assert "+steps = 3" in evidence
    summary = json.loads((run.folder / "summary.json").read_text())
    assert summary["drills"][0]["runbook"]["status"] == CHANGED


def test_require_approved_rejects_changed(repo: Path, bare_lab: Lab, tmp_path: Path):
    approve_runbooks(discover_notebooks(repo), "Isla Manager", "ISM")
    edit_runbook(repo)
    out = tmp_path / "reports"

    with pytest.raises(DrillError, match=r"10-tiny.ipynb \(changed since approval\)"):
        run_drills(bare_lab.root, out, notebooks_folder=repo, require_approved=True)
    assert not out.exists()


def test_require_approved_passes_approved(repo: Path, bare_lab: Lab, tmp_path: Path):
    approve_runbooks(discover_notebooks(repo), "Isla Manager", "ISM")
    run = run_drills(
        bare_lab.root,
        tmp_path / "reports",
        notebooks_folder=repo,
        require_approved=True,
    )
    assert run.passed
    assert run.drills[0].runbook["status"] == APPROVED


def test_approve_rejects_uncommitted_runbook(repo: Path):
    edit_runbook(repo)
    with pytest.raises(DrillError, match="has changes not committed to git"):
        approve_runbooks(discover_notebooks(repo), "Isla Manager", "ISM")
    assert not (repo / "approvals.json").exists()


def test_approve_rejects_empty_name(repo: Path):
    with pytest.raises(DrillError, match="approver's name is empty"):
        approve_runbooks(discover_notebooks(repo), " ", "ISM")


def test_cli_runbook_approve_and_status(repo: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TREKEYS_NOTEBOOKS", str(repo))
    cli = CliRunner()

    before = cli.invoke(main, ["runbook", "status"])
    approved = cli.invoke(main, ["runbook", "approve", "tiny", "--by", "Isla"])
    after = cli.invoke(main, ["runbook", "status"])

    assert before.output.startswith("not approved")
    assert approved.exit_code == 0, approved.output
    assert after.output.startswith("approved")

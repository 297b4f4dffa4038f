"""Every runbook in notebooks/: committed clean, and passing on a fresh demo TRE."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from click.testing import CliRunner

from trekeys.cli import main
from trekeys.drills import PASSED, discover_notebooks, run_drills
from trekeys.lab import Lab
from trekeys.notebooklint import find_notebook_problems
from trekeys.vault import audit_log_path

NOTEBOOKS = discover_notebooks()


def test_notebooks_found():
    assert "vault-health" in NOTEBOOKS
    assert "key-destruction" in NOTEBOOKS


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_follows_rules(name: str):
    assert find_notebook_problems(NOTEBOOKS[name]) == []


@pytest.mark.parametrize(
    ("source", "tags", "problem"),
    [
        ("!ls /", [], "uses a shell escape"),
        ("%%bash\nls /", [], "uses a shell escape"),
        ("files = !ls", [], "uses a shell escape"),
        ("lab_dir = 'lab'", [], "0 cells are tagged 'parameters'"),
        ("other = 1", ["parameters"], "does not declare lab_dir"),
    ],
)
def test_notebook_rules_catch_problems(
    tmp_path: Path, source: str, tags: list[str], problem: str
):
    header = nbformat.v4.new_markdown_cell("# A runbook")
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = tags
    end = nbformat.v4.new_code_cell("checks.show_summary()")
    path = tmp_path / "10-bad.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[header, cell, end]), path)

    problems = find_notebook_problems(path)

    assert any(problem in p for p in problems), problems


def test_notebook_rules_catch_outputs(tmp_path: Path):
    source = NOTEBOOKS["vault-health"]
    notebook = nbformat.read(source, as_version=4)
    code = next(c for c in notebook.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", text="left over\n")]
    code.execution_count = 1
    path = tmp_path / "10-vault-health.ipynb"
    nbformat.write(notebook, path)

    assert any("has outputs" in p for p in find_notebook_problems(path))


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_passes_twice_on_demo_tre(name: str, full_lab: Lab, tmp_path: Path):
    out = tmp_path / "reports"
    for attempt in ("first", "second"):
        run = run_drills(full_lab.root, out, names=[name])
        drill = run.drills[0]
        assert drill.outcome == PASSED, f"{attempt} run: {drill.error}"
        assert drill.checks, f"{attempt} run recorded no checks"
        assert run.passed, f"{attempt} run: {run.errors}"


def test_edited_audit_log_fails_vault_health(full_lab: Lab, tmp_path: Path):
    log = audit_log_path(full_lab.vault_path)
    lines = log.read_text().splitlines(keepends=True)
    entry = json.loads(lines[1])
    entry["detail"] = "edited after the fact"
    lines[1] = json.dumps(entry, sort_keys=True) + "\n"
    log.write_text("".join(lines))
    out = tmp_path / "reports"

    result = CliRunner().invoke(
        main, ["drill", "vault-health", "--lab", str(full_lab.root), "--out", str(out)]
    )

    assert result.exit_code == 1
    assert "failed      vault-health" in result.output
    folder = next(p for p in out.iterdir() if p.is_dir())
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["passed"] is False
    assert summary["drills"][0]["outcome"] == "failed"
    assert "line 2 was edited" in summary["drills"][0]["error"]
    notebook = nbformat.read(folder / "vault-health.ipynb", as_version=4)
    failing = [
        c
        for c in notebook.cells
        if any(o.get("ename") == "AuditError" for o in c.get("outputs", []))
    ]
    assert len(failing) == 1
    assert "audit_log.verify" in failing[0].source
    assert "line 2 was edited" in (folder / "vault-health.html").read_text()

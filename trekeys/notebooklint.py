"""Rules every runbook notebook in the repository must follow.

A runbook is committed with its outputs stripped (outputs are evidence of one
run and belong in reports, not in git), has a cell tagged ``parameters`` that
declares ``lab_dir``, and runs no shell escapes: ``!cmd`` and ``%%bash``
ignore a failing command, so a drill could pass while a step failed.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat

_SHELL_ESCAPE = re.compile(
    r"^\s*(?:[A-Za-z_][\w, ]*=\s*)?(?:!|%%?(?:bash|sh|script|system|sx)\b)", re.M
)


def find_notebook_problems(path: Path) -> list[str]:
    """Return every rule that the notebook at `path` breaks, one line each."""
    notebook = nbformat.read(path, as_version=4)
    problems = []

    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        if cell.get("outputs") or cell.get("execution_count") is not None:
            problems.append(f"cell {index} has outputs; strip them before committing")
        if _SHELL_ESCAPE.search(cell.source):
            problems.append(
                f"cell {index} uses a shell escape; call a trekeys function instead"
            )

    tagged = [
        cell
        for cell in notebook.cells
        if "parameters" in cell.get("metadata", {}).get("tags", [])
    ]
    if len(tagged) != 1:
        problems.append(f"{len(tagged)} cells are tagged 'parameters'; tag exactly one")
    elif not re.search(r"^lab_dir\s*=", tagged[0].source, re.M):
        problems.append("the parameters cell does not declare lab_dir")

    first = notebook.cells[0] if notebook.cells else None
    if (
        first is None
        or first.cell_type != "markdown"
        or not first.source.startswith("# ")
    ):
        problems.append("the first cell is not a markdown header with a '# ' title")
    if "show_summary()" not in "".join(c.source for c in notebook.cells[-2:]):
        problems.append("the notebook does not end with checks.show_summary()")
    return problems

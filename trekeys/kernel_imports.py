"""The modules a runbook's kernel imports, found by reading the code.

Kernels start with these modules imported, so that a drill does not pay for
its imports while it runs. The list has the modules a runbook's code cells
import, and, for each trekeys module among them, every module that module
imports, also inside functions, since trekeys imports some heavy modules
only where they are used.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import nbformat

logger = logging.getLogger(__name__)

PACKAGE = "trekeys"


def runbook_imports(path: Path) -> list[str]:
    """Return the modules a runbook imports, with the imports of its trekeys modules.

    For ``from trekeys import luks`` both ``trekeys`` and ``trekeys.luks``
    are listed, because the name may be a module. Importing a listed name
    that is not a module fails, so callers import each name on its own and
    skip the failures.
    """
    notebook = nbformat.read(path, as_version=4)
    found: dict[str, None] = {}
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        try:
            tree = ast.parse(cell.source)
        except SyntaxError:
            continue  # IPython syntax; the runbook's own run reports it
        found.update(dict.fromkeys(_imported_names(tree)))
    return _with_package_imports(found)


def _with_package_imports(modules: Iterable[str]) -> list[str]:
    found = dict.fromkeys(modules)
    pending = [name for name in found if _in_package(name)]
    while pending:
        for name in _module_imports(pending.pop()):
            if name not in found:
                found[name] = None
                if _in_package(name):
                    pending.append(name)
    return list(found)


@cache
def _module_imports(name: str) -> tuple[str, ...]:
    """Return every name a trekeys module imports, or nothing for a non-module."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return ()
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return ()
    try:
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError) as exc:
        logger.debug("could not read the imports of %s: %s", name, exc)
        return ()
    return tuple(_imported_names(tree, nested=True))


def _imported_names(tree: ast.AST, nested: bool = False) -> list[str]:
    nodes = ast.walk(tree) if nested else iter(getattr(tree, "body", []))
    names: list[str] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _in_package(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")

"""The trekeys modules a runbook's kernel imports, found by reading the code.

Kernels start with these modules imported, so that a drill does not pay for
its imports while it runs. The list has the trekeys modules a runbook's code
cells import and every module that those import, also inside functions,
since trekeys imports some heavy modules only where they are used.

Other modules a runbook imports are left out: the fork server imports the
list into one process for every drill of a run, so it holds only modules
whose import trekeys controls. A runbook's own module could print, start a
thread or change the process (its umask, sys.path), and the next drills
would inherit that.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

import nbformat

logger = logging.getLogger(__name__)

PACKAGE = "trekeys"


def runbook_imports(path: Path) -> list[str]:
    """Return the trekeys modules a runbook imports and the modules they import.

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
        names = _imported_names(tree)
        found.update(dict.fromkeys(n for n in names if _in_package(n)))
    return _with_package_imports(found)


def _with_package_imports(modules: Iterable[str]) -> list[str]:
    found = dict.fromkeys(modules)
    pending = list(found)
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
    source = _module_source(name)
    if source is None:
        return ()
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError) as exc:
        logger.debug("could not read the imports of %s: %s", name, exc)
        return ()
    return tuple(_imported_names(tree, nested=True))


def _module_source(name: str) -> Path | None:
    # Found from the package folder, because importlib.util.find_spec would
    # import the parent packages into this process.
    base = Path(__file__).parent.joinpath(*name.split(".")[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(tree: ast.Module, nested: bool = False) -> list[str]:
    statements = _all_statements(tree.body) if nested else iter(tree.body)
    names: list[str] = []
    for node in statements:
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _all_statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Yield every statement in `body` and in the blocks nested in it.

    Imports are statements, so expressions are not visited, which makes this
    several times faster than `ast.walk` on trekeys' modules.
    """
    for statement in body:
        yield statement
        for block in ("body", "orelse", "finalbody", "handlers", "cases"):
            for child in getattr(statement, block, ()):
                if isinstance(child, ast.stmt):
                    yield from _all_statements([child])
                else:  # an except handler or a match case, which contain a body
                    yield from _all_statements(child.body)


def _in_package(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")

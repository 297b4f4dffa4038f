"""Check drill parameters against each runbook's ``parameters`` cell.

Parameters come from the command line as text (``--param name=value``). Each
is converted to the type of the default in the notebook's ``parameters``
cell, as papermill's `inspect_notebook` reads it, so that a typo or a wrong
type is reported before any drill runs instead of surfacing as a confusing
failure halfway through a runbook.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trekeys.errors import DrillError

# Set by the runner from --lab; a --param may not override it.
RESERVED_PARAMETERS = ("lab_dir",)

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def parse_parameter_options(options: Sequence[str]) -> dict[str, str]:
    """Split ``name=value`` options into a dictionary.

    Raises:
        DrillError: an option has no ``=`` or an empty name.
    """
    parameters: dict[str, str] = {}
    for option in options:
        name, sep, value = option.partition("=")
        if not sep or not name.strip():
            raise DrillError(
                f"parameter {option!r} is invalid; write it as name=value."
            )
        parameters[name.strip()] = value
    return parameters


def declared_parameters(path: Path) -> dict[str, Any]:
    """Return the parameters a notebook declares, with their default values.

    Raises:
        DrillError: the notebook has no cell tagged ``parameters``, or it does
            not declare ``lab_dir``.
    """
    import papermill

    declared = papermill.inspect_notebook(str(path))
    if "lab_dir" not in declared:
        raise DrillError(
            f"runbook {path.name} has no parameters cell declaring lab_dir; "
            "tag its parameters cell 'parameters' and add lab_dir = \"lab\"."
        )
    return {name: _literal(spec.get("default")) for name, spec in declared.items()}


def parameters_for_drills(
    notebooks: Mapping[str, Path], given: Mapping[str, str]
) -> dict[str, dict[str, Any]]:
    """Convert the given parameters for each drill that declares them.

    A parameter goes only to the drills whose parameters cell declares it,
    converted to the type of that drill's default.

    Returns:
        The typed parameters of each drill, by drill name.

    Raises:
        DrillError: a parameter is reserved, declared by none of the chosen
            drills, or its value does not have the type of the default.
    """
    declared = {name: declared_parameters(path) for name, path in notebooks.items()}
    per_drill: dict[str, dict[str, Any]] = {name: {} for name in notebooks}

    for parameter, text in given.items():
        if parameter in RESERVED_PARAMETERS:
            raise DrillError(
                f"parameter {parameter} is set by the runner; use --lab instead."
            )
        takers = [name for name in notebooks if parameter in declared[name]]
        if not takers:
            known = sorted({p for d in declared.values() for p in d} - {"lab_dir"})
            raise DrillError(
                f"unknown parameter {parameter} for drill "
                f"{', '.join(notebooks)}; known parameters: "
                f"{', '.join(known) or 'none'}."
            )
        for drill in takers:
            default = declared[drill][parameter]
            per_drill[drill][parameter] = convert_value(parameter, text, default, drill)
    return per_drill


def convert_value(parameter: str, text: str, default: Any, drill: str) -> Any:
    """Convert command-line `text` to the type of `default`.

    Raises:
        DrillError: `text` is not a value of that type.
    """
    expected = type(default)
    if default is None or expected is str:
        return text
    if expected is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        return _type_error(parameter, text, "bool (true or false)", drill)
    if expected in (int, float):
        try:
            return expected(text)
        except ValueError:
            return _type_error(parameter, text, expected.__name__, drill)

    value = _literal(text)
    if not isinstance(value, expected):
        return _type_error(parameter, text, expected.__name__, drill)
    return value


def _type_error(parameter: str, text: str, expected: str, drill: str) -> Any:
    raise DrillError(
        f"parameter {parameter} of drill {drill} must be of type {expected}, "
        f"not {text!r}; fix the --param value."
    )


def _literal(text: str | None) -> Any:
    """Return the Python value of a literal, or the text itself if it is none."""
    if text is None:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text

"""Run runbook notebooks headless with papermill and write the evidence reports.

Each run writes a new dated folder under the reports folder with every
executed notebook, its HTML rendering, a ``summary.json`` and the checks each
notebook recorded. ``index.html`` at the top lists every run, newest first.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from trekeys.errors import DrillError
from trekeys.lab import Lab
from trekeys.records import utcnow
from trekeys.runbook import CHECKS_FILE_ENV

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 900
_NOTEBOOK_NAME = re.compile(r"^(\d+)-([a-z0-9-]+)\.ipynb$")


@dataclass
class DrillResult:
    """The outcome of one notebook run."""

    name: str
    notebook: str
    parameters: dict[str, Any]
    started: str
    ended: str = ""
    outcome: str = "not run"
    error: str = ""
    checks: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunResult:
    """The outcome of one `run_drills` call."""

    folder: Path
    drills: list[DrillResult]

    @property
    def passed(self) -> bool:
        return bool(self.drills) and all(d.outcome == "passed" for d in self.drills)


def notebooks_dir() -> Path:
    """Return the folder of runbook notebooks (TREKEYS_NOTEBOOKS overrides it)."""
    override = os.environ.get("TREKEYS_NOTEBOOKS")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "notebooks"


def discover_notebooks(folder: Path | None = None) -> dict[str, Path]:
    """Return the runbooks by name, in run order (the number before the name)."""
    folder = folder or notebooks_dir()
    found = []
    for path in folder.glob("*.ipynb"):
        match = _NOTEBOOK_NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), match.group(2), path))
    return {name: path for _, name, path in sorted(found)}


def select_notebooks(
    names: Sequence[str] | None, folder: Path | None = None
) -> dict[str, Path]:
    """Return the runbooks named in `names`, or all of them.

    Raises:
        DrillError: a name is unknown; the message lists the known names.
    """
    available = discover_notebooks(folder)
    if not names:
        return available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise DrillError(
            f"unknown drill {', '.join(unknown)}; known drills: {', '.join(available)}."
        )
    return {n: available[n] for n in available if n in names}


def new_run_folder(out_root: Path) -> Path:
    """Create a new dated folder under `out_root`, never reusing an existing one."""
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        probe = out_root / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise DrillError(
            f"report folder {out_root} is not writable ({exc.strerror}); "
            "choose another with --out."
        ) from exc

    stamp = utcnow().strftime("%Y-%m-%dT%H%M%SZ")
    for suffix in [""] + [f"-{n}" for n in range(1, 1000)]:
        folder = out_root / f"{stamp}{suffix}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise DrillError(f"could not create a new run folder in {out_root}.")


def run_drills(
    lab_dir: Path,
    out_root: Path,
    *,
    names: Sequence[str] | None = None,
    parameters: dict[str, Any] | None = None,
    timeout: int = DEFAULT_TIMEOUT_SECONDS,
    on_progress: Callable[[str], None] | None = None,
) -> RunResult:
    """Run the chosen runbooks against a lab and write their reports.

    Raises:
        LabError: `lab_dir` is not a lab.
        DrillError: a name is unknown or the reports folder is not writable.
    """
    lab = Lab.load(lab_dir)
    chosen = select_notebooks(names)
    folder = new_run_folder(Path(out_root))

    results = []
    for name, path in chosen.items():
        if on_progress is not None:
            on_progress(name)
        params = {"lab_dir": str(lab.root), **(parameters or {})}
        results.append(run_notebook(name, path, folder, params, timeout))

    run = RunResult(folder, results)
    write_summary(run)
    write_index(Path(out_root))
    return run


def run_notebook(
    name: str, path: Path, folder: Path, parameters: dict[str, Any], timeout: int
) -> DrillResult:
    """Execute one notebook with papermill and render it to HTML."""
    import papermill

    result = DrillResult(name, path.name, parameters, utcnow().isoformat())
    output = folder / f"{name}.ipynb"
    checks_file = folder / f"{name}.checks.jsonl"
    previous = os.environ.get(CHECKS_FILE_ENV)
    os.environ[CHECKS_FILE_ENV] = str(checks_file)
    started = time.monotonic()
    try:
        papermill.execute_notebook(
            str(path),
            str(output),
            parameters=parameters,
            kernel_name="python3",
            execution_timeout=timeout,
            progress_bar=False,
            cwd=str(folder),
            report_mode=False,
        )
        result.outcome = "passed"
    except Exception as exc:  # papermill raises several types for a failed run
        result.outcome = "timed out" if "Timeout" in type(exc).__name__ else "failed"
        result.error = _short_error(exc)
        logger.warning("drill %s %s: %s", name, result.outcome, result.error)
    finally:
        _restore_env(CHECKS_FILE_ENV, previous)

    result.ended = utcnow().isoformat()
    result.checks = _read_checks(checks_file)
    if result.outcome == "passed" and _has_error_output(output):
        result.outcome = "failed"
        result.error = "the executed notebook records an error"
    if result.outcome == "passed" and any(not c["passed"] for c in result.checks):
        result.outcome = "failed"
    _render_html(output)
    logger.info(
        "drill %s %s in %.1f s", name, result.outcome, time.monotonic() - started
    )
    return result


def _short_error(exc: Exception) -> str:
    text = getattr(exc, "evalue", None) or str(exc)
    return (
        str(text).strip().splitlines()[-1][:500]
        if str(text).strip()
        else type(exc).__name__
    )


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _read_checks(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [
        json.loads(line)
        for line in path.read_text(encoding="utf-8").splitlines()
        if line
    ]


def _has_error_output(path: Path) -> bool:
    if not path.exists():
        return True
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return True
    return False


def _render_html(path: Path) -> None:
    if not path.exists():
        return
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_filename(str(path))
    path.with_suffix(".html").write_text(body, encoding="utf-8")


def write_summary(run: RunResult) -> Path:
    """Write ``summary.json`` for a run and return its path."""
    target = run.folder / "summary.json"
    data = {
        "folder": run.folder.name,
        "passed": run.passed,
        "drills": [asdict(d) for d in run.drills],
    }
    target.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return target


def write_index(out_root: Path) -> Path:
    """Write ``index.html`` listing every run under `out_root`, newest first."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    runs = []
    for summary in sorted(out_root.glob("*/summary.json"), reverse=True):
        data = json.loads(summary.read_text(encoding="utf-8"))
        runs.append({"folder": summary.parent.name, **data})
    environment = Environment(
        loader=PackageLoader("trekeys"), autoescape=select_autoescape()
    )
    html = environment.get_template("index.html.j2").render(
        runs=runs, generated=utcnow()
    )
    target = out_root / "index.html"
    tmp = target.with_name(".index.html.tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, target)
    return target

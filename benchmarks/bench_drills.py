"""Overhead of the drill runner: the drill suite against the same code run directly.

The suite is timed end to end through `run_drills` (papermill, a kernel per
notebook, HTML rendering, the secret scan and the signed manifest). The
reference runs the same notebooks' code cells in this process with `exec`,
with the same parameters and against the same demo TRE, which is what an
administrator calling trekeys from Python would do. Each side runs twice and
its fastest run counts. The ratio is the runner's overhead factor, and the
target is below 2.

Usage: python -m benchmarks.run drills [--quick]
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path

import nbformat

from benchmarks.common import Ratio
from trekeys.drills import discover_notebooks, run_drills
from trekeys.lab import create_lab

# The quick run covers these drills only; the full run covers every runbook.
QUICK_DRILLS = ("vault-health", "key-destruction")
TARGET_RATIO = 2.0
ROUNDS = 2


def run_directly(path: Path, lab_dir: Path) -> None:
    """Execute a notebook's code cells in a fresh namespace, output discarded."""
    notebook = nbformat.read(path, as_version=4)
    namespace: dict[str, object] = {"__name__": "__drill__"}
    with contextlib.redirect_stdout(io.StringIO()):
        for cell in notebook.cells:
            if cell.cell_type != "code":
                continue
            exec(compile(cell.source, str(path), "exec"), namespace)  # noqa: S102
            if "parameters" in cell.metadata.get("tags", []):
                namespace["lab_dir"] = str(lab_dir)


def measure(quick: bool) -> list[Ratio]:
    notebooks = discover_notebooks()
    names = [n for n in notebooks if not quick or n in QUICK_DRILLS]

    direct_times, suite_times = [], []
    with tempfile.TemporaryDirectory(prefix="trekeys-bench-") as scratch:
        lab = create_lab(Path(scratch) / "lab")

        # The runner starts each kernel in its report folder. The direct runs
        # get a scratch folder too, so that the files a runbook writes to its
        # working folder (inventories, charts, ceremony transcripts) stay out
        # of the current folder.
        workdir = Path(scratch) / "direct"
        workdir.mkdir()

        # Rounds alternate, so that both sides see the lab grow alike, and
        # the fastest round of each counts, as timeit does, because slower
        # rounds measure other load on the host.
        for _ in range(ROUNDS):
            started = time.perf_counter()
            with contextlib.chdir(workdir):
                for name in names:
                    run_directly(notebooks[name], lab.root)
            direct_times.append(time.perf_counter() - started)

            started = time.perf_counter()
            run = run_drills(lab.root, Path(scratch) / "reports", names=names)
            suite_times.append(time.perf_counter() - started)
            if not run.passed:
                failed = [d.name for d in run.drills if d.outcome != "passed"]
                raise RuntimeError(f"drills failed during the benchmark: {failed}")

    direct, suite = min(direct_times), min(suite_times)
    ratio = suite / direct
    per_notebook = (suite - direct) / len(names)
    return [
        Ratio(
            name=f"drill suite ({len(names)} notebooks) vs direct Python",
            measured=suite,
            reference=direct,
            unit="s",
            ratio=ratio,
            target=f"ratio < {TARGET_RATIO:g}",
            passed=ratio < TARGET_RATIO,
        ),
        # The runner's cost is mostly fixed per notebook (a kernel start, the
        # HTML rendering), so this figure predicts the ratio of longer drills.
        Ratio(
            name="runner overhead per notebook",
            measured=per_notebook,
            reference=direct / len(names),
            unit="s",
            ratio=per_notebook,
            target="informational: seconds added to each drill",
            passed=True,
        ),
    ]

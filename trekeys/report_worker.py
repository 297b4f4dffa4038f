"""Write each drill's report in a background process while the next drill runs.

Rendering a notebook to HTML takes about half a second of CPU, so rendering
every report after the last drill added that much to each drill of a run.
`ReportWorker` hands each finished drill to one worker process, which adds
the evidence cell to the executed notebook and renders its HTML while the
main process runs the next drill. `trekeys.reports.finish_run` waits for the
worker before it scans the reports for secrets and signs them, so the scan
and the signature still cover the final files.

The worker reads the keys a drill touched from a read-only vault open right
after the drill: it takes no lock, so it never blocks the next drill, and it
writes no audit entry. Its key states are those after that drill, not after
the whole run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from trekeys import runbook
from trekeys.errors import TrekeysError
from trekeys.lab import Lab

if TYPE_CHECKING:
    from trekeys.drills import DrillResult

logger = logging.getLogger(__name__)


class ReportWorker:
    """One background process that writes the evidence cell and HTML of each drill.

    Use it as a context manager; `wait` returns the names of the drills whose
    reports the worker wrote, and `finish_run` writes the others itself.
    """

    command = [sys.executable, "-m", "trekeys.report_worker"]

    def __init__(self, lab: Lab, folder: Path) -> None:
        self._lab_root = str(lab.root)
        self._folder = str(folder)
        self._results: dict[str, DrillResult] = {}
        self._replies: list[dict[str, Any]] = []
        # A plain child process rather than multiprocessing, whose spawn start
        # method would import the caller's main script again in the child.
        self._process = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        # Replies are read as they come, so that neither pipe fills up.
        self._reader = threading.Thread(
            target=self._read_replies, name="report-worker-replies", daemon=True
        )
        self._reader.start()

    def __enter__(self) -> ReportWorker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._reader.join()
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def submit(self, result: DrillResult) -> None:
        """Queue the report of a finished drill."""
        self._results[result.name] = result
        job = {"lab": self._lab_root, "folder": self._folder, "drill": asdict(result)}
        try:
            assert self._process.stdin is not None
            self._process.stdin.write(json.dumps(job) + "\n")
            self._process.stdin.flush()
        except OSError as exc:
            logger.warning(
                "the report worker stopped (%s); the report of drill %s is "
                "written after the last drill",
                exc,
                result.name,
            )

    def wait(self) -> set[str]:
        """Wait for every queued report and copy each drill's keys into its result.

        Returns:
            The names of the drills whose reports were written. A report the
            worker failed on is left out and logged, so that the caller
            writes it in its own process, where any error is raised.
        """
        assert self._process.stdin is not None
        try:
            self._process.stdin.close()
        except OSError:
            pass  # the worker already stopped; its replies tell what it wrote
        self._process.wait()
        self._reader.join()

        written = set()
        for reply in self._replies:
            result = self._results.get(reply.get("drill", ""))
            if result is None:
                continue
            if "error" in reply:
                logger.warning(
                    "the report worker failed on drill %s (%s); writing it again "
                    "in the main process",
                    result.name,
                    reply["error"],
                )
                continue
            result.keys_touched = reply["keys_touched"]
            written.add(result.name)
        return written

    def _read_replies(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._replies.append(json.loads(line))


def write_drill_report(
    lab_root: str, folder: str, result: DrillResult
) -> list[dict[str, Any]]:
    """Add the evidence cell to a drill's executed notebook and render its HTML.

    Runs in the worker process. A drill that left no executed notebook (its
    kernel died before papermill wrote one) gets no report files.

    Returns:
        The keys the drill touched, as `trekeys.runbook.keys_touched` returns
        them; empty when the vault does not open.
    """
    from trekeys import reports

    lab = Lab.load(Path(lab_root))
    vault = _open_read_only(lab)
    try:
        evidence = runbook.evidence_header(lab, vault)
        if vault is not None and result.audit_range:
            first, last = result.audit_range
            result.keys_touched = runbook.keys_touched(vault, first, last)
    finally:
        if vault is not None:
            vault.close()
    evidence["run folder"] = Path(folder).name

    notebook = Path(folder) / f"{result.name}.ipynb"
    if notebook.exists():
        reports.add_evidence_cell(notebook, result, evidence)
        reports.render_html(notebook)
    return result.keys_touched


def _open_read_only(lab: Lab) -> Any:
    try:
        return lab.open_vault_with(runbook.credentials_for(lab), read_only=True)
    except TrekeysError as exc:
        # finish_run opens the vault again and records the failure in the run.
        logger.warning("the vault did not open for the drill evidence: %s", exc)
        return None


def serve(jobs: TextIO, replies: TextIO) -> None:
    """Write the report of each job line in `jobs` and reply on `replies`."""
    from trekeys import reports
    from trekeys.drills import DrillResult

    # The drills are the critical path: this process takes only the CPU they
    # leave idle, such as while a kernel waits on gpg or cryptsetup.
    os.nice(10)
    # nbconvert loads its templates while the first drill runs.
    reports.start_html_warm_up().join()
    for line in jobs:
        job = json.loads(line)
        result = DrillResult(**job["drill"])
        try:
            keys = write_drill_report(job["lab"], job["folder"], result)
            reply: dict[str, Any] = {"drill": result.name, "keys_touched": keys}
        except Exception as exc:  # the main process writes this report again
            reply = {"drill": result.name, "error": f"{type(exc).__name__}: {exc}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve(sys.stdin, sys.stdout)

"""Run runbook notebooks headless with papermill and judge their outcome.

`run_drills` checks every input before anything runs (the lab, the drill
names, the parameters against each notebook's ``parameters`` cell, the report
folder) and executes each notebook in a new dated run folder. While a drill
runs, `trekeys.report_worker` writes the evidence cell and HTML of the drill
before it. The run then goes to `trekeys.reports`, which writes the summary,
the secret scan, the signed manifest and the index.

A drill passes only when papermill raised nothing, the executed notebook
contains no error output and every check it recorded passed. A drill that runs
longer than its timeout, in total and not only per cell, is stopped by
killing its kernel and reported as "timed out"; a kernel that dies on its own
is reported as "kernel died". In both cases the cell that was running gets
an error output, so that the executed notebook shows where the drill stopped.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from trekeys import approvals, runbook, secretscan
from trekeys.audit import AuditLog
from trekeys.drillparams import parameters_for_drills
from trekeys.errors import DrillError
from trekeys.kernels import (
    KERNEL_NAME,
    KernelStarter,
    kill_kernel,
    manager_class_for,
)
from trekeys.lab import Lab
from trekeys.records import utcnow
from trekeys.report_worker import ReportWorker
from trekeys.runbook import CHECKS_FILE_ENV, PROOFS_FILE_ENV
from trekeys.vault import audit_log_path

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 900
_ENGINE_NAME = "trekeys-nbclient"
_NOTEBOOK_NAME = re.compile(r"^(\d+)-([a-z0-9-]+)\.ipynb$")

# Outcomes of one drill, as written to summary.json and the index.
PASSED = "passed"
FAILED = "failed"
TIMED_OUT = "timed out"
KERNEL_DIED = "kernel died"


@dataclass
class DrillResult:
    """The outcome of one notebook run.

    Attributes:
        name: the drill name, such as ``vault-health``.
        notebook: the runbook's file name.
        parameters: the parameters papermill injected.
        started, ended: UTC times in ISO 8601.
        outcome: passed, failed, timed out or kernel died.
        error: one line on why the drill did not pass.
        checks: every check the notebook recorded, in order.
        audit_range: the first and last audit log sequence numbers the drill wrote.
        keys_touched: id, fingerprint, algorithm and operations of each key the
            drill used, from the audit log; never material.
        runbook: the notebook's SHA-256, git commit and approval status.
        recovery_proofs: the keys the drill proved recoverable; each is
            written to its key record only if the drill passed.
    """

    name: str
    notebook: str
    parameters: dict[str, Any]
    started: str
    ended: str = ""
    outcome: str = "not run"
    error: str = ""
    checks: list[dict[str, Any]] = field(default_factory=list)
    audit_range: list[int] = field(default_factory=list)
    keys_touched: list[dict[str, Any]] = field(default_factory=list)
    runbook: dict[str, Any] = field(default_factory=dict)
    recovery_proofs: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunResult:
    """The outcome of one `run_drills` call.

    Attributes:
        folder: the dated run folder.
        drills: one result per drill, in run order.
        started, ended: UTC times of the whole run.
        evidence: who ran it, where, tool versions and KDF and cipher settings.
        secret_scan: findings of the scan for vault secrets in the reports.
        errors: problems of the run as a whole, such as a failed secret scan.
    """

    folder: Path
    drills: list[DrillResult]
    started: str = ""
    ended: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    secret_scan: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether every drill passed and the run as a whole found no problem."""
        drills_passed = all(d.outcome == PASSED for d in self.drills)
        return bool(self.drills) and drills_passed and not self.errors


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


def changes_keys(path: Path) -> bool:
    """Return whether a runbook creates, rotates or destroys keys.

    Each runbook declares it in its notebook metadata (``trekeys.changes_keys``).
    A runbook without the declaration is treated as changing keys.
    """
    metadata = nbformat.read(path, as_version=4).metadata
    return bool(metadata.get("trekeys", {}).get("changes_keys", True))


def select_notebooks(
    names: Sequence[str] | None,
    folder: Path | None = None,
    *,
    safe_only: bool = False,
) -> dict[str, Path]:
    """Return the runbooks named in `names`, or all of them, in run order.

    With `safe_only`, only runbooks that change no key are chosen, so that a
    scheduled run against a live TRE only reads, recovers into scratch space
    and audits.

    Raises:
        DrillError: a name is unknown (the message lists the known names), a
            named runbook changes keys while `safe_only` is set, or there is
            no runbook at all.
    """
    chosen = _select_by_name(names, folder)
    if not safe_only:
        return chosen
    unsafe = [name for name, path in chosen.items() if changes_keys(path)]
    if names and unsafe:
        raise DrillError(
            f"drill {', '.join(unsafe)} changes keys, so it does not run with "
            "--safe-only; run it without that option, on purpose."
        )
    return {name: path for name, path in chosen.items() if name not in unsafe}


def _select_by_name(
    names: Sequence[str] | None, folder: Path | None
) -> dict[str, Path]:
    available = discover_notebooks(folder)
    if not available:
        raise DrillError(
            f"no runbook notebooks in {folder or notebooks_dir()}; "
            "set TREKEYS_NOTEBOOKS to the notebooks folder."
        )
    if not names:
        return available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise DrillError(
            f"unknown drill {', '.join(unknown)}; known drills: {', '.join(available)}."
        )
    return {n: available[n] for n in available if n in names}


def new_run_folder(out_root: Path) -> Path:
    """Create a new dated folder under `out_root`, never reusing an existing one.

    Raises:
        DrillError: `out_root` cannot be created or written.
    """
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
    raise DrillError(
        f"could not create a new run folder in {out_root}; wait a second and retry."
    )


def reject_secret_parameters(
    lab: Lab, per_drill: Mapping[str, Mapping[str, Any]]
) -> None:
    """Raise before anything runs when a parameter value contains key material.

    papermill writes parameters into the executed notebook, so a secret given
    as a parameter would end up in the report.

    Raises:
        DrillError: naming the parameter, never its value.
    """
    values = {
        (drill, name): value
        for drill, params in per_drill.items()
        for name, value in params.items()
        if isinstance(value, str) and len(value) >= secretscan.MIN_NEEDLE_LENGTH
    }
    if not values:
        return

    with runbook.open_vault(lab) as vault:
        secrets = secretscan.collect_secrets(lab, vault)
    for (drill, name), value in values.items():
        if secretscan.secrets_in_text(value, secrets):
            raise DrillError(
                f"parameter {name} of drill {drill} contains key material; pass "
                "secrets in a file or an environment variable and give its name "
                "as the parameter."
            )


def run_drills(
    lab_dir: Path,
    out_root: Path,
    *,
    names: Sequence[str] | None = None,
    parameters: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    notebooks_folder: Path | None = None,
    on_start: Callable[[str], None] | None = None,
    on_finish: Callable[[DrillResult], None] | None = None,
    require_approved: bool = False,
    safe_only: bool = False,
) -> RunResult:
    """Run the chosen runbooks against a lab and write their reports.

    Args:
        lab_dir: the TRE folder the drills run against.
        out_root: the reports folder; each run gets a new dated folder in it.
        names: drill names; all runbooks when empty.
        parameters: ``name: value`` text from the command line, converted to
            the type of each notebook's default.
        timeout: seconds a whole notebook may run before it is stopped.
        notebooks_folder: where the runbooks are; `notebooks_dir()` by default.
        on_start: called with each drill name before it runs.
        on_finish: called with each result after it ran.
        require_approved: reject runbooks that are not in their approved
            version (see `trekeys.approvals`) before anything runs.
        safe_only: run only the runbooks that change no key (see
            `select_notebooks`).

    Raises:
        LabError: `lab_dir` is missing or not a lab.
        DrillError: a name or parameter is invalid, a runbook is not approved
            while `require_approved` is set, or the reports folder is not
            writable. Nothing has run when these are raised.
    """
    from trekeys import reports

    # The kernel fork server starts first, so that its imports overlap the checks.
    starter = KernelStarter()
    try:
        lab = Lab.load(lab_dir)
        chosen = select_notebooks(names, notebooks_folder, safe_only=safe_only)
        per_drill = parameters_for_drills(chosen, dict(parameters or {}))
        pins = approvals.pin_runbooks(chosen)
        if require_approved:
            approvals.require_approved(pins)
        if timeout <= 0:
            raise DrillError(f"timeout {timeout} is invalid; give a positive number.")
        reject_secret_parameters(lab, per_drill)
        folder = new_run_folder(Path(out_root).absolute())

        run = RunResult(folder, [], started=utcnow().isoformat())
        with ReportWorker(lab, folder) as worker:
            _run_plan(
                list(chosen.items()),
                lab,
                run,
                starter,
                worker,
                per_drill=per_drill,
                pins=pins,
                timeout=timeout,
                on_start=on_start,
                on_finish=on_finish,
            )
            written = worker.wait()
        reports.finish_run(run, lab, Path(out_root), written=written)
    finally:
        # The last kernels finish stopping while the reports are finished.
        starter.close()
    return run


def _run_plan(
    plan: list[tuple[str, Path]],
    lab: Lab,
    run: RunResult,
    starter: KernelStarter,
    worker: ReportWorker,
    *,
    per_drill: dict[str, dict[str, Any]],
    pins: dict[str, approvals.RunbookPin],
    timeout: float,
    on_start: Callable[[str], None] | None,
    on_finish: Callable[[DrillResult], None] | None,
) -> None:
    """Run each drill of `plan` on a kernel started during the drill before it."""
    folder = run.folder
    first_name, first_path = plan[0]
    starter.start_next(drill_environment(folder, first_name), folder, first_path)
    # papermill is imported only to run drills; this thread would otherwise
    # wait idle while the first kernel starts.
    importlib.import_module("papermill")
    for number, (name, path) in enumerate(plan):
        if on_start is not None:
            on_start(name)
        kernel = starter.take()
        if number + 1 < len(plan):
            next_name, next_path = plan[number + 1]
            starter.start_next(drill_environment(folder, next_name), folder, next_path)

        params = {**per_drill[name], "lab_dir": str(lab.root)}
        try:
            result = run_notebook(
                name, path, folder, params, timeout, lab=lab, kernel=kernel
            )
        finally:
            starter.shutdown(kernel)
        result.runbook = pins[name].to_dict()
        run.drills.append(result)

        # Its report is written while the next drill runs.
        worker.submit(result)
        if on_finish is not None:
            on_finish(result)


def drill_environment(folder: Path, name: str) -> dict[str, str]:
    """Return the environment of a drill's kernel: ours plus its evidence files."""
    return {
        **os.environ,
        CHECKS_FILE_ENV: str(folder / f"{name}.checks.jsonl"),
        PROOFS_FILE_ENV: str(folder / f"{name}.proofs.jsonl"),
    }


def run_notebook(
    name: str,
    path: Path,
    folder: Path,
    parameters: dict[str, Any],
    timeout: float,
    *,
    lab: Lab | None = None,
    kernel: Any = None,
) -> DrillResult:
    """Execute one notebook with papermill into `folder` and judge its outcome.

    Args:
        kernel: a started kernel manager whose kernel has the environment of
            `drill_environment`; when None, one is started and shut down here.
    """
    result = DrillResult(name, path.name, parameters, utcnow().isoformat())
    output = folder / f"{name}.ipynb"
    environment = drill_environment(folder, name)
    checks_file = Path(environment[CHECKS_FILE_ENV])
    proofs_file = Path(environment[PROOFS_FILE_ENV])
    audit = AuditLog(audit_log_path(lab.vault_path)) if lab else None
    first_seq = audit.tail()[0] + 1 if audit else 0

    started = time.monotonic()
    own_starter = KernelStarter() if kernel is None else None
    if own_starter is not None:
        own_starter.start_next(environment, folder, path)
        kernel = own_starter.take()
    try:
        result.outcome, result.error = _execute(
            path, output, parameters, timeout, kernel
        )
    finally:
        if own_starter is not None:
            own_starter.shutdown(kernel)
            own_starter.close()

    result.ended = utcnow().isoformat()
    result.checks = _read_json_lines(checks_file)
    result.recovery_proofs = _read_json_lines(proofs_file)
    checks_file.unlink(missing_ok=True)
    proofs_file.unlink(missing_ok=True)
    if audit is not None:
        result.audit_range = [first_seq, audit.tail()[0]]
    _judge_outputs(result, output)
    logger.info(
        "drill %s %s in %.1f s", name, result.outcome, time.monotonic() - started
    )
    return result


def _register_engine() -> str:
    """Register papermill's nbclient engine with fewer saves, and return its name.

    papermill 2.7 writes and validates the whole output notebook before and
    after every cell, about 700 writes for the drill suite, and twice at the
    end. This engine writes it at most every ``autosave_cell_every`` seconds
    (30 by default) during the run and once when the run ends or stops, so a
    timed-out or crashed drill still leaves its executed notebook.
    """
    from papermill.engines import NBClientEngine, papermill_engines

    class SparseSaveEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(
            cls, nb_man: Any, kernel_name: str, **kwargs: Any
        ) -> Any:
            save = nb_man.save

            def save_when_due(**save_kwargs: Any) -> None:
                elapsed = (nb_man.now() - nb_man.last_save_time).total_seconds()
                if elapsed >= nb_man.autosave_cell_every:
                    save(**save_kwargs)

            nb_man.save = save_when_due
            try:
                result = super().execute_managed_notebook(nb_man, kernel_name, **kwargs)
            except BaseException:
                # The save in Engine.execute_notebook, after this, is then the
                # only one of the final notebook.
                nb_man.save = save
                raise
            # Without an exception, papermill writes the final notebook itself
            # (raise_for_execution_errors or write_ipynb), after that save.
            nb_man.save = _skip_save
            return result

    papermill_engines.register(_ENGINE_NAME, SparseSaveEngine)
    return _ENGINE_NAME


def _skip_save(**save_kwargs: Any) -> None:
    """Stand in for papermill's save of a notebook that papermill writes later."""


def _execute(
    path: Path, output: Path, parameters: dict[str, Any], timeout: float, kernel: Any
) -> tuple[str, str]:
    """Run papermill on `kernel`, with a watchdog that kills it after `timeout` s."""
    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    stopped = threading.Event()

    def stop_kernel() -> None:
        stopped.set()
        logger.warning("stopping the kernel of %s: it timed out", path.name)
        kill_kernel(kernel)

    watchdog = threading.Timer(timeout, stop_kernel)
    watchdog.daemon = True
    watchdog.start()
    try:
        papermill.execute_notebook(
            str(path),
            str(output),
            parameters=parameters,
            kernel_name=KERNEL_NAME,
            execution_timeout=int(timeout) + 1,
            progress_bar=False,
            cwd=str(output.parent),
            kernel_manager_class=manager_class_for(kernel),
            engine_name=_register_engine(),
        )
    except PapermillExecutionError as exc:
        return FAILED, f"{exc.ename}: {_last_line(exc.evalue)}"
    except (DeadKernelError, CellTimeoutError) as exc:
        if stopped.is_set() or isinstance(exc, CellTimeoutError):
            message = f"the drill ran longer than its timeout of {timeout:g} s"
            _mark_stopped_cell(output, "DrillTimeout", message)
            return TIMED_OUT, message
        message = "the kernel died while a cell ran (crash, out of memory or killed)"
        _mark_stopped_cell(output, "DeadKernel", message)
        return KERNEL_DIED, message
    except Exception as exc:  # papermill and nbclient raise many types on bad input
        logger.warning("drill %s could not run: %s", path.name, exc)
        return FAILED, f"{type(exc).__name__}: {_last_line(str(exc))}"
    finally:
        watchdog.cancel()
    return PASSED, ""


def _mark_stopped_cell(output: Path, ename: str, message: str) -> None:
    """Give the cell that was running an error output and flag it at the top."""
    if not output.exists():
        return
    notebook = nbformat.read(output, as_version=4)
    started = [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.get("metadata", {}).get("papermill", {}).get("start_time")
    ]
    if not started:
        return

    index = started[-1]
    cell = notebook.cells[index]
    cell.metadata.papermill["status"] = "failed"
    cell.metadata.papermill["exception"] = True
    cell.setdefault("outputs", []).append(
        nbformat.v4.new_output(
            "error", ename=ename, evalue=message, traceback=[f"{ename}: {message}"]
        )
    )
    banner = nbformat.v4.new_markdown_cell(
        f'<span style="color:red; font-size:2em">{message}: the drill stopped '
        f"at cell {index}, which now shows the error.</span>"
    )
    banner.metadata["tags"] = ["trekeys-stopped-cell"]
    notebook.cells.insert(0, banner)
    tmp = output.with_name(f".{output.name}.tmp")
    nbformat.write(notebook, tmp)
    os.replace(tmp, output)


def _judge_outputs(result: DrillResult, output: Path) -> None:
    """Fail a drill that papermill passed but whose notebook or checks say otherwise."""
    if result.outcome != PASSED:
        return
    if not output.exists():
        result.outcome, result.error = FAILED, "papermill wrote no executed notebook"
        return
    error_cell = _first_error_output(output)
    if error_cell is not None:
        result.outcome = FAILED
        result.error = f"the executed notebook records an error in {error_cell}"
    elif any(not c.get("passed") for c in result.checks):
        failed = next(c["name"] for c in result.checks if not c.get("passed"))
        result.outcome, result.error = FAILED, f"check failed: {failed}"


def _first_error_output(path: Path) -> str | None:
    notebook = nbformat.read(path, as_version=4)
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return f"cell {index} ({output.get('ename', 'error')})"
    return None


def _last_line(text: str | None) -> str:
    lines = str(text or "").strip().splitlines()
    return lines[-1][:500] if lines else ""


def _read_json_lines(path: Path) -> list[dict[str, Any]]:
    import json

    if not path.exists():
        return []
    return [
        json.loads(line)
        for line in path.read_text(encoding="utf-8").splitlines()
        if line
    ]

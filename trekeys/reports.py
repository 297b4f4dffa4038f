"""The evidence reports of a drill run: summary, HTML, secret scan, signature, index.

`finish_run` turns the executed notebooks of a run folder into evidence that
an auditor can read and check:

1. an evidence cell at the top of each executed notebook: who ran it, where,
   when, the tool versions, the KDF and cipher settings and the keys the drill
   touched (ids and fingerprints from the audit log, never material);
2. an HTML rendering of each notebook (nbconvert);
3. ``summary.json``: notebook, parameters, start, end, outcome, every check;
4. a scan of every report for every secret of the TRE (`trekeys.secretscan`),
   where a hit fails the run and names the report and cell;
5. ``manifest.json`` and its Ed25519 signature (`trekeys.signing`);
6. ``index.html`` in the reports folder, listing every run, newest first.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Collection
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbformat

from trekeys import runbook, secretscan, signing
from trekeys.audit import Actor
from trekeys.errors import DrillError, TrekeysError
from trekeys.lab import Lab
from trekeys.records import utcnow
from trekeys.retention import folder_time, retention_period

if TYPE_CHECKING:
    from trekeys.drills import DrillResult, RunResult

logger = logging.getLogger(__name__)

SUMMARY = "summary.json"
INDEX = "index.html"
RUN_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{6}Z(-\d+)?$")
RUNNER_ACTOR = "trekeys drill runner"

# Kept for the lab build steps in trekeys.lab.LAB_STEPS.
build_lab = signing.build_lab


def finish_run(
    run: RunResult, lab: Lab, out_root: Path, *, written: Collection[str] = ()
) -> None:
    """Write the evidence, scan for secrets, sign the manifest and update the index.

    Args:
        written: drills whose evidence cell and HTML are already written (see
            `trekeys.report_worker`); their keys_touched are already set too.
    """
    try:
        vault = runbook.open_vault(lab, role="TRE System Administrators")
    except TrekeysError as exc:
        run.errors.append(
            f"the vault did not open after the drills ({exc}); the reports were "
            "neither scanned for secrets nor signed"
        )
        vault = None

    if vault is None:
        _write_reports(run, lab, None, written)
        write_summary(run)
        write_index(out_root)
        return

    vault.actor = Actor("TRE System Administrators", RUNNER_ACTOR)
    with vault:
        _write_reports(run, lab, vault, written)
        write_summary(run)
        secrets = _scan_for_secrets(run, lab, vault)
        _record_recovery_proofs(run, vault)
        write_summary(run)
        _withhold_leaking_files(run, secrets)
        signing.sign_run_folder(run.folder, vault)
    write_index(out_root)


def _write_reports(
    run: RunResult, lab: Lab, vault: Any, written: Collection[str]
) -> None:
    run.evidence = runbook.evidence_header(lab, vault)
    run.evidence["run folder"] = run.folder.name
    for result in run.drills:
        if result.name in written:
            continue
        if vault is not None and result.audit_range:
            first, last = result.audit_range
            result.keys_touched = runbook.keys_touched(vault, first, last)
        notebook = run.folder / f"{result.name}.ipynb"
        if notebook.exists():
            add_evidence_cell(notebook, result, run.evidence)
            render_html(notebook)
    run.ended = utcnow().isoformat()


def add_evidence_cell(path: Path, result: DrillResult, evidence: dict[str, Any]):
    """Insert a markdown cell with the drill's evidence at the top of a notebook."""
    rows = [
        ("drill", result.name),
        (
            "notebook outcome (before the secret scan, see summary.json)",
            result.outcome + (f": {result.error}" if result.error else ""),
        ),
        ("started", result.started),
        ("ended", result.ended),
        *[(name, str(value)) for name, value in evidence.items()],
        ("parameters", json.dumps(result.parameters, sort_keys=True)),
        *_runbook_rows(result.runbook),
        (
            "recovery proofs claimed",
            ", ".join(p["key_id"] for p in result.recovery_proofs) or "none",
        ),
    ]
    lines = ["## Drill evidence", "", "| item | value |", "|---|---|"]
    lines += [f"| {name} | {_cell_text(value)} |" for name, value in rows]
    lines += ["", "**Keys touched** (from the audit log; fingerprints, never material)"]
    lines += ["", "| key | fingerprint | algorithm | state | operations |"]
    lines += ["|---|---|---|---|---|"]
    for key in result.keys_touched:
        values = [key.get(c, "") for c in runbook.KEY_COLUMNS]
        lines.append("| " + " | ".join(_cell_text(v) for v in values) + " |")
    if not result.keys_touched:
        lines.append("| (none) | | | | |")
    if result.runbook.get("changes"):
        lines += ["", "**Changes since the approved version of this runbook**", ""]
        lines += ["```diff", result.runbook["changes"].rstrip("\n"), "```"]

    notebook = nbformat.read(path, as_version=4)
    cell = nbformat.v4.new_markdown_cell("\n".join(lines))
    cell.metadata["tags"] = ["trekeys-evidence"]
    notebook.cells.insert(0, cell)
    _write_notebook(notebook, path)


def _runbook_rows(pin: dict[str, Any]) -> list[tuple[str, str]]:
    if not pin:
        return []
    commit = pin["git_commit"] or "not in git"
    if pin["uncommitted"]:
        commit += " plus uncommitted changes"
    approval = pin["status"]
    if pin["approved_by"]:
        approval += (
            f" (approved by {pin['approved_by']} on {pin['approved_at']}, "
            f"sha256 {pin['approved_sha256']}, commit {pin['approved_commit']})"
        )
    if pin["status"] != "approved":
        approval = f"**{approval.upper()}**"
    return [
        ("runbook sha256", pin["sha256"]),
        ("runbook git commit", commit),
        ("runbook approval", approval),
    ]


def _cell_text(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _write_notebook(notebook: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    nbformat.write(notebook, tmp)
    os.replace(tmp, path)


@functools.cache
def _html_exporter() -> Any:
    # The first conversion loads the templates, which costs about as much as
    # several later ones, so one exporter serves every report of the process.
    from nbconvert import HTMLExporter

    return HTMLExporter()


def start_html_warm_up() -> threading.Thread:
    """Load nbconvert and its templates in the background, while drills run."""

    def warm_up() -> None:
        try:
            _html_exporter().from_notebook_node(nbformat.v4.new_notebook())
        except Exception as exc:  # the real rendering reports any problem
            logger.debug("HTML warm-up failed: %s", exc)

    thread = threading.Thread(target=warm_up, name="html-warm-up", daemon=True)
    thread.start()
    return thread


def render_html(path: Path) -> Path:
    """Render an executed notebook to HTML beside it."""
    body, _ = _html_exporter().from_filename(str(path))
    target = path.with_suffix(".html")
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, target)
    return target


def _scan_for_secrets(run: RunResult, lab: Lab, vault: Any) -> list[secretscan.Secret]:
    secrets = secretscan.collect_secrets(lab, vault)
    findings = secretscan.scan_folder(run.folder, secrets)
    run.secret_scan = {
        "secrets_checked": len(secrets),
        "forms": "raw, hex, HEX, base64, base64url (padded and not), PEM body",
        "passed": not findings,
        "findings": secretscan.findings_as_dicts(findings),
    }
    for finding in findings:
        run.errors.append(f"secret found: {finding.describe()}")
        drill = next(
            (d for d in run.drills if finding.file.startswith(f"{d.name}.")), None
        )
        if drill is not None:
            drill.outcome = "failed"
            drill.error = f"key material in the report: {finding.describe()}"
    return secrets


def _withhold_leaking_files(run: RunResult, secrets: list[secretscan.Secret]) -> None:
    """Replace every report file that still contains key material with a notice.

    The run has already failed and names each finding; the files themselves
    must not keep the material, so they are withheld before signing.
    """
    if run.secret_scan.get("passed"):
        # The full scan found nothing, and only summary.json was written since.
        summary = run.folder / SUMMARY
        if not secretscan.scan_file(summary, secrets, run.folder):
            return
    for _ in range(2):
        findings = secretscan.scan_folder(run.folder, secrets)
        if not findings:
            return
        for path in sorted({run.folder / f.file for f in findings}):
            labels = ", ".join(
                sorted({f.secret for f in findings if run.folder / f.file == path})
            )
            secretscan.withhold_file(path, f"it contained key material ({labels})")


def _record_recovery_proofs(run: RunResult, vault: Any) -> None:
    """Write the recovery proofs of the drills that passed to their key records."""
    for drill in run.drills:
        for proof in drill.recovery_proofs:
            proof["recorded"] = False
            if drill.outcome != "passed":
                proof["note"] = "not recorded: the drill did not pass"
                continue
            report = f"{run.folder.name}/{drill.name}.ipynb"
            try:
                runbook.write_recovery_proof(
                    vault, proof["key_id"], report, proof["at"], proof["detail"]
                )
            except TrekeysError as exc:
                proof["note"] = f"not recorded: {exc}"
                logger.warning(
                    "recovery proof of %s not recorded: %s", proof["key_id"], exc
                )
                continue
            proof["recorded"] = True
            proof["report"] = report


def write_summary(run: RunResult) -> Path:
    """Write ``summary.json`` for a run and return its path."""
    target = run.folder / SUMMARY
    data = {
        "folder": run.folder.name,
        "passed": run.passed,
        "started": run.started,
        "ended": run.ended,
        "errors": run.errors,
        "evidence": run.evidence,
        "secret_scan": run.secret_scan,
        "drills": [asdict(d) for d in run.drills],
    }
    tmp = target.with_name(f".{SUMMARY}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def list_runs(out_root: Path) -> list[dict[str, Any]]:
    """Return the summary of every run under `out_root`, newest first."""
    runs = []
    for folder in sorted(out_root.iterdir(), reverse=True) if out_root.is_dir() else []:
        if not RUN_FOLDER.match(folder.name) or not folder.is_dir():
            continue
        try:
            data = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            data = {"passed": False, "drills": [], "errors": ["no readable summary"]}
        defaults: dict[str, Any] = {
            "evidence": {},
            "secret_scan": {},
            "errors": [],
            "drills": [],
        }
        runs.append({**defaults, **data, "folder": folder.name})
    return runs


def write_index(out_root: Path) -> Path:
    """Write ``index.html`` listing every run under `out_root`, newest first."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    environment = Environment(
        loader=PackageLoader("trekeys"), autoescape=select_autoescape()
    )
    html = environment.get_template("index.html.j2").render(
        runs=list_runs(out_root), generated=utcnow()
    )
    target = out_root / INDEX
    tmp = target.with_name(f".{INDEX}.tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, target)
    return target


def prune_runs(
    out_root: Path,
    keep: int,
    *,
    dry_run: bool = False,
    retention: timedelta | None = None,
) -> list[Path]:
    """Remove all but the `keep` newest run folders, and rewrite the index.

    The newest run in which a drill passed is always kept, for every drill, so
    that the last proof of each procedure survives any number of failed runs.
    Runs younger than the retention period (7 years by default, see
    `trekeys.retention`) are kept as evidence, whatever the value of `keep`.
    Only folders named like run folders are touched.

    Returns:
        The run folders removed (or that would be, with `dry_run`).

    Raises:
        DrillError: `keep` is below 1 or `out_root` is not a folder.
    """
    if keep < 1:
        raise DrillError(f"--keep {keep} is invalid; keep at least 1 run folder.")
    if not out_root.is_dir():
        raise DrillError(f"report folder {out_root} does not exist; check --out.")

    runs = list_runs(out_root)
    kept = {run["folder"] for run in runs[:keep]}
    latest_pass: dict[str, str] = {}
    for run in runs:  # newest first, so the first pass seen is the latest
        for drill in run.get("drills", []):
            if drill.get("outcome") == "passed":
                latest_pass.setdefault(drill["name"], run["folder"])
    kept |= set(latest_pass.values())
    cutoff = utcnow() - (retention if retention is not None else retention_period())
    for run in runs:
        made = folder_time(out_root / run["folder"])
        if made is None or made > cutoff:
            kept.add(run["folder"])

    removed = [out_root / run["folder"] for run in runs if run["folder"] not in kept]
    if dry_run:
        return removed
    for folder in removed:
        logger.info("removing old report folder %s", folder)
        shutil.rmtree(folder)
    write_index(out_root)
    return removed

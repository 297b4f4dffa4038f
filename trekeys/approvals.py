"""Pinned runbooks: which version of each notebook was approved, and drift from it.

An approval pins a runbook by the SHA-256 of its file and the git commit that
last changed it, and names who approved it. Approvals live in
``approvals.json`` beside the notebooks, so they are reviewed and versioned
in git with the runbooks themselves.

Every drill report records the runbook's SHA-256, its git commit and whether
it is still the approved version. A runbook edited since its approval is
flagged, its report shows the difference of its cells against the approved
commit, and ``trekeys drill --require-approved`` rejects it before anything
runs.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nbformat

from trekeys.errors import DrillError
from trekeys.records import utcnow

logger = logging.getLogger(__name__)

APPROVALS_FILE = "approvals.json"
APPROVALS_FORMAT = "trekeys-runbook-approvals/1"

APPROVED = "approved"
CHANGED = "changed since approval"
NOT_APPROVED = "not approved"


@dataclass
class RunbookPin:
    """A runbook's identity at run time, compared with its approval.

    Attributes:
        notebook: the file name.
        sha256: SHA-256 of the notebook file as run.
        git_commit: the last commit that changed the file, or "" outside git.
        uncommitted: whether the file differs from that commit.
        status: approved, changed since approval, or not approved.
        approved_sha256, approved_commit, approved_by, approved_at: the
            approval's values, or "" when there is none.
        changes: a unified diff of the cells' sources against the approved
            commit, when the runbook changed and git has that commit.
    """

    notebook: str
    sha256: str
    git_commit: str
    uncommitted: bool
    status: str
    approved_sha256: str = ""
    approved_commit: str = ""
    approved_by: str = ""
    approved_at: str = ""
    changes: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_file(path: Path) -> str:
    """Return the SHA-256 of a file, in hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _git(folder: Path, *arguments: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(folder), *arguments],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def git_commit_of(path: Path) -> tuple[str, bool]:
    """Return the last commit that changed `path`, and whether the file differs."""
    commit = (
        _git(path.parent, "log", "-1", "--format=%H", "--", path.name) or ""
    ).strip()
    if not commit:
        return "", False
    status = _git(path.parent, "status", "--porcelain", "--", path.name)
    return commit, bool(status and status.strip())


def load_approvals(folder: Path) -> dict[str, dict[str, str]]:
    """Return the approvals of the runbooks in `folder`, by notebook file name.

    Raises:
        DrillError: the approvals file is not valid.
    """
    path = folder / APPROVALS_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != APPROVALS_FORMAT:
            raise ValueError(data.get("format"))
        return dict(data["runbooks"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DrillError(
            f"{path} is not a valid runbook approvals file; restore it from git."
        ) from exc


def pin_runbook(path: Path, approvals: Mapping[str, Mapping[str, str]]) -> RunbookPin:
    """Compare a runbook with its approval."""
    digest = sha256_file(path)
    commit, uncommitted = git_commit_of(path)
    approval = approvals.get(path.name)
    if approval is None:
        return RunbookPin(path.name, digest, commit, uncommitted, NOT_APPROVED)

    status = APPROVED if approval.get("sha256") == digest else CHANGED
    pin = RunbookPin(
        path.name,
        digest,
        commit,
        uncommitted,
        status,
        approved_sha256=approval.get("sha256", ""),
        approved_commit=approval.get("git_commit", ""),
        approved_by=approval.get("approved_by", ""),
        approved_at=approval.get("approved_at", ""),
    )
    if status == CHANGED:
        pin.changes = diff_against_commit(path, pin.approved_commit)
    return pin


def diff_against_commit(path: Path, commit: str) -> str:
    """Return a unified diff of the cells' sources from `commit` to the file now."""
    if not commit:
        return ""
    top = (_git(path.parent, "rev-parse", "--show-toplevel") or "").strip()
    if not top:
        return ""
    relative = path.resolve().relative_to(Path(top).resolve()).as_posix()
    approved_text = _git(path.parent, "show", f"{commit}:{relative}")
    if approved_text is None:
        return ""

    approved = _cell_lines(nbformat.reads(approved_text, as_version=4))
    current = _cell_lines(nbformat.read(path, as_version=4))
    diff = difflib.unified_diff(
        approved, current, f"{path.name} @ {commit[:12]}", f"{path.name} as run", n=2
    )
    return "".join(diff)


def _cell_lines(notebook: Any) -> list[str]:
    lines = []
    for index, cell in enumerate(notebook.cells):
        lines.append(f"# cell {index} ({cell.cell_type})\n")
        lines.extend(line + "\n" for line in cell.source.splitlines())
    return lines


def pin_runbooks(notebooks: Mapping[str, Path]) -> dict[str, RunbookPin]:
    """Pin each runbook against the approvals of its folder, by drill name."""
    pins = {}
    approvals_by_folder: dict[Path, dict[str, dict[str, str]]] = {}
    for name, path in notebooks.items():
        folder = path.parent
        if folder not in approvals_by_folder:
            approvals_by_folder[folder] = load_approvals(folder)
        pins[name] = pin_runbook(path, approvals_by_folder[folder])
    return pins


def require_approved(pins: Mapping[str, RunbookPin]) -> None:
    """Raise unless every runbook is the approved version.

    Raises:
        DrillError: naming each runbook that is changed or not approved.
    """
    problems = [
        f"{pin.notebook} ({pin.status})"
        for pin in pins.values()
        if pin.status != APPROVED
    ]
    if problems:
        raise DrillError(
            f"runbooks not in their approved version: {', '.join(problems)}; "
            "review and approve them with 'trekeys runbook approve', or run "
            "without --require-approved."
        )


def approve_runbooks(
    notebooks: Mapping[str, Path], approved_by: str, role: str
) -> list[dict[str, str]]:
    """Record the current version of each runbook as approved.

    Raises:
        DrillError: a runbook has changes that are not committed to git, so
            its approval could not name the version; or `approved_by` is empty.
    """
    if not approved_by.strip():
        raise DrillError("the approver's name is empty; give it with --by.")

    rows = []
    for path in notebooks.values():
        commit, uncommitted = git_commit_of(path)
        if uncommitted:
            raise DrillError(
                f"runbook {path.name} has changes not committed to git; commit "
                "them before approving, so that the approval names the version."
            )
        rows.append(
            {
                "notebook": path.name,
                "sha256": sha256_file(path),
                "git_commit": commit,
                "approved_by": approved_by,
                "role": role,
                "approved_at": utcnow().isoformat(),
            }
        )

    for folder in {p.parent for p in notebooks.values()}:
        approvals = load_approvals(folder)
        for row in rows:
            if (folder / row["notebook"]).exists():
                approvals[row["notebook"]] = {
                    k: v for k, v in row.items() if k != "notebook"
                }
        _write_approvals(folder, approvals)
    for row in rows:
        logger.info(
            "approved runbook %s (%s) for %s",
            row["notebook"],
            row["sha256"][:16],
            approved_by,
        )
    return rows


def _write_approvals(folder: Path, approvals: dict[str, dict[str, str]]) -> None:
    target = folder / APPROVALS_FILE
    data = {"format": APPROVALS_FORMAT, "runbooks": dict(sorted(approvals.items()))}
    tmp = target.with_name(f".{APPROVALS_FILE}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, target)


def describe_pins(pins: Sequence[RunbookPin]) -> list[str]:
    """Return one line per runbook for the command line."""
    return [
        f"{pin.status:24} {pin.notebook} sha256 {pin.sha256[:16]} "
        f"commit {pin.git_commit[:12] or '(not in git)'}"
        + (" (uncommitted changes)" if pin.uncommitted else "")
        for pin in pins
    ]

"""Retention of drill reports and ceremony transcripts.

Evidence is kept for a configurable period (seven years by default, a
common span for audit records). Pruning removes whole run folders older than
that, but never the latest passing report of any drill, however old: it is
the last proof that the drill's procedure works. Folders of unknown age are
kept and listed, never guessed at.

A run folder holds a ``summary.json`` (``{"passed": bool, "drills": [{"name",
"outcome", "started", ...}]}``). A ceremony folder holds a sealed
``transcript.jsonl`` whose first entry has the start time.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from trekeys.errors import DrillError
from trekeys.records import utcnow
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

DEFAULT_RETENTION_YEARS = 7
TRANSCRIPT_NAME = "transcript.jsonl"
_STAMP = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{6}Z)(?:-\d+)?")


def retention_period(years: float = DEFAULT_RETENTION_YEARS) -> timedelta:
    """Return a retention period of `years` years, counting leap days on average."""
    return timedelta(days=round(365.25 * years))


@dataclass
class PrunePlan:
    """The folders a prune removes and the folders it keeps, each with a reason."""

    remove: list[Path] = field(default_factory=list)
    keep: dict[Path, str] = field(default_factory=dict)


def _read_summary(folder: Path) -> dict[str, Any] | None:
    path = folder / "summary.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def folder_time(folder: Path) -> datetime | None:
    """Return when a run or ceremony folder was made, or None if it is unknown.

    The dated folder name comes first, then the earliest drill start in
    ``summary.json``, then the first transcript entry.
    """
    match = _STAMP.match(folder.name)
    if match:
        return datetime.strptime(match.group(1), "%Y-%m-%dT%H%M%SZ").replace(tzinfo=UTC)

    summary = _read_summary(folder) or {}
    starts = [d.get("started") for d in summary.get("drills", []) if d.get("started")]
    if starts:
        return _parse_time(min(starts))

    transcript = folder / TRANSCRIPT_NAME
    if transcript.is_file():
        with transcript.open(encoding="ascii", errors="replace") as handle:
            first = handle.readline()
        try:
            return _parse_time(json.loads(first).get("time", ""))
        except (json.JSONDecodeError, AttributeError):
            return None
    return None


def _parse_time(text: str) -> datetime | None:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def evidence_folders(reports_root: Path) -> list[Path]:
    """Return the run and ceremony folders directly under `reports_root`."""
    if not reports_root.is_dir():
        raise DrillError(
            f"reports folder {reports_root} does not exist; check the --out path."
        )
    return sorted(
        p
        for p in reports_root.iterdir()
        if p.is_dir()
        and ((p / "summary.json").is_file() or (p / TRANSCRIPT_NAME).is_file())
    )


def latest_passing_runs(reports_root: Path) -> dict[str, Path]:
    """Return, per drill name, the newest run folder in which that drill passed."""
    latest: dict[str, tuple[datetime, Path]] = {}
    for folder in evidence_folders(reports_root):
        when = folder_time(folder)
        summary = _read_summary(folder) or {}
        for drill in summary.get("drills", []):
            if drill.get("outcome") != "passed" or when is None:
                continue
            name = str(drill.get("name", ""))
            if name not in latest or when > latest[name][0]:
                latest[name] = (when, folder)
    return {name: folder for name, (_, folder) in latest.items()}


def plan_prune(
    reports_root: Path,
    *,
    now: datetime | None = None,
    period: timedelta | None = None,
) -> PrunePlan:
    """Decide which evidence folders are past retention and may be removed."""
    now = now or utcnow()
    period = period or retention_period()
    protected: dict[Path, list[str]] = {}
    for name, folder in latest_passing_runs(reports_root).items():
        protected.setdefault(folder, []).append(name)

    plan = PrunePlan()
    for folder in evidence_folders(reports_root):
        when = folder_time(folder)
        if folder in protected:
            plan.keep[folder] = "latest passing report of " + ", ".join(
                sorted(protected[folder])
            )
        elif when is None:
            plan.keep[folder] = "age unknown"
        elif now - when <= period:
            plan.keep[folder] = "within the retention period"
        else:
            plan.remove.append(folder)
    return plan


def prune_evidence(
    reports_root: Path,
    *,
    vault: Vault | None = None,
    now: datetime | None = None,
    period: timedelta | None = None,
    dry_run: bool = True,
) -> PrunePlan:
    """Remove the folders that `plan_prune` marks, unless `dry_run`.

    Every removed sealed transcript is logged in the vault's audit log when
    `vault` is given, because deleting one is an access to it.
    """
    plan = plan_prune(reports_root, now=now, period=period)
    if dry_run:
        return plan
    for folder in plan.remove:
        for transcript in sorted(folder.rglob(TRANSCRIPT_NAME)):
            if vault is not None:
                vault.record_operation(
                    "delete-transcript",
                    f"transcript:{transcript.relative_to(reports_root)}",
                    "success",
                    "past the retention period",
                )
        shutil.rmtree(folder)
        logger.info("removed evidence folder %s, past the retention period", folder)
    return plan

"""Retention of reports and transcripts: prune old evidence, keep the last proof."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from trekeys.errors import DrillError
from trekeys.lab import create_lab
from trekeys.retention import (
    folder_time,
    plan_prune,
    prune_evidence,
    retention_period,
)

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def make_run(root: Path, when: datetime, outcomes: dict[str, str]) -> Path:
    folder = root / when.strftime("%Y-%m-%dT%H%M%SZ")
    folder.mkdir(parents=True)
    drills = [
        {"name": name, "outcome": outcome, "started": when.isoformat()}
        for name, outcome in outcomes.items()
    ]
    passed = all(outcome == "passed" for outcome in outcomes.values())
    summary = {"passed": passed, "drills": drills}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "report.html").write_text("<p>evidence</p>")
    return folder


def years_ago(years: float) -> datetime:
    return NOW - timedelta(days=round(365.25 * years))


def test_default_period_is_seven_years():
    assert retention_period() == timedelta(days=2557)


def test_prune_removes_old_keeps_recent(tmp_path: Path):
    old = make_run(tmp_path, years_ago(8), {"vault-health": "passed"})
    newer = make_run(tmp_path, years_ago(1), {"vault-health": "passed"})

    plan = prune_evidence(tmp_path, now=NOW, dry_run=False)

    assert plan.remove == [old]
    assert not old.exists()
    assert newer.exists()
    assert plan.keep[newer] == "latest passing report of vault-health"


def test_latest_passing_report_never_pruned(tmp_path: Path):
    passing = make_run(tmp_path, years_ago(10), {"custody": "passed", "tls": "failed"})
    older = make_run(tmp_path, years_ago(12), {"custody": "passed"})
    failing = make_run(tmp_path, years_ago(9), {"custody": "failed", "tls": "failed"})

    plan = prune_evidence(tmp_path, now=NOW, dry_run=False)

    assert passing.exists()
    assert plan.keep[passing] == "latest passing report of custody"
    assert sorted(plan.remove) == sorted([older, failing])
    assert not older.exists()
    assert not failing.exists()


def test_dry_run_removes_nothing(tmp_path: Path):
    old = make_run(tmp_path, years_ago(8), {"a": "failed"})
    plan = prune_evidence(tmp_path, now=NOW)
    assert plan.remove == [old]
    assert (old / "report.html").read_text() == "<p>evidence</p>"


def test_shorter_period_prunes_more(tmp_path: Path):
    make_run(tmp_path, years_ago(0), {"a": "passed"})
    middle = make_run(tmp_path, years_ago(2), {"a": "passed"})
    plan = plan_prune(tmp_path, now=NOW, period=retention_period(1))
    assert plan.remove == [middle]


def test_folder_of_unknown_age_is_kept(tmp_path: Path):
    folder = tmp_path / "hand-made"
    folder.mkdir()
    (folder / "summary.json").write_text("{not json")
    plan = prune_evidence(tmp_path, now=NOW, dry_run=False)
    assert folder.exists()
    assert plan.keep[folder] == "age unknown"


def test_other_folders_are_ignored(tmp_path: Path):
    unrelated = tmp_path / "2001-01-01T000000Z"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("not evidence")
    plan = prune_evidence(tmp_path, now=NOW, dry_run=False)
    assert unrelated.exists()
    assert plan.remove == []


def test_transcript_folder_age_from_first_entry(tmp_path: Path):
    folder = tmp_path / "ceremony"
    folder.mkdir()
    entry = {"seq": 1, "type": "start", "time": years_ago(8).isoformat()}
    (folder / "transcript.jsonl").write_text(json.dumps(entry) + "\n")
    assert folder_time(folder) == years_ago(8)
    assert plan_prune(tmp_path, now=NOW).remove == [folder]


def test_deleted_transcripts_are_audited(tmp_path: Path):
    lab = create_lab(tmp_path / "lab", steps=[])
    reports = tmp_path / "reports"
    old = make_run(reports, years_ago(8), {"ceremony": "failed"})
    (old / "ceremony").mkdir()
    (old / "ceremony" / "transcript.jsonl").write_text("{}\n")

    with lab.open_vault() as vault:
        prune_evidence(reports, vault=vault, now=NOW, dry_run=False)

    with lab.open_vault(read_only=True) as vault:
        last = vault.audit_log.entries()[-1]
    assert last["operation"] == "delete-transcript"
    assert last["key_id"] == f"transcript:{old.name}/ceremony/transcript.jsonl"


def test_missing_reports_folder(tmp_path: Path):
    with pytest.raises(DrillError, match="does not exist; check the --out path"):
        plan_prune(tmp_path / "nowhere", now=NOW)

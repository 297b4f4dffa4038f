"""Pruning of old report folders, and the index of runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trekeys.errors import DrillError
from trekeys.reports import prune_runs, write_index


def make_run(out: Path, folder: str, outcomes: dict[str, str]) -> Path:
    path = out / folder
    path.mkdir(parents=True)
    drills = [{"name": name, "outcome": outcome} for name, outcome in outcomes.items()]
    summary = {
        "passed": all(o == "passed" for o in outcomes.values()),
        "drills": drills,
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return path


@pytest.fixture
def history(tmp_path: Path) -> Path:
    """Five weekly runs: health passed in week 1 and 3, backup only in week 1."""
    out = tmp_path / "reports"
    make_run(out, "2026-11-02T030000Z", {"health": "passed", "backup": "passed"})
    make_run(out, "2026-11-09T030000Z", {"health": "failed", "backup": "failed"})
    make_run(out, "2026-11-16T030000Z", {"health": "passed", "backup": "failed"})
    make_run(out, "2026-11-23T030000Z", {"health": "failed", "backup": "failed"})
    make_run(out, "2026-11-30T030000Z", {"health": "failed", "backup": "timed out"})
    (out / "notes").mkdir()
    return out


def folders(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_dir())


def test_prune_keeps_newest_and_last_passes(history: Path):
    removed = prune_runs(history, 2)

    assert sorted(p.name for p in removed) == ["2026-11-09T030000Z"]
    assert folders(history) == [
        "2026-11-02T030000Z",  # last pass of backup
        "2026-11-16T030000Z",  # last pass of health
        "2026-11-23T030000Z",
        "2026-11-30T030000Z",
        "notes",  # not a run folder: never touched
    ]


def test_prune_dry_run_removes_nothing(history: Path):
    before = folders(history)
    removed = prune_runs(history, 1, dry_run=True)
    assert [p.name for p in removed] == ["2026-11-23T030000Z", "2026-11-09T030000Z"]
    assert folders(history) == before


def test_prune_rewrites_index(history: Path):
    prune_runs(history, 1)
    index = (history / "index.html").read_text()
    assert "2026-11-30T030000Z" in index
    assert "2026-11-09T030000Z" not in index


@pytest.mark.parametrize("keep", [0, -3])
def test_prune_rejects_invalid_keep(history: Path, keep: int):
    before = folders(history)
    with pytest.raises(DrillError, match="keep at least 1 run folder"):
        prune_runs(history, keep)
    assert folders(history) == before


def test_prune_rejects_missing_folder(tmp_path: Path):
    with pytest.raises(DrillError, match="does not exist; check --out"):
        prune_runs(tmp_path / "nothing", 3)


def test_index_lists_newest_first(history: Path):
    index = write_index(history).read_text()
    positions = [index.index(name) for name in sorted(folders(history)[:-1])]
    assert positions == sorted(positions, reverse=True)

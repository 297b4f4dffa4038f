"""The scheduling examples: wrapper script, systemd units and cron line."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from trekeys.lab import Lab

SCHEDULING = Path(__file__).resolve().parent.parent / "scheduling"
WRAPPER = SCHEDULING / "run-drills.sh"
TREKEYS = str(Path(sys.executable).with_name("trekeys"))


def write_notebook(folder: Path, name: str, source: str) -> None:
    """Write a two-cell runbook: the parameters cell, then `source`."""
    folder.mkdir(parents=True, exist_ok=True)
    parameters = nbformat.v4.new_code_cell('lab_dir = "lab"')
    parameters.metadata["tags"] = ["parameters"]
    notebook = nbformat.v4.new_notebook(
        cells=[parameters, nbformat.v4.new_code_cell(source)]
    )
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(notebook, folder / f"{name}.ipynb")


@pytest.fixture
def scheduled_env(bare_lab: Lab, tmp_path: Path) -> dict[str, str]:
    """Environment for the wrapper, with one passing and one failing runbook."""
    books = tmp_path / "books"
    write_notebook(books, "10-ok", "x = 1")
    write_notebook(books, "20-raises", "raise RuntimeError('scheduled failure')")
    return {
        **os.environ,
        "TREKEYS": TREKEYS,
        "TREKEYS_LAB": str(bare_lab.root),
        "TREKEYS_REPORTS": str(tmp_path / "reports"),
        "TREKEYS_KEEP": "1",
        "TREKEYS_NOTEBOOKS": str(books),
    }


def run_wrapper(env: dict[str, str], *names: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(WRAPPER), *names],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_wrapper_passes_success_through(scheduled_env: dict[str, str]):
    result = run_wrapper(scheduled_env, "ok")
    assert result.returncode == 0, result.stderr
    assert "passed      ok" in result.stdout


def test_wrapper_passes_failure_through(scheduled_env: dict[str, str]):
    result = run_wrapper(scheduled_env, "ok", "raises")
    assert result.returncode == 1, result.stderr
    assert "failed      raises" in result.stdout
    assert "exited with status 1" in result.stderr


def test_wrapper_prunes_but_keeps_last_pass(scheduled_env: dict[str, str]):
    reports = Path(scheduled_env["TREKEYS_REPORTS"])
    passing = run_wrapper(scheduled_env, "ok")
    failing = run_wrapper(scheduled_env, "raises")

    folders = sorted(p.name for p in reports.iterdir() if p.is_dir())
    assert passing.returncode == 0
    assert failing.returncode == 1
    # TREKEYS_KEEP=1 keeps the newest run, and the passing run of drill ok stays.
    assert len(folders) == 2
    assert "0 run folder(s) removed" in failing.stdout


def test_wrapper_reports_missing_lab(scheduled_env: dict[str, str], tmp_path: Path):
    env = {**scheduled_env, "TREKEYS_LAB": str(tmp_path / "missing")}
    result = run_wrapper(env, "ok")
    assert result.returncode == 1
    assert "does not exist; create it with" in result.stderr


def read_unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(SCHEDULING / name)
    return parser


def test_service_runs_wrapper_once():
    service = read_unit("trekeys-drills.service")
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["ExecStart"].endswith("/scheduling/run-drills.sh")
    assert service["Service"]["EnvironmentFile"] == "/etc/trekeys/drills.env"


def test_timer_starts_service_weekly():
    timer = read_unit("trekeys-drills.timer")
    assert timer["Timer"]["Unit"] == "trekeys-drills.service"
    assert timer["Timer"]["OnCalendar"] == "Mon *-*-* 03:00:00"
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Install"]["WantedBy"] == "timers.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd")
def test_units_pass_systemd_analyze(tmp_path: Path):
    # The units name /opt/trekeys and user trekeys; point them at this checkout.
    service = (SCHEDULING / "trekeys-drills.service").read_text()
    service = service.replace("/opt/trekeys/scheduling/run-drills.sh", str(WRAPPER))
    service = service.replace("User=trekeys", "User=root").replace(
        "Group=trekeys", "Group=root"
    )
    service = service.replace("EnvironmentFile=/", "EnvironmentFile=-/")
    (tmp_path / "trekeys-drills.service").write_text(service)
    shutil.copy(SCHEDULING / "trekeys-drills.timer", tmp_path)

    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "trekeys-drills.timer"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def cron_job() -> tuple[list[str], str, str]:
    """Return the schedule fields, user and command of the cron example."""
    for line in (SCHEDULING / "trekeys-drills.cron").read_text().splitlines():
        if line and not line.startswith("#") and "=" not in line.split()[0]:
            fields = line.split(None, 6)
            return fields[:5], fields[5], fields[6]
    raise AssertionError("no job line in trekeys-drills.cron")


def test_cron_line_runs_weekly():
    schedule, user, command = cron_job()
    assert schedule == ["0", "3", "*", "*", "1"]
    assert user == "trekeys"
    assert "/scheduling/run-drills.sh" in command
    assert "%" not in command  # cron turns % into a newline


def test_cron_command_passes_failure_through(
    scheduled_env: dict[str, str], tmp_path: Path
):
    _, _, command = cron_job()
    command = command.replace(
        "/opt/trekeys/scheduling/run-drills.sh", f"{WRAPPER} raises"
    )
    command = command.replace(
        "/var/log/trekeys/drills.log", str(tmp_path / "drills.log")
    )

    result = subprocess.run(
        ["sh", "-c", command],
        env=scheduled_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert result.returncode == 1
    assert "trekeys drills failed with status 1" in result.stdout
    assert "failed      raises" in (tmp_path / "drills.log").read_text()

"""The TLS runbooks, run headless with papermill against the demo TRE."""

from __future__ import annotations

import re
import shutil
from datetime import timedelta
from pathlib import Path

from click.testing import CliRunner

from trekeys import tls
from trekeys.cli import main
from trekeys.drills import run_drills
from trekeys.lab import Lab
from trekeys.records import utcnow

DRILLS = ["tls-issue", "tls-audit"]


def _outcomes(lab: Lab, out: Path, names: list[str]) -> dict[str, str]:
    run = run_drills(lab.root, out, names=names)
    return {d.name: f"{d.outcome} {d.error}".strip() for d in run.drills}


def test_tls_drills_pass_twice(full_lab: Lab, tmp_path: Path) -> None:
    first = _outcomes(full_lab, tmp_path / "reports", DRILLS)
    second = _outcomes(full_lab, tmp_path / "reports", DRILLS)

    assert first == {"tls-issue": "passed", "tls-audit": "passed"}
    assert second == first
    assert not (full_lab.work_dir / "tls-issue").exists()
    charts = list((tmp_path / "reports").glob("*/tls-expiry-timeline.png"))
    assert len(charts) == 2


def test_audit_drill_fails_on_revoked_deployment(full_lab: Lab, tmp_path: Path) -> None:
    with full_lab.open_vault() as vault:
        tls.revoke_certificate(vault, "tls/portal.tre.internal", "keyCompromise")

    result = CliRunner().invoke(
        main,
        ["drill", "tls-audit", "--lab", str(full_lab.root), "--out", str(tmp_path)],
    )

    assert result.exit_code == 1
    assert re.search(r"failed +tls-audit", result.output)
    assert "nothing expired, revoked or mismatched" in result.output
    assert "portal.tre.internal" in result.output


def test_audit_drill_fails_on_expired_deployment(full_lab: Lab, tmp_path: Path) -> None:
    folder = full_lab.services_dir / "wiki.tre.internal"
    folder.mkdir()
    with full_lab.open_vault() as vault:
        record = tls.issue_certificate(
            vault, "wiki.tre.internal", days=30, now=utcnow() - timedelta(days=40)
        )
        tls.deploy_certificate(vault, record.id, folder)

    outcome = _outcomes(full_lab, tmp_path / "reports", ["tls-audit"])

    assert outcome["tls-audit"].startswith("failed")
    assert "expired 10 days ago" in outcome["tls-audit"]


def test_audit_drill_swapped_certificate_fails(full_lab: Lab, tmp_path: Path) -> None:
    services = full_lab.services_dir
    shutil.copy(
        services / "gitlab.tre.internal" / "fullchain.pem",
        services / "portal.tre.internal" / "fullchain.pem",
    )

    run = run_drills(full_lab.root, tmp_path / "reports", names=["tls-audit"])

    drill = run.drills[0]
    failed_checks = [c["name"] for c in drill.checks if not c["passed"]]
    report = next((tmp_path / "reports").glob("*/tls-audit.html")).read_text()
    assert drill.outcome == "failed"
    assert "SSLError" not in drill.error
    assert "does not match" in drill.error
    assert "not a certificate of tls/portal.tre.internal" in drill.error
    assert "nothing expired, revoked or mismatched is deployed or served" in (
        failed_checks
    )
    assert "SSLError" not in report
    assert "KEY_VALUES_MISMATCH" not in report
    assert 'alt="Certificate expiry timeline of ' in report
    assert "No description has been provided" not in report

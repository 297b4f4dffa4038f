"""The volume runbooks run headless on the demo TRE, twice, and leak no secret."""

from __future__ import annotations

import base64
from pathlib import Path

from trekeys.drills import run_drills
from trekeys.lab import Lab

VOLUME_DRILLS = ["volume-provision", "volume-recovery", "volume-lifecycle"]


def test_volume_runbooks_pass_twice(full_lab: Lab, tmp_path: Path) -> None:
    first = run_drills(full_lab.root, tmp_path / "reports", names=VOLUME_DRILLS)
    second = run_drills(full_lab.root, tmp_path / "reports", names=VOLUME_DRILLS)

    for run in (first, second):
        outcomes = {d.name: (d.outcome, d.error) for d in run.drills}
        assert outcomes == {name: ("passed", "") for name in VOLUME_DRILLS}
    with full_lab.open_vault() as vault:
        proof = vault.get("alpha/luks-volume").attributes["last_recovery_proof"]
        secrets = [
            vault.read_secret(key_id, "report scan")
            for key_id in vault.ids()
            if "luks" in key_id and not vault.get(key_id).is_tombstone
        ]
    assert proof
    assert list(full_lab.work_dir.glob("luks-drill-*")) == []

    reports = "".join(
        path.read_text(encoding="utf-8")
        for run in (first, second)
        for path in run.folder.glob("*.ipynb")
    )
    for secret in secrets:
        assert secret.hex() not in reports
        assert base64.b64encode(secret).decode() not in reports
        if secret.isascii():
            assert secret.decode() not in reports


def test_recovery_runbook_fails_on_bad_media_copy(
    full_lab: Lab, tmp_path: Path
) -> None:
    with full_lab.open_vault() as vault:
        name = vault.get("alpha/luks-volume").attributes["header_backup_file"]
    media = full_lab.root / name
    media.write_bytes(b"\0" * media.stat().st_size)

    run = run_drills(full_lab.root, tmp_path / "reports", names=["volume-recovery"])

    outcome = run.drills[0]
    assert outcome.outcome == "failed"
    assert "backup media is sound" in outcome.error
    assert str(media) in outcome.error


def test_recovery_runbook_claims_its_proofs(full_lab: Lab, tmp_path: Path) -> None:
    run = run_drills(full_lab.root, tmp_path / "reports", names=["volume-recovery"])

    outcome = run.drills[0]
    assert outcome.outcome == "passed", outcome.error
    claimed = sorted(proof["key_id"] for proof in outcome.recovery_proofs)
    expected = sorted(
        f"{instance}/{kind}"
        for instance in full_lab.instances
        for kind in ("luks-volume", "luks-passphrase", "luks-boot-key")
    )
    assert claimed == expected
    assert all(proof["recorded"] for proof in outcome.recovery_proofs)
    with full_lab.open_vault(read_only=True) as vault:
        record = vault.get("alpha/luks-volume")
    report = f"{run.folder.name}/volume-recovery.ipynb"
    assert record.attributes["last_recovery_report"] == report

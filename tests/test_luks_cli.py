"""The ``trekeys volume`` commands on a copy of the demo TRE."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from trekeys.cli import main
from trekeys.cryptsetup import KdfSettings
from trekeys.errors import VolumeError
from trekeys.lab import Lab
from trekeys.luks import build_manifest, current_key
from trekeys.luks_device import add_keyslot
from trekeys.records import KeyKind


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_volume_drill_and_recover(full_lab: Lab, tmp_path: Path) -> None:
    lab = str(full_lab.root)
    target = tmp_path / "out"

    drill = invoke("volume", "drill", "alpha", "--lab", lab)
    recover = invoke("volume", "recover", "beta", "--lab", lab, "--out", str(target))

    assert drill.exit_code == 0
    assert "live volume unchanged: True" in drill.output
    assert recover.exit_code == 0
    assert build_manifest(target) == build_manifest(
        full_lab.instance_dir("beta") / "data"
    )


def test_volume_check_header_reports_stale(full_lab: Lab) -> None:
    lab = str(full_lab.root)
    with full_lab.open_vault() as vault:
        passphrase = vault.read_secret("alpha/luks-passphrase", "test")
    device = full_lab.instance_dir("alpha") / "volume.img"

    fresh = invoke("volume", "check-header", "alpha", "--lab", lab)
    add_keyslot(device, passphrase, b"another key", kdf=KdfSettings.test())
    stale = invoke("volume", "check-header", "alpha", "--lab", lab)
    refreshed = invoke("volume", "backup-header", "alpha", "--lab", lab)
    again = invoke("volume", "check-header", "alpha", "--lab", lab)

    assert fresh.exit_code == 0
    assert stale.exit_code == 1
    assert "STALE" in stale.output
    assert refreshed.exit_code == 0
    assert again.exit_code == 0


def test_volume_destroy_needs_uuid(full_lab: Lab) -> None:
    device = full_lab.instance_dir("beta") / "volume.img"
    before = device.read_bytes()

    result = CliRunner().invoke(
        main,
        [
            "volume",
            "destroy",
            "beta",
            "--lab",
            str(full_lab.root),
            "--confirm-uuid",
            "wrong",
            "--reason",
            "test",
        ],
    )

    assert result.exit_code == 1
    assert "needs its LUKS UUID" in result.output
    assert device.read_bytes() == before


def test_volume_drill_records_its_own_report(
    full_lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = str(full_lab.root)
    monkeypatch.setenv("TREKEYS_ACTOR", "ops-tester")
    first = invoke("volume", "drill", "alpha", "--lab", lab, "--report", "run-1")
    second = invoke("volume", "drill", "alpha", "--lab", lab)

    with full_lab.open_vault(read_only=True) as vault:
        records = [
            vault.get(f"alpha/{name}")
            for name in ("luks-volume", "luks-passphrase", "luks-boot-key")
        ]
        proofs = [
            entry
            for entry in vault.audit_log.entries()
            if entry["operation"] == "recovery-proof"
        ]
    proved_at = records[0].attributes["last_recovery_proof"]
    report = records[0].attributes["last_recovery_report"]

    assert first.exit_code == 0
    assert second.exit_code == 0
    assert report == f"cli drill {proved_at} by ops-tester"
    for record in records:
        assert record.attributes["last_recovery_proof"] == proved_at
        assert record.attributes["last_recovery_report"] == report
    latest = proofs[-3:]
    assert [entry["key_id"] for entry in latest] == [r.id for r in records]
    for entry in latest:
        assert entry["detail"].startswith(f"{report}: proved ")
        assert "header restored from the vault's backup" in entry["detail"]
        assert "alpha/luks-boot-key opens the volume" in entry["detail"]
        assert "with the escrowed alpha/luks-volume alone" in entry["detail"]


def test_volume_recover_is_private(full_lab: Lab, tmp_path: Path) -> None:
    target = tmp_path / "restores" / "out"

    result = invoke(
        "volume", "recover", "beta", "--lab", str(full_lab.root), "--out", str(target)
    )

    assert result.exit_code == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    inside = list(target.rglob("*"))
    assert any(path.is_file() for path in inside)
    assert any(path.is_dir() for path in inside)
    for path in inside:
        assert stat.S_IMODE(path.lstat().st_mode) & 0o077 == 0, path
    assert [p.name for p in target.parent.iterdir()] == ["out"]


def test_volume_unknown_instance_names_known_ones(full_lab: Lab) -> None:
    vault_before = full_lab.vault_path.read_bytes()

    result = CliRunner().invoke(
        main, ["volume", "drill", "gamma", "--lab", str(full_lab.root)]
    )

    assert result.exit_code == 1
    assert "no volume for instance gamma; known instances: alpha, beta" in (
        result.output
    )
    assert "trekeys volume provision gamma" in result.output
    assert full_lab.vault_path.read_bytes() == vault_before
    assert not list(full_lab.work_dir.glob("luks-drill-*"))


def test_current_key_unknown_instance(full_lab: Lab) -> None:
    with full_lab.open_vault(read_only=True) as vault:
        with pytest.raises(
            VolumeError,
            match="no volume for instance gamma; known instances: alpha, beta",
        ):
            current_key(vault, "gamma", KeyKind.LUKS_VOLUME)

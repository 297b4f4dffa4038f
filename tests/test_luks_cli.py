"""The ``trekeys volume`` commands on a copy of the demo TRE."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from trekeys.cli import main
from trekeys.cryptsetup import KdfSettings
from trekeys.lab import Lab
from trekeys.luks import build_manifest
from trekeys.luks_device import add_keyslot


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

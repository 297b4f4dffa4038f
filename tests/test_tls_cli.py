"""The ``trekeys tls`` commands, run against a copy of the demo TRE."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from trekeys.cli import main
from trekeys.lab import Lab, create_lab
from trekeys.tls_names import parse_subject_names


@pytest.fixture(scope="module")
def lab_template(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    return create_lab(
        tmp_path_factory.mktemp("template") / "lab", steps=["trekeys.tls:build_lab"]
    )


@pytest.fixture
def lab(lab_template: Lab, tmp_path: Path) -> Lab:
    shutil.copytree(lab_template.root, tmp_path / "lab")
    return Lab.load(tmp_path / "lab")


def _tls(lab: Lab, *args: str) -> Result:
    return CliRunner().invoke(main, ["tls", *args, "--lab", str(lab.root)])


def test_cli_certificate_life(lab: Lab, tmp_path: Path) -> None:
    folder = tmp_path / "wiki"
    folder.mkdir()

    issued = _tls(
        lab, "issue", "wiki.tre.internal", "--name", "10.0.0.7", "--deploy", str(folder)
    )
    renewed = _tls(lab, "renew", "tls/wiki.tre.internal", "--new-key")
    revoked = _tls(
        lab, "revoke", "tls/wiki.tre.internal@2", "--reason", "cessationOfOperation"
    )
    crl = _tls(lab, "crl")
    rotated = _tls(
        lab, "rotate", "tls/portal.tre.internal", "--reason", "test", "--compromised"
    )

    assert issued.exit_code == 0, issued.output
    assert issued.output.startswith("issued tls/wiki.tre.internal: serial ")
    assert (folder / "privkey.pem").is_file()
    assert renewed.exit_code == 0, renewed.output
    assert "renewed tls/wiki.tre.internal@2" in renewed.output
    assert revoked.exit_code == 0, revoked.output
    assert "the key is now deactivated" in revoked.output
    assert crl.exit_code == 0, crl.output
    assert "2 revoked" in crl.output
    assert rotated.exit_code == 0, rotated.output
    assert "new keys: tls/portal.tre.internal@2" in rotated.output


def test_cli_renew_due_none_due(lab: Lab) -> None:
    result = _tls(lab, "renew", "--due", "--renew-after", "0.99")

    assert result.exit_code == 0, result.output
    assert "no certificate is due for renewal" in result.output


def test_cli_renew_due_default(lab: Lab) -> None:
    result = _tls(lab, "renew", "--due")

    assert result.exit_code == 0, result.output
    assert (
        result.output
        == "renewed tls/jupyter.tre.internal@2: serial "
        + (result.output.split("serial ")[1])
    )


def test_cli_second_ca_rejected(lab: Lab) -> None:
    result = _tls(lab, "ca", "create")

    assert result.exit_code == 1
    assert "Error: CA tls/ca is already active" in result.output


def test_cli_deploy_needs_destination(lab: Lab) -> None:
    result = _tls(lab, "deploy", "tls/portal.tre.internal")

    assert result.exit_code == 2
    assert "give FOLDER, or both --chain-path and --key-path" in result.output


def test_subject_names_normalized() -> None:
    names = parse_subject_names(
        [
            "Portal.TRE.internal.",
            "portal.tre.internal",
            "xn--bcher-kva.tre.internal",
            "10.0.0.5",
            "10.0.0.5",
            "fe80::1",
        ]
    )

    assert names.dns_names == ["portal.tre.internal", "xn--bcher-kva.tre.internal"]
    assert [str(ip) for ip in names.ip_addresses] == ["10.0.0.5", "fe80::1"]


def test_cli_audit_json(lab: Lab) -> None:
    result = CliRunner().invoke(
        main, ["tls", "audit", "--json", "--lab", str(lab.root)]
    )

    rows = json.loads(result.stdout)
    assert result.exit_code == 0
    assert rows[0]["verdict"] == "WARN"
    assert rows[0]["service"] == "jupyter.tre.internal"
    assert "4 certificates, 0 failing, 1 warning" in result.stderr

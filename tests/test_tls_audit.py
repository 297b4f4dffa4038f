"""The certificate audit: deployed files, live endpoints on 127.0.0.1, the chart."""

from __future__ import annotations

import base64
import shutil
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from tls_support import closed_port, plain_text_server, silent_server

from trekeys import tls
from trekeys.cli import main
from trekeys.errors import CertificateError, EndpointError, PolicyError
from trekeys.lab import Lab, create_lab
from trekeys.records import utcnow
from trekeys.tls_endpoints import Endpoint, fetch_certificate
from trekeys.tls_names import parse_subject_names
from trekeys.tls_x509 import (
    build_service_certificate,
    certificate_pem,
    generate_private_key,
    private_key_pem,
)
from trekeys.vault import Vault

SERVICES_STEP = "trekeys.tls:build_lab"


@pytest.fixture(scope="module")
def lab_template(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    return create_lab(
        tmp_path_factory.mktemp("template") / "lab", steps=[SERVICES_STEP]
    )


@pytest.fixture
def lab(lab_template: Lab, tmp_path: Path) -> Lab:
    shutil.copytree(lab_template.root, tmp_path / "lab")
    return Lab.load(tmp_path / "lab")


@pytest.fixture
def vault(lab: Lab) -> Iterator[Vault]:
    with lab.open_vault() as opened:
        yield opened


def _by_source(report: tls.TlsAuditReport) -> dict[str, tls.CertificateFinding]:
    return {finding.source: finding for finding in report.findings}


def _chain(lab: Lab, service: str) -> str:
    return str(lab.services_dir / service / "fullchain.pem")


def test_demo_lab_passes_with_one_warning(lab: Lab, vault: Vault) -> None:
    report = tls.audit_tls(lab, vault)

    findings = _by_source(report)
    jupyter = findings[_chain(lab, "jupyter.tre.internal")]
    portal = findings[_chain(lab, "portal.tre.internal")]
    ca = findings[str(lab.root / "pki" / "tls-ca.pem")]
    assert report.passed
    assert len(report.findings) == 4
    assert [f.service for f in report.warnings] == ["jupyter.tre.internal"]
    assert 0 < jupyter.days_left <= 30
    assert jupyter.warnings == [f"expires in {jupyter.days_left} days"]
    assert portal.verdict == "ok"
    assert portal.sans == ["portal.tre.internal", "portal"]
    assert portal.vault_key == "tls/portal.tre.internal"
    assert portal.vault_status == "current"
    assert portal.hostname_verified is True
    assert portal.key_matches is True
    assert portal.issuer == ca.subject
    assert ca.is_ca
    assert ca.vault_key == "tls/ca"


def test_revoked_certificate_still_deployed_fails(lab: Lab, vault: Vault) -> None:
    tls.revoke_certificate(vault, "tls/portal.tre.internal", "keyCompromise")

    report = tls.audit_tls(lab, vault)

    portal = _by_source(report)[_chain(lab, "portal.tre.internal")]
    assert not report.passed
    assert report.failures == [portal]
    assert portal.revoked
    assert portal.revocation_reason == "keyCompromise"
    assert portal.failures == ["revoked (keyCompromise) but still deployed"]


def test_expired_certificate_still_deployed_fails(lab: Lab, vault: Vault) -> None:
    record = tls.issue_certificate(
        vault, "old.tre.internal", days=30, now=utcnow() - timedelta(days=100)
    )
    (lab.services_dir / "old").mkdir()
    tls.deploy_certificate(vault, record.id, lab.services_dir / "old")

    report = tls.audit_tls(lab, vault)

    old = _by_source(report)[str(lab.services_dir / "old" / "fullchain.pem")]
    assert report.failures == [old]
    assert old.days_left < 0
    assert old.failures == [
        "expired 70 days ago",
        "does not verify for old.tre.internal",
    ]
    assert old.hostname_verified is False


def test_superseded_certificate_left_behind_fails(lab: Lab, vault: Vault) -> None:
    stale = lab.root / "stale"
    stale.mkdir()
    shutil.copy(lab.services_dir / "gitlab.tre.internal" / "fullchain.pem", stale)
    tls.renew_certificate(vault, "tls/gitlab.tre.internal")

    report = tls.audit_tls(lab, vault, scan_dirs=[lab.services_dir, stale])

    findings = _by_source(report)
    left_behind = findings[str(stale / "fullchain.pem")]
    redeployed = findings[_chain(lab, "gitlab.tre.internal")]
    assert left_behind.failures == ["superseded (superseded) but still deployed"]
    assert redeployed.verdict == "ok"


def test_mismatched_key_file_fails(lab: Lab, vault: Vault) -> None:
    key_file = lab.services_dir / "gitlab.tre.internal" / "privkey.pem"
    key_file.write_text(private_key_pem(generate_private_key("ecdsa-p256")))

    report = tls.audit_tls(lab, vault)

    gitlab = _by_source(report)[_chain(lab, "gitlab.tre.internal")]
    assert gitlab.key_matches is False
    assert "does not match" in gitlab.failures[0]


def test_unknown_self_signed_file_fails(lab: Lab, vault: Vault) -> None:
    key = generate_private_key("ecdsa-p256")
    names = parse_subject_names(["stray.tre.internal"])
    stray_certificate = build_service_certificate(key, names, utcnow(), 90)
    (lab.services_dir / "stray.pem").write_bytes(certificate_pem(stray_certificate))

    report = tls.audit_tls(lab, vault)

    stray = _by_source(report)[str(lab.services_dir / "stray.pem")]
    assert not report.passed
    assert stray.vault_status == "not in vault"
    assert stray.warnings == ["certificate not in the vault"]
    assert stray.failures == ["does not verify for stray.tre.internal"]


def test_self_signed_deployment_verifies(lab: Lab, vault: Vault) -> None:
    record = tls.issue_certificate(vault, "legacy.tre.internal", self_signed=True)
    (lab.services_dir / "legacy").mkdir()
    tls.deploy_certificate(vault, record.id, lab.services_dir / "legacy")

    with tls.serve_deployments(vault) as served:
        report = tls.audit_tls(lab, vault, endpoints=served)

    legacy = [f for f in report.findings if f.service == "legacy.tre.internal"]
    assert [f.origin for f in legacy] == ["file", "endpoint"]
    assert all(f.hostname_verified for f in legacy)
    assert all(f.vault_key == record.id for f in legacy)
    assert report.passed


def test_live_endpoints_audited_by_handshake(lab: Lab, vault: Vault) -> None:
    with tls.serve_deployments(vault) as served:
        report = tls.audit_tls(lab, vault, scan_dirs=[], endpoints=served)

    assert {f.service for f in report.findings} == set(lab.services)
    assert all(f.origin == "endpoint" for f in report.findings)
    assert all(f.hostname_verified for f in report.findings)
    assert report.passed


def test_endpoint_with_wrong_name_fails(lab: Lab, vault: Vault) -> None:
    folder = lab.services_dir / "portal.tre.internal"
    with tls.serve_tls(folder / "fullchain.pem", folder / "privkey.pem") as endpoint:
        wrong = Endpoint(endpoint.host, endpoint.port, "gitlab.tre.internal")
        report = tls.audit_tls(lab, vault, scan_dirs=[], endpoints=[wrong])

    finding = report.findings[0]
    assert finding.hostname_verified is False
    assert "Hostname mismatch" in finding.verification_detail
    assert finding.verdict == "FAIL"
    assert finding.vault_key == "tls/portal.tre.internal"


def test_failing_endpoints_reported_and_audit_goes_on(lab: Lab, vault: Vault) -> None:
    folder = lab.services_dir / "portal.tre.internal"
    refused = closed_port()
    with (
        silent_server() as silent,
        plain_text_server() as plain,
        tls.serve_tls(folder / "fullchain.pem", folder / "privkey.pem") as good,
    ):
        served = Endpoint(good.host, good.port, "portal.tre.internal")
        report = tls.audit_tls(
            lab,
            vault,
            endpoints=[refused, silent, plain, served],
            timeout=1.0,
        )

    findings = _by_source(report)
    assert findings[refused.address].warnings == ["endpoint refused"]
    assert findings[silent.address].warnings == ["endpoint timed out"]
    assert findings[plain.address].warnings == ["endpoint no TLS"]
    assert "refused the connection" in findings[refused.address].error
    assert findings[served.address].hostname_verified is True
    assert findings[_chain(lab, "gitlab.tre.internal")].verdict == "ok"
    assert report.passed


@pytest.mark.parametrize(
    ("server", "reason"),
    [(silent_server, "timed out"), (plain_text_server, "no TLS")],
)
def test_fetch_certificate_errors(server, reason: str) -> None:
    message = {"timed out": "timed out after 1 s", "no TLS": "does not speak TLS"}
    with server() as endpoint:
        with pytest.raises(EndpointError, match=message[reason]) as caught:
            fetch_certificate(endpoint, timeout=1.0)

    assert caught.value.reason == reason
    assert caught.value.endpoint == endpoint.address


def test_endpoint_parse() -> None:
    parsed = Endpoint.parse("portal.tre.internal@127.0.0.1:8443")

    assert parsed == Endpoint("127.0.0.1", 8443, "portal.tre.internal")
    assert Endpoint.parse("[::1]:443").host == "::1"
    with pytest.raises(EndpointError, match="not host:port"):
        Endpoint.parse("portal.tre.internal")


def test_drill_server_only_on_loopback(lab: Lab) -> None:
    folder = lab.services_dir / "portal.tre.internal"

    with pytest.raises(PolicyError, match="only on loopback"):
        with tls.serve_tls(
            folder / "fullchain.pem", folder / "privkey.pem", host="0.0.0.0"
        ):
            pass


def test_expiry_timeline_is_png(lab: Lab, vault: Vault) -> None:
    png = tls.expiry_timeline_png(tls.audit_tls(lab, vault))

    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 10_000


def test_cli_audit_exit_status(lab: Lab) -> None:
    runner = CliRunner()

    passed = runner.invoke(main, ["tls", "audit", "--lab", str(lab.root)])
    revoked = runner.invoke(
        main,
        [
            "tls",
            "revoke",
            "tls/gitlab.tre.internal",
            "--reason",
            "keyCompromise",
            "--lab",
            str(lab.root),
        ],
    )
    failed = runner.invoke(main, ["tls", "audit", "--lab", str(lab.root)])

    assert passed.exit_code == 0, passed.output
    assert "expires in" in passed.output
    assert revoked.exit_code == 0, revoked.output
    assert failed.exit_code == 1
    assert "FAIL" in failed.output


def test_cli_issue_bad_hostname(lab: Lab) -> None:
    result = CliRunner().invoke(
        main,
        [
            "tls",
            "issue",
            "wiki.tre.internal",
            "--name",
            "bad_name",
            "--lab",
            str(lab.root),
        ],
    )

    assert result.exit_code == 1
    assert "Error: 'bad_name' is not a valid DNS name or IP address" in result.output


def _openssl_self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """Create a self-signed certificate as `openssl req -x509` does by default,
    which marks it CA:TRUE, and return its chain and key paths."""
    chain, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(chain),
            "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
            "-days", "90",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return chain, key


def test_swapped_certificate_fails_key_check(
    lab: Lab, vault: Vault, tmp_path: Path
) -> None:
    foreign, _ = _openssl_self_signed(tmp_path, "other.example")
    shutil.copy(foreign, _chain(lab, "portal.tre.internal"))

    report = tls.audit_tls(lab, vault)

    portal = _by_source(report)[_chain(lab, "portal.tre.internal")]
    assert portal.verdict == "FAIL"
    assert portal.key_matches is False
    assert portal.service == "portal.tre.internal"
    assert "key file privkey.pem does not match the certificate" in portal.failures
    assert "not a certificate of tls/portal.tre.internal" in portal.failures
    assert not report.passed


def test_serve_deployments_skips_mismatched_key(lab: Lab, vault: Vault) -> None:
    gitlab = lab.services_dir / "gitlab.tre.internal" / "fullchain.pem"
    shutil.copy(gitlab, _chain(lab, "portal.tre.internal"))

    with tls.serve_deployments(vault) as served:
        report = tls.audit_tls(lab, vault, endpoints=served)

    portal = _by_source(report)[_chain(lab, "portal.tre.internal")]
    assert sorted(e.service for e in served) == [
        "gitlab.tre.internal",
        "jupyter.tre.internal",
    ]
    assert portal.key_matches is False
    assert not report.passed


def test_serve_tls_mismatched_key_raises(lab: Lab) -> None:
    portal = lab.services_dir / "portal.tre.internal"
    gitlab = lab.services_dir / "gitlab.tre.internal"

    with pytest.raises(CertificateError, match="privkey.pem does not match"):
        with tls.serve_tls(portal / "fullchain.pem", gitlab / "privkey.pem"):
            pass


def test_other_service_files_deployed_fail(lab: Lab, vault: Vault) -> None:
    gitlab = lab.services_dir / "gitlab.tre.internal"
    portal = lab.services_dir / "portal.tre.internal"
    shutil.copy(gitlab / "fullchain.pem", portal / "fullchain.pem")
    shutil.copy(gitlab / "privkey.pem", portal / "privkey.pem")

    report = tls.audit_tls(lab, vault)

    finding = _by_source(report)[_chain(lab, "portal.tre.internal")]
    assert finding.key_matches is True
    assert finding.service == "portal.tre.internal"
    assert finding.vault_key == "tls/gitlab.tre.internal"
    assert finding.hostname_verified is False
    assert "not a certificate of tls/portal.tre.internal" in finding.failures
    assert "does not verify for portal.tre.internal" in finding.failures
    assert not report.passed


def test_self_signed_endpoint_fails(lab: Lab, vault: Vault, tmp_path: Path) -> None:
    chain, key = _openssl_self_signed(tmp_path, "portal.tre.internal")
    with tls.serve_tls(chain, key) as served:
        endpoint = Endpoint(served.host, served.port, "portal.tre.internal")
        report = tls.audit_tls(lab, vault, scan_dirs=[], endpoints=[endpoint])

    finding = report.findings[0]
    assert finding.verdict == "FAIL"
    assert finding.hostname_verified is False
    assert finding.failures[0].startswith("handshake does not verify:")
    assert not report.passed


def test_expiry_warning_pluralised(lab: Lab, vault: Vault) -> None:
    report = tls.audit_tls(lab, vault, now=utcnow() + timedelta(days=400))
    jupyter = _by_source(report)[_chain(lab, "jupyter.tre.internal")]
    record = vault.get("tls/jupyter.tre.internal")
    one_day_before = record.expires - timedelta(days=1, hours=1)

    soon = tls.audit_tls(lab, vault, now=one_day_before)

    assert jupyter.failures[0].endswith("days ago")
    assert _by_source(soon)[_chain(lab, "jupyter.tre.internal")].warnings == [
        "expires in 1 day"
    ]


def test_cli_audit_fails_bad_deployments(lab: Lab, tmp_path: Path) -> None:
    foreign, _ = _openssl_self_signed(tmp_path, "other.example")
    shutil.copy(foreign, _chain(lab, "portal.tre.internal"))

    result = CliRunner().invoke(main, ["tls", "audit", "--lab", str(lab.root)])

    portal_line = next(
        line for line in result.stdout.splitlines() if "portal.tre.internal" in line
    )
    assert result.exit_code == 1
    assert portal_line.startswith("FAIL")
    assert "does not match" in portal_line


def test_cli_audit_fails_other_service_files(lab: Lab) -> None:
    gitlab = lab.services_dir / "gitlab.tre.internal"
    portal = lab.services_dir / "portal.tre.internal"
    shutil.copy(gitlab / "fullchain.pem", portal / "fullchain.pem")
    shutil.copy(gitlab / "privkey.pem", portal / "privkey.pem")

    result = CliRunner().invoke(main, ["tls", "audit", "--lab", str(lab.root)])

    portal_line = next(
        line for line in result.stdout.splitlines() if str(portal) in line
    )
    assert result.exit_code == 1
    assert portal_line.startswith("FAIL")


def test_cli_audit_fails_self_signed_endpoint(lab: Lab, tmp_path: Path) -> None:
    chain, key = _openssl_self_signed(tmp_path, "portal.tre.internal")
    with tls.serve_tls(chain, key) as served:
        address = f"portal.tre.internal@{served.address}"
        result = CliRunner().invoke(
            main,
            ["tls", "audit", "--lab", str(lab.root), "--endpoint", address],
        )

    endpoint_line = next(
        line for line in result.stdout.splitlines() if served.address in line
    )
    assert result.exit_code == 1
    assert endpoint_line.startswith("FAIL")
    assert "handshake does not verify" in endpoint_line


def test_cli_audit_unreachable_days_column(lab: Lab) -> None:
    refused = closed_port()

    result = CliRunner().invoke(
        main,
        ["tls", "audit", "--lab", str(lab.root), "--endpoint", refused.address],
    )

    line = next(line for line in result.stdout.splitlines() if refused.address in line)
    assert line.split()[:2] == ["WARN", "-"]
    assert " d " not in line


def test_expiry_timeline_html_has_alt_text(lab: Lab, vault: Vault) -> None:
    report = tls.audit_tls(lab, vault)
    png = tls.expiry_timeline_png(report)

    alt = tls.expiry_timeline_alt(report)
    tag = tls.expiry_timeline_html(png, 'a "quoted" <chart>')

    assert alt.startswith("Certificate expiry timeline of 4 certificates, 0 failing")
    assert "jupyter.tre.internal [WARN]" in alt
    assert tag.startswith('<img alt="a &quot;quoted&quot; &lt;chart&gt;" src="data:')
    assert base64.b64decode(tag.split("base64,")[1].removesuffix('"/>')) == png


def test_missing_key_file_fails(lab: Lab, vault: Vault) -> None:
    (lab.services_dir / "gitlab.tre.internal" / "privkey.pem").unlink()

    report = tls.audit_tls(lab, vault)

    gitlab = _by_source(report)[_chain(lab, "gitlab.tre.internal")]
    assert gitlab.key_matches is False
    assert gitlab.failures[0].startswith("key file privkey.pem is unusable: ")
    assert "No such file" in gitlab.failures[0]

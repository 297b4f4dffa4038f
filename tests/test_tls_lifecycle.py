"""Renewal, revocation, CRLs and rotation, checked with openssl and handshakes."""

from __future__ import annotations

import json
import shutil
import ssl
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from tls_support import (
    copied_vault,
    create_template_vault,
    handshake,
    openssl,
    vault_state,
)

from trekeys import tls
from trekeys.errors import CertificateError, DeploymentError, PolicyError
from trekeys.lab import Lab, create_lab
from trekeys.records import KeyState, utcnow
from trekeys.tls_records import load_record_certificate
from trekeys.vault import Vault


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_template_vault(tmp_path_factory.mktemp("template"))


@pytest.fixture
def vault(template: Path, tmp_path: Path) -> Iterator[Vault]:
    with copied_vault(template, tmp_path) as opened:
        tls.create_ca(opened, publish_dir=tmp_path / "pki")
        yield opened


def _deployed(vault: Vault, service: str, folder: Path, **options) -> str:
    record = tls.issue_certificate(vault, service, **options)
    folder.mkdir(parents=True, exist_ok=True)
    tls.deploy_certificate(vault, record.id, folder)
    return record.id


def _crl_serials(path: Path) -> dict[int, x509.ReasonFlags | None]:
    crl = x509.load_pem_x509_crl(path.read_bytes())
    reasons = {}
    for revoked in crl:
        try:
            reason = revoked.extensions.get_extension_for_class(x509.CRLReason)
            reasons[revoked.serial_number] = reason.value.reason
        except x509.ExtensionNotFound:
            reasons[revoked.serial_number] = None
    return reasons


def test_renewal_due_after_two_thirds(vault: Vault) -> None:
    record = tls.issue_certificate(vault, "portal.tre.internal", days=90)
    starts = load_record_certificate(vault, record.id).not_valid_before_utc

    assert not tls.renewal_due(record, now=starts + timedelta(days=59))
    assert tls.renewal_due(record, now=starts + timedelta(days=61))
    assert tls.renewal_due(record, renew_after=0.5, now=starts + timedelta(days=46))
    with pytest.raises(PolicyError, match="not a fraction"):
        tls.renewal_due(record, renew_after=1.5)


def test_renew_same_key_supersedes_old(vault: Vault, tmp_path: Path) -> None:
    key_id = _deployed(vault, "portal.tre.internal", tmp_path / "www")
    old = load_record_certificate(vault, key_id)

    renewed = tls.renew_certificate(vault, key_id)

    new = load_record_certificate(vault, key_id)
    deployed = x509.load_pem_x509_certificates(
        (tmp_path / "www" / "fullchain.pem").read_bytes()
    )[0]
    history = json.loads(renewed.attributes["certificates"])
    assert renewed.id == key_id
    assert new.serial_number != old.serial_number
    assert new.public_key() == old.public_key()
    assert deployed == new
    assert [e["status"] for e in history] == ["superseded", "current"]
    assert f"certificate-{old.serial_number:x}.pem" in vault.attachment_names(key_id)
    assert _crl_serials(tmp_path / "pki" / "tls-ca.crl.pem") == {
        old.serial_number: x509.ReasonFlags.superseded
    }


def test_renew_with_new_key(vault: Vault, tmp_path: Path) -> None:
    key_id = _deployed(vault, "portal.tre.internal", tmp_path / "www", names=["portal"])
    old = load_record_certificate(vault, key_id)

    renewed = tls.renew_certificate(vault, key_id, new_key=True)

    new = load_record_certificate(vault, renewed.id)
    old_record = vault.get(key_id)
    assert renewed.id == "tls/portal.tre.internal@2"
    assert renewed.protects == ["service:portal.tre.internal"]
    assert new.public_key() != old.public_key()
    assert old_record.state is KeyState.DEACTIVATED
    assert old_record.attributes["replaced_by"] == renewed.id
    assert old_record.attributes["deployments"] == "[]"
    assert (tmp_path / "www" / "privkey.pem").read_bytes() == vault.read_secret(
        renewed.id, "test"
    )
    assert tls.find_service_key(vault, "portal.tre.internal").id == renewed.id
    assert "cert:tls/portal.tre.internal@2" in vault.get("tls/ca").signs


def test_renew_same_key_past_cryptoperiod_rejected(vault: Vault) -> None:
    record = tls.issue_certificate(
        vault, "portal.tre.internal", key_cryptoperiod_days=400
    )
    before = vault_state(vault)

    with pytest.raises(PolicyError, match="renew with a new key"):
        tls.renew_certificate(vault, record.id, now=utcnow() + timedelta(days=200))

    assert vault_state(vault) == before


def test_renew_with_missing_deploy_folder_rejected(
    vault: Vault, tmp_path: Path
) -> None:
    key_id = _deployed(vault, "portal.tre.internal", tmp_path / "www")
    shutil.rmtree(tmp_path / "www")
    before = vault_state(vault)

    with pytest.raises(DeploymentError, match="www does not exist"):
        tls.renew_certificate(vault, key_id, new_key=True)

    assert vault_state(vault) == before
    assert not (tmp_path / "www").exists()


def test_renew_due_renews_only_due(vault: Vault) -> None:
    due = tls.issue_certificate(vault, "short.tre.internal", days=30)
    fresh = tls.issue_certificate(vault, "long.tre.internal", days=90)

    renewed = tls.renew_due_certificates(vault, now=utcnow() + timedelta(days=21))

    assert [r.id for r in renewed] == [due.id]
    assert len(json.loads(vault.get(fresh.id).attributes["certificates"])) == 1


def test_revoke_key_compromise_publishes_crl(vault: Vault, tmp_path: Path) -> None:
    key_id = _deployed(vault, "portal.tre.internal", tmp_path / "www")
    other = _deployed(vault, "gitlab.tre.internal", tmp_path / "gitlab")
    serial = load_record_certificate(vault, key_id).serial_number
    crl_path = tmp_path / "pki" / "tls-ca.crl.pem"

    record = tls.revoke_certificate(vault, key_id, "keyCompromise")

    text = openssl("crl", "-in", str(crl_path), "-noout", "-text")
    verified = openssl(
        "crl", "-in", str(crl_path), "-CAfile", str(tmp_path / "pki" / "tls-ca.pem")
    )
    assert record.state is KeyState.COMPROMISED
    assert record.attributes["revocation_reason"] == "keyCompromise"
    assert text.returncode == 0, text.stderr
    assert f"{serial:X}" in text.stdout.replace(":", "").upper()
    assert "Key Compromise" in text.stdout
    assert "verify OK" in verified.stderr + verified.stdout
    assert _crl_serials(crl_path) == {serial: x509.ReasonFlags.key_compromise}
    assert vault.get(other).state is KeyState.ACTIVE
    assert vault.get("tls/ca").attributes["crl_number"] == "1"


def test_revoke_other_reason_deactivates(vault: Vault) -> None:
    record = tls.issue_certificate(vault, "portal.tre.internal")

    tls.revoke_certificate(vault, record.id, "cessationOfOperation")

    assert vault.get(record.id).state is KeyState.DEACTIVATED


def test_revoke_unknown_reason_rejected(vault: Vault) -> None:
    record = tls.issue_certificate(vault, "portal.tre.internal")

    with pytest.raises(CertificateError, match="unknown revocation reason"):
        tls.revoke_certificate(vault, record.id, "lost")

    assert vault.get(record.id).state is KeyState.ACTIVE


def test_revoke_ca_rejected(vault: Vault) -> None:
    with pytest.raises(PolicyError, match="cannot revoke itself"):
        tls.revoke_certificate(vault, "tls/ca", "keyCompromise")


@pytest.fixture
def lab_with_ca(bare_lab: Lab) -> Iterator[tuple[Lab, Vault]]:
    with bare_lab.open_vault() as vault:
        tls.create_ca(vault, publish_dir=tls.default_publish_dir(bare_lab))
        for service in ("portal.tre.internal", "gitlab.tre.internal"):
            _deployed(vault, service, bare_lab.services_dir / service)
        yield bare_lab, vault


def test_rotate_compromised_service_key(lab_with_ca: tuple[Lab, Vault]) -> None:
    lab, vault = lab_with_ca
    old = load_record_certificate(vault, "tls/portal.tre.internal")
    root = lab.root / "pki" / "tls-ca.pem"

    new_ids = tls.rotate_key(
        lab, vault, "tls/portal.tre.internal", reason="key leaked", compromised=True
    )

    folder = lab.services_dir / "portal.tre.internal"
    assert new_ids == ["tls/portal.tre.internal@2"]
    assert vault.get("tls/portal.tre.internal").state is KeyState.COMPROMISED
    assert vault.get(new_ids[0]).state is KeyState.ACTIVE
    assert _crl_serials(lab.root / "pki" / "tls-ca.crl.pem") == {
        old.serial_number: x509.ReasonFlags.key_compromise
    }
    assert (folder / "privkey.pem").read_bytes() == vault.read_secret(
        new_ids[0], "test"
    )
    with tls.serve_tls(folder / "fullchain.pem", folder / "privkey.pem") as endpoint:
        assert handshake(endpoint, root, "portal.tre.internal")


def test_rotate_compromised_ca(lab_with_ca: tuple[Lab, Vault]) -> None:
    lab, vault = lab_with_ca
    pki = lab.root / "pki"
    old_root = pki / "tls-ca.pem"
    old_root_copy = lab.root / "old-root.pem"
    old_root_copy.write_bytes(old_root.read_bytes())

    new_ids = tls.rotate_key(
        lab, vault, "tls/ca", reason="CA key exposed", compromised=True
    )

    folder = lab.services_dir / "portal.tre.internal"
    new_root = pki / "tls-ca@2.pem"
    assert new_ids[0] == "tls/ca@2"
    assert sorted(new_ids[1:]) == [
        "tls/gitlab.tre.internal@2",
        "tls/portal.tre.internal@2",
    ]
    assert vault.get("tls/ca").state is KeyState.COMPROMISED
    assert vault.get("tls/portal.tre.internal").state is KeyState.DEACTIVATED
    assert not old_root.exists()
    assert new_root.exists()
    reasons = set(_crl_serials(pki / "tls-ca.crl.pem").values())
    assert reasons == {x509.ReasonFlags.ca_compromise}
    with tls.serve_tls(folder / "fullchain.pem", folder / "privkey.pem") as endpoint:
        assert handshake(endpoint, new_root, "portal.tre.internal")
        with pytest.raises(ssl.SSLCertVerificationError):
            handshake(endpoint, old_root_copy, "portal.tre.internal")
    result = openssl("verify", "-CAfile", str(new_root), str(folder / "fullchain.pem"))
    assert result.returncode == 0, result.stderr


def test_rotate_ca_then_issue_uses_new_ca(lab_with_ca: tuple[Lab, Vault]) -> None:
    lab, vault = lab_with_ca
    tls.rotate_key(lab, vault, "tls/ca", reason="scheduled", compromised=False)

    record = tls.issue_certificate(vault, "jupyter.tre.internal")

    assert record.attributes["issuer"] == "tls/ca@2"
    assert vault.get("tls/ca").state is KeyState.DEACTIVATED


def test_demo_lab_builds_certificates(tmp_path: Path) -> None:
    lab = create_lab(tmp_path / "lab", steps=["trekeys.tls:build_lab"])

    with lab.open_vault() as vault:
        services = {s: tls.find_service_key(vault, s) for s in lab.services}
        assert all(record is not None for record in services.values())
        jupyter = services["jupyter.tre.internal"]
        assert jupyter is not None
        assert jupyter.expires is not None
        assert timedelta(days=1) < jupyter.expires - utcnow() < timedelta(days=30)
        ca_key_line = vault.read_secret("tls/ca", "test").splitlines()[1]
    for service in lab.services:
        assert (lab.services_dir / service / "fullchain.pem").is_file()
        assert (lab.services_dir / service / "privkey.pem").stat().st_mode & 0o077 == 0
    lab_files = [p for p in lab.root.rglob("*") if p.is_file()]
    assert not [p for p in lab_files if ca_key_line in p.read_bytes()]


def test_rotate_self_signed_key(lab_with_ca: tuple[Lab, Vault]) -> None:
    lab, vault = lab_with_ca
    folder = lab.services_dir / "legacy"
    _deployed(vault, "legacy.tre.internal", folder, self_signed=True)

    new_ids = tls.rotate_key(
        lab, vault, "tls/legacy.tre.internal", reason="yearly", compromised=False
    )

    new = load_record_certificate(vault, new_ids[0])
    assert new_ids == ["tls/legacy.tre.internal@2"]
    assert new.issuer == new.subject
    assert vault.get("tls/legacy.tre.internal").state is KeyState.DEACTIVATED
    assert not (lab.root / "pki" / "tls-ca.crl.pem").exists()
    with tls.serve_tls(folder / "fullchain.pem", folder / "privkey.pem") as endpoint:
        assert handshake(endpoint, folder / "fullchain.pem", "legacy.tre.internal")

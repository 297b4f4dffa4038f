"""Issuing certificates: the CA and service profiles, real handshakes, bad input."""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterator
from datetime import UTC, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from tls_support import (
    copied_vault,
    create_template_vault,
    handshake,
    openssl,
    snapshot,
    vault_state,
)

from trekeys import tls
from trekeys.errors import (
    CertificateError,
    CertificateValidityError,
    HostnameError,
    PolicyError,
    RecordError,
)
from trekeys.records import KeyKind, KeyState, utcnow
from trekeys.tls_records import load_record_certificate
from trekeys.tls_x509 import certificate_pem, fingerprint
from trekeys.vault import Vault


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_template_vault(tmp_path_factory.mktemp("template"))


@pytest.fixture
def vault(template: Path, tmp_path: Path) -> Iterator[Vault]:
    with copied_vault(template, tmp_path) as opened:
        yield opened


@pytest.fixture
def ca_vault(vault: Vault, tmp_path: Path) -> Vault:
    tls.create_ca(vault, publish_dir=tmp_path / "pki")
    return vault


def _extension(certificate: x509.Certificate, kind: type) -> x509.Extension:
    return certificate.extensions.get_extension_for_class(kind)


def test_ca_profile_and_record(ca_vault: Vault, tmp_path: Path) -> None:
    record = ca_vault.get("tls/ca")
    certificate = load_record_certificate(ca_vault, "tls/ca")

    constraints = _extension(certificate, x509.BasicConstraints)
    usage = _extension(certificate, x509.KeyUsage)
    assert record.kind is KeyKind.TLS_CA
    assert record.state is KeyState.ACTIVE
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert record.fingerprint == fingerprint(certificate)
    assert "crl:tls/ca" in record.signs
    assert (tmp_path / "pki" / "tls-ca.pem").read_bytes() == (
        certificate_pem(certificate)
    )


def test_ca_key_only_in_vault(ca_vault: Vault, tmp_path: Path) -> None:
    ca_key = ca_vault.read_secret("tls/ca", "test").decode()
    body = ca_key.splitlines()[1]

    files = snapshot(tmp_path)
    assert ca_key.startswith("-----BEGIN PRIVATE KEY-----")
    assert all(body.encode() not in data for data in files.values())


def test_service_certificate_profile(ca_vault: Vault) -> None:
    record = tls.issue_certificate(
        ca_vault, "portal.tre.internal", names=["portal", "10.0.0.5", "::1"]
    )
    certificate = load_record_certificate(ca_vault, record.id)

    sans = _extension(certificate, x509.SubjectAlternativeName).value
    constraints = _extension(certificate, x509.BasicConstraints)
    usage = _extension(certificate, x509.KeyUsage)
    extended = _extension(certificate, x509.ExtendedKeyUsage).value
    assert record.id == "tls/portal.tre.internal"
    assert record.protects == ["service:portal.tre.internal"]
    assert "cert:tls/portal.tre.internal" in ca_vault.get("tls/ca").signs
    assert sans.get_values_for_type(x509.DNSName) == ["portal.tre.internal", "portal"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("::1"),
    ]
    assert constraints.critical
    assert not constraints.value.ca
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert list(extended) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert certificate.not_valid_after_utc.tzinfo is UTC
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    assert timedelta(days=365) <= lifetime <= timedelta(days=365, minutes=5)
    assert record.expires == certificate.not_valid_after_utc


def test_serials_are_random_and_distinct(ca_vault: Vault) -> None:
    serials = set()
    for name in ("a", "b", "c", "d"):
        record = tls.issue_certificate(ca_vault, f"{name}.tre.internal")
        serials.add(load_record_certificate(ca_vault, record.id).serial_number)

    assert len(serials) == 4
    assert all(serial.bit_length() > 64 for serial in serials)


def test_lifetime_above_398_days_rejected(ca_vault: Vault) -> None:
    before = vault_state(ca_vault)

    with pytest.raises(PolicyError, match="399 days is not allowed"):
        tls.issue_certificate(ca_vault, "long.tre.internal", days=399)

    assert vault_state(ca_vault) == before
    assert tls.issue_certificate(ca_vault, "long.tre.internal", days=398)


def test_second_active_certificate_rejected(ca_vault: Vault) -> None:
    tls.issue_certificate(ca_vault, "portal.tre.internal")

    with pytest.raises(RecordError, match="already has an active certificate"):
        tls.issue_certificate(ca_vault, "Portal.TRE.internal.")


def test_openssl_verifies_deployed_chain(ca_vault: Vault, tmp_path: Path) -> None:
    record = tls.issue_certificate(ca_vault, "portal.tre.internal")
    target = tls.deploy_certificate(ca_vault, record.id, tmp_path)
    root = tmp_path / "pki" / "tls-ca.pem"

    result = openssl(
        "verify",
        "-CAfile",
        str(root),
        "-untrusted",
        str(target.chain_path),
        "-purpose",
        "sslserver",
        "-verify_hostname",
        "portal.tre.internal",
        str(target.chain_path),
    )
    wrong_name = openssl(
        "verify",
        "-CAfile",
        str(root),
        "-verify_hostname",
        "other.tre.internal",
        str(target.chain_path),
    )

    assert result.returncode == 0, result.stderr
    assert f"{target.chain_path}: OK" in result.stdout
    assert wrong_name.returncode != 0


def test_handshake_verifies_san_and_rejects_other_name(
    ca_vault: Vault, tmp_path: Path
) -> None:
    record = tls.issue_certificate(
        ca_vault, "portal.tre.internal", names=["portal", "127.0.0.1"]
    )
    target = tls.deploy_certificate(ca_vault, record.id, tmp_path)
    root = tmp_path / "pki" / "tls-ca.pem"

    with tls.serve_tls(target.chain_path, target.key_path) as endpoint:
        assert handshake(endpoint, root, "portal.tre.internal").startswith("TLSv1")
        assert handshake(endpoint, root, "portal")
        assert handshake(endpoint, root, "127.0.0.1")
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            handshake(endpoint, root, "gitlab.tre.internal")


def test_handshake_rejects_another_root(ca_vault: Vault, tmp_path: Path) -> None:
    record = tls.issue_certificate(ca_vault, "portal.tre.internal")
    target = tls.deploy_certificate(ca_vault, record.id, tmp_path)
    other = tls.issue_certificate(ca_vault, "other.tre.internal", self_signed=True)
    other_root = tmp_path / "other.pem"
    other_root.write_bytes(tls.chain_pem(ca_vault, other.id))

    with tls.serve_tls(target.chain_path, target.key_path) as endpoint:
        with pytest.raises(
            ssl.SSLCertVerificationError, match="certificate verify failed"
        ):
            handshake(endpoint, other_root, "portal.tre.internal")


def test_self_signed_certificate(ca_vault: Vault, tmp_path: Path) -> None:
    record = tls.issue_certificate(ca_vault, "legacy.tre.internal", self_signed=True)
    target = tls.deploy_certificate(ca_vault, record.id, tmp_path)
    certificate = load_record_certificate(ca_vault, record.id)

    assert certificate.issuer == certificate.subject
    assert record.attributes["issuer"] == "self"
    assert tls.chain_pem(ca_vault, record.id).count(b"BEGIN CERTIFICATE") == 1
    with tls.serve_tls(target.chain_path, target.key_path) as endpoint:
        assert handshake(endpoint, target.chain_path, "legacy.tre.internal")
        with pytest.raises(ssl.SSLCertVerificationError):
            handshake(endpoint, target.chain_path, "portal.tre.internal")


@pytest.mark.parametrize(
    "name",
    [
        "bad_name.tre.internal",
        "-portal.tre.internal",
        "portal..tre.internal",
        "*.tre.internal",
        "a" * 64 + ".tre.internal",
        "256.1.1.1",
        "portal tre",
        "",
    ],
)
def test_invalid_hostname_rejected(ca_vault: Vault, name: str) -> None:
    before = vault_state(ca_vault)

    with pytest.raises(HostnameError, match="not a valid DNS name or IP address"):
        tls.issue_certificate(ca_vault, "portal.tre.internal", names=[name])

    assert vault_state(ca_vault) == before


def test_expired_ca_rejected(vault: Vault) -> None:
    tls.create_ca(vault, days=30, now=utcnow() - timedelta(days=60))
    before = vault_state(vault)

    with pytest.raises(CertificateValidityError, match="CA tls/ca expired on"):
        tls.issue_certificate(vault, "portal.tre.internal")

    assert vault_state(vault) == before


def test_not_yet_valid_ca_rejected(vault: Vault) -> None:
    tls.create_ca(vault, now=utcnow() + timedelta(days=10))
    before = vault_state(vault)

    with pytest.raises(CertificateValidityError, match="CA tls/ca is not valid until"):
        tls.issue_certificate(vault, "portal.tre.internal")

    assert vault_state(vault) == before


def test_certificate_outliving_ca_rejected(vault: Vault) -> None:
    tls.create_ca(vault, days=100)

    with pytest.raises(CertificateError, match="rotate the CA first"):
        tls.issue_certificate(vault, "portal.tre.internal", days=200)


def test_second_ca_rejected(ca_vault: Vault) -> None:
    with pytest.raises(RecordError, match="already active"):
        tls.create_ca(ca_vault)


def test_service_named_by_ip_rejected(ca_vault: Vault) -> None:
    with pytest.raises(CertificateError, match="must be named by a DNS name"):
        tls.issue_certificate(ca_vault, "10.0.0.5", names=["portal.tre.internal"])

    assert ca_vault.find(kind="tls-cert") == []


def test_long_service_name_keeps_full_san(ca_vault: Vault, tmp_path: Path) -> None:
    service = ("a" * 60 + ".") * 3 + "tre.internal"
    record = tls.issue_certificate(ca_vault, service)
    target = tls.deploy_certificate(ca_vault, record.id, tmp_path)
    certificate = load_record_certificate(ca_vault, record.id)

    sans = _extension(certificate, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [service]
    with tls.serve_tls(target.chain_path, target.key_path) as endpoint:
        assert handshake(endpoint, tmp_path / "pki" / "tls-ca.pem", service)

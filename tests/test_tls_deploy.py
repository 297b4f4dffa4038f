"""Deploying and importing certificates: modes, records, atomicity, bad input."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from tls_support import (
    copied_vault,
    create_template_vault,
    snapshot,
    unwritable,
    vault_state,
)

from trekeys import tls
from trekeys.errors import (
    CertificateError,
    CertificateKeyMismatchError,
    DeploymentError,
    DestinationExistsError,
    PolicyError,
)
from trekeys.tls_records import load_record_certificate
from trekeys.tls_x509 import certificate_pem, generate_private_key, private_key_pem
from trekeys.vault import Vault


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_template_vault(tmp_path_factory.mktemp("template"))


@pytest.fixture
def vault(template: Path, tmp_path: Path) -> Iterator[Vault]:
    with copied_vault(template, tmp_path) as opened:
        tls.create_ca(opened, publish_dir=tmp_path / "pki")
        yield opened


@pytest.fixture
def service_id(vault: Vault) -> str:
    return tls.issue_certificate(vault, "portal.tre.internal").id


def test_deploy_writes_chain_and_0600_key(
    vault: Vault, service_id: str, tmp_path: Path
) -> None:
    folder = tmp_path / "www"
    folder.mkdir()

    target = tls.deploy_certificate(vault, service_id, folder)

    chain = target.chain_path.read_bytes()
    assert target.chain_path == folder / "fullchain.pem"
    assert stat.S_IMODE(target.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.chain_path.stat().st_mode) == 0o644
    assert chain.startswith(certificate_pem(load_record_certificate(vault, service_id)))
    assert chain.endswith(certificate_pem(load_record_certificate(vault, "tls/ca")))
    assert target.key_path.read_bytes() == vault.read_secret(service_id, "test")
    assert sorted(p.name for p in folder.iterdir()) == ["fullchain.pem", "privkey.pem"]


def test_deploy_is_recorded(vault: Vault, service_id: str, tmp_path: Path) -> None:
    target = tls.deploy_certificate(vault, service_id, tmp_path)

    record = vault.get(service_id)
    deployments = json.loads(record.attributes["deployments"])
    assert deployments[0]["chain"] == "fullchain.pem"
    assert deployments[0]["key"] == "privkey.pem"
    assert deployments[0]["fingerprint"] == record.fingerprint
    assert tls.deployment_targets(vault, record) == [target]
    assert "deployed: privkey.pem" in record.locations


def test_deploy_outside_tre_recorded_absolute(
    vault: Vault, service_id: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    folder = tmp_path_factory.mktemp("elsewhere")

    target = tls.deploy_certificate(vault, service_id, folder)

    deployments = json.loads(vault.get(service_id).attributes["deployments"])
    assert deployments[0]["chain"] == str(target.chain_path)
    assert target.chain_path.is_absolute()


def test_redeploy_replaces_own_files_only(
    vault: Vault, service_id: str, tmp_path: Path
) -> None:
    tls.deploy_certificate(vault, service_id, tmp_path)
    tls.deploy_certificate(vault, service_id, tmp_path)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "fullchain.pem").write_text("the web server's own file\n")

    with pytest.raises(DestinationExistsError, match="already exists"):
        tls.deploy_certificate(vault, service_id, foreign)

    assert (foreign / "fullchain.pem").read_text() == "the web server's own file\n"
    assert not (foreign / "privkey.pem").exists()
    assert len(json.loads(vault.get(service_id).attributes["deployments"])) == 1


def test_deploy_to_missing_folder(
    vault: Vault, service_id: str, tmp_path: Path
) -> None:
    before = vault_state(vault)

    with pytest.raises(DeploymentError, match="does not exist"):
        tls.deploy_certificate(vault, service_id, tmp_path / "missing")

    assert not (tmp_path / "missing").exists()
    assert vault_state(vault) == before


def test_deploy_to_unwritable_folder(
    vault: Vault, service_id: str, tmp_path: Path
) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    before = vault_state(vault)

    with unwritable(folder):
        with pytest.raises(DeploymentError, match="is not writable"):
            tls.deploy_certificate(vault, service_id, folder)

    assert list(folder.iterdir()) == []
    assert vault_state(vault) == before


def test_failed_key_write_leaves_old_files(
    vault: Vault, service_id: str, tmp_path: Path
) -> None:
    chain_dir, key_dir = tmp_path / "certs", tmp_path / "private"
    chain_dir.mkdir()
    key_dir.mkdir()
    target = tls.DeployTarget(chain_dir / "portal.pem", key_dir / "portal.key")
    tls.deploy_certificate(vault, service_id, target)
    tls.renew_certificate(vault, service_id)
    before = snapshot(tmp_path)
    state = vault_state(vault)

    with unwritable(key_dir):
        with pytest.raises(DeploymentError, match="private is not writable"):
            tls.deploy_certificate(vault, service_id, target)

    assert snapshot(tmp_path) == before
    assert vault_state(vault) == state


def test_deploy_of_revoked_key_rejected(
    vault: Vault, service_id: str, tmp_path: Path
) -> None:
    tls.revoke_certificate(vault, service_id, "cessationOfOperation")

    with pytest.raises(PolicyError, match="may not be deployed"):
        tls.deploy_certificate(vault, service_id, tmp_path)

    assert not (tmp_path / "privkey.pem").exists()


def test_import_with_mismatched_key_rejected(
    vault: Vault, service_id: str, tmp_path: Path
) -> None:
    target = tls.deploy_certificate(vault, service_id, tmp_path)
    tls.revoke_certificate(vault, service_id, "superseded")
    wrong_key = tmp_path / "wrong.key"
    wrong_key.write_text(private_key_pem(generate_private_key("ecdsa-p256")))
    files = snapshot(tmp_path)
    before = vault_state(vault)

    with pytest.raises(CertificateKeyMismatchError, match="does not match the cert"):
        tls.import_certificate(
            vault, "portal.tre.internal", target.chain_path, wrong_key
        )

    assert snapshot(tmp_path) == files
    assert vault_state(vault) == before


def test_import_self_signed_certificate(vault: Vault, tmp_path: Path) -> None:
    legacy = tls.issue_certificate(vault, "legacy.tre.internal", self_signed=True)
    target = tls.deploy_certificate(vault, legacy.id, tmp_path)
    tls.revoke_certificate(vault, legacy.id, "superseded")

    record = tls.import_certificate(
        vault, "legacy.tre.internal", target.chain_path, target.key_path
    )

    assert record.id == "tls/legacy.tre.internal@2"
    assert record.fingerprint == legacy.fingerprint
    assert record.attributes["issuer"] == "self"


def test_undeploy_removes_files(vault: Vault, service_id: str, tmp_path: Path) -> None:
    target = tls.deploy_certificate(vault, service_id, tmp_path)

    removed = tls.undeploy_certificate(vault, service_id)

    assert set(removed) == {target.chain_path, target.key_path}
    assert not target.key_path.exists()
    assert vault.get(service_id).attributes["deployments"] == "[]"


def test_import_missing_file_rejected(vault: Vault, tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="cannot read .*missing.pem"):
        tls.import_certificate(
            vault, "x.tre.internal", tmp_path / "missing.pem", tmp_path / "k.pem"
        )


def test_failed_rename_restores_first_file(
    vault: Vault, service_id: str, tmp_path: Path
) -> None:
    chain_path = tmp_path / "portal.pem"
    chain_path.write_text("the chain the web server uses now\n")
    key_path = tmp_path / "portal.key"
    key_path.mkdir()
    before = snapshot(tmp_path)

    with pytest.raises(DeploymentError, match="the earlier files were put back"):
        tls.deploy_certificate(
            vault, service_id, tls.DeployTarget(chain_path, key_path), replace=True
        )

    assert chain_path.read_text() == "the chain the web server uses now\n"
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_replace_foreign_files_sets_key_mode(
    vault: Vault, service_id: str, tmp_path: Path
) -> None:
    (tmp_path / "fullchain.pem").write_text("old chain\n")
    (tmp_path / "privkey.pem").write_text("old key\n")
    (tmp_path / "privkey.pem").chmod(0o644)

    target = tls.deploy_certificate(vault, service_id, tmp_path, replace=True)

    assert stat.S_IMODE(target.key_path.stat().st_mode) == 0o600
    assert target.key_path.read_bytes() == vault.read_secret(service_id, "test")


def test_deploy_with_mismatched_vault_key_rejected(
    vault: Vault, service_id: str, tmp_path: Path
) -> None:
    other_key = private_key_pem(generate_private_key("ecdsa-p256"))
    vault.put_secret(service_id, other_key, reason="test: corrupt the record")
    folder = tmp_path / "www"
    folder.mkdir()

    with pytest.raises(CertificateKeyMismatchError, match="does not match the cert"):
        tls.deploy_certificate(vault, service_id, folder)

    assert list(folder.iterdir()) == []
    assert vault.get(service_id).attributes.get("deployments") is None

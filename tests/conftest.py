"""Shared fixtures: vaults and demo TREs on temporary folders, with the real tools."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from trekeys.lab import Lab, create_lab
from trekeys.vault import KdfSettings, Vault, VaultCredentials


@pytest.fixture
def credentials() -> VaultCredentials:
    """Credentials with a fixed master secret and no key file."""
    return VaultCredentials(bytes(range(32)))


@pytest.fixture
def vault_path(tmp_path: Path, credentials: VaultCredentials) -> Path:
    """An empty trekeys vault with test-strength KDF settings, closed."""
    path = tmp_path / "device" / "vault.kdbx"
    Vault.create(path, credentials, kdf=KdfSettings.test()).close()
    return path


@pytest.fixture
def bare_lab(tmp_path: Path) -> Lab:
    """A lab with the vault and custody only, no capability build steps."""
    return create_lab(tmp_path / "lab", steps=[])


@pytest.fixture(scope="session")
def full_lab_template(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    """A complete demo TRE, built once per test session; copy it before changing it."""
    return create_lab(tmp_path_factory.mktemp("template") / "lab")


@pytest.fixture
def full_lab(full_lab_template: Lab, tmp_path: Path) -> Lab:
    """A private copy of the complete demo TRE that a test may change."""
    target = tmp_path / "lab"
    shutil.copytree(full_lab_template.root, target, symlinks=True)
    return Lab.load(target)

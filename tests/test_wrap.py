"""Key-wrapping keys and recorded key distribution."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.keywrap import (
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from trekeys import transfer, wrap
from trekeys.drills import run_drills
from trekeys.errors import (
    CredentialError,
    DestinationExistsError,
    IntegrityError,
    RecordError,
)
from trekeys.lab import Lab, create_lab
from trekeys.records import KeyState


@pytest.fixture(scope="module")
def lab_template(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    """A lab with wrapping keys for alice and bob and one channel MAC key."""
    template = create_lab(tmp_path_factory.mktemp("wrap") / "lab", steps=[])
    with template.open_vault() as vault:
        wrap.create_wrapping_key(vault, "alice")
        wrap.create_wrapping_key(vault, "bob")
        transfer.create_channel_key(vault, "alpha-import")
    return template


@pytest.fixture
def lab(lab_template: Lab, tmp_path: Path) -> Lab:
    shutil.copytree(lab_template.root, tmp_path / "lab")
    return Lab.load(tmp_path / "lab")


def material(lab: Lab, key_id: str) -> bytes:
    with lab.open_vault() as vault:
        return vault.read_secret(key_id, "test")


@pytest.mark.parametrize(
    ("kek", "key", "wrapped"),
    [
        (
            "5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8",
            "c37b7e6492584340bed12207808941155068f738",
            "138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a",
        ),
        (
            "5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8",
            "466f7250617369",
            "afbeb0f07dfbf5419200f2ccb50bb24f",
        ),
    ],
)
def test_library_matches_rfc5649_vectors(kek, key, wrapped):
    kek_bytes, key_bytes = bytes.fromhex(kek), bytes.fromhex(key)
    assert aes_key_wrap_with_padding(kek_bytes, key_bytes).hex() == wrapped
    assert aes_key_unwrap_with_padding(kek_bytes, bytes.fromhex(wrapped)) == key_bytes


def test_wrap_and_unwrap_round_trip(lab, tmp_path):
    with lab.open_vault() as vault:
        package = wrap.wrap_key(lab, vault, "mac/alpha-import", "alice")
    unwrapped = wrap.unwrap_package(package, material(lab, "wrap/alice"))
    assert unwrapped == material(lab, "mac/alpha-import")
    assert package.stat().st_mode & 0o777 == 0o600


def test_package_contains_no_clear_key(lab):
    with lab.open_vault() as vault:
        package = wrap.wrap_key(lab, vault, "mac/alpha-import", "alice")
    text = package.read_text()
    key = material(lab, "mac/alpha-import")
    assert key.hex() not in text
    assert key.hex().upper() not in text
    assert json.loads(text)["wrapping_key_id"] == "wrap/alice"


def test_distribution_is_recorded(lab):
    with lab.open_vault() as vault:
        package = wrap.wrap_key(lab, vault, "mac/alpha-import", "alice")
        rows = wrap.list_distributions(vault, "alice")
        record = vault.get("wrap/alice")
    assert len(rows) == 1
    assert rows[0]["to"] == "user:alice"
    assert rows[0]["key"] == "mac/alpha-import"
    assert rows[0]["wrapping_key"] == "wrap/alice"
    assert rows[0]["at"]
    assert lab.root / rows[0]["package"] == package
    assert "key:mac/alpha-import" in record.protects
    log = vault.audit_log.entries()
    assert any(
        e["operation"] == "distribute" and "user:alice" in e["detail"] for e in log
    )


def test_unwrap_with_wrong_wrapping_key_rejected(lab, tmp_path):
    with lab.open_vault() as vault:
        package = wrap.wrap_key(lab, vault, "mac/alpha-import", "alice")
    before = package.read_bytes()
    dest = tmp_path / "key.bin"
    bob_key = tmp_path / "bob.key"
    bob_key.write_bytes(material(lab, "wrap/bob"))
    with pytest.raises(CredentialError, match="does not unwrap .* wrap/alice"):
        wrap.unwrap_to_file(package, bob_key, dest)
    assert not dest.exists()
    assert package.read_bytes() == before


def test_tampered_package_rejected(lab, tmp_path):
    with lab.open_vault() as vault:
        package = wrap.wrap_key(lab, vault, "mac/alpha-import", "alice")
    body = json.loads(package.read_text())
    raw = bytearray(base64.b64decode(body["wrapped"]))
    raw[5] ^= 0x80
    body["wrapped"] = base64.b64encode(bytes(raw)).decode()
    package.write_text(json.dumps(body))
    with pytest.raises(IntegrityError, match="RFC 5649 integrity check"):
        wrap.unwrap_package(package, material(lab, "wrap/alice"))


def test_garbage_package_rejected(tmp_path):
    path = tmp_path / "not-a-package.json"
    path.write_text("{]")
    with pytest.raises(IntegrityError, match="not a trekeys wrapped-key package"):
        wrap.read_package(path)


def test_existing_package_not_overwritten(lab, tmp_path):
    dest = tmp_path / "package.json"
    dest.write_text("earlier package")
    with lab.open_vault() as vault:
        with pytest.raises(DestinationExistsError, match="already exists"):
            wrap.wrap_key(lab, vault, "mac/alpha-import", "alice", dest)
        assert wrap.list_distributions(vault, "alice") == []
    assert dest.read_text() == "earlier package"


def test_wrap_for_user_without_key_rejected(lab):
    with lab.open_vault() as vault:
        with pytest.raises(RecordError, match="carol has no active wrapping key"):
            wrap.wrap_key(lab, vault, "mac/alpha-import", "carol")


def test_verify_package_against_vault(lab):
    with lab.open_vault() as vault:
        package = wrap.wrap_key(lab, vault, "mac/alpha-import", "alice")
        row = wrap.verify_package(vault, package)
    assert row["unwraps"] is True
    assert row["key"] == "mac/alpha-import"


def test_rotation_redistributes_under_new_key(lab, tmp_path):
    with lab.open_vault() as vault:
        old_package = wrap.wrap_key(lab, vault, "mac/alpha-import", "alice")
        new_ids = wrap.rotate_key(
            lab, vault, "wrap/alice", reason="laptop stolen", compromised=True
        )
        assert vault.get("wrap/alice").state is KeyState.COMPROMISED
        assert vault.get(new_ids[0]).state is KeyState.ACTIVE
        rows = wrap.list_distributions(vault, "alice")
    assert new_ids == ["wrap/alice.v2"]
    assert [r["wrapping_key"] for r in rows] == ["wrap/alice", "wrap/alice.v2"]
    new_package = lab.root / rows[-1]["package"]
    assert new_package != old_package
    new_key = material(lab, "wrap/alice.v2")
    assert wrap.unwrap_package(new_package, new_key) == material(
        lab, "mac/alpha-import"
    )
    with pytest.raises(CredentialError, match="does not unwrap"):
        wrap.unwrap_package(old_package, new_key)


def test_retired_wrapping_key_not_used(lab):
    with lab.open_vault() as vault:
        wrap.rotate_key(lab, vault, "wrap/bob", reason="yearly", compromised=False)
        assert vault.get("wrap/bob").state is KeyState.DEACTIVATED
        with pytest.raises(RecordError, match="wrap/bob is deactivated"):
            wrap.wrap_key(
                lab, vault, "mac/alpha-import", "bob", wrapping_key_id="wrap/bob"
            )


def test_key_distribution_notebook_passes_twice(full_lab, tmp_path):
    for attempt in range(2):
        run = run_drills(
            full_lab.root, tmp_path / f"reports-{attempt}", names=["key-distribution"]
        )
        assert run.passed, run.drills[0].error

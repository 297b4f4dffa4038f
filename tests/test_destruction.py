"""Key destruction: only out-of-use keys, and nothing left behind."""

from __future__ import annotations

import pytest

from trekeys.destruction import (
    SCRATCH_ATTACHMENT,
    create_scratch_key,
    destroy_key,
    has_material,
    verify_destroyed,
)
from trekeys.errors import PolicyError, StateTransitionError
from trekeys.lab import Lab
from trekeys.records import KeyState


def test_destroy_rejects_active_key(bare_lab: Lab):
    with bare_lab.open_vault() as vault:
        record = create_scratch_key(vault)
    with bare_lab.open_vault() as vault:
        with pytest.raises(PolicyError, match="is active; deactivate it"):
            destroy_key(vault, record.id, "test")
        assert has_material(vault, record.id)
        assert vault.attachment_names(record.id) == [SCRATCH_ATTACHMENT]
        assert vault.get(record.id).state is KeyState.ACTIVE


def test_destroyed_key_leaves_only_tombstone(bare_lab: Lab):
    with bare_lab.open_vault() as vault:
        record = create_scratch_key(vault)
        vault.transition(record.id, KeyState.DEACTIVATED, "end of use")
        destroy_key(vault, record.id, "test")

    with bare_lab.open_vault() as vault:
        results = {r.check: r for r in verify_destroyed(bare_lab, vault, record.id)}
        tombstone = vault.get(record.id)

    failed = [name for name, r in results.items() if not r.passed]
    assert failed == []
    assert tombstone.fingerprint == record.fingerprint
    assert "KDBX entry holds no material" in results
    assert "attachments gone" in results


def test_destroy_twice_rejected(bare_lab: Lab):
    with bare_lab.open_vault() as vault:
        record = create_scratch_key(vault)
        vault.transition(record.id, KeyState.DEACTIVATED, "end of use")
        destroy_key(vault, record.id, "test")
    with bare_lab.open_vault() as vault:
        with pytest.raises(StateTransitionError, match="cannot go from destroyed"):
            destroy_key(vault, record.id, "again")


def test_verify_catches_surviving_material(bare_lab: Lab):
    with bare_lab.open_vault() as vault:
        record = create_scratch_key(vault)
        vault.transition(record.id, KeyState.DEACTIVATED, "end of use")
    with bare_lab.open_vault() as vault:
        results = {r.check: r for r in verify_destroyed(bare_lab, vault, record.id)}
    assert not results["record is a tombstone"].passed
    assert not results["KDBX entry holds no material"].passed
    assert not results["attachments gone"].passed
    assert not results["audit log records the destruction"].passed

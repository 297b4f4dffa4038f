"""Compromise impact, response plan, execution with resume, dry run, notifications.

The rotators `rotate_test_key` and `FAILING` below are test doubles of trekeys'
own plug-in point (the rotator registry), registered for the MAC and wrapping
kinds only; they replace no external tool.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from trekeys.cli import main
from trekeys.depgraph import BackupExposure, SuspectSignature, find_impact
from trekeys.drills import run_drills
from trekeys.errors import (
    CredentialError,
    DependencyCycleError,
    IncidentError,
    KeyDestroyedError,
    RecordNotFoundError,
    ResponseStepError,
    RotatorMissingError,
)
from trekeys.incident import (
    ISM,
    RESPONSE_COMPLETE,
    SYSADMINS,
    build_plan,
    close_incident,
    execute_plan,
    incident_records,
    respond,
)
from trekeys.incident_checks import verify_replacements
from trekeys.incident_report import (
    choose_drill_keys,
    verify_custody,
    verify_response,
)
from trekeys.lab import VAULT_MASTER_ID, Lab
from trekeys.notify import (
    PLANNED,
    UNPLANNED,
    build_notifications,
    load_stakeholders,
)
from trekeys.records import KeyKind, KeyRecord, KeyState
from trekeys.routine_rotation import find_due_keys, rotate_keys
from trekeys.vault import Vault

BACKUP_A1 = "backup:alpha/2026-11-01"
BACKUP_A2 = "backup:alpha/2026-12-01"
BACKUP_B1 = "backup:beta/2026-12-01"

# Which test-rotator calls must fail, by key id; tests set and clear it.
FAILING: set[str] = set()

TEST_ROTATORS = {
    KeyKind.MAC: "test_incident:rotate_test_key",
    KeyKind.WRAPPING: "test_incident:rotate_test_key",
}
WRAP_ROTATORS = {**TEST_ROTATORS, KeyKind.FILE_KEY: "test_incident:rotate_test_key"}


def rotate_test_key(
    lab: Lab, vault: Vault, key_id: str, *, reason: str, compromised: bool
) -> list[str]:
    """Replace a key by a new record of the same kind, as a capability would."""
    old = vault.get(key_id)
    generation = sum(1 for k in vault.ids() if k.startswith(f"{key_id}.r")) + 1
    new = KeyRecord(
        id=f"{key_id}.r{generation}",
        kind=old.kind,
        purpose=old.purpose,
        owner=old.owner,
        state=KeyState.ACTIVE,
        protects=list(old.protects),
        fingerprint=secrets.token_hex(8),
    )
    vault.add(new, secrets.token_bytes(32))
    if key_id in FAILING:
        raise IncidentError(f"test rotator was told to fail on {key_id}.")
    return [new.id]


def add(vault: Vault, key_id: str, kind: KeyKind, **values) -> KeyRecord:
    record = KeyRecord(
        id=key_id,
        kind=kind,
        purpose=f"test key {key_id}",
        owner=values.pop("owner", "tre"),
        state=values.pop("state", KeyState.ACTIVE),
        **values,
    )
    return vault.add(record, secrets.token_bytes(32))


def add_small_tre(vault: Vault) -> None:
    """Add a small but realistic set of records beside the lab's vault master."""
    add(
        vault,
        "alpha/luks-volume",
        KeyKind.LUKS_VOLUME,
        protects=["volume:alpha"],
        attributes={"image": "instances/alpha/volume.img"},
    )
    add(
        vault,
        "alpha/luks-passphrase",
        KeyKind.LUKS_PASSPHRASE,
        protects=["key:alpha/luks-volume"],
    )
    add(
        vault,
        "alpha/luks-boot-key",
        KeyKind.LUKS_BOOT_KEY,
        protects=["key:alpha/luks-volume"],
    )
    add(
        vault,
        "tls/ca",
        KeyKind.TLS_CA,
        signs=["cert:tls/ca", "cert:tls/portal", "cert:tls/gitlab", "crl:tls/ca"],
    )
    add(vault, "tls/portal", KeyKind.TLS_CERT, protects=["service:portal.tre.internal"])
    add(vault, "tls/gitlab", KeyKind.TLS_CERT, protects=["service:gitlab.tre.internal"])
    add(
        vault,
        "gpg/alpha",
        KeyKind.GPG,
        owner="instance:alpha",
        protects=[BACKUP_A1, BACKUP_A2],
    )
    add(vault, "gpg/beta", KeyKind.GPG, owner="instance:beta", protects=[BACKUP_B1])
    add(vault, "gpg/admin", KeyKind.GPG, protects=[BACKUP_A1, BACKUP_A2, BACKUP_B1])
    add(
        vault,
        "gpg/admin-offline",
        KeyKind.GPG,
        protects=[BACKUP_A1, BACKUP_A2, BACKUP_B1],
    )
    add(
        vault,
        "wrap/alice",
        KeyKind.WRAPPING,
        owner="user:alice",
        protects=["key:files/alice"],
    )
    add(
        vault,
        "files/alice",
        KeyKind.FILE_KEY,
        owner="user:alice",
        protects=["files:alice"],
    )
    add(vault, "transfer/import", KeyKind.MAC, protects=["manifest:import/batch-001"])
    add(vault, "reports/signing", KeyKind.SIGNING, signs=["report:2026-12-01T000000Z"])


@pytest.fixture
def tre(bare_lab: Lab) -> Lab:
    """A lab whose vault holds the small TRE of `add_small_tre`."""
    with bare_lab.open_vault() as vault:
        add_small_tre(vault)
    return bare_lab


def impact_of(lab: Lab, *key_ids: str):
    with lab.open_vault() as vault:
        return find_impact(vault, list(key_ids))


def hash_tree(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# Impact


def test_impact_of_passphrase_reaches_volume(tre):
    impact = impact_of(tre, "alpha/luks-passphrase")
    assert set(impact.key_ids) == {"alpha/luks-passphrase", "alpha/luks-volume"}
    assert {(d.ref, d.protected_by) for d in impact.data} == {
        ("volume:alpha", "alpha/luks-volume")
    }
    assert impact.data[0].where == (
        "LUKS volume of project instance alpha (instances/alpha/volume.img)"
    )
    assert impact.signatures == []
    assert impact.backups == []


def test_impact_of_ca_lists_what_it_signed(tre):
    impact = impact_of(tre, "tls/ca")
    assert impact.key_ids == ["tls/ca"]
    assert impact.data == []
    assert set(impact.signatures) == {
        SuspectSignature(ref, "tls/ca", "signed by a compromised key")
        for ref in ("cert:tls/ca", "cert:tls/portal", "cert:tls/gitlab", "crl:tls/ca")
    }


def test_impact_of_service_key_flags_its_certificate(tre):
    impact = impact_of(tre, "tls/portal")
    assert impact.key_ids == ["tls/portal"]
    assert {d.ref for d in impact.data} == {"service:portal.tre.internal"}
    assert impact.signatures == [
        SuspectSignature("cert:tls/portal", "tls/ca", "certifies a compromised key")
    ]


def test_impact_of_instance_key_names_remaining_recipients(tre):
    impact = impact_of(tre, "gpg/alpha")
    assert {d.ref for d in impact.data} == {BACKUP_A1, BACKUP_A2}
    recipients = ("gpg/admin", "gpg/admin-offline", "gpg/alpha")
    assert impact.backups == [
        BackupExposure(BACKUP_A1, recipients, ("gpg/admin", "gpg/admin-offline")),
        BackupExposure(BACKUP_A2, recipients, ("gpg/admin", "gpg/admin-offline")),
    ]


def test_impact_of_two_backup_keys_leaves_offline_key(tre):
    impact = impact_of(tre, "gpg/alpha", "gpg/admin")
    still_open = {b.ref: b.still_open_with for b in impact.backups}
    assert still_open == {
        BACKUP_A1: ("gpg/admin-offline",),
        BACKUP_A2: ("gpg/admin-offline",),
        BACKUP_B1: ("gpg/admin-offline", "gpg/beta"),
    }


def test_impact_of_wrapping_key_reaches_wrapped_file_key(tre):
    impact = impact_of(tre, "wrap/alice")
    assert impact.key_ids == ["wrap/alice", "files/alice"]
    assert impact.keys[1].path == ("wrap/alice", "files/alice")
    assert {d.ref for d in impact.data} == {"files:alice"}


def test_impact_of_vault_master_is_everything(tre):
    impact = impact_of(tre, VAULT_MASTER_ID)
    with tre.open_vault() as vault:
        every_key = set(vault.ids())
    assert set(impact.key_ids) == every_key
    assert {d.ref for d in impact.data} == {
        "volume:alpha",
        "service:portal.tre.internal",
        "service:gitlab.tre.internal",
        BACKUP_A1,
        BACKUP_A2,
        BACKUP_B1,
        "files:alice",
        "manifest:import/batch-001",
    }
    assert {s.ref for s in impact.signatures} == {
        "cert:tls/ca",
        "cert:tls/portal",
        "cert:tls/gitlab",
        "crl:tls/ca",
        "report:2026-12-01T000000Z",
    }
    assert all(b.still_open_with == () for b in impact.backups)


def test_impact_since_is_activation_date(tre):
    with tre.open_vault() as vault:
        activated = vault.get("files/alice").created.isoformat()
    impact = impact_of(tre, "files/alice")
    assert impact.keys[0].since == activated
    assert impact.data[0].since == activated


def test_impact_skips_destroyed_protected_key(tre):
    with tre.open_vault() as vault:
        vault.transition("files/alice", KeyState.DEACTIVATED, "user left")
        vault.destroy("files/alice", "user left")
    impact = impact_of(tre, "wrap/alice")
    assert impact.key_ids == ["wrap/alice"]
    assert impact.data == []


def test_impact_unknown_key_raises(tre):
    with pytest.raises(RecordNotFoundError, match="no key record with id 'nope/x'"):
        impact_of(tre, "nope/x")


def test_impact_destroyed_key_raises(tre):
    with tre.open_vault() as vault:
        vault.transition("transfer/import", KeyState.DEACTIVATED, "channel closed")
        vault.destroy("transfer/import", "channel closed")
    before = hash_tree(tre.root)
    with pytest.raises(KeyDestroyedError, match="transfer/import is already destroyed"):
        impact_of(tre, "transfer/import")
    assert hash_tree(tre.root) == before


def test_impact_cycle_raises_naming_it(tre):
    with tre.open_vault() as vault:
        add(vault, "loop/a", KeyKind.WRAPPING, protects=["key:loop/b"])
        add(vault, "loop/b", KeyKind.WRAPPING, protects=["key:loop/a"])
    before = hash_tree(tre.root)
    with pytest.raises(DependencyCycleError, match="loop/a -> loop/b -> loop/a"):
        impact_of(tre, "loop/a")
    assert hash_tree(tre.root) == before


def test_impact_cycle_through_vault_master_raises(tre):
    with tre.open_vault() as vault:
        add(vault, "loop/escrow", KeyKind.WRAPPING, protects=[f"key:{VAULT_MASTER_ID}"])
    with pytest.raises(DependencyCycleError) as caught:
        impact_of(tre, VAULT_MASTER_ID)
    assert caught.value.cycle[0] == caught.value.cycle[-1]
    assert "loop/escrow" in caught.value.cycle
    assert VAULT_MASTER_ID in caught.value.cycle


def test_impact_reports_reference_to_unknown_key(tre):
    with tre.open_vault() as vault:
        add(vault, "wrap/bob", KeyKind.WRAPPING, protects=["key:files/bob"])
    impact = impact_of(tre, "wrap/bob")
    assert impact.unknown_refs == ["key:files/bob"]


# Plan


def test_plan_orders_protectors_first(tre):
    rotators = {kind: "test_incident:rotate_test_key" for kind in KeyKind}
    with tre.open_vault() as vault:
        plan = build_plan(vault, VAULT_MASTER_ID, rotators=rotators)
    order = [step.key_id for step in plan.steps]
    assert order[0] == VAULT_MASTER_ID
    assert order.index("wrap/alice") < order.index("files/alice")
    assert order.index("alpha/luks-passphrase") < order.index("alpha/luks-volume")
    assert order.index("alpha/luks-boot-key") < order.index("alpha/luks-volume")
    assert order.index("tls/ca") < order.index("tls/portal")
    assert sorted(order) == sorted(k["key_id"] for k in plan.impact["keys"])


def test_plan_gives_kind_actions_with_roles(tre):
    rotators = {kind: "test_incident:rotate_test_key" for kind in KeyKind}
    with tre.open_vault() as vault:
        plan = build_plan(vault, "tls/portal", rotators=rotators)
    (step,) = plan.steps
    assert [(a.text, a.role) for a in step.actions] == [
        ("revoke the certificate (reason: key compromise)", ISM),
        ("reissue it with a new key", SYSADMINS),
        ("redeploy it to the service", SYSADMINS),
        ("publish a new CRL", ISM),
    ]


def test_plan_missing_rotator_raises_at_plan_time(tre):
    before = hash_tree(tre.root)
    with (
        tre.open_vault() as vault,
        pytest.raises(RotatorMissingError, match="no rotator for luks-volume keys"),
    ):
        build_plan(
            vault,
            "alpha/luks-passphrase",
            rotators={
                KeyKind.LUKS_PASSPHRASE: "test_incident:rotate_test_key",
                KeyKind.LUKS_VOLUME: "trekeys.not_installed:rotate_key",
            },
        )
    assert hash_tree(tre.root) == before


# Execution


def test_respond_rotates_and_marks_compromised(tre):
    with tre.open_vault() as vault:
        plan, result = respond(
            tre,
            vault,
            ["wrap/alice"],
            rotators={
                **TEST_ROTATORS,
                KeyKind.FILE_KEY: "test_incident:rotate_test_key",
            },
        )
    assert result.done_now == ["01-wrap/alice", "02-files/alice"]
    assert result.new_keys == {
        "wrap/alice": ["wrap/alice.r1"],
        "files/alice": ["files/alice.r1"],
    }
    with tre.open_vault() as vault:
        assert vault.get("wrap/alice").state is KeyState.COMPROMISED
        assert vault.get("files/alice").state is KeyState.COMPROMISED
        assert vault.get("wrap/alice.r1").state is KeyState.ACTIVE
        record = incident_records(vault)[plan.incident_id]
        operations = [e["operation"] for e in vault.audit_log.entries()]
    assert record["status"] == RESPONSE_COMPLETE
    assert "closed" not in record
    assert operations.count("incident-step") == 2
    assert "incident-response-complete" in operations
    assert "incident-close" not in operations


def test_close_incident_after_open_items(tre):
    with tre.open_vault() as vault:
        plan, _ = respond(tre, vault, ["wrap/alice"], rotators=WRAP_ROTATORS)
        close_incident(vault, plan.incident_id, "notifications sent; cause found")
    with tre.open_vault(read_only=True) as vault:
        record = incident_records(vault)[plan.incident_id]
        operations = [e["operation"] for e in vault.audit_log.entries()]
    assert record["status"] == "closed"
    assert record["closed"]
    assert record["closing_note"] == "notifications sent; cause found"
    assert "incident-close" in operations


def test_close_incident_with_steps_left_raises(tre):
    FAILING.add("files/alice")
    try:
        with pytest.raises(ResponseStepError), tre.open_vault() as vault:
            plan, _ = respond(tre, vault, ["wrap/alice"], rotators=WRAP_ROTATORS)
    finally:
        FAILING.clear()

    with tre.open_vault() as vault:
        (incident_id,) = incident_records(vault)
        with pytest.raises(IncidentError, match="steps are not done"):
            close_incident(vault, incident_id, "done")
        record = incident_records(vault)[incident_id]
    assert record["status"] == "open"
    assert "closed" not in record


def test_close_unknown_incident_raises(tre):
    with tre.open_vault() as vault:
        with pytest.raises(IncidentError, match="no incident 'INC-none'"):
            close_incident(vault, "INC-none", "done")
        assert incident_records(vault) == {}


def test_respond_dry_run_changes_no_file(tre):
    before = hash_tree(tre.root)
    with tre.open_vault() as vault:
        plan, result = respond(
            tre,
            vault,
            ["transfer/import", "wrap/alice"],
            dry_run=True,
            rotators={
                **TEST_ROTATORS,
                KeyKind.FILE_KEY: "test_incident:rotate_test_key",
            },
        )
    assert result.would_run == ["01-wrap/alice", "02-files/alice", "03-transfer/import"]
    assert result.done_now == []
    assert hash_tree(tre.root) == before


def test_failed_step_stops_and_resumes(tre):
    with tre.open_vault() as vault:
        add(vault, "transfer/export", KeyKind.MAC, protects=["manifest:export/b-1"])
        add(vault, "transfer/partner", KeyKind.MAC, protects=["manifest:partner/b-1"])
    leaked = ["transfer/export", "transfer/import", "transfer/partner"]

    FAILING.add("transfer/import")
    try:
        with (
            pytest.raises(
                ResponseStepError, match="step 02-transfer/import failed"
            ) as caught,
            tre.open_vault() as vault,
        ):
            respond(tre, vault, leaked, rotators=TEST_ROTATORS)
    finally:
        FAILING.clear()
    assert caught.value.done == ["01-transfer/export"]
    assert caught.value.not_done == ["02-transfer/import", "03-transfer/partner"]

    with tre.open_vault() as vault:
        # The failed step's half-made key was dropped with its unsaved changes.
        assert "transfer/import.r1" not in vault
        assert vault.get("transfer/import").state is KeyState.ACTIVE
        assert vault.get("transfer/export").state is KeyState.COMPROMISED
        failures = [
            e
            for e in vault.audit_log.entries()
            if e["operation"] == "incident-step" and e["outcome"] == "failure"
        ]
        assert [e["key_id"] for e in failures] == ["transfer/import"]

        plan, result = respond(tre, vault, leaked, rotators=TEST_ROTATORS)
    assert plan.incident_id == caught.value.incident_id
    assert result.done_before == ["01-transfer/export"]
    assert result.done_now == ["02-transfer/import", "03-transfer/partner"]
    with tre.open_vault() as vault:
        assert "transfer/export.r2" not in vault
        assert vault.get("transfer/partner").state is KeyState.COMPROMISED


def test_execute_plan_twice_repeats_nothing(tre):
    with tre.open_vault() as vault:
        plan = build_plan(vault, "transfer/import", rotators=TEST_ROTATORS)
        execute_plan(tre, vault, plan, rotators=TEST_ROTATORS)
        again = execute_plan(tre, vault, plan, rotators=TEST_ROTATORS)
    assert again.done_now == []
    assert again.done_before == ["01-transfer/import"]


def test_respond_to_destroyed_key_raises(tre):
    with tre.open_vault() as vault:
        vault.transition("transfer/import", KeyState.DEACTIVATED, "closed")
        vault.destroy("transfer/import", "closed")
    with tre.open_vault() as vault, pytest.raises(KeyDestroyedError):
        respond(tre, vault, ["transfer/import"], rotators=TEST_ROTATORS)


# Notification


def test_demo_lab_has_stakeholder_register(full_lab):
    register = load_stakeholders(full_lab.config)
    roles = {s.role for s in register}
    assert {ISM, "Operations Manager", SYSADMINS} <= roles


def test_notifications_reach_affected_instance_only(tre):
    from trekeys.incident import build_lab

    with tre.open_vault() as vault:
        build_lab(tre, vault)
    register = load_stakeholders(tre.config)
    impact = impact_of(tre, "gpg/alpha")
    notes = build_notifications(
        register,
        impact,
        unavailability=UNPLANNED,
        incident_id="inc-1",
        instances=tre.instances,
    )
    assert {(n.role, n.name) for n in notes} == {
        (ISM, "Isla Manager"),
        ("Operations Manager", "Omar Operations"),
        (SYSADMINS, "Sam Admin"),
        ("Data owner", "Dr Alpha Lead"),
        ("Project users", "alpha project users"),
    }
    owner = next(n for n in notes if n.name == "Dr Alpha Lead")
    assert owner.subject == "Key compromise inc-1: unplanned service interruption"
    assert BACKUP_A1 in owner.body
    assert "beta" not in owner.body


def test_planned_notifications_for_service(tre):
    from trekeys.incident import build_lab

    with tre.open_vault() as vault:
        build_lab(tre, vault)
    impact = impact_of(tre, "files/alice", "tls/portal")
    notes = build_notifications(
        load_stakeholders(tre.config),
        impact,
        unavailability=PLANNED,
        instances=tre.instances,
    )
    names = {n.name for n in notes}
    assert "TRE web service users" in names
    assert "alpha project users" in names
    assert "beta project users" not in names
    assert all(n.subject.startswith("Planned key rotation") for n in notes)


def test_notifications_without_register_raise(tre):
    with pytest.raises(IncidentError, match="no stakeholder register"):
        load_stakeholders({})


# Vault master rotation


def test_vault_master_response_resplits_custody(bare_lab, tmp_path):
    old_shares = tmp_path / "old-shares"
    old_shares.mkdir()
    for share in bare_lab.share_files():
        shutil.copy2(share, old_shares / share.name)
    with bare_lab.open_vault() as vault:
        old_fingerprint = vault.get(VAULT_MASTER_ID).fingerprint
        old_split = vault.get(VAULT_MASTER_ID).attributes["split"]
        plan, result = respond(bare_lab, vault, [VAULT_MASTER_ID])
    assert [s.key_id for s in plan.steps] == [VAULT_MASTER_ID]
    assert result.new_keys == {VAULT_MASTER_ID: [VAULT_MASTER_ID]}

    with pytest.raises(CredentialError):
        bare_lab.open_vault(sorted(old_shares.glob("*.share"))[:2])

    with bare_lab.open_vault() as vault:
        current = vault.get(VAULT_MASTER_ID)
        old = vault.get(f"{VAULT_MASTER_ID}/split-{old_split}")
        custody = verify_custody(bare_lab, vault)
    assert current.fingerprint != old_fingerprint
    assert current.state is KeyState.ACTIVE
    assert old.state is KeyState.DESTROYED_COMPROMISED
    assert old.fingerprint == old_fingerprint
    for row in custody:
        assert row["passed"], row


def test_vault_master_rotation_keeps_keys_readable(tre):
    with tre.open_vault() as vault:
        secret = vault.read_secret("files/alice", "test")
        rotators = {kind: "test_incident:rotate_test_key" for kind in KeyKind}
        rotators[KeyKind.VAULT_MASTER] = "trekeys.resplit:rotate_key"
        plan = build_plan(vault, VAULT_MASTER_ID, rotators=rotators)
        execute_plan(tre, vault, plan, rotators=rotators)
    with tre.open_vault() as vault:
        assert vault.read_secret("files/alice", "test") == secret
        assert vault.get("files/alice").state is KeyState.COMPROMISED
        assert vault.get("files/alice.r1").state is KeyState.ACTIVE
        assert vault.audit_log.verify(vault.meta["audit_head"]) > 0


def test_deactivated_key_is_only_marked(tre):
    with tre.open_vault() as vault:
        vault.transition("files/alice", KeyState.DEACTIVATED, "user left")
        plan, result = respond(tre, vault, ["wrap/alice"], rotators=TEST_ROTATORS)
    assert [(s.key_id, s.rotator) for s in plan.steps] == [
        ("wrap/alice", TEST_ROTATORS[KeyKind.WRAPPING]),
        ("files/alice", ""),
    ]
    assert result.new_keys == {"wrap/alice": ["wrap/alice.r1"], "files/alice": []}
    with tre.open_vault() as vault:
        assert vault.get("files/alice").state is KeyState.COMPROMISED
        assert "files/alice.r1" not in vault


# Routine rotation


def test_routine_rotation_deactivates_old_key(tre):
    with tre.open_vault() as vault:
        rotated = rotate_keys(
            tre,
            vault,
            ["transfer/import"],
            reason="cryptoperiod due",
            rotators=TEST_ROTATORS,
        )
    assert rotated == {"transfer/import": ["transfer/import.r1"]}
    with tre.open_vault() as vault:
        assert vault.get("transfer/import").state is KeyState.DEACTIVATED
        assert vault.get("transfer/import.r1").state is KeyState.ACTIVE


def test_routine_rotation_lists_due_keys(tre):
    with tre.open_vault() as vault:
        record = vault.get("transfer/import")
        record.cryptoperiod_days = 1
        record.activated = record.created - timedelta(days=2)
        vault.update(record)
        due = find_due_keys(vault)
    assert [(row["id"], row["rotator"]) for row in due] == [
        ("transfer/import", "installed")
    ]


def test_routine_rotation_without_rotator_changes_nothing(tre):
    before = hash_tree(tre.root)
    with tre.open_vault() as vault, pytest.raises(RotatorMissingError):
        rotate_keys(
            tre,
            vault,
            ["transfer/import"],
            reason="due",
            rotators={KeyKind.MAC: "trekeys.not_installed:rotate_key"},
        )
    assert hash_tree(tre.root) == before


# Runbooks


def test_runbooks_pass_twice_on_demo_lab(full_lab, tmp_path):
    for attempt in ("first", "second"):
        run = run_drills(
            full_lab.root,
            tmp_path / attempt,
            names=["key-rotation", "compromise-response"],
        )
        outcomes = {d.name: (d.outcome, d.error) for d in run.drills}
        assert outcomes == {
            "key-rotation": ("passed", ""),
            "compromise-response": ("passed", ""),
        }
        response = run.drills[1]
        checks = {c["name"]: c["detail"] for c in response.checks}
        assert (
            RESPONSE_COMPLETE
            in checks["incident stays open until its open items are done"]
        )
    with full_lab.open_vault(read_only=True) as vault:
        statuses = [r["status"] for r in incident_records(vault).values()]
    assert statuses == [RESPONSE_COMPLETE, RESPONSE_COMPLETE]


def test_rotation_runbook_rotates_given_key(full_lab, tmp_path):
    with full_lab.open_vault() as vault:
        old_fingerprint = vault.get(VAULT_MASTER_ID).fingerprint
    run = run_drills(
        full_lab.root,
        tmp_path / "reports",
        names=["key-rotation"],
        parameters={"rotate_keys": f"[{VAULT_MASTER_ID!r}]"},
    )
    assert run.drills[0].outcome == "passed", run.drills[0].error
    with full_lab.open_vault() as vault:
        assert vault.get(VAULT_MASTER_ID).fingerprint != old_fingerprint
        retired = [k for k in vault.ids() if k.startswith(f"{VAULT_MASTER_ID}/")]
        assert [vault.get(k).state for k in retired] == [KeyState.DESTROYED]


def test_compromise_runbook_dry_run_changes_nothing(full_lab, tmp_path):
    # The drill runner itself writes to the vault (it signs the report), so
    # the runbook hashes the lab around its own dry run and records a check.
    with full_lab.open_vault() as vault:
        keys_before = sorted(vault.ids())
    run = run_drills(
        full_lab.root,
        tmp_path / "reports",
        names=["compromise-response"],
        parameters={"dry_run": "true"},
    )
    drill = run.drills[0]
    assert drill.outcome == "passed", drill.error
    checks = {c["name"]: c["passed"] for c in drill.checks}
    assert checks["dry run changes no file"] is True
    assert checks["dry run only"] is True
    with full_lab.open_vault() as vault:
        assert sorted(vault.ids()) == keys_before
        assert incident_records(vault) == {}


# Command line


def test_cli_impact_lists_exposed_data(tre):
    runner = CliRunner()
    result = runner.invoke(
        main, ["incident", "impact", "--lab", str(tre.root), "gpg/alpha"]
    )
    assert result.exit_code == 0, result.output
    assert f"  {BACKUP_A1}: gpg/admin, gpg/admin-offline" in result.output
    assert "encrypted home-directory backup alpha/2026-12-01" in result.output


def test_cli_impact_unknown_key_exits_1(tre):
    result = CliRunner().invoke(
        main, ["incident", "impact", "--lab", str(tre.root), "nope/x"]
    )
    assert result.exit_code == 1
    assert "Error: no key record with id 'nope/x'" in result.output


def test_cli_close_incident(tre):
    with tre.open_vault() as vault:
        plan, _ = respond(tre, vault, ["wrap/alice"], rotators=WRAP_ROTATORS)
    arguments = ["incident", "close", "--lab", str(tre.root), plan.incident_id]

    result = CliRunner().invoke(main, [*arguments, "--note", "ISM: all sent"])

    assert result.exit_code == 0, result.output
    assert f"incident {plan.incident_id} closed" in result.output
    with tre.open_vault(read_only=True) as vault:
        record = incident_records(vault)[plan.incident_id]
    assert record["status"] == "closed"
    assert record["closing_note"] == "ISM: all sent"


def test_cli_plan_missing_rotator_exits_1(tre, monkeypatch):
    # Every kind has a rotator now, so one is taken out of trekeys' own registry.
    from trekeys import response_plan

    monkeypatch.delitem(response_plan.ROTATORS, KeyKind.SIGNING)
    kind, key_id = KeyKind.SIGNING, "reports/signing"
    if key_id not in impact_of(tre, VAULT_MASTER_ID).key_ids:
        with tre.open_vault() as vault:
            add(vault, key_id, kind, protects=["account:alice@alpha"])
    before = hash_tree(tre.root)
    result = CliRunner().invoke(
        main, ["incident", "plan", "--lab", str(tre.root), key_id]
    )
    assert result.exit_code == 1
    assert f"no rotator for {kind.value} keys ({key_id})" in result.output
    assert hash_tree(tre.root) == before


def test_cli_respond_dry_run_changes_nothing(full_lab):
    with full_lab.open_vault() as vault:
        leaked, _ = choose_drill_keys(vault)
    before = hash_tree(full_lab.root)
    result = CliRunner().invoke(
        main,
        ["incident", "respond", "--lab", str(full_lab.root), "--dry-run", *leaked],
    )
    assert result.exit_code == 0, result.output
    assert f"would run: 01-{leaked[0]}" in result.output
    assert "Subject: Key compromise inc-" in result.output
    assert hash_tree(full_lab.root) == before


# The demo TRE's own records


def test_demo_impact_of_ca(full_lab):
    impact = impact_of(full_lab, "tls/ca")
    assert impact.key_ids == ["tls/ca"]
    assert impact.data == []
    assert {(s.ref, s.signer) for s in impact.signatures} == {
        ("crl:tls/ca", "tls/ca"),
        ("cert:tls/portal.tre.internal", "tls/ca"),
        ("cert:tls/gitlab.tre.internal", "tls/ca"),
        ("cert:tls/jupyter.tre.internal", "tls/ca"),
    }


def test_demo_impact_of_instance_passphrase(full_lab):
    impact = impact_of(full_lab, "alpha/luks-passphrase")
    assert impact.key_ids == ["alpha/luks-passphrase", "alpha/luks-volume"]
    assert [d.ref for d in impact.data] == ["volume:alpha"]
    assert impact.data[0].protected_by == "alpha/luks-volume"
    assert impact.signatures == []


def test_demo_impact_of_service_key(full_lab):
    impact = impact_of(full_lab, "tls/portal.tre.internal")
    assert [d.ref for d in impact.data] == ["service:portal.tre.internal"]
    assert impact.signatures == [
        SuspectSignature(
            "cert:tls/portal.tre.internal", "tls/ca", "certifies a compromised key"
        )
    ]


def test_demo_impact_of_wrapping_key(full_lab):
    impact = impact_of(full_lab, "wrap/alice")
    assert impact.key_ids == ["wrap/alice", "mac/alpha-import"]
    assert [d.ref for d in impact.data] == [
        "manifest:alpha-import/import-cohort-2026-12"
    ]


def test_demo_compromise_drill_end_to_end(full_lab):
    leaked = ["alpha/luks-passphrase", "tls/portal.tre.internal"]
    with full_lab.open_vault() as vault:
        plan, result = respond(full_lab, vault, leaked)
        record_rows = verify_response(vault, plan, result)
        tool_rows = verify_replacements(full_lab, vault, result.new_keys)

    assert [s.key_id for s in plan.steps] == [
        "alpha/luks-passphrase",
        "alpha/luks-volume",
        "tls/portal.tre.internal",
    ]
    assert set(result.new_keys) == set(leaked) | {"alpha/luks-volume"}
    for row in record_rows + tool_rows:
        assert row["passed"], row
    checked = {row["check"] for row in tool_rows}
    assert "old alpha/luks-passphrase no longer opens the volume" in checked
    assert "files of volume alpha recover with the new keys" in checked
    assert (
        "old certificate of tls/portal.tre.internal is in the CRL of tls/ca" in checked
    )


def test_demo_ca_and_service_key_rotate_once(full_lab):
    leaked = ["tls/ca", "tls/portal.tre.internal"]
    with full_lab.open_vault() as vault:
        plan, result = respond(full_lab, vault, leaked)
        portal = vault.get("tls/portal.tre.internal")
        rows = verify_response(vault, plan, result)

    assert [s.key_id for s in plan.steps] == leaked
    # The CA rotation reissued the portal certificate, so its own step only
    # marks the old key compromised instead of rotating it a second time.
    assert result.new_keys["tls/portal.tre.internal"] == []
    assert portal.state is KeyState.COMPROMISED
    new_ca = result.new_keys["tls/ca"][0]
    assert any(
        k.startswith("tls/portal.tre.internal@") for k in result.new_keys["tls/ca"]
    )
    assert new_ca != "tls/ca"
    for row in rows:
        assert row["passed"], row


def test_demo_impact_of_instance_gpg_key(full_lab):
    from trekeys.backup import list_backups

    expected = {b.reference for b in list_backups(full_lab, "alpha")}
    impact = impact_of(full_lab, "gpg/instance-alpha")
    assert len(expected) >= 2
    assert {d.ref for d in impact.data} == expected
    assert {b.ref for b in impact.backups} == expected
    for backup in impact.backups:
        assert backup.still_open_with == ("gpg/admin", "gpg/admin-offline")


def test_demo_instance_and_service_key_drill(full_lab):
    leaked = ["gpg/instance-alpha", "tls/portal.tre.internal"]
    with full_lab.open_vault() as vault:
        plan, result = respond(full_lab, vault, leaked)
        record_rows = verify_response(vault, plan, result)
        tool_rows = verify_replacements(full_lab, vault, result.new_keys)
        old_state = vault.get("gpg/instance-alpha").state

    assert [s.key_id for s in plan.steps] == leaked
    assert old_state is KeyState.COMPROMISED
    for row in record_rows + tool_rows:
        assert row["passed"], row
    checked = {row["check"] for row in tool_rows}
    assert "no backup is still encrypted to old gpg/instance-alpha" in checked
    new_gpg = result.new_keys["gpg/instance-alpha"][0]
    assert f"backups are encrypted to new {new_gpg}" in checked

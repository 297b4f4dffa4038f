"""The custodian register, recovery-proof coverage and the per-share custody check."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from trekeys.cli import main
from trekeys.coverage import (
    check_lab_shares,
    record_recovery_proof,
    recovery_coverage,
)
from trekeys.custodians import (
    acknowledge_duties,
    add_custodian,
    key_file_holding,
    load_register,
    record_departure,
    record_new_split,
    register_rows,
    required_actions,
)
from trekeys.custody import (
    Custodian,
    check_each_share,
    generate_master_secret,
    split_master_secret,
)
from trekeys.errors import RecordError
from trekeys.lab import Lab, create_lab
from trekeys.records import KeyState, utcnow


@pytest.fixture(scope="session")
def register_lab_template(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    root = tmp_path_factory.mktemp("register-template") / "lab"
    return create_lab(root, steps=["trekeys.ceremony:build_lab"])


@pytest.fixture
def lab(register_lab_template: Lab, tmp_path: Path) -> Lab:
    shutil.copytree(register_lab_template.root, tmp_path / "lab")
    return Lab.load(tmp_path / "lab")


def split_of(lab: Lab) -> str:
    with lab.open_vault(read_only=True) as vault:
        return vault.meta["custody"]["split"]


# The register


def test_lab_register_lists_every_custodian(lab: Lab):
    with lab.open_vault(read_only=True) as vault:
        entries = load_register(vault)

    shares = {e.name: e.holds for e in entries if e.kind == "share"}
    split = split_of(lab)
    assert shares == {
        "Sam Admin": f"share:{split}:tre-system-administrator.share",
        "Isla Manager": f"share:{split}:information-security-manager.share",
        "Omar Operations": f"share:{split}:operations-manager.share",
    }
    key_file = key_file_holding("vault.keyx", lab.keyfile_path.read_bytes())
    holders = {e.name for e in entries if e.holds == key_file}
    assert holders == {"Sam Admin", "Isla Manager"}
    assert all(e.policy_version == "ISMS-09-07 v1.5" for e in entries)
    assert all(e.duties_acknowledged for e in entries)


def test_register_feeds_inventory_rows(lab: Lab):
    with lab.open_vault(read_only=True) as vault:
        rows = register_rows(vault)
    assert len(rows) == 5
    assert {row["state"] for row in rows} == {"active"}
    assert all(row["flags"] == "" for row in rows)
    assert rows[0]["id"].startswith("custody/share:")


def test_departure_requires_resplit(lab: Lab):
    with lab.open_vault() as vault:
        actions = record_departure(vault, "Omar Operations", "left the organisation")

    assert len(actions) == 1
    assert actions[0].trigger == "custodian left"
    assert actions[0].action.startswith("re-split required")
    assert split_of(lab) in actions[0].action
    with lab.open_vault(read_only=True) as vault:
        rows = {row["custodian"]: row for row in register_rows(vault)}
    assert rows["Omar Operations"]["flags"] == "re-split-required"
    assert rows["Omar Operations"]["state"].startswith("left ")


def test_resplit_closes_departure_action(lab: Lab):
    with lab.open_vault() as vault:
        record_departure(vault, "Omar Operations", "left")
        vault.update_meta(custody={**vault.meta["custody"], "split": "beef"})
    with lab.open_vault(read_only=True) as vault:
        assert required_actions(vault) == []


def test_new_split_retires_old_shares(lab: Lab):
    old_split = split_of(lab)
    with lab.open_vault() as vault:
        record_departure(vault, "Omar Operations", "left")
        vault.update_meta(custody={**vault.meta["custody"], "split": "beef"})
        added = record_new_split(
            vault,
            "beef",
            [
                ("Sam Admin", "TRE System Administrator", "sam.share"),
                ("Isla Manager", "Information Security Manager", "isla.share"),
            ],
        )
        entries = load_register(vault)
        actions = required_actions(vault)

    assert [e.holds for e in added] == ["share:beef:sam.share", "share:beef:isla.share"]
    old = [e for e in entries if e.holds.startswith(f"share:{old_split}:")]
    assert len(old) == 3
    assert all(not e.active for e in old)
    assert [(a.custodian, a.trigger) for a in actions] == [
        ("Sam Admin", "duties not acknowledged"),
        ("Isla Manager", "duties not acknowledged"),
    ]


def test_key_file_holder_leaving_needs_new_key_file(lab: Lab):
    with lab.open_vault() as vault:
        actions = record_departure(vault, "Sam Admin", "moved team")
    kinds = sorted(a.holds.split(":")[0] for a in actions)
    assert kinds == ["key-file", "share"]
    assert any("replace key file vault.keyx" in a.action for a in actions)

    with lab.open_vault() as vault:
        add_custodian(
            vault,
            "Isla Manager",
            "Information Security Manager",
            key_file_holding("vault.keyx", b"a new key file"),
            duties_acknowledged=utcnow(),
        )
        remaining = required_actions(vault)
    assert [a.holds.split(":")[0] for a in remaining] == ["share"]


def test_share_has_one_holder(lab: Lab):
    holding = f"share:{split_of(lab)}:operations-manager.share"
    with lab.open_vault() as vault:
        with pytest.raises(RecordError, match="already held by Omar Operations"):
            add_custodian(vault, "Sara Second", "TRE System Administrator", holding)
        assert len(load_register(vault)) == 5


def test_malformed_holding_refused(lab: Lab):
    with lab.open_vault() as vault:
        with pytest.raises(RecordError, match="invalid holding 'usb-stick'"):
            add_custodian(vault, "Sara Second", "TRE System Administrator", "usb-stick")


def test_unacknowledged_duties_are_flagged(lab: Lab):
    holding = key_file_holding("backup.keyx", b"backup key file")
    with lab.open_vault() as vault:
        add_custodian(vault, "Sara Second", "TRE System Administrator", holding)
        actions = required_actions(vault)
        assert [(a.custodian, a.trigger) for a in actions] == [
            ("Sara Second", "duties not acknowledged")
        ]
        assert acknowledge_duties(vault, "Sara Second") == 1
        assert required_actions(vault) == []


def test_departure_of_unknown_custodian(lab: Lab):
    with lab.open_vault() as vault:
        with pytest.raises(RecordError, match="Nobody Here holds no share"):
            record_departure(vault, "Nobody Here", "never was")


def test_register_changes_are_audited(lab: Lab):
    with lab.open_vault() as vault:
        record_departure(vault, "Omar Operations", "left")
    with lab.open_vault(read_only=True) as vault:
        operations = [e["operation"] for e in vault.audit_log.entries()]
    assert operations.count("add-custodian") == 5
    assert operations[-1] == "custodian-left"


# Recovery-proof coverage


def test_coverage_flags_old_and_missing_proofs(lab: Lab):
    now = utcnow()
    with lab.open_vault() as vault:
        record_recovery_proof(
            vault,
            "tre/vault-master",
            "reports/2025/vault-health",
            at=now - timedelta(days=400),
        )
        record_recovery_proof(vault, "tre/ceremony-signing", "reports/2026/x", at=now)
        rows = {row.key_id: row for row in recovery_coverage(vault, now=now)}

    assert rows["tre/vault-master"].status == "overdue"
    assert rows["tre/vault-master"].age_days == 400
    assert rows["tre/vault-master"].report == "reports/2025/vault-health"
    assert rows["tre/ceremony-signing"].status == "proven"


def test_coverage_interval_is_configurable(lab: Lab):
    now = utcnow()
    with lab.open_vault() as vault:
        record_recovery_proof(
            vault, "tre/vault-master", "r", at=now - timedelta(days=40)
        )
        short = recovery_coverage(vault, now=now, interval_days=30)
        default = recovery_coverage(vault, now=now)
    assert {r.key_id: r.status for r in short}["tre/vault-master"] == "overdue"
    assert {r.key_id: r.status for r in default}["tre/vault-master"] == "proven"


def test_coverage_skips_tombstones(lab: Lab):
    with lab.open_vault() as vault:
        vault.transition("tre/ceremony-signing", KeyState.DEACTIVATED, "test")
        vault.destroy("tre/ceremony-signing", "test")
        rows = recovery_coverage(vault)
        with pytest.raises(RecordError, match="was destroyed"):
            record_recovery_proof(vault, "tre/ceremony-signing", "r")
    assert [r.key_id for r in rows] == ["tre/vault-master"]
    assert rows[0].status == "never proven"


# Each custodian's share on its own


def replace_with_foreign_share(path: Path) -> None:
    """Put a well-formed share of another split into a share file."""
    other = split_master_secret(
        generate_master_secret(), [Custodian("a", "a"), Custodian("b", "b")], 2
    )
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    path.write_text("\n".join([*header, next(iter(other.shares.values()))]) + "\n")


def test_bad_share_reported_while_threshold_works(lab: Lab):
    files = lab.share_files()
    bad = lab.custodians_dir / "operations-manager.share"
    replace_with_foreign_share(bad)
    good = [f for f in files if f != bad]

    with lab.open_vault(good) as vault:
        rows = {row["file"]: row for row in check_lab_shares(files, 2, vault)}

    assert rows["operations-manager.share"]["valid"] is False
    assert "another split" in rows["operations-manager.share"]["detail"]
    assert rows["information-security-manager.share"]["valid"] is True
    assert rows["tre-system-administrator.share"]["valid"] is True
    assert rows["information-security-manager.share"]["proven_with"] == (
        "tre-system-administrator"
    )


def test_damaged_share_words_reported(lab: Lab):
    bad = lab.custodians_dir / "tre-system-administrator.share"
    lines = bad.read_text().splitlines()
    words = lines[-1].split()
    words[3] = "academic" if words[3] != "academic" else "acid"
    bad.write_text("\n".join([*lines[:-1], " ".join(words)]) + "\n")

    with lab.open_vault(
        [
            lab.custodians_dir / "operations-manager.share",
            lab.custodians_dir / "information-security-manager.share",
        ]
    ) as vault:
        fingerprint = vault.get("tre/vault-master").fingerprint
    rows = check_each_share(lab.share_files(), 2, fingerprint)

    assert [row["valid"] for row in rows] == [True, True, False]
    assert rows[2]["file"] == "tre-system-administrator.share"


def test_missing_share_file_reported(lab: Lab):
    files = lab.share_files()
    missing = lab.custodians_dir / "lost.share"
    with lab.open_vault() as vault:
        fingerprint = vault.get("tre/vault-master").fingerprint
    rows = check_each_share([*files, missing], 2, fingerprint)
    assert rows[-1]["valid"] is False
    assert "is missing" in rows[-1]["detail"]
    assert all(row["valid"] for row in rows[:-1])


def test_all_shares_valid_on_fresh_lab(lab: Lab):
    with lab.open_vault() as vault:
        rows = check_lab_shares(lab.share_files(), lab.threshold, vault)
    assert [row["valid"] for row in rows] == [True, True, True]


def test_lab_check_reports_bad_share(lab: Lab):
    bad = lab.custodians_dir / "operations-manager.share"
    replace_with_foreign_share(bad)
    good = [f for f in lab.share_files() if f != bad]

    with lab.open_vault(good) as vault:
        rows = {row["custodian"]: row for row in lab.check_each_share(vault)}

    assert rows["operations-manager"]["valid"] is False


# The command line


def test_cli_register_lists_departure(lab: Lab):
    with lab.open_vault() as vault:
        record_departure(vault, "Omar Operations", "left")
    result = CliRunner().invoke(
        main, ["ceremony", "register", "list", "--lab", str(lab.root), "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert len(data["register"]) == 5
    assert data["actions"][0]["custodian"] == "Omar Operations"
    assert data["actions"][0]["action"].startswith("re-split required")


def test_cli_coverage_lists_keys(lab: Lab):
    with lab.open_vault() as vault:
        record_recovery_proof(vault, "tre/vault-master", "reports/run-1")
    result = CliRunner().invoke(main, ["ceremony", "coverage", "--lab", str(lab.root)])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split()[1:] for line in result.output.splitlines()}
    assert lines["tre/vault-master"][0] == "proven"
    assert lines["tre/vault-master"][-1] == "reports/run-1"
    assert lines["tre/ceremony-signing"][:2] == ["never", "proven"]


def test_cli_prune_lists_without_yes(lab: Lab, tmp_path: Path):
    old = tmp_path / "reports" / "2010-01-01T000000Z"
    old.mkdir(parents=True)
    (old / "summary.json").write_text(
        json.dumps({"passed": False, "drills": [{"name": "a", "outcome": "failed"}]})
    )
    runner = CliRunner()
    args = ["ceremony", "prune", str(tmp_path / "reports"), "--lab", str(lab.root)]

    listed = runner.invoke(main, args)
    assert listed.exit_code == 0, listed.output
    assert f"would remove {old}" in listed.output
    assert old.exists()

    removed = runner.invoke(main, [*args, "--yes"])
    assert removed.exit_code == 0, removed.output
    assert not old.exists()

"""The hash-chained audit log: every kind of tampering names its first bad line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from trekeys.audit import GENESIS, Actor, AuditLog, make_entry
from trekeys.cli import main
from trekeys.errors import AuditError
from trekeys.lab import Lab

ACTOR = Actor("TRE System Administrators", "tester")


def _write_log(path: Path, count: int) -> list[str]:
    log = AuditLog(path)
    previous = GENESIS
    entries = []
    for sequence in range(1, count + 1):
        entry = make_entry(
            previous, sequence, ACTOR, "read", f"k/{sequence}", "success"
        )
        previous = entry["hash"]
        entries.append(entry)
    log.append(entries)
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def test_intact_log_verifies(tmp_path: Path) -> None:
    lines = _write_log(tmp_path / "audit.jsonl", 5)
    head = json.loads(lines[-1])["hash"]

    assert AuditLog(tmp_path / "audit.jsonl").verify(head) == 5


def test_edited_line_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _write_log(path, 5)
    lines[2] = lines[2].replace('"k/3"', '"k/33"')
    path.write_text("".join(lines), encoding="utf-8")

    with pytest.raises(AuditError, match="line 3 was edited") as caught:
        AuditLog(path).verify()

    assert caught.value.line == 3


def test_deleted_line_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _write_log(path, 5)
    del lines[1]
    path.write_text("".join(lines), encoding="utf-8")

    with pytest.raises(AuditError, match="line 2 does not follow line 1") as caught:
        AuditLog(path).verify()

    assert caught.value.line == 2


def test_reordered_lines_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _write_log(path, 5)
    lines[3], lines[4] = lines[4], lines[3]
    path.write_text("".join(lines), encoding="utf-8")

    with pytest.raises(AuditError, match="line 4 does not follow") as caught:
        AuditLog(path).verify()

    assert caught.value.line == 4


def test_truncated_log_detected_by_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _write_log(path, 5)
    head = json.loads(lines[-1])["hash"]
    path.write_text("".join(lines[:3]), encoding="utf-8")

    with pytest.raises(AuditError, match="ends at entry 3.*truncated") as caught:
        AuditLog(path).verify(head)

    assert caught.value.line == 4


def test_garbage_line_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _write_log(path, 3)
    lines[1] = "not json\n"
    path.write_text("".join(lines), encoding="utf-8")

    with pytest.raises(AuditError, match="line 2 is not valid JSON"):
        AuditLog(path).verify()


def _lab_log(lab: Lab) -> Path:
    return lab.vault_path.with_name("vault-audit.jsonl")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("edit", "line 2 was edited"),
        ("delete", "line 2 does not follow line 1"),
        ("reorder", "line 2 does not follow line 1"),
        ("truncate", "the log was truncated"),
    ],
)
def test_cli_audit_verify_names_bad_line(
    bare_lab: Lab, damage: str, expected: str
) -> None:
    with bare_lab.open_vault() as vault:
        vault.record_operation("inventory", "tre/vault-master", "success")
        vault.record_operation("inventory", "tre/vault-master", "success")
    path = _lab_log(bare_lab)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == 4
    if damage == "edit":
        lines[1] = lines[1].replace('"success"', '"failure"')
    elif damage == "delete":
        del lines[1]
    elif damage == "reorder":
        lines[1], lines[2] = lines[2], lines[1]
    else:
        lines = lines[:-1]
    path.write_text("".join(lines), encoding="utf-8")

    result = CliRunner().invoke(main, ["audit", "verify", "--lab", str(bare_lab.root)])

    assert result.exit_code == 1
    assert expected in result.stderr
    assert result.stderr.startswith("Error: audit log")


def test_cli_audit_verify_passes_on_intact_log(bare_lab: Lab) -> None:
    result = CliRunner().invoke(main, ["audit", "verify", "--lab", str(bare_lab.root)])

    assert result.exit_code == 0
    assert "audit log intact" in result.output

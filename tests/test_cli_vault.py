"""The ``trekeys vault``, ``custody`` and ``inventory`` commands and exit codes."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from click.testing import CliRunner, Result

from trekeys.cli import main
from trekeys.custody import read_share_file
from trekeys.lab import VAULT_MASTER_ID, Lab
from trekeys.records import KeyKind, KeyRecord
from trekeys.vault import list_generations


def _run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input)


def _copy_shares(lab: Lab, folder: Path) -> list[Path]:
    folder.mkdir()
    copies = []
    for path in lab.share_files():
        copy = folder / path.name
        copy.write_bytes(path.read_bytes())
        copies.append(copy)
    return copies


def test_every_command_has_help() -> None:
    for command in (
        ["vault", "info"],
        ["vault", "generations"],
        ["vault", "restore"],
        ["vault", "tune-kdf"],
        ["custody", "check"],
        ["custody", "resplit"],
        ["inventory"],
    ):
        result = _run(*command, "--help")
        assert result.exit_code == 0, command
        assert "Usage:" in result.output


def test_vault_info_shows_kdf_cipher_strength(bare_lab: Lab) -> None:
    result = _run("vault", "info", "--lab", str(bare_lab.root))

    assert result.exit_code == 0
    assert "KDF:            Argon2id, 1 iterations, 8 MiB, 1 lanes" in result.output
    assert "cipher:         aes256" in result.output
    assert "custody:        split" in result.output
    assert "2 of 3 custodians" in result.output
    assert "meets the policy" in result.output


def test_vault_generations_and_restore(bare_lab: Lab) -> None:
    with bare_lab.open_vault() as vault:
        vault.record_operation("inventory", VAULT_MASTER_ID, "success")
    generations = list_generations(bare_lab.vault_path)
    lab = str(bare_lab.root)

    listing = _run("vault", "generations", "--lab", lab)
    restored = _run("vault", "restore", "--lab", lab, generations[0].name)

    assert listing.exit_code == 0
    assert generations[0].name in listing.output.splitlines()[1]
    assert restored.exit_code == 0
    assert f"restored {generations[0].name}" in restored.output
    assert len(list_generations(bare_lab.vault_path)) == len(generations) + 1
    assert _run("audit", "verify", "--lab", lab).exit_code == 0


def test_vault_restore_unknown_generation_exits_1(bare_lab: Lab) -> None:
    result = _run("vault", "restore", "--lab", str(bare_lab.root), "no-such.kdbx")

    assert result.exit_code == 1
    assert "Error: no generation 'no-such.kdbx'" in result.stderr


def test_tune_kdf_reports_settings() -> None:
    result = _run("vault", "tune-kdf", "--seconds", "0.05", "--memory-mib", "8")

    assert result.exit_code == 0
    assert result.output.startswith("Argon2id, ")
    assert "s per derivation here" in result.output


def test_custody_check_passes_and_flags_bad_share(
    bare_lab: Lab, tmp_path: Path
) -> None:
    good = _run("custody", "check", "--lab", str(bare_lab.root))
    last = bare_lab.share_files()[-1]
    words = read_share_file(last).split()
    words[5] = "academic" if words[5] != "academic" else "acid"
    last.write_text(" ".join(words) + "\n")

    bad = _run("custody", "check", "--lab", str(bare_lab.root))

    assert good.exit_code == 0
    assert good.output.count(" valid ") == 3
    assert bad.exit_code == 1
    assert "INVALID" in bad.output
    assert "bad checksum" in bad.output


def test_custody_resplit_makes_old_shares_fail(bare_lab: Lab, tmp_path: Path) -> None:
    old = _copy_shares(bare_lab, tmp_path / "old")
    lab = str(bare_lab.root)

    result = _run("custody", "resplit", "--lab", lab, "--reason", "annual re-split")
    with_old = _run(
        "inventory", "--lab", lab, "--share", str(old[0]), "--share", str(old[1])
    )
    with_new = _run("inventory", "--lab", lab)

    assert result.exit_code == 0
    assert "new share for operations-manager" in result.output
    assert with_old.exit_code == 1
    assert "Error: the credentials do not open vault" in with_old.stderr
    assert with_new.exit_code == 0
    assert "tre/vault-master/split-" in with_new.output


def test_custody_resplit_custodian_leaves(bare_lab: Lab) -> None:
    result = _run(
        "custody",
        "resplit",
        "--lab",
        str(bare_lab.root),
        "--custodian",
        "TRE System Administrator=Sam Admin",
        "--custodian",
        "Information Security Manager=Isla Manager",
        "--threshold",
        "2",
        "--reason",
        "Operations Manager left",
        "--compromised",
    )

    assert result.exit_code == 0
    assert "removed share of a former custodian" in result.output
    with Lab.load(bare_lab.root).open_vault(read_only=True) as vault:
        tombstones = vault.find(kind="vault-master", state="destroyed-compromised")
    assert [t.id for t in tombstones] == [
        f"tre/vault-master/split-{tombstones[0].attributes['split']}"
    ]
    assert len(Lab.load(bare_lab.root).share_files()) == 2
    assert _run("custody", "check", "--lab", str(bare_lab.root)).exit_code == 0


def test_custody_resplit_usage_errors_exit_2(bare_lab: Lab) -> None:
    no_reason = _run("custody", "resplit", "--lab", str(bare_lab.root))
    bad_custodian = _run(
        "custody",
        "resplit",
        "--lab",
        str(bare_lab.root),
        "--custodian",
        "nobody",
        "--reason",
        "x",
    )

    assert no_reason.exit_code == 2
    assert "Missing option '--reason'" in no_reason.stderr
    assert bad_custodian.exit_code == 1
    assert "write it as ROLE=NAME" in bad_custodian.stderr


def test_shares_typed_at_prompt_open_vault(bare_lab: Lab) -> None:
    shares = [read_share_file(p) for p in bare_lab.share_files()[:2]]

    result = _run(
        "inventory",
        "--lab",
        str(bare_lab.root),
        "--share",
        "-",
        input="\n".join(shares),
    )

    assert result.exit_code == 0
    assert "tre/vault-master" in result.output
    for share in shares:
        assert share not in result.output


def test_too_few_shares_at_prompt_exit_1(bare_lab: Lab) -> None:
    share = read_share_file(bare_lab.share_files()[0])

    result = _run(
        "inventory",
        "--lab",
        str(bare_lab.root),
        "--share",
        "-",
        input=f"{share}\n{share}\n",
    )

    assert result.exit_code == 1
    assert "Error:" in result.stderr
    assert share not in result.stderr


def test_inventory_exports_csv_and_json(bare_lab: Lab, tmp_path: Path) -> None:
    lab = str(bare_lab.root)
    csv_path, json_path = tmp_path / "inv.csv", tmp_path / "inv.json"

    as_csv = _run(
        "inventory", "--lab", lab, "--format", "csv", "--output", str(csv_path)
    )
    as_json = _run(
        "inventory", "--lab", lab, "--format", "json", "--output", str(json_path)
    )
    filtered = _run("inventory", "--lab", lab, "--kind", "tls-cert", "--format", "json")

    assert as_csv.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert [row["id"] for row in rows] == [VAULT_MASTER_ID]
    assert rows[0]["strength_bits"] == "256"
    assert as_json.exit_code == 0
    data = json.loads(json_path.read_text())
    assert data[0]["kind"] == "vault-master"
    assert data[0]["state"] == "active"
    assert json.loads(filtered.output) == []


def test_missing_lab_exits_1(tmp_path: Path) -> None:
    result = _run("vault", "info", "--lab", str(tmp_path / "none"))

    assert result.exit_code == 1
    assert "does not exist; create it with 'trekeys lab create'" in result.stderr


def test_vault_info_exits_1_when_strength_rule_fails(bare_lab: Lab) -> None:
    with bare_lab.open_vault() as vault:
        vault.add(
            KeyRecord(
                id="tre/huge",
                kind=KeyKind.WRAPPING,
                purpose="stronger than the vault",
                owner="tre",
                strength_bits=512,
            ),
            b"k" * 64,
        )

    result = _run("vault", "info", "--lab", str(bare_lab.root))

    assert result.exit_code == 1
    assert "strongest key held 512 bits: VIOLATES the policy" in result.output


def test_relative_share_paths_follow_current_folder(bare_lab, monkeypatch):
    monkeypatch.chdir(bare_lab.root.parent)
    shares = [f"lab/custodians/{p.name}" for p in bare_lab.share_files()[:2]]
    arguments = ["inventory", "--lab", "lab"]
    for share in shares:
        arguments += ["--share", share]

    result = CliRunner().invoke(main, arguments)

    assert result.exit_code == 0, result.output
    assert "tre/vault-master" in result.output


def test_relative_share_paths_in_environment(bare_lab, monkeypatch):
    monkeypatch.chdir(bare_lab.root.parent)
    shares = [f"lab/custodians/{p.name}" for p in bare_lab.share_files()[:2]]
    monkeypatch.setenv("TREKEYS_SHARE_FILES", ":".join(shares))

    result = CliRunner().invoke(main, ["inventory", "--lab", "lab"])

    assert result.exit_code == 0, result.output
    assert "tre/vault-master" in result.output

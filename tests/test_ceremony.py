"""Ceremony mode, machine evidence and sealed transcripts, with real gpg and openssl."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from trekeys.ceremony import Ceremony, Participant, start_lab_ceremony
from trekeys.cli import main
from trekeys.drills import run_drills
from trekeys.errors import CeremonyError, ToolError, TranscriptError
from trekeys.evidence import (
    REDACTED,
    capture_tool_output,
    file_manifest,
    group_hex,
    redact,
)
from trekeys.lab import Lab, create_lab
from trekeys.offline_signature import gpg_detach_sign, offline_signer_if_reachable
from trekeys.procedures import (
    ISM,
    OPERATIONS_MANAGER,
    SYSTEM_ADMINISTRATOR,
    Procedure,
)
from trekeys.signing_key import load_public_key_pem, signing_public_key
from trekeys.transcript import (
    parse_lines,
    read_transcript,
    verify_transcript,
    verify_with_vault,
)
from trekeys.transcript_report import DRY_RUN_MARK, render_sections

SAM = Participant(SYSTEM_ADMINISTRATOR, "Sam Admin", custodian=True)
ISLA = Participant(ISM, "Isla Manager", custodian=True)
OMAR = Participant(OPERATIONS_MANAGER, "Omar Operations", custodian=True)
SECOND_ADMIN = Participant(SYSTEM_ADMINISTRATOR, "Sara Second")


@pytest.fixture(scope="session")
def ceremony_lab_template(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    """A lab with the vault, custody and the ceremony step only, built once."""
    root = tmp_path_factory.mktemp("ceremony-template") / "lab"
    return create_lab(root, steps=["trekeys.ceremony:build_lab"])


@pytest.fixture
def lab(ceremony_lab_template: Lab, tmp_path: Path) -> Lab:
    """A private copy of the ceremony lab."""
    shutil.copytree(ceremony_lab_template.root, tmp_path / "lab")
    return Lab.load(tmp_path / "lab")


def run_ca_ceremony(lab: Lab, folder: Path) -> Ceremony:
    """Run the ca-creation script to the end, with one skipped step, unsealed."""
    ceremony = start_lab_ceremony(lab, "ca-creation", [SAM, ISLA], folder)
    ceremony.perform(
        "check-participants-and-tools",
        by="Sam Admin",
        outcome="identities checked",
        evidence=[capture_tool_output(["openssl", "version"])],
    )
    produced = folder / "ca.txt"
    produced.write_text("not a real certificate\n")
    ceremony.perform(
        "generate-key",
        by="Sam Admin",
        witness="Isla Manager",
        outcome="key generated",
        files=[produced],
        fingerprints={"certificate": "ab" * 32},
    )
    ceremony.perform(
        "export-certificate",
        by="Sam Admin",
        witness="Isla Manager",
        outcome="exported",
    )
    ceremony.skip(
        "backup-to-offline-media",
        reason="no offline media in the demo TRE",
        instead="nothing; the scratch key is destroyed afterwards",
        reported_by="Sam Admin",
        acknowledged_by="Isla Manager",
    )
    ceremony.perform(
        "read-fingerprints-aloud", by="Isla Manager", outcome="fingerprints match"
    )
    return ceremony


@pytest.fixture
def sealed(lab: Lab, tmp_path: Path) -> Path:
    """A sealed ca-creation transcript, signed by the vault key only."""
    ceremony = run_ca_ceremony(lab, tmp_path / "ceremony")
    with lab.open_vault() as vault:
        return ceremony.seal(vault)


def trusted_key(lab: Lab) -> bytes:
    with lab.open_vault(read_only=True) as vault:
        return signing_public_key(vault)


def audit_operations(lab: Lab) -> list[tuple[str, str, str]]:
    with lab.open_vault(read_only=True) as vault:
        return [
            (e["operation"], e["key_id"], e["outcome"])
            for e in vault.audit_log.entries()
        ]


# Roles and witnesses


def test_start_refused_without_ism_for_compromise(lab: Lab, tmp_path: Path):
    folder = tmp_path / "compromise"
    with pytest.raises(CeremonyError, match="needs 1 more Information Security"):
        start_lab_ceremony(lab, "compromise-response", [SAM, OMAR], folder)
    assert not folder.exists()


def test_resplit_needs_two_custodians(lab: Lab, tmp_path: Path):
    lone_custodian = [ISLA, SECOND_ADMIN]
    with pytest.raises(CeremonyError, match="1 more Custodian"):
        start_lab_ceremony(lab, "custody-resplit", lone_custodian, tmp_path / "r")
    ceremony = start_lab_ceremony(lab, "custody-resplit", [ISLA, SAM], tmp_path / "ok")
    assert ceremony.pending_steps[0] == "check-participants-and-tools"


def test_step_refused_without_witness(lab: Lab, tmp_path: Path):
    ceremony = start_lab_ceremony(lab, "ca-creation", [SAM, ISLA], tmp_path / "c")
    ceremony.perform("check-participants-and-tools", by="Sam Admin", outcome="ok")
    before = ceremony.journal.path.read_bytes()

    with pytest.raises(CeremonyError, match="needs a witness in another role"):
        ceremony.perform("generate-key", by="Sam Admin", outcome="made")

    assert ceremony.journal.path.read_bytes() == before
    assert ceremony.pending_steps[0] == "generate-key"


def test_witness_in_same_role_refused(lab: Lab, tmp_path: Path):
    participants = [SAM, ISLA, SECOND_ADMIN]
    ceremony = start_lab_ceremony(lab, "ca-creation", participants, tmp_path / "c")
    ceremony.perform("check-participants-and-tools", by="Sam Admin", outcome="ok")
    before = ceremony.journal.path.read_bytes()

    with pytest.raises(CeremonyError, match="Sara Second cannot witness"):
        ceremony.perform(
            "generate-key", by="Sam Admin", witness="Sara Second", outcome="made"
        )
    assert ceremony.journal.path.read_bytes() == before


def test_absent_witness_refused(lab: Lab, tmp_path: Path):
    ceremony = start_lab_ceremony(lab, "ca-creation", [SAM, ISLA], tmp_path / "c")
    ceremony.perform("check-participants-and-tools", by="Sam Admin", outcome="ok")
    with pytest.raises(CeremonyError, match="'Omar Operations' is not present"):
        ceremony.perform(
            "generate-key", by="Sam Admin", witness="Omar Operations", outcome="x"
        )


def test_actor_role_restricted_by_script(lab: Lab, tmp_path: Path):
    ceremony = start_lab_ceremony(lab, "ca-creation", [SAM, ISLA], tmp_path / "c")
    ceremony.perform("check-participants-and-tools", by="Sam Admin", outcome="ok")
    with pytest.raises(CeremonyError, match="must be performed by a TRE System"):
        ceremony.perform(
            "generate-key", by="Isla Manager", witness="Sam Admin", outcome="x"
        )


def test_ceremony_stops_when_role_leaves(lab: Lab, tmp_path: Path):
    ceremony = start_lab_ceremony(lab, "ca-creation", [SAM, ISLA], tmp_path / "c")
    ceremony.perform("check-participants-and-tools", by="Sam Admin", outcome="ok")
    ceremony.leave("Isla Manager", "called away")

    with pytest.raises(
        CeremonyError, match="cannot go on: it needs 1 more Information"
    ):
        ceremony.perform(
            "generate-key", by="Sam Admin", witness="Isla Manager", outcome="x"
        )

    ceremony.join(ISLA)
    with pytest.raises(CeremonyError, match="Isla Manager is already present"):
        ceremony.join(ISLA)
    entry = ceremony.perform(
        "generate-key", by="Sam Admin", witness="Isla Manager", outcome="made"
    )
    assert entry["witness"]["name"] == "Isla Manager"
    assert entry["witness"]["acknowledged"] is True


def test_unknown_role_rejected():
    with pytest.raises(
        CeremonyError, match="unknown role 'Information Security Manger'"
    ):
        Participant("Information Security Manger", "Isla Manager")
    with pytest.raises(CeremonyError, match="needs both a role and a name"):
        Participant.from_dict({"name": "Isla Manager"})


def test_duplicate_participant_refused(lab: Lab, tmp_path: Path):
    with pytest.raises(CeremonyError, match="listed twice"):
        start_lab_ceremony(lab, "ca-creation", [SAM, ISLA, SAM], tmp_path / "c")


def test_start_refused_in_nonempty_folder(lab: Lab, tmp_path: Path):
    folder = tmp_path / "used"
    folder.mkdir()
    (folder / "old.txt").write_text("earlier evidence")
    with pytest.raises(CeremonyError, match="is not empty"):
        start_lab_ceremony(lab, "ca-creation", [SAM, ISLA], folder)
    assert (folder / "old.txt").read_text() == "earlier evidence"
    assert not (folder / "transcript.jsonl").exists()


def test_unknown_procedure_lists_known(lab: Lab, tmp_path: Path):
    with pytest.raises(CeremonyError, match="choose one of vault-creation"):
        start_lab_ceremony(lab, "coffee-break", [SAM, ISLA], tmp_path / "c")


# Steps and deviations


def test_step_cannot_skip_ahead_silently(lab: Lab, tmp_path: Path):
    ceremony = start_lab_ceremony(lab, "ca-creation", [SAM, ISLA], tmp_path / "c")
    with pytest.raises(CeremonyError, match="cannot come before step check-part"):
        ceremony.perform(
            "generate-key", by="Sam Admin", witness="Isla Manager", outcome="x"
        )


def test_skip_is_recorded_as_deviation(lab: Lab, tmp_path: Path):
    ceremony = start_lab_ceremony(lab, "ca-creation", [SAM, ISLA], tmp_path / "c")
    entry = ceremony.skip(
        "check-participants-and-tools",
        reason="checked at the door",
        instead="badges were checked by security",
        reported_by="Isla Manager",
        acknowledged_by="Sam Admin",
    )
    assert entry["type"] == "deviation"
    assert entry["skipped"] is True
    assert entry["acknowledged_by"]["name"] == "Sam Admin"
    assert ceremony.pending_steps[0] == "generate-key"


def test_deviation_acknowledged_by_other_role(lab: Lab, tmp_path: Path):
    ceremony = start_lab_ceremony(lab, "ca-creation", [SAM, ISLA], tmp_path / "c")
    with pytest.raises(CeremonyError, match="cannot witness"):
        ceremony.deviate(
            "generate-key",
            what_happened="power cut",
            instead="restarted",
            reported_by="Sam Admin",
            acknowledged_by="Sam Admin",
        )


def test_seal_refused_with_pending_steps(lab: Lab, tmp_path: Path):
    ceremony = start_lab_ceremony(lab, "ca-creation", [SAM, ISLA], tmp_path / "c")
    ceremony.perform("check-participants-and-tools", by="Sam Admin", outcome="ok")
    before = ceremony.journal.path.read_bytes()
    with lab.open_vault() as vault:
        with pytest.raises(CeremonyError, match="generate-key, export-certificate"):
            ceremony.seal(vault)
    assert ceremony.journal.path.read_bytes() == before


def test_recorded_step_cannot_be_redone(lab: Lab, tmp_path: Path):
    ceremony = start_lab_ceremony(lab, "ca-creation", [SAM, ISLA], tmp_path / "c")
    ceremony.perform("check-participants-and-tools", by="Sam Admin", outcome="ok")
    with pytest.raises(CeremonyError, match="already recorded and cannot be changed"):
        ceremony.perform("check-participants-and-tools", by="Sam Admin", outcome="2")


def test_extra_step_needs_deviation_first(lab: Lab, tmp_path: Path):
    ceremony = start_lab_ceremony(lab, "ca-creation", [SAM, ISLA], tmp_path / "c")
    with pytest.raises(CeremonyError, match="not in the ca-creation script"):
        ceremony.perform(
            "destroy-scratch", by="Sam Admin", witness="Isla Manager", outcome="x"
        )

    ceremony.deviate(
        "destroy-scratch",
        what_happened="dry run keys must not stay",
        instead="an extra step destroys the scratch key",
        reported_by="Isla Manager",
        acknowledged_by="Sam Admin",
    )
    entry = ceremony.perform(
        "destroy-scratch", by="Sam Admin", witness="Isla Manager", outcome="destroyed"
    )
    assert entry["planned"] is False


def test_resume_picks_up_recorded_state(lab: Lab, tmp_path: Path):
    folder = tmp_path / "c"
    ceremony = start_lab_ceremony(lab, "ca-creation", [SAM, ISLA], folder)
    ceremony.perform("check-participants-and-tools", by="Sam Admin", outcome="ok")
    ceremony.leave("Isla Manager", "break")

    resumed = Ceremony.resume(folder)

    assert resumed.pending_steps == ceremony.pending_steps
    assert set(resumed.present) == {"Sam Admin"}
    assert resumed.dry_run is True
    with pytest.raises(CeremonyError, match="cannot go on"):
        resumed.perform(
            "generate-key", by="Sam Admin", witness="Isla Manager", outcome="x"
        )


def test_concurrent_writer_detected(lab: Lab, tmp_path: Path):
    folder = tmp_path / "c"
    first = start_lab_ceremony(lab, "ca-creation", [SAM, ISLA], folder)
    second = Ceremony.resume(folder)
    second.perform("check-participants-and-tools", by="Sam Admin", outcome="ok")
    before = first.journal.path.read_bytes()

    with pytest.raises(TranscriptError, match="changed by another process"):
        first.perform("check-participants-and-tools", by="Sam Admin", outcome="ok")
    assert first.journal.path.read_bytes() == before


def test_non_ascii_names_verify(lab: Lab, tmp_path: Path):
    zoe = Participant(ISM, "Zoë Ødegård")
    ceremony = start_lab_ceremony(lab, "key-destruction", [SAM, zoe], tmp_path / "c")
    ceremony.perform("check-participants-and-tools", by="Zoë Ødegård", outcome="ok")
    for step_id in ("confirm-key-unused", "destroy-key", "verify-tombstone"):
        ceremony.perform(step_id, by="Sam Admin", witness="Zoë Ødegård", outcome="ok")
    with lab.open_vault() as vault:
        path = ceremony.seal(vault)

    entries, _ = parse_lines(path)
    assert verify_transcript(path, trusted_key(lab)).entries == len(entries)
    assert entries[0]["participants"][1]["name"] == "Zoë Ødegård"


def test_custom_procedure_object(lab: Lab, tmp_path: Path):
    script = Procedure("tiny", "A tiny script", "4.3", {ISM: 1}, ())
    ceremony = Ceremony.start(script, [ISLA], tmp_path / "t", dry_run=False)
    with lab.open_vault() as vault:
        path = ceremony.seal(vault)
    entries, _ = parse_lines(path)
    assert [e["type"] for e in entries] == ["start", "manifest", "end"]
    assert entries[0]["dry_run"] is False


# Evidence


def test_redact_removes_every_form():
    secret = bytes(range(40, 72))
    text = "\n".join(
        [
            secret.hex(),
            secret.hex().upper(),
            base64.b64encode(secret).decode(),
            base64.urlsafe_b64encode(secret).decode().rstrip("="),
            "passphrase: correct horse battery",
        ]
    )
    cleaned = redact(text, [secret, "correct horse battery"])
    assert secret.hex() not in cleaned.lower()
    assert "correct horse battery" not in cleaned
    assert cleaned.count(REDACTED) == 5


@pytest.mark.parametrize(
    "command",
    [["cat"], ["base64", "-w0"], ["basenc", "--base16", "-w0"]],
)
def test_tool_output_redacted_real_tools(command: list[str]):
    secret = os.urandom(32)
    output = capture_tool_output(command, secrets=[secret], stdin=secret)
    assert output.returncode == 0
    assert REDACTED in output.stdout
    assert secret.hex() not in output.stdout.lower()
    assert base64.b64encode(secret).decode() not in output.stdout


def test_tool_failure_raises_with_status():
    with pytest.raises(ToolError, match="openssl failed with status") as info:
        capture_tool_output(["openssl", "x509", "-in", "/nonexistent", "-noout"])
    assert info.value.returncode != 0


def test_manifest_hashes_and_groups(tmp_path: Path):
    (tmp_path / "a.txt").write_bytes(b"abc")
    rows = file_manifest([tmp_path], base=tmp_path)
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert rows == [
        {
            "path": "a.txt",
            "bytes": 3,
            "sha256": expected,
            "read_aloud": group_hex(expected),
        }
    ]
    assert group_hex("ab:cd:ef:01") == "ABCD EF01"


def test_manifest_flags_file_changed_after_step(lab: Lab, tmp_path: Path):
    folder = tmp_path / "c"
    ceremony = run_ca_ceremony(lab, folder)
    (folder / "ca.txt").write_text("swapped after the step\n")
    (folder / "late.txt").write_text("written later\n")
    with lab.open_vault() as vault:
        path = ceremony.seal(vault)

    entries, _ = parse_lines(path)
    manifest = {row["path"]: row for row in entries[-2]["files"]}
    assert manifest["ca.txt"]["changed_since_step"] is True
    assert manifest["ca.txt"]["step_id"] == "generate-key"
    assert manifest["late.txt"]["changed_since_step"] is False
    assert "transcript.jsonl" not in manifest


def test_dry_run_marked_on_every_section(sealed: Path):
    entries, seal = parse_lines(sealed)
    sections = render_sections(entries, seal)
    assert len(sections) == len(entries) + 1
    for section in sections:
        assert section.startswith(DRY_RUN_MARK)
    assert all(entry["dry_run"] is True for entry in entries)


def test_tool_output_kept_verbatim_in_transcript(sealed: Path):
    entries, _ = parse_lines(sealed)
    version = subprocess.run(["openssl", "version"], capture_output=True, text=True)
    evidence = entries[1]["evidence"][0]
    assert evidence["command"] == ["openssl", "version"]
    assert evidence["stdout"] == version.stdout


# Sealing and verification


def test_sealed_transcript_verifies(lab: Lab, sealed: Path):
    result = verify_transcript(sealed, trusted_key(lab))
    assert result.entries == 8
    assert result.offline == "absent"
    published = load_public_key_pem(lab.root / "published" / "ceremony-signing.pem")
    assert verify_transcript(sealed, published).head == result.head


def test_edited_byte_fails_and_names_entry(lab: Lab, sealed: Path):
    key = trusted_key(lab)
    original = sealed.read_bytes()
    lines = original.split(b"\n")
    target = 3  # the generate-key step
    start = sum(len(line) + 1 for line in lines[: target - 1])
    position = start + lines[target - 1].index(b"key generated")

    sealed.write_bytes(original[:position] + b"K" + original[position + 1 :])

    with pytest.raises(
        TranscriptError, match="entry 3 \\(step generate-key\\)"
    ) as info:
        verify_transcript(sealed, key)
    assert info.value.entry == 3


def test_every_edited_byte_is_detected(lab: Lab, sealed: Path, tmp_path: Path):
    key = trusted_key(lab)
    original = sealed.read_bytes()
    copy = tmp_path / "edited.jsonl"
    body_end = original.rstrip(b"\n").rfind(b"\n")
    missed = []
    for position in range(0, len(original), 7):
        flipped = bytes([original[position] ^ 0x01])
        copy.write_bytes(original[:position] + flipped + original[position + 1 :])
        try:
            verify_transcript(copy, key)
        except TranscriptError as exc:
            if position < body_end:
                assert exc.entry is not None or "seal" in str(exc)
            continue
        missed.append(position)
    assert missed == []


def test_removed_entry_fails_verification(lab: Lab, sealed: Path):
    lines = sealed.read_text().splitlines(keepends=True)
    sealed.write_text("".join(lines[:3] + lines[4:]))
    with pytest.raises(TranscriptError, match="entry 4 .* does not follow entry 3"):
        verify_transcript(sealed, trusted_key(lab))


def test_resealed_by_other_key_fails(lab: Lab, sealed: Path, tmp_path: Path):
    other = create_lab(tmp_path / "other", steps=["trekeys.ceremony:build_lab"])
    with pytest.raises(TranscriptError, match="vault signature does not verify"):
        verify_transcript(sealed, trusted_key(other))


def test_unsealed_transcript_fails(lab: Lab, tmp_path: Path):
    ceremony = start_lab_ceremony(lab, "ca-creation", [SAM, ISLA], tmp_path / "c")
    with pytest.raises(TranscriptError, match="is not sealed"):
        verify_transcript(ceremony.journal.path, trusted_key(lab))


def test_sealed_journal_refuses_more_entries(lab: Lab, tmp_path: Path):
    ceremony = run_ca_ceremony(lab, tmp_path / "c")
    with lab.open_vault() as vault:
        ceremony.seal(vault)
    with pytest.raises(TranscriptError, match="is sealed"):
        ceremony.journal.append("step", {})
    with pytest.raises(TranscriptError, match="is sealed"):
        Ceremony.resume(tmp_path / "c")


def test_access_to_transcript_is_audited(lab: Lab, sealed: Path):
    with lab.open_vault() as vault:
        verify_with_vault(sealed, vault)
        read_transcript(sealed, vault, "auditor review")

    operations = audit_operations(lab)
    reference = "transcript:ceremony/transcript.jsonl"
    assert ("seal-transcript", reference, "success") in operations
    assert ("verify-transcript", reference, "success") in operations
    assert ("read-transcript", reference, "success") in operations


def test_failed_verification_is_audited(lab: Lab, sealed: Path):
    sealed.write_text(
        sealed.read_text().replace("fingerprints match", "fingerprints mismatch")
    )
    with pytest.raises(TranscriptError, match="entry 6"):
        with lab.open_vault() as vault:
            verify_with_vault(sealed, vault)

    operations = audit_operations(lab)
    assert operations[-1] == (
        "verify-transcript",
        "transcript:ceremony/transcript.jsonl",
        "failure",
    )


# The offline admin key, with a throwaway GPG key


@pytest.fixture(scope="module")
def offline_key() -> Iterator[tuple[Path, str, str]]:
    """A throwaway ed25519 signing key with a passphrase in a short GNUPGHOME,
    shared by this module's tests, which only sign and verify with it."""
    # gpg-agent's socket path must stay short, so this lives directly in /tmp.
    home = Path(tempfile.mkdtemp(prefix="tkg", dir="/tmp"))
    passphrase = "offline test passphrase"
    subprocess.run(
        [
            "gpg",
            "--homedir",
            str(home),
            "--batch",
            "--pinentry-mode",
            "loopback",
            "--passphrase-fd",
            "0",
            "--quick-generate-key",
            "Offline Admin <offline@tre.test>",
            "ed25519",
            "sign",
            "never",
        ],
        input=passphrase.encode(),
        check=True,
        capture_output=True,
    )
    listing = subprocess.run(
        ["gpg", "--homedir", str(home), "--with-colons", "--list-keys"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    fingerprint = next(
        line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:")
    )
    yield home, fingerprint, passphrase
    subprocess.run(
        ["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False
    )
    shutil.rmtree(home, ignore_errors=True)


def test_offline_signature_verifies(lab: Lab, tmp_path: Path, offline_key):
    home, fingerprint, passphrase = offline_key
    ceremony = run_ca_ceremony(lab, tmp_path / "c")
    signer = offline_signer_if_reachable(home, fingerprint, passphrase)
    with lab.open_vault() as vault:
        path = ceremony.seal(vault, offline_signer=signer)

    result = verify_transcript(
        path, trusted_key(lab), gnupghome=home, offline_fingerprint=fingerprint
    )
    assert result.offline == "verified"
    assert f"VALIDSIG {fingerprint}" in result.offline_status
    assert verify_transcript(path, trusted_key(lab)).offline == "not checked"


def test_offline_block_covered_by_vault_signature(
    lab: Lab, tmp_path: Path, offline_key
):
    home, fingerprint, passphrase = offline_key
    ceremony = run_ca_ceremony(lab, tmp_path / "c")
    signer = offline_signer_if_reachable(home, fingerprint, passphrase)
    with lab.open_vault() as vault:
        path = ceremony.seal(vault, offline_signer=signer)
    original = path.read_bytes()
    armored_at = original.index(b"-----BEGIN PGP SIGNATURE-----")

    for offset in (40, 80, 120):
        position = armored_at + offset
        flipped = bytes([original[position] ^ 0x01])
        path.write_bytes(original[:position] + flipped + original[position + 1 :])
        with pytest.raises(TranscriptError, match="vault signature does not verify"):
            verify_transcript(path, trusted_key(lab))


def test_offline_signature_of_other_key_fails(lab: Lab, tmp_path: Path, offline_key):
    home, fingerprint, passphrase = offline_key
    ceremony = run_ca_ceremony(lab, tmp_path / "c")
    with lab.open_vault() as vault:
        path = ceremony.seal(
            vault,
            offline_signer=offline_signer_if_reachable(home, fingerprint, passphrase),
        )
    with pytest.raises(TranscriptError, match="offline signature does not verify"):
        verify_transcript(
            path, trusted_key(lab), gnupghome=home, offline_fingerprint="A" * 40
        )


def test_wrong_offline_passphrase_leaves_unsealed(
    lab: Lab, tmp_path: Path, offline_key
):
    home, fingerprint, passphrase = offline_key
    ceremony = run_ca_ceremony(lab, tmp_path / "c")
    signer = offline_signer_if_reachable(home, fingerprint, "wrong passphrase")

    with pytest.raises(ToolError, match="could not sign with the offline key") as info:
        with lab.open_vault() as vault:
            ceremony.seal(vault, offline_signer=signer)

    assert "wrong passphrase" not in str(info.value)
    assert "wrong passphrase" not in info.value.stderr_tail
    resumed = Ceremony.resume(tmp_path / "c")
    assert resumed.journal.entries[-1]["type"] == "end"
    with pytest.raises(CeremonyError, match="has ended and only its seal may follow"):
        resumed.join(OMAR)

    signer = offline_signer_if_reachable(home, fingerprint, passphrase)
    with lab.open_vault() as vault:
        path = resumed.seal(vault, offline_signer=signer)
    entries, _ = parse_lines(path)
    assert [e["type"] for e in entries].count("manifest") == 1
    result = verify_transcript(
        path, trusted_key(lab), gnupghome=home, offline_fingerprint=fingerprint
    )
    assert result.offline == "verified"


def test_offline_passphrase_not_left_cached(offline_key):
    home, fingerprint, passphrase = offline_key
    gpg_detach_sign(home, fingerprint, b"first", passphrase)
    with pytest.raises(ToolError, match="could not sign with the offline key"):
        gpg_detach_sign(home, fingerprint, b"second", None)


def test_offline_signer_absent_when_media_missing(tmp_path: Path):
    assert offline_signer_if_reachable(tmp_path / "not-mounted", "AB" * 20) is None


def test_gpg_detach_sign_is_standard(offline_key, tmp_path: Path):
    home, fingerprint, passphrase = offline_key
    data = b"statement to sign\n"
    signature = gpg_detach_sign(home, fingerprint, data, passphrase)
    (tmp_path / "data").write_bytes(data)
    (tmp_path / "data.asc").write_text(signature.armored)
    checked = subprocess.run(
        [
            "gpg",
            "--homedir",
            str(home),
            "--verify",
            str(tmp_path / "data.asc"),
            str(tmp_path / "data"),
        ],
        capture_output=True,
    )
    assert checked.returncode == 0


# The command line


def test_cli_start_refused_without_role(lab: Lab, tmp_path: Path):
    participants = tmp_path / "people.yaml"
    participants.write_text(
        "participants:\n"
        "  - {role: TRE System Administrator, name: Sam Admin, custodian: true}\n"
        "  - {role: Operations Manager, name: Omar Operations, custodian: true}\n"
    )
    result = CliRunner().invoke(
        main,
        [
            "ceremony",
            "start",
            "compromise-response",
            str(tmp_path / "c"),
            "--participants",
            str(participants),
            "--lab",
            str(lab.root),
        ],
    )
    assert result.exit_code == 1
    assert "needs 1 more Information Security Manager" in result.output


def test_cli_runs_and_verifies_ceremony(lab: Lab, tmp_path: Path):
    participants = tmp_path / "people.json"
    participants.write_text(json.dumps([SAM.to_dict(), ISLA.to_dict()]))
    folder = tmp_path / "c"
    runner = CliRunner()
    lab_args = ["--lab", str(lab.root)]

    def invoke(*args: str) -> str:
        result = runner.invoke(main, ["ceremony", *args])
        assert result.exit_code == 0, result.output
        return result.output

    invoke(
        "start",
        "key-destruction",
        str(folder),
        "--participants",
        str(participants),
        *lab_args,
    )
    invoke(
        "step",
        str(folder),
        "check-participants-and-tools",
        "--by",
        "Sam Admin",
        "--outcome",
        "ok",
    )
    invoke(
        "step",
        str(folder),
        "confirm-key-unused",
        "--by",
        "Sam Admin",
        "--witness",
        "Isla Manager",
        "--outcome",
        "nothing uses it",
    )
    invoke(
        "deviate",
        str(folder),
        "destroy-key",
        "--skipped",
        "--what",
        "dry run",
        "--instead",
        "nothing destroyed",
        "--by",
        "Sam Admin",
        "--ack",
        "Isla Manager",
    )
    invoke(
        "step",
        str(folder),
        "verify-tombstone",
        "--by",
        "Isla Manager",
        "--witness",
        "Sam Admin",
        "--outcome",
        "checked",
    )
    invoke("seal", str(folder), *lab_args)
    transcript = str(folder / "transcript.jsonl")
    assert "transcript intact: 7 entries" in invoke("verify", transcript, *lab_args)
    assert "DRY RUN" in invoke("show", transcript, *lab_args)

    text = Path(transcript).read_text().replace("nothing uses it", "nothing uses IT")
    Path(transcript).write_text(text)
    result = runner.invoke(main, ["ceremony", "verify", transcript, *lab_args])
    assert result.exit_code == 1
    assert "entry 3 (step confirm-key-unused) was edited" in result.output


def test_cli_participants_file_invalid(lab: Lab, tmp_path: Path):
    participants = tmp_path / "people.yaml"
    participants.write_text("- {role: Operations Manager}\n")
    result = CliRunner().invoke(
        main,
        [
            "ceremony",
            "start",
            "ca-creation",
            str(tmp_path / "c"),
            "--participants",
            str(participants),
            "--lab",
            str(lab.root),
        ],
    )
    assert result.exit_code == 1
    assert "needs both a role and a name" in result.output
    assert not (tmp_path / "c").exists()


# The runbook


def test_ceremony_notebook_passes_twice(full_lab: Lab, tmp_path: Path):
    for attempt in (1, 2):
        run = run_drills(full_lab.root, tmp_path / "reports", names=["ceremony-ca-key"])
        assert run.passed, (attempt, run.drills[0].error)
        transcripts = list(run.folder.glob("ceremonies/ca-creation-*/transcript.jsonl"))
        assert len(transcripts) == 1
        checks = {c["name"]: c["passed"] for c in run.drills[0].checks}
        assert checks["one changed byte fails and names the entry"] is True
        assert verify_transcript(transcripts[0], trusted_key(full_lab)).entries == 10

    with full_lab.open_vault(read_only=True) as vault:
        scratch = [r for r in vault.find(kind="tls-ca") if r.id.startswith("scratch/")]
    assert len(scratch) == 2
    assert all(record.is_tombstone for record in scratch)


def test_luks_volume_key_dump_redacted(tmp_path: Path):
    image = tmp_path / "volume.img"
    image.write_bytes(b"\0" * (20 * 1024 * 1024))
    volume_key = os.urandom(64)
    key_file = tmp_path / "volume.key"
    key_file.write_bytes(volume_key)
    key_file.chmod(0o600)
    passphrase = b"ceremony test passphrase"
    subprocess.run(
        [
            "cryptsetup",
            "luksFormat",
            "--type",
            "luks2",
            "--batch-mode",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--volume-key-file",
            str(key_file),
            "--key-file",
            "-",
            str(image),
        ],
        input=passphrase,
        check=True,
        capture_output=True,
    )
    key_file.unlink()

    header = capture_tool_output(["cryptsetup", "luksDump", str(image)])
    dump = capture_tool_output(
        [
            "cryptsetup",
            "luksDump",
            "--dump-volume-key",
            "--batch-mode",
            "--key-file",
            "-",
            str(image),
        ],
        secrets=[volume_key, passphrase],
        stdin=passphrase,
    )

    assert "LUKS header information" in header.stdout
    assert "MK dump:" in dump.stdout
    assert REDACTED in dump.stdout
    spaced = " ".join(f"{byte:02x}" for byte in volume_key[:16])
    assert spaced not in dump.stdout
    assert volume_key[-4:].hex() not in dump.stdout.replace(" ", "")
    assert "ceremony test passphrase" not in dump.stdout + dump.stderr


def test_redact_colon_hex_over_lines():
    secret = bytes(range(100, 140))
    pairs = [f"{byte:02x}" for byte in secret]
    printed = "priv:\n    " + ":\n    ".join(
        ":".join(pairs[i : i + 15]) for i in range(0, len(pairs), 15)
    )
    cleaned = redact(printed, [secret])
    assert cleaned == f"priv:\n    {REDACTED}"


def test_redact_ignores_empty_secret():
    assert redact("nothing secret here", [b"", ""]) == "nothing secret here"

"""File encryption with escrowed keys, against the real gpg."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trekeys import escrow, files, gpgrun, pgpfile
from trekeys.drills import run_drills
from trekeys.errors import (
    CredentialError,
    DestinationExistsError,
    IntegrityError,
    PolicyError,
    WeakPassphraseError,
)
from trekeys.lab import Lab, create_lab
from trekeys.records import KeyState

PASSPHRASE = "orbit-saddle-quartz-lantern-97"


@pytest.fixture(scope="module")
def lab_template(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    """A lab where alice and bob have escrow keys and alice's passphrase is stored."""
    template = create_lab(tmp_path_factory.mktemp("files") / "lab", steps=[])
    with template.open_vault() as vault:
        escrow.create_escrow_key(template, vault, "alice")
        escrow.create_escrow_key(template, vault, "bob")
        escrow.store_passphrase(vault, "alice", PASSPHRASE)
    return template


@pytest.fixture
def lab(lab_template: Lab, tmp_path: Path) -> Lab:
    """A private copy of the escrow lab that a test may change."""
    shutil.copytree(lab_template.root, tmp_path / "lab")
    return Lab.load(tmp_path / "lab")


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    path = tmp_path / "data" / "cohort.csv"
    path.parent.mkdir()
    path.write_bytes(os.urandom(300_000) + b"end of cohort\n")
    return path


@pytest.fixture
def encrypted(lab: Lab, plain: Path) -> Path:
    with lab.open_vault() as vault:
        return files.encrypt_path(lab, vault, "alice", plain, passphrase=PASSPHRASE)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "trekeys-partial" in p.name)


def test_passphrase_and_escrow_both_open_file(lab, plain, encrypted, tmp_path):
    by_passphrase = files.decrypt_path(
        encrypted, tmp_path / "out" / "p.csv", passphrase=PASSPHRASE
    )
    with lab.open_vault() as vault:
        by_escrow = files.recover_path(
            lab, vault, encrypted, tmp_path / "out" / "e.csv", reason="user left"
        )
    assert by_passphrase.read_bytes() == plain.read_bytes()
    assert by_escrow.read_bytes() == plain.read_bytes()
    assert by_escrow.stat().st_mode & 0o777 == 0o600


def test_folder_round_trip(lab, tmp_path):
    folder = tmp_path / "analysis"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha\n")
    (folder / "sub" / "b.bin").write_bytes(os.urandom(70_000))
    with lab.open_vault() as vault:
        cipher = files.encrypt_path(lab, vault, "alice", folder, passphrase=PASSPHRASE)
        restored = files.recover_path(
            lab, vault, cipher, tmp_path / "restored", reason="drill"
        )
    assert cipher.name == "analysis.tar.gpg"
    assert (restored / "a.txt").read_text() == "alpha\n"
    assert (restored / "sub" / "b.bin").read_bytes() == (
        folder / "sub" / "b.bin"
    ).read_bytes()


def test_escrow_record_lists_protected_files(lab, encrypted):
    with lab.open_vault() as vault:
        record = vault.get("files/alice")
    assert record.protects == ["files:alice"]
    assert record.owner == "user:alice"
    assert escrow.protected_files(lab, record) == [encrypted]


def gpg_decrypt(home: Path, source: Path, dest: Path, passphrase: str | None):
    """Decrypt with plain gpg, the passphrase on a pipe, as a user would."""
    command = ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback"]
    pass_fds: tuple[int, ...] = ()
    if passphrase is not None:
        read_fd, write_fd = os.pipe()
        os.write(write_fd, passphrase.encode() + b"\n")
        os.close(write_fd)
        command += ["--passphrase-fd", str(read_fd)]
        pass_fds = (read_fd,)
    command += ["--output", str(dest), "--decrypt", str(source)]
    result = subprocess.run(command, capture_output=True, pass_fds=pass_fds)
    for fd in pass_fds:
        os.close(fd)
    return result


def test_plain_gpg_opens_file_with_passphrase(plain, encrypted, tmp_path):
    home = tmp_path / "user-gnupg"
    home.mkdir(mode=0o700)
    result = gpg_decrypt(home, encrypted, tmp_path / "by-gpg.csv", PASSPHRASE)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "by-gpg.csv").read_bytes() == plain.read_bytes()
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"])


def test_plain_gpg_opens_file_with_escrow_key(lab, plain, encrypted, tmp_path):
    with lab.open_vault() as vault:
        secret = vault.read_secret("files/alice", "standard tool test")
    with gpgrun.temporary_home() as home:
        imported = subprocess.run(
            ["gpg", "--homedir", str(home), "--batch", "--import"],
            input=secret,
            capture_output=True,
        )
        assert imported.returncode == 0, imported.stderr
        result = gpg_decrypt(home, encrypted, tmp_path / "by-escrow.csv", None)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "by-escrow.csv").read_bytes() == plain.read_bytes()


@pytest.mark.parametrize("weak", ["password123", "alice2024", "qwertyuiop"])
def test_weak_passphrase_rejected_with_reason(lab, plain, weak):
    with lab.open_vault() as vault:
        with pytest.raises(WeakPassphraseError, match="too easy to guess") as caught:
            files.encrypt_path(lab, vault, "alice", plain, passphrase=weak)
    assert weak not in str(caught.value)
    assert len(str(caught.value)) > len("the passphrase is too easy to guess") + 40
    assert not plain.with_name(plain.name + ".gpg").exists()
    assert leftovers(plain.parent) == []


def test_wrong_passphrase_rejected(encrypted, tmp_path):
    before = digest(encrypted)
    dest = tmp_path / "out.csv"
    with pytest.raises(CredentialError, match="passphrase does not open"):
        files.decrypt_path(encrypted, dest, passphrase="not-the-right-one-42-x")
    assert not dest.exists()
    assert leftovers(tmp_path) == []
    assert digest(encrypted) == before


def corrupt(encrypted: Path, target: Path, *, truncate_to=None, flip_at=None):
    data = bytearray(encrypted.read_bytes())
    if flip_at is not None:
        data[flip_at] ^= 0x01
    if truncate_to is not None:
        data = data[:truncate_to]
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize(
    ("case", "change"),
    [
        ("tampered", {"flip_at": 150_000}),
        ("tampered-tail", {"flip_at": -5}),
        ("truncated-half", {"truncate_to": 150_000}),
        ("truncated-header", {"truncate_to": 120}),
    ],
)
def test_damaged_ciphertext_leaves_no_plaintext(lab, encrypted, tmp_path, case, change):
    damaged = corrupt(encrypted, tmp_path / f"{case}.gpg", **change)
    before = digest(damaged)
    for mode in ("passphrase", "escrow"):
        dest = tmp_path / f"{case}-{mode}.csv"
        with pytest.raises(IntegrityError, match="truncated|modified|damaged"):
            if mode == "passphrase":
                files.decrypt_path(damaged, dest, passphrase=PASSPHRASE)
            else:
                with lab.open_vault() as vault:
                    files.recover_path(
                        lab, vault, damaged, dest, reason="drill", key_id="files/alice"
                    )
        assert not dest.exists()
    assert leftovers(tmp_path) == []
    assert digest(damaged) == before


def test_file_of_other_escrow_key_rejected(lab, encrypted, tmp_path):
    dest = tmp_path / "out.csv"
    with lab.open_vault() as vault:
        with pytest.raises(CredentialError, match="not to escrow key files/bob"):
            files.recover_path(
                lab, vault, encrypted, dest, reason="drill", key_id="files/bob"
            )
        bob_secret = vault.read_secret("files/bob", "test").decode()
    with open(tmp_path / "sink", "wb") as sink:
        with pytest.raises(CredentialError, match="is encrypted to OpenPGP key"):
            pgpfile.decrypt(encrypted, sink, secret_key=bob_secret, key_label="bob")
    assert not dest.exists()


def test_file_of_foreign_escrow_key_rejected(lab, plain, tmp_path):
    foreign = pgpfile.generate_escrow_key("another TRE")
    pgpfile.import_key(escrow.escrow_home(lab), foreign.public)
    cipher = tmp_path / "foreign.gpg"
    pgpfile.encrypt(
        plain,
        cipher,
        home=escrow.escrow_home(lab),
        recipient=foreign.fingerprint,
        passphrase=PASSPHRASE,
        settings=pgpfile.S2kSettings.test(),
    )
    with lab.open_vault() as vault:
        with pytest.raises(CredentialError, match="no escrow key in the vault matches"):
            files.recover_path(lab, vault, cipher, tmp_path / "x", reason="drill")
    assert not (tmp_path / "x").exists()


def test_existing_destination_kept_unless_overwrite(lab, plain, encrypted, tmp_path):
    dest = tmp_path / "kept.csv"
    dest.write_text("do not lose me")
    with pytest.raises(DestinationExistsError, match="already exists"):
        files.decrypt_path(encrypted, dest, passphrase=PASSPHRASE)
    assert dest.read_text() == "do not lose me"

    with lab.open_vault() as vault:
        with pytest.raises(DestinationExistsError, match="already exists"):
            files.encrypt_path(
                lab, vault, "alice", plain, dest=dest, passphrase=PASSPHRASE
            )
    assert dest.read_text() == "do not lose me"

    files.decrypt_path(encrypted, dest, passphrase=PASSPHRASE, overwrite=True)
    assert dest.read_bytes() == plain.read_bytes()


def test_existing_folder_never_replaced(lab, tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "x.txt").write_text("x")
    existing = tmp_path / "existing"
    existing.mkdir()
    with lab.open_vault() as vault:
        cipher = files.encrypt_path(lab, vault, "alice", folder, passphrase=PASSPHRASE)
    with pytest.raises(DestinationExistsError, match="already exists"):
        files.decrypt_path(cipher, existing, passphrase=PASSPHRASE, overwrite=True)
    assert list(existing.iterdir()) == []


_INTERRUPTED_ENCRYPTION = """
import sys
from pathlib import Path
from trekeys import pgpfile
pgpfile.encrypt(Path(sys.argv[1]), Path(sys.argv[2]), home=Path(sys.argv[3]),
                recipient=sys.argv[4], passphrase=sys.stdin.readline().strip(),
                settings=pgpfile.S2kSettings.test())
"""


def test_interrupted_encryption_leaves_nothing(lab, tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as handle:
        for _ in range(40):
            handle.write(os.urandom(4 << 20))
    before = digest(big)
    dest = tmp_path / "big.bin.gpg"
    with lab.open_vault() as vault:
        fingerprint = vault.get("files/alice").fingerprint

    child = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED_ENCRYPTION, str(big), str(dest)]
        + [str(escrow.escrow_home(lab)), fingerprint],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdin is not None
    child.stdin.write(PASSPHRASE.encode() + b"\n")
    child.stdin.close()
    deadline = time.monotonic() + 20
    while not leftovers(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert leftovers(tmp_path), "the encryption never started writing"
    child.send_signal(signal.SIGINT)
    child.wait(timeout=30)

    assert child.stderr is not None
    with child.stderr:
        errors = child.stderr.read()
    assert child.returncode != 0
    assert b"KeyboardInterrupt" in errors
    assert not dest.exists()
    assert leftovers(tmp_path) == []
    assert digest(big) == before


def test_recovery_audit_names_actor_and_reason(lab, encrypted, tmp_path):
    with lab.open_vault() as vault:
        files.recover_path(
            lab, vault, encrypted, tmp_path / "r.csv", reason="alice left the project"
        )
    entries = vault.audit_log.entries()
    recovery = [e for e in entries if e["operation"] == "escrow-recovery"][-1]
    assert recovery["key_id"] == "files/alice"
    assert recovery["outcome"] == "success"
    assert "alice left the project" in recovery["detail"]
    assert recovery["actor"]
    assert PASSPHRASE not in json.dumps(entries)


def test_failed_recovery_is_audited(lab, encrypted, tmp_path):
    damaged = corrupt(encrypted, tmp_path / "bad.gpg", flip_at=100_000)
    with pytest.raises(IntegrityError):
        with lab.open_vault() as vault:
            files.recover_path(lab, vault, damaged, tmp_path / "r", reason="drill")
    with lab.open_vault() as vault:
        last = [
            e for e in vault.audit_log.entries() if e["operation"] == "escrow-recovery"
        ][-1]
    assert last["outcome"] == "failure"


def test_rotate_escrow_key_reencrypts_files(lab, plain, encrypted, tmp_path):
    with lab.open_vault() as vault:
        new_ids = files.rotate_key(
            lab, vault, "files/alice", reason="laptop stolen", compromised=True
        )
        new = vault.get(new_ids[0])
        assert vault.get("files/alice").state is KeyState.COMPROMISED
        assert new.state is KeyState.ACTIVE
        assert escrow.protected_files(lab, new) == [encrypted]
        assert pgpfile.list_recipients(encrypted) == [
            new.attributes["encryption_key_id"]
        ]
        with pytest.raises(CredentialError, match="not to escrow key files/alice"):
            files.recover_path(
                lab,
                vault,
                encrypted,
                tmp_path / "old",
                key_id="files/alice",
                reason="drill",
            )
        files.recover_path(lab, vault, encrypted, tmp_path / "new", reason="drill")
    assert new_ids == ["files/alice.v2"]
    assert (tmp_path / "new").read_bytes() == plain.read_bytes()
    files.decrypt_path(encrypted, tmp_path / "p", passphrase=PASSPHRASE)
    assert (tmp_path / "p").read_bytes() == plain.read_bytes()


def test_rotate_passphrase_retires_old_one(lab, plain, encrypted, tmp_path):
    with lab.open_vault() as vault:
        new_ids = files.rotate_key(
            lab, vault, "files/alice/passphrase", reason="shared", compromised=False
        )
        assert vault.get("files/alice/passphrase").state is KeyState.DEACTIVATED
        new_passphrase = vault.read_secret(new_ids[0], "test").decode()
    with pytest.raises(CredentialError, match="passphrase does not open"):
        files.decrypt_path(encrypted, tmp_path / "old", passphrase=PASSPHRASE)
    files.decrypt_path(encrypted, tmp_path / "new", passphrase=new_passphrase)
    assert (tmp_path / "new").read_bytes() == plain.read_bytes()


def test_lab_users_have_escrow_and_passphrase(full_lab):
    with full_lab.open_vault() as vault:
        for instance, users in full_lab.instances.items():
            for user in users:
                summary = escrow.user_summary(full_lab, vault, user)
                assert summary["escrow key"] == f"files/{user}"
                assert len(summary["files"]) == 2
                folder = full_lab.instance_dir(instance) / "user-files" / user
                assert sorted(p.name for p in folder.iterdir()) == [
                    "analysis.tar.gpg",
                    "results.csv.gpg",
                ]


def test_escrow_recovery_notebook_passes_twice(full_lab, tmp_path):
    for attempt in range(2):
        run = run_drills(
            full_lab.root,
            tmp_path / f"reports-{attempt}",
            names=["file-escrow-recovery"],
        )
        assert run.passed, run.drills[0].error


def test_notebook_report_contains_no_secret(full_lab, tmp_path):
    run = run_drills(
        full_lab.root, tmp_path / "reports", names=["file-escrow-recovery"]
    )
    assert run.passed, run.drills[0].error
    with full_lab.open_vault() as vault:
        passphrase = vault.read_secret("files/alice/passphrase", "test").decode()
        armored = vault.read_secret("files/alice", "test").decode().splitlines()
    key_line = max(armored, key=len)
    for report in run.folder.iterdir():
        text = report.read_text(encoding="utf-8", errors="replace")
        assert passphrase not in text, report.name
        assert key_line not in text, report.name


def test_cli_rejects_weak_passphrase_without_echo(full_lab, tmp_path):
    from click.testing import CliRunner

    from trekeys.cli import main

    weak = tmp_path / "weak.txt"
    weak.write_text("sunshine1")
    plain = tmp_path / "notes.txt"
    plain.write_text("notes")
    result = CliRunner().invoke(
        main,
        ["files", "encrypt", "--lab", str(full_lab.root), "alice", str(plain)]
        + ["--passphrase-file", str(weak)],
    )
    assert result.exit_code == 1
    assert "too easy to guess" in result.output
    assert "sunshine1" not in result.output
    assert not (tmp_path / "notes.txt.gpg").exists()


def test_cli_encrypt_decrypt_recover(full_lab, tmp_path):
    from click.testing import CliRunner

    from trekeys.cli import main

    secret = tmp_path / "pass.txt"
    secret.write_text(PASSPHRASE + "\n")
    plain = tmp_path / "notes.txt"
    plain.write_text("field notes\n")
    runner = CliRunner()
    lab_args = ["--lab", str(full_lab.root)]
    encrypted = runner.invoke(
        main,
        ["files", "encrypt", *lab_args, "alice", str(plain)]
        + ["--passphrase-file", str(secret)],
    )
    assert encrypted.exit_code == 0, encrypted.output
    decrypted = runner.invoke(
        main,
        ["files", "decrypt", str(tmp_path / "notes.txt.gpg"), str(tmp_path / "d.txt")]
        + ["--passphrase-file", str(secret)],
    )
    assert decrypted.exit_code == 0, decrypted.output
    recovered = runner.invoke(
        main,
        ["files", "recover", *lab_args, str(tmp_path / "notes.txt.gpg")]
        + [str(tmp_path / "r.txt"), "--reason", "cli test"],
    )
    assert recovered.exit_code == 0, recovered.output
    assert (tmp_path / "d.txt").read_text() == "field notes\n"
    assert (tmp_path / "r.txt").read_text() == "field notes\n"


@pytest.mark.parametrize("case", ["climbs-out", "two-files", "absolute"])
def test_unsafe_archive_not_extracted(lab, tmp_path, case):
    import io
    import tarfile

    members = {
        "climbs-out": ["folder/../../escape.txt"],
        "two-files": ["one.txt", "two.txt"],
        "absolute": [str(tmp_path / "planted.txt")],
    }[case]

    def write_archive(pipe):
        with tarfile.open(fileobj=pipe, mode="w|") as tar:
            for name in members:
                info = tarfile.TarInfo(name)
                info.size = 7
                tar.addfile(info, io.BytesIO(b"planted"))

    with lab.open_vault() as vault:
        fingerprint = vault.get("files/alice").fingerprint
    cipher = tmp_path / "crafted.tar.gpg"
    pgpfile.encrypt(
        write_archive,
        cipher,
        home=escrow.escrow_home(lab),
        recipient=fingerprint,
        passphrase=PASSPHRASE,
        settings=pgpfile.S2kSettings.test(),
    )
    dest = tmp_path / "out"
    if case == "absolute":
        # The leading slash is stripped, so the file lands inside the new folder.
        files.decrypt_path(cipher, dest, passphrase=PASSPHRASE)
        assert list(dest.rglob("planted.txt"))
    else:
        with pytest.raises(PolicyError, match="unsafe to extract|top-level entries"):
            files.decrypt_path(cipher, dest, passphrase=PASSPHRASE)
        assert not dest.exists()
    assert not (tmp_path / "planted.txt").exists()
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path.parent / "escape.txt").exists()
    assert leftovers(tmp_path) == []


def test_passphrase_never_in_gpg_argv(lab, tmp_path):
    import threading

    big = tmp_path / "big.bin"
    with open(big, "wb") as handle:
        for _ in range(24):
            handle.write(os.urandom(4 << 20))
    with lab.open_vault() as vault:
        fingerprint = vault.get("files/alice").fingerprint
    home = str(escrow.escrow_home(lab))
    worker = threading.Thread(
        target=pgpfile.encrypt,
        args=(big, tmp_path / "big.gpg"),
        kwargs={
            "home": escrow.escrow_home(lab),
            "recipient": fingerprint,
            "passphrase": PASSPHRASE,
            "settings": pgpfile.S2kSettings.test(),
        },
    )
    seen: list[list[str]] = []
    worker.start()
    while worker.is_alive():
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            words = [w.decode(errors="replace") for w in argv if w]
            if home in words and words not in seen:
                seen.append(words)
        time.sleep(0.005)
    worker.join()

    assert seen, "no gpg process was observed"
    for words in seen:
        assert "--passphrase-fd" in words
        assert not any(PASSPHRASE in word for word in words)


@pytest.mark.parametrize(
    ("settings", "count"),
    [(pgpfile.S2kSettings.test(), 65536), (pgpfile.S2kSettings.production(), 65011712)],
)
def test_s2k_count_reaches_message(lab, plain, tmp_path, settings, count):
    with lab.open_vault() as vault:
        fingerprint = vault.get("files/alice").fingerprint
    cipher = tmp_path / "c.gpg"
    pgpfile.encrypt(
        plain,
        cipher,
        home=escrow.escrow_home(lab),
        recipient=fingerprint,
        passphrase=PASSPHRASE,
        settings=settings,
    )
    with gpgrun.temporary_home() as home:
        listing = subprocess.run(
            ["gpg", "--homedir", str(home), "--batch", "--list-packets", str(cipher)],
            capture_output=True,
            text=True,
        )
    assert f"count {count} " in listing.stdout
    assert "cipher 9" in listing.stdout


def test_failed_rotation_changes_no_file(lab, plain, tmp_path):
    with lab.open_vault() as vault:
        good = files.encrypt_path(lab, vault, "alice", plain, passphrase=PASSPHRASE)
        second = plain.with_name("second.csv")
        second.write_bytes(b"second file\n")
        damaged = files.encrypt_path(lab, vault, "alice", second, passphrase=PASSPHRASE)
    corrupt(damaged, damaged, flip_at=200)
    before = {good: digest(good), damaged: digest(damaged)}

    with pytest.raises(IntegrityError):
        with lab.open_vault() as vault:
            files.rotate_key(
                lab, vault, "files/alice", reason="drill", compromised=False
            )

    with lab.open_vault() as vault:
        assert vault.get("files/alice").state is KeyState.ACTIVE
        assert vault.get("files/alice.v2").is_tombstone
        assert escrow.find_user_key(vault, "alice", "escrow").id == "files/alice"
    assert {path: digest(path) for path in before} == before
    assert not [p for p in good.parent.iterdir() if p.name.startswith(".trekeys")]
    files.decrypt_path(good, tmp_path / "still-open.csv", passphrase=PASSPHRASE)

"""Restore a backup with one chosen key and prove it matches its manifest.

`restore_backup` decrypts an archive inside the GnuPG home of one recipient
key, so a restore with the offline key only ever happens in the offline
media's home. The tar stream is extracted as it is decrypted, each file is
hashed as it is written, and the result is compared with the manifest inside
the archive. Extraction goes to a hidden staging folder beside the target,
which is renamed to the target only when everything matched, so a failed
restore leaves nothing behind and an existing target is never touched.

`drill_restore` runs the restore once per recipient key and records the
outcome in the backup's manifest; retention keeps the newest backup whose
drill passed.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, cast

from trekeys import gpgkeys
from trekeys.backup import (
    CHUNK,
    Backup,
    Recipient,
    verify_recipients,
    write_json_atomically,
)
from trekeys.errors import (
    CredentialError,
    DestinationExistsError,
    IntegrityError,
    RecipientMismatchError,
    TrekeysError,
)
from trekeys.extract import (
    AuthorizedKeysFilter,
    Extracted,
    checked_name,
    extract_stream,
    read_member,
)
from trekeys.lab import Lab
from trekeys.records import utcnow
from trekeys.vault import Vault

logger = logging.getLogger(__name__)


@dataclass
class RestoreReport:
    """The outcome of restoring one backup with one key.

    Attributes:
        key_id: the recipient key used.
        passed: whether decryption, extraction and the manifest check passed.
        target: where the files were restored (None when not kept).
        files: how many files were restored and checked.
        bytes: their total size.
        removed_ssh_keys: authorized_keys lines dropped because they are revoked.
        error: the error message when the restore failed.
    """

    key_id: str
    passed: bool
    target: Path | None = None
    files: int = 0
    bytes: int = 0
    removed_ssh_keys: list[str] = field(default_factory=list)
    error: str = ""


def restore_backup(
    lab: Lab,
    vault: Vault,
    backup: Backup,
    *,
    key_id: str,
    target: Path,
    user: str | None = None,
    drop_revoked_ssh_keys: bool = True,
) -> RestoreReport:
    """Decrypt `backup` with `key_id` alone and extract it into the new folder `target`.

    Args:
        key_id: one of the backup's recipient keys.
        target: a folder that must not exist yet.
        user: restore only this user's folder.
        drop_revoked_ssh_keys: leave out of each ``.ssh/authorized_keys`` the
            keys listed in the TRE's SSH key revocation list.

    Raises:
        DestinationExistsError: `target` exists.
        KeyringMissingError: the key's GnuPG home is missing.
        RecipientMismatchError: the backup is not encrypted to its recipients
            or not to `key_id`.
        IntegrityError: the archive is truncated or tampered, or a file does
            not match the manifest.
        CredentialError: the key's passphrase does not unlock it.
    """
    target = Path(target)
    if target.exists():
        raise DestinationExistsError(target)
    record = vault.get(key_id)
    home = gpgkeys.open_home(gpgkeys.home_of(lab, record), key_id=key_id)
    recipient = _recipient_for(backup, key_id)
    if not backup.archive.is_file():
        raise IntegrityError(
            f"backup archive {backup.archive} is missing; restore from another backup."
        )
    verify_recipients(backup.archive, backup.recipients)
    _check_size(backup)
    keys_filter = None
    if drop_revoked_ssh_keys:
        from trekeys.ssh import revoked_keys_filter

        keys_filter = revoked_keys_filter(lab)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        passphrase = gpgkeys.read_passphrase(
            vault, key_id, f"restore {backup.reference}"
        )
        extracted = _decrypt_and_extract(
            backup, home, passphrase, staging, user, keys_filter
        )
        count, size = _compare_with_manifest(backup, extracted, user)
        # rename(2) would replace an empty folder created meanwhile.
        if target.exists():
            raise DestinationExistsError(target)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        gpgkeys.stop_agent(home)

    vault.record_operation(
        "restore", key_id, "success", f"{backup.reference} -> {target}"
    )
    logger.info(
        "restored %s with %s (%s) into %s",
        backup.reference,
        key_id,
        recipient.subkey,
        target,
    )
    return RestoreReport(key_id, True, target, count, size, extracted.removed_ssh_keys)


def _recipient_for(backup: Backup, key_id: str) -> Recipient:
    for recipient in backup.recipients:
        if recipient.key_id == key_id:
            return recipient
    raise RecipientMismatchError(
        f"backup {backup.reference} is not encrypted to key {key_id}; its "
        f"recipients are {', '.join(r.key_id for r in backup.recipients)}."
    )


def _check_size(backup: Backup) -> None:
    size = backup.archive.stat().st_size
    if size < backup.manifest["archive_bytes"]:
        raise IntegrityError(
            f"backup archive {backup.archive} is truncated ({size} of "
            f"{backup.manifest['archive_bytes']} bytes); restore from another backup."
        )


def _decrypt_and_extract(
    backup: Backup,
    home: Path,
    passphrase: str,
    staging: Path,
    user: str | None,
    keys_filter: AuthorizedKeysFilter | None,
) -> Extracted:
    extracted = Extracted()

    def consume(stream: IO[bytes]) -> None:
        extract_stream(stream, staging, user, keys_filter, extracted)

    _decrypt_into(backup, home, passphrase, consume)
    return extracted


def read_backup_members(
    lab: Lab,
    vault: Vault,
    backup: Backup,
    *,
    key_id: str,
    wanted: Callable[[str], bool],
) -> dict[str, bytes]:
    """Decrypt `backup` with `key_id` and return the members `wanted` selects.

    Nothing is written to disk; use it for small files such as authorized_keys.
    """
    record = vault.get(key_id)
    home = gpgkeys.open_home(gpgkeys.home_of(lab, record), key_id=key_id)
    _recipient_for(backup, key_id)
    verify_recipients(backup.archive, backup.recipients)
    found: dict[str, bytes] = {}

    def consume(stream: IO[bytes]) -> None:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as tar:
            for member in tar:
                name = checked_name(member.name)
                if member.isfile() and wanted(name):
                    found[name] = read_member(tar, member)

    passphrase = gpgkeys.read_passphrase(vault, key_id, f"read {backup.reference}")
    try:
        _decrypt_into(backup, home, passphrase, consume)
    finally:
        gpgkeys.stop_agent(home)
    return found


def _decrypt_into(
    backup: Backup, home: Path, passphrase: str, consume: Callable[[IO[bytes]], None]
) -> None:
    with gpgkeys.passphrase_fd(passphrase) as fd, tempfile.TemporaryFile() as status:
        command = gpgkeys.gpg_command(
            home,
            "--pinentry-mode",
            "loopback",
            "--passphrase-fd",
            str(fd),
            "--status-fd",
            "2",
            "--output",
            "-",
            "--decrypt",
            str(backup.archive),
        )
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=status, pass_fds=(fd,)
        )
        stdout = cast(IO[bytes], process.stdout)
        gpgkeys.widen_pipe(stdout)
        tar_error: Exception | None = None
        try:
            consume(stdout)
            # Drain what follows the tar end so gpg can check the MDC.
            while stdout.read(CHUNK):
                pass
        except (tarfile.TarError, EOFError, ValueError) as exc:
            tar_error = exc
            process.kill()
        finally:
            stdout.close()
            returncode = process.wait()
        status.seek(0)
        output = status.read().decode(errors="replace")

    _raise_for_decryption(backup, home, returncode, output, tar_error)


def _raise_for_decryption(
    backup: Backup, home: Path, returncode: int, output: str, error: Exception | None
) -> None:
    if returncode == 0 and error is None and "DECRYPTION_OKAY" in output:
        return
    if any(m in output for m in ("No agent running", "can't connect to the agent")):
        gpgkeys.raise_for_gpg(f"decrypt {backup.archive}", output, returncode, home)
    if "BAD_PASSPHRASE" in output:
        raise CredentialError(
            f"the passphrase in the vault does not unlock the key in {home}; "
            "check that the vault and the GnuPG home belong together."
        )
    if "NO_SECKEY" in output and "BEGIN_DECRYPTION" not in output:
        raise RecipientMismatchError(
            f"GnuPG home {home} contains no secret key that {backup.archive} is "
            "encrypted to; check the recipients with 'trekeys backup recipients'."
        )
    if error is not None and "DECRYPTION_OKAY" in output:
        raise IntegrityError(
            f"backup {backup.archive} decrypted but its tar stream is invalid "
            f"({error}); restore from another backup."
        )
    raise IntegrityError(
        f"backup {backup.archive} failed to decrypt: it is truncated or was "
        "modified (gpg found no valid modification detection code); restore "
        "from another backup."
    )


def _compare_with_manifest(
    backup: Backup, extracted: Extracted, user: str | None
) -> tuple[int, int]:
    if extracted.manifest is None:
        raise IntegrityError(
            f"backup {backup.reference} has no manifest inside; it is truncated or "
            "not a trekeys backup, so restore from another backup."
        )
    if extracted.manifest_sha256 != backup.manifest["manifest_sha256"]:
        raise IntegrityError(
            f"the manifest inside backup {backup.reference} differs from the one "
            "recorded beside it; the archive was replaced, so restore from another "
            "backup."
        )

    expected = {
        e["path"]: (e["size"], e["sha256"])
        for e in extracted.manifest["files"]
        if e["type"] == "file"
        and (not user or PurePosixPath(e["path"]).parts[0] == user)
    }
    if user and not expected:
        raise IntegrityError(
            f"backup {backup.reference} contains no files of user {user}; check the "
            "user name."
        )
    problems = sorted(
        path
        for path in expected.keys() | extracted.files.keys()
        if expected.get(path) != extracted.files.get(path)
    )
    if problems:
        raise IntegrityError(
            f"{len(problems)} files of backup {backup.reference} do not match its "
            f"manifest (first: {problems[0]}); restore from another backup."
        )
    return len(expected), sum(size for size, _ in expected.values())


def drill_restore(
    lab: Lab,
    vault: Vault,
    backup: Backup,
    *,
    work_dir: Path,
    user: str | None = None,
    keep: bool = False,
) -> list[RestoreReport]:
    """Restore `backup` once with each of its recipient keys and record the result.

    Each restore goes into a new folder under `work_dir`, removed afterwards
    unless `keep`. A key that cannot restore the backup gives a failed report
    naming the key and the error; the drill passes only when every key passed.
    """
    reports = []
    stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
    run_folder = work_dir / f"restore-{backup.instance}-{backup.name}-{stamp}"
    for recipient in backup.recipients:
        target = run_folder / recipient.key_id.replace("/", "-")
        try:
            report = restore_backup(
                lab, vault, backup, key_id=recipient.key_id, target=target, user=user
            )
        except TrekeysError as exc:
            report = RestoreReport(recipient.key_id, False, error=str(exc))
            logger.warning(
                "restore of %s with %s failed: %s",
                backup.reference,
                recipient.key_id,
                exc,
            )
        reports.append(report)
        if not keep and report.target is not None:
            shutil.rmtree(report.target)
            report.target = None

    if not keep and run_folder.is_dir() and not any(run_folder.iterdir()):
        run_folder.rmdir()
    record_restore_test(backup, reports, user=user)
    return reports


def record_restore_test(
    backup: Backup, reports: list[RestoreReport], *, user: str | None = None
) -> None:
    """Append a restore test to the backup's manifest, written atomically."""
    passed = len(reports) == len(backup.recipients) and all(r.passed for r in reports)
    backup.manifest.setdefault("restore_tests", []).append(
        {
            "at": utcnow().isoformat(),
            "passed": passed and not user,
            "user": user or "",
            "keys": {r.key_id: "passed" if r.passed else r.error for r in reports},
        }
    )
    write_json_atomically(backup.manifest_path, backup.manifest)

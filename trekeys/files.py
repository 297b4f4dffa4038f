"""User file encryption with escrowed keys.

TRE users protect the data they copy into their home folders with a
passphrase, and the key manager stores the keys that open it. A user's file
or folder is encrypted once, as one OpenPGP message that both the user's
passphrase and their escrow key (`trekeys.escrow`) open (see
`trekeys.pgpfile`). A folder is streamed as a tar archive and named
``<folder>.tar.gpg``. Recovery from the escrow is audited, and rotation
re-encrypts every file a replaced key protects.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from trekeys import archives, pgpfile
from trekeys.errors import (
    CredentialError,
    RecordError,
)
from trekeys.escrow import (
    ESCROW_ROLE,
    PASSPHRASE_ROLE,
    create_escrow_key,
    escrow_home,
    escrow_key_for,
    find_user_key,
    lab_reference,
    protected_files,
    remember_file,
    require_escrow_key,
    store_passphrase,
)
from trekeys.lab import Lab
from trekeys.passphrases import check_passphrase_strength, generate_passphrase
from trekeys.pgpfile import S2kSettings
from trekeys.records import KeyRecord, KeyState
from trekeys.succession import next_key_id, retire_key
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

FILE_SUFFIX = ".gpg"
FOLDER_SUFFIX = archives.FOLDER_SUFFIX


def s2k_settings(lab: Lab) -> S2kSettings:
    """Return the passphrase S2K settings that match the lab's KDF strength."""
    return S2kSettings.test() if lab.fast_kdf else S2kSettings.production()


# Encryption and recovery


def encrypt_path(
    lab: Lab,
    vault: Vault,
    user: str,
    source: Path,
    dest: Path | None = None,
    *,
    passphrase: str,
    overwrite: bool = False,
    check_strength: bool = True,
) -> Path:
    """Encrypt a user's file or folder for their passphrase and escrow key.

    Args:
        source: a file, or a folder that is streamed as a tar archive.
        dest: the ciphertext; by default `source` with ``.gpg`` or ``.tar.gpg``.
        passphrase: the user's passphrase.
        overwrite: replace `dest` if it exists.
        check_strength: reject weak passphrases with zxcvbn.

    Returns:
        The ciphertext path.

    Raises:
        WeakPassphraseError: the passphrase is too easy to guess.
        RecordError: the user has no active escrow key.
        DestinationExistsError: `dest` exists and `overwrite` is false.
    """
    source = Path(source)
    if check_strength:
        check_passphrase_strength(passphrase, user_inputs=[user])
    record = require_escrow_key(vault, user)
    suffix = FOLDER_SUFFIX if source.is_dir() else FILE_SUFFIX
    dest = Path(dest) if dest else source.with_name(source.name + suffix)

    _encrypt(lab, record, source, dest, passphrase, overwrite=overwrite)

    remember_file(lab, vault, record, dest)
    return dest


def decrypt_path(
    source: Path, dest: Path, *, passphrase: str, overwrite: bool = False
) -> Path:
    """Decrypt a user's file or folder with their passphrase, as the user does.

    Raises:
        CredentialError: the passphrase does not open `source`.
        IntegrityError: `source` is truncated or was tampered with.
        DestinationExistsError: `dest` exists and `overwrite` is false.
    """

    def run(out: Path) -> None:
        pgpfile.decrypt(Path(source), out, passphrase=passphrase)

    return archives.write_plaintext(Path(source), Path(dest), run, overwrite=overwrite)


def decrypt_with_stored_passphrase(
    vault: Vault, source: Path, dest: Path, *, key_id: str, reason: str
) -> Path:
    """Decrypt as the user would, with the passphrase the vault stores for them.

    Drills use this to prove the passphrase path without handling the
    passphrase themselves.
    """
    passphrase = vault.read_secret(key_id, reason).decode("utf-8")
    return decrypt_path(source, dest, passphrase=passphrase)


def recover_path(
    lab: Lab,
    vault: Vault,
    source: Path,
    dest: Path,
    *,
    reason: str,
    key_id: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Recover a user's file or folder from the escrow, without their passphrase.

    The escrow key is the one named by `key_id`, or the one whose encryption
    subkey the message is encrypted to. The audit log records the actor, the
    reason, the source and the new place.

    Raises:
        CredentialError: the message is not encrypted to the escrow key.
        IntegrityError: `source` is truncated or was tampered with.
        DestinationExistsError: `dest` exists and `overwrite` is false.
    """
    source, dest = Path(source), Path(dest)
    if not reason.strip():
        raise RecordError("escrow recovery needs a reason for the audit log.")
    recipients = pgpfile.list_recipients(source)
    record = vault.get(key_id) if key_id else escrow_key_for(vault, recipients, source)
    subkey = record.attributes.get("encryption_key_id", "")
    if subkey not in recipients:
        raise CredentialError(
            f"{source} is encrypted to OpenPGP key "
            f"{', '.join(recipients) or 'none (passphrase only)'}, not to escrow key "
            f"{record.id} ({subkey}); recover it with the escrow key that matches."
        )

    detail = (
        f"{lab_reference(lab, source)} -> {lab_reference(lab, dest)}; reason: {reason}"
    )
    try:
        secret = vault.read_secret(record.id, f"escrow recovery: {reason}")

        def run(out: Path) -> None:
            pgpfile.decrypt(
                source, out, secret_key=secret.decode("ascii"), key_label=record.id
            )

        archives.write_plaintext(source, dest, run, overwrite=overwrite)
    except Exception:
        vault.record_operation("escrow-recovery", record.id, "failure", detail)
        logger.warning("escrow recovery of %s with %s failed", source, record.id)
        raise
    vault.record_operation("escrow-recovery", record.id, "success", detail)
    logger.info("recovered %s from escrow key %s to %s", source, record.id, dest)
    return dest


# Rotation


def rotate_key(
    lab: Lab, vault: Vault, key_id: str, *, reason: str, compromised: bool
) -> list[str]:
    """Replace a user's escrow key or passphrase and re-encrypt their files.

    An escrow key is replaced by a new key pair, a passphrase by a new random
    one. The new key is saved in the vault before any file depends on it.
    Every file the old key protects is then encrypted again into a staging
    file and test-decrypted with the new key. Only when all of them pass do
    they replace the old ciphertexts, and the new key becomes active. If any
    file fails, the new key is destroyed and every file stays as it was.

    Returns:
        The ids of the new keys.
    """
    record = vault.get(key_id)
    user = record.attributes.get("user", "")
    escrow = find_user_key(vault, user, ESCROW_ROLE)
    passphrase_record = find_user_key(vault, user, PASSPHRASE_ROLE)
    if escrow is None:
        raise RecordError(f"user {user} has no active escrow key to rotate with.")

    new_escrow, new_passphrase = escrow, passphrase_record
    if record.attributes.get("role") == PASSPHRASE_ROLE:
        new_passphrase = store_passphrase(
            vault,
            user,
            generate_passphrase(),
            key_id=next_key_id(vault, key_id),
            state=KeyState.PRE_ACTIVATION,
        )
        new_key = new_passphrase
    else:
        new_escrow = create_escrow_key(
            lab,
            vault,
            user,
            key_id=next_key_id(vault, escrow.id),
            state=KeyState.PRE_ACTIVATION,
        )
        new_key = new_escrow
    vault.save()

    passphrase = (
        vault.read_secret(new_passphrase.id, f"rotation: {reason}").decode("utf-8")
        if new_passphrase is not None
        else None
    )
    try:
        _reencrypt_files(lab, vault, escrow, new_escrow, passphrase, reason)
    except BaseException:
        vault.destroy(new_key.id, f"rotation of {key_id} failed; no file changed")
        vault.save()
        raise

    vault.transition(new_key.id, KeyState.ACTIVE, f"replaces {key_id}: {reason}")
    retire_key(vault, key_id, reason=reason, compromised=compromised)
    logger.info("rotated %s to %s", key_id, new_key.id)
    return [new_key.id]


def _reencrypt_files(
    lab: Lab,
    vault: Vault,
    old: KeyRecord,
    new: KeyRecord,
    passphrase: str | None,
    reason: str,
) -> None:
    if passphrase is None:
        logger.warning(
            "no stored passphrase for %s: files are re-encrypted to the escrow "
            "key only, and the user must encrypt them again with a passphrase",
            old.attributes.get("user"),
        )
    old_secret = vault.read_secret(old.id, f"re-encryption: {reason}").decode()
    new_secret = vault.read_secret(new.id, f"check re-encryption: {reason}").decode()
    staged: list[tuple[Path, Path]] = []
    try:
        for path in protected_files(lab, old):
            if not path.exists():
                logger.warning("protected file %s is missing; skipped", path)
                continue
            staging = Path(tempfile.mkdtemp(prefix=".trekeys-rotate-", dir=path.parent))
            staged.append((path, staging))
            plain = staging / "plain"
            pgpfile.decrypt(path, plain, secret_key=old_secret)
            pgpfile.encrypt(
                plain,
                staging / "new.gpg",
                home=escrow_home(lab),
                recipient=new.fingerprint,
                passphrase=passphrase,
                settings=s2k_settings(lab),
                literal_name=path.name.removesuffix(FILE_SUFFIX),
            )
            plain.unlink()
            pgpfile.decrypt(staging / "new.gpg", plain, secret_key=new_secret)
            plain.unlink()

        # Every new ciphertext passed its check, so the old ones can go.
        for path, staging in staged:
            os.replace(staging / "new.gpg", path)
            remember_file(lab, vault, new, path)
    finally:
        for _, staging in staged:
            shutil.rmtree(staging, ignore_errors=True)


# Lab


def build_lab(lab: Lab, vault: Vault) -> None:
    """Give every demo user an escrow key, a stored passphrase and encrypted files."""
    for instance, users in lab.instances.items():
        for user in users:
            create_escrow_key(lab, vault, user)
            passphrase = generate_passphrase()
            store_passphrase(vault, user, passphrase)
            folder = lab.instance_dir(instance) / "user-files" / user
            _write_demo_files(folder, instance, user)
            for name in ("results.csv", "analysis"):
                plain = folder / name
                encrypt_path(lab, vault, user, plain, passphrase=passphrase)
                _remove_plaintext(plain)


def _write_demo_files(folder: Path, instance: str, user: str) -> None:
    (folder / "analysis").mkdir(parents=True, mode=0o700)
    rows = [f"{n},{instance},{user},{(n * 37) % 101}" for n in range(1, 501)]
    (folder / "results.csv").write_text(
        "row,instance,user,score\n" + "\n".join(rows) + "\n", encoding="utf-8"
    )
    (folder / "analysis" / "model.py").write_text(
        f"# regression model of {user} in project {instance}\nalpha = 0.05\n",
        encoding="utf-8",
    )
    (folder / "analysis" / "notes.md").write_text(
        f"# Notes of {user}\n\nCohort extract received and checked.\n",
        encoding="utf-8",
    )


def _remove_plaintext(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()


# Internals


def _encrypt(
    lab: Lab,
    record: KeyRecord,
    source: Path,
    dest: Path,
    passphrase: str | None,
    *,
    overwrite: bool,
) -> None:
    content: Path | Callable[[IO[bytes]], None] = source
    literal_name = source.name
    if source.is_dir():
        content = archives.tar_writer(source)
        literal_name = source.name + ".tar"
    pgpfile.encrypt(
        content,
        dest,
        home=escrow_home(lab),
        recipient=record.fingerprint,
        passphrase=passphrase,
        settings=s2k_settings(lab),
        literal_name=literal_name,
        overwrite=overwrite,
    )

"""User file encryption with escrowed keys.

TRE users protect the data they copy into their home folders with a
passphrase, and the key manager stores the keys that open it. Each user has
an OpenPGP escrow key pair (``files/<user>``): its secret key lives only in
the vault, its public key in the escrow keyring. A user's file or folder is
encrypted once, as one OpenPGP message that both the user's passphrase and
the escrow key open (see `trekeys.pgpfile`). A folder is streamed as a tar
archive and named ``<folder>.tar.gpg``.

The escrow record lists the files it protects as far as trekeys knows, with
paths relative to the lab folder when they lie inside it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from zxcvbn import zxcvbn

from trekeys import pgpfile
from trekeys.errors import (
    CredentialError,
    DestinationExistsError,
    RecordError,
    WeakPassphraseError,
)
from trekeys.lab import Lab
from trekeys.outputs import staged_output
from trekeys.pgpfile import S2kSettings
from trekeys.records import KeyKind, KeyRecord, KeyState
from trekeys.rotation import next_key_id, retire_key
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

ESCROW_ROLE = "escrow"
PASSPHRASE_ROLE = "passphrase"
FILE_SUFFIX = ".gpg"
FOLDER_SUFFIX = ".tar.gpg"
# zxcvbn scores run from 0 to 4; 3 means "safely unguessable" (about 10^10
# guesses) against an offline attack on a slow hash.
MIN_PASSPHRASE_SCORE = 3
ESCROW_CRYPTOPERIOD_DAYS = 730


def escrow_home(lab: Lab) -> Path:
    """Return the GNUPGHOME that holds the escrow public keys of the lab."""
    return lab.root / "keyrings" / "escrow"


def s2k_settings(lab: Lab) -> S2kSettings:
    """Return the passphrase S2K settings that match the lab's KDF strength."""
    return S2kSettings.test() if lab.fast_kdf else S2kSettings.production()


def check_passphrase_strength(
    passphrase: str,
    *,
    user_inputs: Sequence[str] = (),
    min_score: int = MIN_PASSPHRASE_SCORE,
) -> int:
    """Estimate how guessable a passphrase is with zxcvbn and reject weak ones.

    Args:
        passphrase: the passphrase; it never appears in a message or log.
        user_inputs: words an attacker would try first, such as the user name.
        min_score: the lowest zxcvbn score (0 to 4) accepted.

    Returns:
        The zxcvbn score.

    Raises:
        WeakPassphraseError: the score is below `min_score`; the message gives
            zxcvbn's warning and suggestions.
    """
    pgpfile.check_passphrase_characters(passphrase)
    result = zxcvbn(passphrase, user_inputs=list(user_inputs))
    score = int(result["score"])
    if score >= min_score:
        return score

    feedback = result.get("feedback") or {}
    reasons = [feedback.get("warning") or ""] + list(feedback.get("suggestions") or [])
    advice = " ".join(r.strip() for r in reasons if r and r.strip())
    raise WeakPassphraseError(
        f"the passphrase is too easy to guess (strength {score} of 4, at least "
        f"{min_score} required). {advice or 'Use a longer passphrase.'} "
        "Choose a longer passphrase of several uncommon words."
    )


def generate_passphrase() -> str:
    """Return a random passphrase of 144 bits, for demo users and rotations."""
    return secrets.token_urlsafe(18)


# Keys and records


def create_escrow_key(
    lab: Lab, vault: Vault, user: str, *, key_id: str | None = None
) -> KeyRecord:
    """Create a user's escrow key, store it in the vault and its public key in the
    escrow keyring."""
    key_id = key_id or f"files/{user}"
    escrow = pgpfile.generate_escrow_key(f"trekeys escrow {key_id}")
    pgpfile.import_key(escrow_home(lab), escrow.public)
    record = KeyRecord(
        id=key_id,
        kind=KeyKind.FILE_KEY,
        purpose=f"Escrow key that recovers the files {user} encrypts (policy 4.1.2).",
        owner=f"user:{user}",
        state=KeyState.ACTIVE,
        cryptoperiod_days=ESCROW_CRYPTOPERIOD_DAYS,
        fingerprint=escrow.fingerprint,
        algorithm="OpenPGP Ed25519 with Curve25519 (ECDH) encryption subkey",
        strength_bits=128,
        protects=[f"files:{user}"],
        locations=["vault", f"public key in {_reference(lab, escrow_home(lab))}"],
        attributes={
            "role": ESCROW_ROLE,
            "user": user,
            "encryption_key_id": escrow.encryption_key_id,
            "files": "[]",
        },
    )
    record.activated = record.created
    vault.add(record, escrow.secret, attachments={"public.asc": escrow.public.encode()})
    return record


def store_passphrase(
    vault: Vault, user: str, passphrase: str, *, key_id: str | None = None
) -> KeyRecord:
    """Store a user's file passphrase in the vault (policy 4.1.2: the key manager
    stores the keys that users' passphrases operate)."""
    estimate = zxcvbn(passphrase)
    record = KeyRecord(
        id=key_id or f"files/{user}/passphrase",
        kind=KeyKind.FILE_KEY,
        purpose=f"Passphrase with which {user} encrypts their files.",
        owner=f"user:{user}",
        custodian=f"user {user} and TRE System Administrators",
        state=KeyState.ACTIVE,
        algorithm="OpenPGP passphrase (iterated and salted S2K, AES-256)",
        strength_bits=int(float(estimate["guesses_log10"]) * 3.3219),
        protects=[f"files:{user}"],
        locations=["vault", f"memory of {user}"],
        attributes={"role": PASSPHRASE_ROLE, "user": user},
    )
    record.activated = record.created
    vault.add(record, passphrase)
    return record


def find_user_key(vault: Vault, user: str, role: str) -> KeyRecord | None:
    """Return the active escrow or passphrase record of `user`, or None."""
    for record in vault.find(kind=KeyKind.FILE_KEY.value, owner=f"user:{user}"):
        if record.attributes.get("role") == role and record.state is KeyState.ACTIVE:
            return record
    return None


def protected_files(lab: Lab, record: KeyRecord) -> list[Path]:
    """Return the ciphertexts that an escrow record protects, as far as it knows."""
    return [_resolve(lab, ref) for ref in json.loads(record.attributes["files"])]


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
    record = _require_escrow_key(vault, user)
    suffix = FOLDER_SUFFIX if source.is_dir() else FILE_SUFFIX
    dest = Path(dest) if dest else source.with_name(source.name + suffix)

    _encrypt(lab, record, source, dest, passphrase, overwrite=overwrite)

    _remember_file(lab, vault, record, dest)
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

    def run(out: IO[bytes]) -> None:
        pgpfile.decrypt(Path(source), out, passphrase=passphrase)

    return _write_plaintext(Path(source), Path(dest), run, overwrite=overwrite)


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
    record = vault.get(key_id) if key_id else _escrow_key_for(vault, recipients, source)
    subkey = record.attributes.get("encryption_key_id", "")
    if subkey not in recipients:
        raise CredentialError(
            f"{source} is encrypted to OpenPGP key "
            f"{', '.join(recipients) or 'none (passphrase only)'}, not to escrow key "
            f"{record.id} ({subkey}); recover it with the escrow key that matches."
        )

    detail = f"{_reference(lab, source)} -> {_reference(lab, dest)}; reason: {reason}"
    try:
        secret = vault.read_secret(record.id, f"escrow recovery: {reason}")

        def run(out: IO[bytes]) -> None:
            pgpfile.decrypt(
                source, out, secret_key=secret.decode("ascii"), key_label=record.id
            )

        _write_plaintext(source, dest, run, overwrite=overwrite)
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

    An escrow key is replaced by a new key pair; a passphrase by a new random
    one. Every file the old key protects is decrypted from the escrow and
    encrypted again, and each new ciphertext is checked before it replaces the
    old one. The old key becomes compromised or deactivated.

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
            vault, user, generate_passphrase(), key_id=next_key_id(vault, key_id)
        )
        new_ids = [new_passphrase.id]
    else:
        new_escrow = create_escrow_key(
            lab, vault, user, key_id=next_key_id(vault, escrow.id)
        )
        new_ids = [new_escrow.id]

    passphrase = (
        vault.read_secret(new_passphrase.id, f"rotation: {reason}").decode("utf-8")
        if new_passphrase is not None
        else None
    )
    _reencrypt_files(lab, vault, escrow, new_escrow, passphrase, reason)

    retire_key(vault, key_id, reason=reason, compromised=compromised)
    logger.info("rotated %s to %s", key_id, ", ".join(new_ids))
    return new_ids


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
    for path in protected_files(lab, old):
        if not path.exists():
            logger.warning("protected file %s is missing; skipped", path)
            continue
        staging = Path(tempfile.mkdtemp(prefix=".trekeys-rotate-", dir=path.parent))
        try:
            plain = staging / "plain"
            secret = vault.read_secret(old.id, f"re-encryption: {reason}")
            with open(plain, "xb") as out:
                pgpfile.decrypt(path, out, secret_key=secret.decode("ascii"))
            rewritten = staging / "new.gpg"
            pgpfile.encrypt(
                plain,
                rewritten,
                home=escrow_home(lab),
                recipient=new.fingerprint,
                passphrase=passphrase,
                settings=s2k_settings(lab),
                literal_name=path.name.removesuffix(FILE_SUFFIX),
            )
            new_secret = vault.read_secret(new.id, f"check re-encryption: {reason}")
            with open(os.devnull, "wb") as sink:
                pgpfile.decrypt(rewritten, sink, secret_key=new_secret.decode("ascii"))
            os.replace(rewritten, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _remember_file(lab, vault, new, path)


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


def _require_escrow_key(vault: Vault, user: str) -> KeyRecord:
    record = find_user_key(vault, user, ESCROW_ROLE)
    if record is None:
        raise RecordError(
            f"user {user} has no active escrow key in the vault; create one with "
            f"'trekeys files create-key {user}'."
        )
    return record


def _escrow_key_for(vault: Vault, recipients: list[str], source: Path) -> KeyRecord:
    for record in vault.find(kind=KeyKind.FILE_KEY.value):
        if record.attributes.get("encryption_key_id") in recipients:
            return record
    raise CredentialError(
        f"{source} is encrypted to OpenPGP key "
        f"{', '.join(recipients) or 'none (passphrase only)'}, and no escrow key in "
        "the vault matches; check that the file comes from this TRE."
    )


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
        content = _tar_writer(source)
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


def _tar_writer(folder: Path) -> Callable[[IO[bytes]], None]:
    def write(pipe: IO[bytes]) -> None:
        with tarfile.open(fileobj=pipe, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.add(folder, arcname=folder.name)

    return write


def _write_plaintext(
    source: Path,
    dest: Path,
    run: Callable[[IO[bytes]], None],
    *,
    overwrite: bool,
) -> Path:
    if not source.name.endswith(FOLDER_SUFFIX):
        with staged_output(dest, overwrite=overwrite) as out:
            run(out)
        return dest

    # A folder is never merged into or swapped for an existing one.
    if dest.exists():
        raise DestinationExistsError(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(
            prefix=f".{dest.name}.", suffix=".trekeys-partial", dir=dest.parent
        )
    )
    try:
        archive = staging / "archive.tar"
        with open(archive, "xb") as out:
            run(out)
        _extract_single_folder(archive, staging / "tree", dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _extract_single_folder(archive: Path, tree: Path, dest: Path) -> None:
    with tarfile.open(archive, "r:") as tar:
        tops = {member.name.split("/")[0] for member in tar.getmembers()}
        if len(tops) != 1:
            raise RecordError(
                f"the archive in {archive.name} holds {len(tops)} top-level entries, "
                "not one folder; decrypt it with gpg and inspect it."
            )
        # The "data" filter rejects absolute paths, links out of the tree and
        # device files (Python 3.11.4 and later).
        tar.extractall(tree, filter="data")
    os.rename(tree / tops.pop(), dest)


def _remember_file(lab: Lab, vault: Vault, record: KeyRecord, path: Path) -> None:
    files = json.loads(record.attributes.get("files", "[]"))
    reference = _reference(lab, path)
    if reference not in files:
        files.append(reference)
        record.attributes["files"] = json.dumps(files)
        vault.update(record, operation="protect-file", detail=reference)


def _reference(lab: Lab, path: Path) -> str:
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(lab.root))
    except ValueError:
        return str(resolved)


def _resolve(lab: Lab, reference: str) -> Path:
    path = Path(reference)
    return path if path.is_absolute() else lab.root / path


def user_summary(lab: Lab, vault: Vault, user: str) -> dict[str, Any]:
    """Return a user's active escrow and passphrase key ids and protected files."""
    escrow = find_user_key(vault, user, ESCROW_ROLE)
    passphrase = find_user_key(vault, user, PASSPHRASE_ROLE)
    return {
        "user": user,
        "escrow key": escrow.id if escrow else "none",
        "passphrase key": passphrase.id if passphrase else "none",
        "files": [str(p) for p in protected_files(lab, escrow)] if escrow else [],
    }

"""OpenPGP file encryption through the ``gpg`` program, streamed to staged outputs.

Each message carries two ways in: a symmetric-key packet (SKESK) that the
user's passphrase opens, and a public-key packet (PKESK) for an escrow
recipient. Either one recovers the session key, so plain ``gpg --decrypt``
opens the file with the passphrase, and the key manager opens it with the
escrow secret key.

``gpg`` is run directly rather than through python-gnupg for two reasons.
The passphrase must travel on its own pipe (``--passphrase-fd``) while the
data streams from a file or a tar writer on standard input. And the decision
to keep a plaintext depends on the status lines (``GOODMDC``, ``BADMDC``)
that gpg prints after it has already written the data.

Every output is written to a hidden temporary file in the destination folder
and linked into place only after gpg has finished and, on decryption,
reported a valid integrity check. On any failure or interruption the
temporary file is removed, so no partial output is left behind.
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from trekeys.errors import CredentialError, IntegrityError, ToolError
from trekeys.gpgrun import (
    GpgRun,
    check_passphrase_characters,
    gpg_binary,
    run_gpg,
    temporary_home,
)
from trekeys.outputs import staged_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class S2kSettings:
    """The OpenPGP string-to-key settings that turn a passphrase into a key.

    Attributes:
        count: bytes hashed by the iterated and salted S2K (RFC 4880, 3.7.1.3),
            between 65536 and 65011712. gpg 2.2 encodes the value 1024 as
            the maximum, so smaller test values are raised to 65536.
        digest: the S2K hash algorithm.
        cipher: the symmetric cipher of the message.
    """

    count: int
    digest: str = "SHA512"
    cipher: str = "AES256"

    @classmethod
    def production(cls) -> S2kSettings:
        """Return the strongest iteration count that OpenPGP can encode."""
        return cls(count=65011712)

    @classmethod
    def test(cls) -> S2kSettings:
        """Return weak settings for tests and the demo TRE only."""
        return cls(count=65536)

    def describe(self) -> str:
        """Return a one-line summary for reports."""
        return f"{self.cipher}, S2K {self.digest} iterated {self.count} bytes"

    def arguments(self) -> list[str]:
        return [
            "--cipher-algo",
            self.cipher,
            "--s2k-mode",
            "3",
            "--s2k-digest-algo",
            self.digest,
            "--s2k-count",
            str(max(self.count, 65536)),
        ]


# Encryption and decryption


def encrypt(
    source: Path | Callable[[IO[bytes]], None],
    dest: Path,
    *,
    home: Path,
    recipient: str,
    passphrase: str | None,
    settings: S2kSettings,
    literal_name: str = "",
    overwrite: bool = False,
) -> None:
    """Encrypt a file, or what `source` writes, for a passphrase and a recipient.

    Args:
        source: a file to read, or a function that writes the plaintext.
        dest: the ciphertext to create.
        home: the GNUPGHOME that contains the recipient's public key.
        recipient: the recipient's fingerprint.
        passphrase: the passphrase of the SKESK, or None for the recipient only.
        settings: the S2K and cipher settings.
        literal_name: the file name stored in the literal data packet.
        overwrite: replace `dest` if it exists.

    Raises:
        DestinationExistsError: `dest` exists and `overwrite` is false.
        ToolError: gpg failed, for example because the recipient is unknown.
    """
    if passphrase is not None:
        check_passphrase_characters(passphrase)
    modes = ["--symmetric", "--encrypt"] if passphrase is not None else ["--encrypt"]
    arguments = [
        "--no-autostart",
        "--trust-model",
        "always",
        # Compression is off: research data is often compressed already, and
        # compressing before encrypting can leak content through the length.
        "--compress-algo",
        "none",
        *settings.arguments(),
        *modes,
        "--recipient",
        recipient,
        "--set-filename",
        literal_name,
        # gpg writes a named file faster than its standard output (2.2.40).
        "--yes",
        "--output",
    ]

    with staged_path(dest, overwrite=overwrite) as tmp:
        arguments.append(str(tmp))
        if isinstance(source, Path):
            with open(source, "rb") as data:
                run = run_gpg(home, arguments, passphrase=passphrase, stdin=data)
        else:
            run = run_gpg(home, arguments, passphrase=passphrase, writer=source)
        if run.returncode != 0 or not run.has("END_ENCRYPTION"):
            raise ToolError(
                f"gpg could not encrypt to {dest} for recipient {recipient}; "
                f"check that the escrow public key is in the keyring at {home}.",
                tool="gpg",
                returncode=run.returncode,
                stderr_tail=run.stderr_tail,
            )
    logger.info("encrypted %s for escrow recipient %s", dest, recipient)


def list_recipients(source: Path) -> list[str]:
    """Return the key ids that the public-key packets of `source` are encrypted to.

    Raises:
        IntegrityError: `source` is not an OpenPGP message.
    """
    with temporary_home() as home, open(source, "rb") as data:
        run = run_gpg(home, ["--no-autostart", "--list-only", "--decrypt"], stdin=data)
    recipients = [value.split()[0] for value in run.values("ENC_TO")]
    if not recipients and not run.has("NEED_PASSPHRASE_SYM"):
        raise IntegrityError(
            f"{source} is not an OpenPGP message or is truncated; check the file."
        )
    return recipients


def decrypt(
    source: Path,
    out: Path,
    *,
    passphrase: str | None = None,
    secret_key: str | None = None,
    key_label: str = "",
) -> GpgRun:
    """Decrypt `source` into the file `out` with a passphrase or an armored secret key.

    `out` is overwritten. The caller must discard it when this raises: gpg
    writes plaintext before it has checked the integrity of the whole message.

    Raises:
        CredentialError: the passphrase or the secret key does not open `source`.
        IntegrityError: `source` is truncated, tampered with or not OpenPGP.
    """
    with temporary_home() as home:
        arguments = ["--yes", "--output", str(out), "--decrypt"]
        if secret_key is not None:
            import_key(home, secret_key, secret=True)
        else:
            arguments.insert(0, "--no-autostart")
        with open(source, "rb") as data:
            run = run_gpg(home, arguments, passphrase=passphrase, stdin=data)
    check_decryption(run, source, passphrase is not None, key_label)
    return run


def check_decryption(
    run: GpgRun, source: Path, used_passphrase: bool, key_label: str = ""
) -> None:
    """Raise the trekeys error that matches a failed decryption, or return."""
    clean = not run.has("BADMDC") and not run.has("DECRYPTION_FAILED")
    if run.returncode == 0 and clean and run.has("GOODMDC"):
        return

    if run.has("BADMDC") or run.has("PLAINTEXT"):
        raise IntegrityError(
            f"{source} is truncated or was modified after encryption (the OpenPGP "
            "integrity check failed); no plaintext was kept, restore the "
            "ciphertext from a backup."
        )
    bad_passphrase = any("BAD_PASSPHRASE" in v for v in run.values("ERROR"))
    if used_passphrase and (bad_passphrase or run.has("BAD_PASSPHRASE")):
        raise CredentialError(
            f"the passphrase does not open {source}; check it, or ask the key "
            "manager to recover the file from the escrow."
        )
    # With a passphrase packet present, gpg requests a passphrase before it
    # reports NO_SECKEY, so a missing DECRYPTION_KEY is the reliable sign.
    if not used_passphrase and run.has("ENC_TO") and not run.has("DECRYPTION_KEY"):
        recipients = ", ".join(v.split()[0] for v in run.values("ENC_TO"))
        raise CredentialError(
            f"{source} is encrypted to OpenPGP key {recipients}, not to escrow key "
            f"{key_label or 'given'}; recover it with the escrow key that matches."
        )
    raise IntegrityError(
        f"gpg could not decrypt {source} (exit status {run.returncode}); the file "
        "is damaged or not an OpenPGP message: restore it from a backup."
    )


# Keys


@dataclass(frozen=True)
class EscrowKey:
    """A new OpenPGP escrow key: its identifiers and armored exports.

    Attributes:
        fingerprint: the primary key's fingerprint.
        encryption_key_id: the 16-hex-digit id of the encryption subkey, which
            is what a message's public-key packet names.
        secret: the armored secret key, unprotected, for the vault only.
        public: the armored public key.
    """

    fingerprint: str
    encryption_key_id: str
    secret: str = field(repr=False)
    public: str = field(repr=False)


def generate_escrow_key(user_id: str) -> EscrowKey:
    """Create an Ed25519 key with a Curve25519 encryption subkey in a throwaway home.

    The secret key is never written to a lasting keyring: the caller stores
    the armored export in the vault.
    """
    with temporary_home() as home:
        _expect_success(
            home,
            ["--quick-gen-key", user_id, "ed25519", "cert", "never"],
            "create the escrow key",
            passphrase_empty=True,
        )
        fingerprint = _list_keys(home)[0][0]
        _expect_success(
            home,
            ["--quick-add-key", fingerprint, "cv25519", "encr", "never"],
            "add the escrow encryption subkey",
            passphrase_empty=True,
        )
        _, subkey_id = _list_keys(home)[0]
        secret = _export(home, ["--export-secret-keys", fingerprint])
        public = _export(home, ["--export", fingerprint])
    logger.info("created OpenPGP escrow key %s", fingerprint)
    return EscrowKey(fingerprint, subkey_id, secret, public)


def import_key(home: Path, armored: str, *, secret: bool = False) -> None:
    """Import an armored key into the keyring at `home` (created 0700 if missing).

    Only a secret key import starts a gpg-agent, because lasting keyrings
    such as the escrow keyring must not keep agent sockets: they cannot be
    copied or backed up.
    """
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryFile() as source:
        source.write(armored.encode("ascii"))
        source.seek(0)
        arguments = ["--import"] if secret else ["--no-autostart", "--import"]
        run = run_gpg(home, arguments, stdin=source)
    if run.returncode != 0 or not run.has("IMPORT_OK"):
        raise ToolError(
            f"gpg could not import a key into {home}; check the keyring.",
            tool="gpg",
            returncode=run.returncode,
            stderr_tail=run.stderr_tail,
        )


def _list_keys(home: Path) -> list[tuple[str, str]]:
    """Return (fingerprint, encryption subkey id) of each key in the keyring."""
    result = subprocess.run(
        [gpg_binary(), "--homedir", str(home), "--batch", "--with-colons"]
        + ["--list-keys"],
        capture_output=True,
        text=True,
        check=False,
    )
    keys: list[tuple[str, str]] = []
    fingerprint = ""
    expect_primary_fpr = False
    for line in result.stdout.splitlines():
        fields = line.split(":")
        if fields[0] == "pub":
            expect_primary_fpr = True
        elif fields[0] == "fpr" and expect_primary_fpr:
            fingerprint = fields[9]
            keys.append((fingerprint, ""))
            expect_primary_fpr = False
        elif fields[0] == "sub" and "e" in fields[11] and keys:
            keys[-1] = (fingerprint, fields[4])
    return keys


def _export(home: Path, arguments: list[str]) -> str:
    with tempfile.TemporaryFile() as out:
        run = run_gpg(home, ["--armor", *arguments], stdout=out)
        out.seek(0)
        text = out.read().decode("ascii")
    if run.returncode != 0 or not text:
        raise ToolError(
            f"gpg could not export a key from {home}.",
            tool="gpg",
            returncode=run.returncode,
            stderr_tail=run.stderr_tail,
        )
    return text


def _expect_success(
    home: Path, arguments: list[str], action: str, *, passphrase_empty: bool = False
) -> None:
    run = run_gpg(home, arguments, passphrase="" if passphrase_empty else None)
    if run.returncode != 0:
        raise ToolError(
            f"gpg could not {action} in {home}.",
            tool="gpg",
            returncode=run.returncode,
            stderr_tail=run.stderr_tail,
        )

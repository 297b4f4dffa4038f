"""Detached OpenPGP signatures by the offline TRE admin key, through ``gpg``.

The offline admin key lives in its own GNUPGHOME on offline media, so a seal
signs with it only when that media is present. Any passphrase reaches gpg
through a pipe (``--passphrase-fd``), never through argv or the environment.
The signed data goes through stdin.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trekeys.errors import IntegrityError, ToolError, ToolMissingError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineSignature:
    """An armored detached signature and the fingerprint of the key that made it."""

    fingerprint: str
    armored: str
    status: str


OfflineSigner = Callable[[bytes], OfflineSignature]


def _gpg() -> str:
    program = shutil.which("gpg")
    if program is None:
        raise ToolMissingError("gpg", "gnupg")
    return program


def gpg_detach_sign(
    gnupghome: Path, fingerprint: str, data: bytes, passphrase: str | None = None
) -> OfflineSignature:
    """Sign `data` with the key `fingerprint` in `gnupghome`, detached and armored.

    Raises:
        ToolError: gpg failed, for example because the key is absent or the
            passphrase is wrong (gpg's status lines are kept, never the passphrase).
    """
    command = [
        _gpg(),
        "--homedir",
        str(gnupghome),
        "--batch",
        "--no-tty",
        "--status-fd",
        "2",
        "--pinentry-mode",
        "loopback",
        "--local-user",
        fingerprint,
        "--armor",
        "--detach-sign",
    ]
    read_fd, write_fd = os.pipe()
    try:
        command[-2:-2] = ["--passphrase-fd", str(read_fd)]
        # The passphrase (possibly empty) is written before gpg starts; it is
        # far below the pipe buffer, so the write cannot block.
        os.write(write_fd, (passphrase or "").encode("utf-8") + b"\n")
        os.close(write_fd)
        write_fd = -1
        result = subprocess.run(
            command,
            input=data,
            capture_output=True,
            pass_fds=(read_fd,),
            check=False,
            timeout=120,
        )
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
        _flush_agent_passphrases(gnupghome)

    status = _status_lines(result.stderr)
    if result.returncode != 0 or "SIG_CREATED" not in status:
        raise ToolError(
            f"gpg could not sign with the offline key {fingerprint} in {gnupghome}; "
            "check that the offline media is mounted and the passphrase is right.",
            tool="gpg",
            returncode=result.returncode,
            stderr_tail="\n".join(status.splitlines()[-5:]),
        )
    logger.info("signed a transcript digest with offline key %s", fingerprint)
    return OfflineSignature(fingerprint.upper(), result.stdout.decode("ascii"), status)


def gpg_verify_detached(
    gnupghome: Path, fingerprint: str, data: bytes, armored: str
) -> str:
    """Check a detached signature over `data` and that `fingerprint` made it.

    Returns:
        gpg's status lines, as evidence.

    Raises:
        IntegrityError: the signature is bad or was made by another key.
    """
    with tempfile.TemporaryDirectory(prefix="trekeys-verify-") as folder:
        signature = Path(folder) / "transcript.asc"
        signature.write_text(armored, encoding="ascii")
        result = subprocess.run(
            [
                _gpg(),
                "--homedir",
                str(gnupghome),
                "--batch",
                "--no-tty",
                "--status-fd",
                "2",
                "--verify",
                str(signature),
                "-",
            ],
            input=data,
            capture_output=True,
            check=False,
            timeout=120,
        )
    status = _status_lines(result.stderr)
    signers = [
        line.split()[2].upper()
        for line in status.splitlines()
        if line.startswith("[GNUPG:] VALIDSIG ")
    ]
    if result.returncode != 0 or fingerprint.upper() not in signers:
        raise IntegrityError(
            f"the offline signature does not verify with key {fingerprint}; the "
            "transcript or its seal was changed, or another key signed it."
        )
    return status


def offline_signer_if_reachable(
    gnupghome: Path, fingerprint: str, passphrase: str | None = None
) -> OfflineSigner | None:
    """Return a signer for the offline key, or None when its GNUPGHOME is absent."""
    if not Path(gnupghome).is_dir():
        logger.info("offline key home %s not reachable; sealing without it", gnupghome)
        return None

    def sign(data: bytes) -> OfflineSignature:
        return gpg_detach_sign(Path(gnupghome), fingerprint, data, passphrase)

    return sign


def _flush_agent_passphrases(gnupghome: Path) -> None:
    # gpg-agent caches a loopback passphrase (10 minutes by default), which
    # would leave the offline key usable without it. A reload (SIGHUP) makes
    # the agent drop every cached passphrase.
    gpgconf = shutil.which("gpgconf")
    if gpgconf is None:
        return
    subprocess.run(
        [gpgconf, "--homedir", str(gnupghome), "--reload", "gpg-agent"],
        capture_output=True,
        check=False,
        timeout=30,
    )


def _status_lines(stderr: bytes) -> str:
    lines = stderr.decode("utf-8", "replace").splitlines()
    return "\n".join(line for line in lines if line.startswith("[GNUPG:]"))

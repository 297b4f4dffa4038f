"""Running ``gpg`` with a passphrase on its own pipe and reading its status lines.

trekeys passes secrets to gpg only through a pipe (``--passphrase-fd``) or
standard input, never in argv. Each call names its GNUPGHOME explicitly, so
the keyrings of different TRE components never mix.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from trekeys.errors import CredentialError, ToolMissingError

logger = logging.getLogger(__name__)

STATUS_PREFIX = "[GNUPG:] "
# gpg reads a passphrase up to the first newline, so it cannot contain one.
_FORBIDDEN_PASSPHRASE_CHARACTERS = ("\n", "\r", "\0")


@dataclass
class GpgRun:
    """The outcome of one gpg run: exit status and status lines."""

    returncode: int
    status: list[str]
    stderr_tail: str

    def has(self, keyword: str) -> bool:
        return any(line.split(" ", 1)[0] == keyword for line in self.status)

    def values(self, keyword: str) -> list[str]:
        prefix = keyword + " "
        return [line[len(prefix) :] for line in self.status if line.startswith(prefix)]


def gpg_binary() -> str:
    """Return the path of gpg.

    Raises:
        ToolMissingError: gpg is not installed.
    """
    path = shutil.which("gpg")
    if path is None:
        raise ToolMissingError("gpg", "gnupg")
    return path


def check_passphrase_characters(passphrase: str) -> None:
    """Reject a passphrase that gpg cannot read from a pipe."""
    if not passphrase or any(c in passphrase for c in _FORBIDDEN_PASSPHRASE_CHARACTERS):
        raise CredentialError(
            "the passphrase is empty or contains a line break or NUL character; "
            "choose one on a single line."
        )


def run_gpg(
    home: Path,
    arguments: list[str],
    *,
    passphrase: str | None = None,
    stdin: IO[bytes] | int | None = subprocess.DEVNULL,
    stdout: IO[bytes] | int | None = subprocess.DEVNULL,
    writer: Callable[[IO[bytes]], None] | None = None,
) -> GpgRun:
    """Run gpg in `home` with the passphrase on its own pipe and return its status.

    With `writer`, gpg reads standard input from a pipe that `writer` fills.
    If anything raises, including KeyboardInterrupt, gpg is killed first.
    """
    command = [
        gpg_binary(),
        "--homedir",
        str(home),
        "--batch",
        "--no-tty",
        "--no-greeting",
        "--pinentry-mode",
        "loopback",
        "--no-symkey-cache",
        "--status-fd",
        "2",
    ]
    pass_fds: tuple[int, ...] = ()
    read_fd = None
    if passphrase is not None:
        if passphrase:
            check_passphrase_characters(passphrase)
        read_fd, write_fd = os.pipe()
        # The write blocks only beyond the pipe buffer (64 KiB on Linux), far
        # more than any passphrase.
        os.write(write_fd, passphrase.encode("utf-8") + b"\n")
        os.close(write_fd)
        command += ["--passphrase-fd", str(read_fd)]
        pass_fds = (read_fd,)
    command += arguments

    with tempfile.TemporaryFile() as errors:
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE if writer else stdin,
                stdout=stdout,
                stderr=errors,
                pass_fds=pass_fds,
            )
        finally:
            if read_fd is not None:
                os.close(read_fd)
        try:
            if writer is not None and process.stdin is not None:
                _feed(process.stdin, writer)
            returncode = process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
        errors.seek(0)
        text = errors.read().decode("utf-8", "replace")

    status = [
        line[len(STATUS_PREFIX) :]
        for line in text.splitlines()
        if line.startswith(STATUS_PREFIX)
    ]
    human = [line for line in text.splitlines() if not line.startswith(STATUS_PREFIX)]
    return GpgRun(returncode, status, "\n".join(human[-5:]))


def _feed(pipe: IO[bytes], writer: Callable[[IO[bytes]], None]) -> None:
    try:
        with pipe:
            writer(pipe)
    except BrokenPipeError:
        # gpg stopped reading, and its exit status and status lines give the cause.
        logger.debug("gpg closed its input early")


@contextlib.contextmanager
def temporary_home() -> Iterator[Path]:
    """Yield a private, short-lived GNUPGHOME and remove it with its agent afterwards.

    The folder lives in the system temporary folder because gpg-agent's
    socket path must stay short.
    """
    home = Path(tempfile.mkdtemp(prefix="trekeys-gpg-"))
    try:
        yield home
    finally:
        # Only a secret-key import starts an agent, so without its socket
        # there is nothing to stop.
        if any(home.glob("S.gpg-agent*")):
            subprocess.run(
                ["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
                capture_output=True,
                check=False,
            )
        shutil.rmtree(home, ignore_errors=True)

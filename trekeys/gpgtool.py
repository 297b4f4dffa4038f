"""Run gpg on a GnuPG home: agent sockets, passphrase pipes and gpg's errors.

Every GnuPG home that trekeys uses goes through `open_home`, which checks it
and points its gpg-agent sockets at a short private folder. Passphrases reach
gpg through a pipe file descriptor (`passphrase_fd`), never through argv.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import gnupg

from trekeys.errors import AgentError, KeyringMissingError, ToolError, ToolMissingError

logger = logging.getLogger(__name__)

PIPE_BYTES = 1 << 20

# gpg-agent sockets live in a short folder because a Unix socket path is
# limited to about 107 bytes, which a GnuPG home deep in a temporary folder
# exceeds. A file named like the socket in the home redirects gpg there.
_SOCKETS = (
    "S.gpg-agent",
    "S.gpg-agent.extra",
    "S.gpg-agent.browser",
    "S.gpg-agent.ssh",
)
_AGENT_FAILURES = ("No agent running", "can't connect to the agent", "agent_genkey")


def gpg_binary() -> str:
    """Return the path of gpg, or raise ToolMissingError."""
    found = shutil.which("gpg")
    if found is None:
        raise ToolMissingError("gpg", "gnupg")
    return found


def open_home(home: Path, *, key_id: str = "", create: bool = False) -> Path:
    """Check or create a GnuPG home and point its agent sockets at a short folder.

    Raises:
        KeyringMissingError: the home is missing and `create` is false.
        AgentError: the socket folder is not a private folder of this user.
    """
    home = Path(home).resolve()
    if not home.is_dir():
        if not create:
            raise KeyringMissingError(home, key_id or "(unknown)")
        home.mkdir(mode=0o700, parents=True)

    # The redirect is rewritten on every use: a copied lab must not reach the
    # agent of the folder it was copied from.
    sockets = _socket_dir(home)
    for name in _SOCKETS:
        redirect = home / name
        text = f"%Assuan%\nsocket={sockets / name}\n"
        if not redirect.is_file() or redirect.read_text() != text:
            redirect.unlink(missing_ok=True)
            redirect.write_text(text)
    return home


def _socket_dir(home: Path) -> Path:
    base = Path("/tmp") / f"trekeys-gpg-{os.getuid()}"
    folder = base / hashlib.sha256(str(home).encode()).hexdigest()[:16]
    for path in (base, folder):
        path.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(path)
        private = stat.S_IMODE(info.st_mode) & 0o077 == 0
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or not private:
            raise AgentError(
                f"gpg-agent socket folder {path} is not a private folder of this "
                "user; remove it and try again.",
                tool="gpg-agent",
            )
    return folder


def gpg_for(home: Path, *, key_id: str = "") -> gnupg.GPG:
    """Return a python-gnupg handle on an existing GnuPG home."""
    home = open_home(home, key_id=key_id)
    return gnupg.GPG(gnupghome=str(home), gpgbinary=gpg_binary())


def gpg_command(home: Path, *args: str) -> list[str]:
    """Return a gpg command line for the existing GnuPG home `home`, ignoring gpg.conf.

    Ignoring gpg.conf keeps its encrypt-to or default-recipient options from
    adding recipients to a backup.
    """
    # open_home recreates the agent's socket folder, which stop_agent removes.
    home = open_home(home)
    return [
        gpg_binary(),
        "--homedir",
        str(home),
        "--no-options",
        "--batch",
        "--no-tty",
        *args,
    ]


@contextmanager
def passphrase_fd(passphrase: str) -> Iterator[int]:
    """Yield the read end of a pipe that contains `passphrase`, for --passphrase-fd."""
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, passphrase.encode("utf-8") + b"\n")
    finally:
        os.close(write_fd)
    try:
        yield read_fd
    finally:
        os.close(read_fd)


def widen_pipe(stream: IO[bytes]) -> None:
    """Grow a pipe to 1 MiB so gpg and the Python side wait less for each other."""
    # fcntl.F_SETPIPE_SZ exists on Linux only.
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is None:
        return
    try:
        fcntl.fcntl(stream.fileno(), set_size, PIPE_BYTES)
    except OSError:
        logger.debug("could not grow the pipe to gpg; keeping the default size")


def raise_for_gpg(action: str, stderr: str, returncode: int | None, home: Path) -> None:
    """Raise AgentError when gpg could not reach its agent, else ToolError."""
    tail = "\n".join(stderr.strip().splitlines()[-5:])
    if any(marker in stderr for marker in _AGENT_FAILURES):
        raise AgentError(
            f"gpg-agent did not start for GnuPG home {home} while trying to "
            f"{action}; check its gpg-agent.conf and run 'gpgconf --homedir {home} "
            "--launch gpg-agent' to see why.",
            tool="gpg-agent",
            returncode=returncode,
            stderr_tail=tail,
        )
    raise ToolError(
        f"gpg failed to {action} in GnuPG home {home} (exit status {returncode}); "
        "see the error output attached to this exception.",
        tool="gpg",
        returncode=returncode,
        stderr_tail=tail,
    )


def stop_agent(home: Path) -> None:
    """Stop the gpg-agent of `home`, if one runs, because it caches passphrases."""
    gpgconf = shutil.which("gpgconf")
    if gpgconf is None or not Path(home).is_dir():
        return
    home = open_home(home)
    subprocess.run(
        [gpgconf, "--homedir", str(home), "--kill", "gpg-agent"],
        capture_output=True,
        check=False,
    )
    try:
        _socket_dir(home).rmdir()
    except OSError:
        logger.debug("socket folder of %s is still in use", home)

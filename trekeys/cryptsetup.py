"""Run cryptsetup and e2fsprogs with secrets kept out of argv.

Every secret reaches cryptsetup through standard input (``--key-file=-``) or
through a 0600 file in a private 0700 folder that is overwritten and removed
as soon as the call returns. `ARGV_OBSERVERS` lets tests see the argv of
every call, so that they can check that no secret ever appears in it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from trekeys.errors import (
    CredentialError,
    NotLuksError,
    ToolError,
    ToolMissingError,
)

logger = logging.getLogger(__name__)

# Called with the argv of every external command before it runs.
ARGV_OBSERVERS: list[Callable[[list[str]], None]] = []

_PACKAGES = {
    "cryptsetup": "cryptsetup-bin",
    "mke2fs": "e2fsprogs",
    "debugfs": "e2fsprogs",
}


@dataclass(frozen=True)
class KdfSettings:
    """The keyslot key derivation passed to cryptsetup.

    Attributes:
        pbkdf: ``argon2id`` or ``pbkdf2``.
        iterations: a fixed iteration count, or None to let cryptsetup
            benchmark this host (its default, about 2 seconds of work).
        test_strength: True for weak settings that only tests and the demo
            TRE may use.
    """

    pbkdf: str = "argon2id"
    iterations: int | None = None
    test_strength: bool = False

    @classmethod
    def production(cls) -> KdfSettings:
        """Argon2id with cryptsetup's benchmarked costs (its strong default)."""
        return cls()

    @classmethod
    def test(cls) -> KdfSettings:
        """PBKDF2 with 1000 iterations: fast, for tests and the demo TRE only."""
        return cls("pbkdf2", 1000, test_strength=True)

    def arguments(self) -> list[str]:
        """Return the cryptsetup options that select these settings."""
        args = ["--pbkdf", self.pbkdf]
        if self.iterations is not None:
            args += ["--pbkdf-force-iterations", str(self.iterations)]
        return args

    def describe(self) -> str:
        """Return a one-line summary for reports."""
        cost = (
            f"{self.iterations} iterations"
            if self.iterations is not None
            else "costs benchmarked by cryptsetup"
        )
        prefix = "test-strength " if self.test_strength else ""
        return f"{prefix}{self.pbkdf}, {cost}"


def find_tool(name: str) -> str:
    """Return the path of `name` on PATH.

    Raises:
        ToolMissingError: it is not installed or not on PATH.
    """
    found = shutil.which(name)
    if found is None:
        raise ToolMissingError(name, _PACKAGES.get(name, name))
    return found


@contextlib.contextmanager
def secret_file(secret: bytes) -> Iterator[Path]:
    """Hold `secret` in a 0600 file in a private folder while the block runs.

    The file is overwritten with zeros and removed when the block ends, also
    when it raises.
    """
    folder = Path(tempfile.mkdtemp(prefix="trekeys-"))
    path = folder / "secret"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secret)
        yield path
    finally:
        if path.exists():
            with path.open("r+b") as handle:
                handle.write(bytes(len(secret)))
            path.unlink()
        folder.rmdir()


def run_tool(
    name: str,
    args: list[str],
    *,
    stdin: bytes | None = None,
    device: Path | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run `name` with `args`, passing any secret on standard input only.

    Raises:
        ToolMissingError: the tool is not installed.
        CredentialError: cryptsetup found no keyslot that the key unlocks.
        NotLuksError: cryptsetup found no LUKS header on `device`.
        ToolError: the tool failed for another reason.
    """
    argv = [find_tool(name), *args]
    for observer in ARGV_OBSERVERS:
        observer(list(argv))
    logger.debug("running %s", " ".join(argv))
    result = subprocess.run(
        argv,
        input=stdin if stdin is not None else b"",
        capture_output=True,
        check=False,
        env={**os.environ, "LC_ALL": "C"},
    )
    if check and result.returncode != 0:
        raise _tool_error(name, args, result, device)
    return result


def _tool_error(
    name: str,
    args: list[str],
    result: subprocess.CompletedProcess[bytes],
    device: Path | None,
) -> Exception:
    stderr = result.stderr.decode("utf-8", "replace")
    tail = "\n".join(stderr.strip().splitlines()[-3:])
    target = device or "the device"
    unlocked_nothing = "No key available" in stderr or "No usable keyslot" in stderr
    if name == "cryptsetup" and unlocked_nothing:
        return CredentialError(
            f"the key does not unlock any keyslot of LUKS volume {target}; check "
            "that the escrowed key belongs to this volume."
        )
    if name == "cryptsetup" and re.search(r"not a valid LUKS device", stderr):
        return NotLuksError(
            f"{target} contains no LUKS header; check the path or restore the header "
            "from a verified backup."
        )
    command = args[0] if args else ""
    return ToolError(
        f"{name} {command} failed on {target} with status {result.returncode}: "
        f"{tail or 'no message'}",
        tool=name,
        returncode=result.returncode,
        stderr_tail=tail,
    )

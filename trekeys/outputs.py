"""Outputs that appear whole or not at all.

Every file trekeys writes goes first to a hidden temporary file in the
destination folder and is moved into place only when complete. A failure or
an interruption therefore leaves no half-written file under the real name,
and existing data is replaced only when the caller requests it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from trekeys.errors import DestinationExistsError

PARTIAL_SUFFIX = ".trekeys-partial"


@contextlib.contextmanager
def staged_path(dest: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield the path of a new hidden 0600 file that becomes `dest` on success.

    The caller, or a tool it runs, fills the file. When the block succeeds
    the file is flushed to disk and moved into place: without `overwrite` it
    is linked, which fails rather than replace a file that appeared
    meanwhile. On any exception the file is removed and `dest` is left as it
    was.

    Raises:
        DestinationExistsError: `dest` exists and `overwrite` is false.
    """
    dest = Path(dest)
    if (dest.exists() and not overwrite) or dest.is_dir():
        raise DestinationExistsError(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        yield tmp
        _fsync_file(tmp)
        publish(tmp, dest, overwrite=overwrite)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_output(dest: Path, *, overwrite: bool = False) -> Iterator[IO[bytes]]:
    """Yield an open binary file that becomes `dest` when the block succeeds.

    Raises:
        DestinationExistsError: `dest` exists and `overwrite` is false.
    """
    with staged_path(dest, overwrite=overwrite) as tmp, open(tmp, "wb") as handle:
        yield handle


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, dest: Path, *, overwrite: bool) -> None:
    """Move a finished temporary file to `dest`, never replacing it unless asked."""
    if overwrite:
        os.replace(tmp, dest)
        return
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise DestinationExistsError(dest) from None
    tmp.unlink()


def new_scratch_dir(parent: Path, prefix: str) -> Path:
    """Create a new private folder under `parent` for one drill run's outputs."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=parent))


def file_digest(path: Path) -> str:
    """Return the SHA-256 of a file's content in hex, reading it in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()

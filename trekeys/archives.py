"""Folders as tar archives inside OpenPGP messages.

A folder is streamed into gpg as a PAX tar archive. On decryption the
archive is written to a private staging folder, and only after gpg has
checked its integrity is it extracted and the one folder it contains moved
to the destination.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from trekeys.errors import DestinationExistsError, PolicyError
from trekeys.outputs import staged_path

FOLDER_SUFFIX = ".tar.gpg"


def tar_writer(folder: Path) -> Callable[[IO[bytes]], None]:
    """Return a function that streams `folder` as a PAX tar archive into a pipe."""

    def write(pipe: IO[bytes]) -> None:
        with tarfile.open(fileobj=pipe, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.add(folder, arcname=folder.name)

    return write


def write_plaintext(
    source: Path,
    dest: Path,
    run: Callable[[Path], None],
    *,
    overwrite: bool,
) -> Path:
    """Run `run` on a staged path and move the plaintext, or its folder, to `dest`.

    `run` decrypts `source` into the path it gets and raises when gpg's
    integrity check fails. A ``.tar.gpg`` source is extracted as a folder.

    Raises:
        DestinationExistsError: `dest` exists (for a folder, even with `overwrite`).
        PolicyError: the archive is unsafe or is not one folder.
    """
    if not source.name.endswith(FOLDER_SUFFIX):
        with staged_path(dest, overwrite=overwrite) as out:
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
        run(archive)
        _extract_single_folder(archive, staging / "tree", dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _extract_single_folder(archive: Path, tree: Path, dest: Path) -> None:
    try:
        with tarfile.open(archive, "r:") as tar:
            # The "data" filter rejects links out of the tree, paths that climb
            # out of it and device files, and strips leading slashes (Python
            # 3.11.4 and later).
            tar.extractall(tree, filter="data")
    except tarfile.TarError as exc:
        raise PolicyError(
            f"the decrypted archive is not a tar archive or has an entry that is "
            f"unsafe to extract ({exc}); decrypt it with gpg and inspect it."
        ) from exc

    entries = list(tree.iterdir()) if tree.is_dir() else []
    if len(entries) != 1 or not entries[0].is_dir():
        raise PolicyError(
            f"the decrypted archive contains {len(entries)} top-level entries, not "
            "one folder; decrypt it with gpg and inspect it."
        )
    os.rename(entries[0], dest)

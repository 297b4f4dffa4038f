"""Extract a tar stream into a folder, hashing every file as it is written.

Restores read the tar stream straight from gpg's output. Files are written by
a second thread (`FileWriter`) fed through a queue of at most
`QUEUE_CHUNKS` chunks, so disk writes overlap with decryption while memory
stays bounded. Member names are checked so that nothing lands outside the
target folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from trekeys.archive import INNER_MANIFEST
from trekeys.errors import IntegrityError, RestoreWriteError

logger = logging.getLogger(__name__)

CHUNK = 1 << 18
QUEUE_CHUNKS = 16

# Takes the bytes of an authorized_keys file and returns the bytes to write
# and a description of each line it removed.
AuthorizedKeysFilter = Callable[[bytes], tuple[bytes, list[str]]]


@dataclass
class Extracted:
    """The result of an extraction: each file's size and SHA-256, and the manifest."""

    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    filtered: set[str] = field(default_factory=set)
    removed_ssh_keys: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    manifest_sha256: str = ""


class FileWriter:
    """Hash and write files in a second thread, fed through a bounded queue.

    Hashing here rather than in the thread that parses the tar stream spreads
    the work over two cores; hashlib and os.write release the GIL.

    Attributes:
        files: each finished file's name, mapped to its size and SHA-256.
    """

    def __init__(self) -> None:
        self.files: dict[str, tuple[int, str]] = {}
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue(QUEUE_CHUNKS)
        self._error: OSError | None = None
        self._finished = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def open(self, path: Path, name: str, member: tarfile.TarInfo) -> None:
        self._put(("open", (path, name, member)))

    def write(
        self, data: bytes, *, hash_only: bool = False, write_only: bool = False
    ) -> None:
        """Queue `data` to be hashed and written, or only one of the two."""
        self._put(("data", (data, not write_only, not hash_only)))

    def close_file(self) -> None:
        self._put(("close", None))

    def finish(self) -> None:
        """Wait for every queued write; raise RestoreWriteError if one failed."""
        if not self._finished:
            self._finished = True
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise RestoreWriteError(
                f"writing the restored files failed ({self._error}); free space "
                "or choose another target, then restore again."
            ) from self._error

    def _put(self, item: tuple[str, Any]) -> None:
        if self._error is not None:
            self.finish()
        self._queue.put(item)

    def _run(self) -> None:
        fd, path, name, member = -1, Path(), "", tarfile.TarInfo()
        digest = hashlib.sha256()
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            kind, value = item
            try:
                if kind == "open":
                    path, name, member = value
                    digest = hashlib.sha256()
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                    fd = os.open(path, flags, member.mode & 0o777)
                elif kind == "data":
                    data, hash_it, write_it = value
                    if hash_it:
                        digest.update(data)
                    view = memoryview(data) if write_it else memoryview(b"")
                    while view:
                        view = view[os.write(fd, view) :]
                else:
                    os.close(fd)
                    fd = -1
                    os.utime(path, (member.mtime, member.mtime))
                    self.files[name] = (member.size, digest.hexdigest())
            except OSError as exc:
                self._error = exc
        if fd >= 0:
            os.close(fd)


def extract_stream(
    stream: IO[bytes],
    staging: Path,
    user: str | None,
    keys_filter: AuthorizedKeysFilter | None,
    extracted: Extracted,
) -> None:
    """Extract a tar stream into `staging`, only `user`'s folder when given.

    Raises:
        IntegrityError: a member name leaves `staging` or has no data.
        RestoreWriteError: a file could not be written.
    """
    writer = FileWriter()
    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK) as tar:
            for member in tar:
                _extract_member(
                    tar, member, staging, user, keys_filter, extracted, writer
                )
    except BaseException:
        try:
            writer.finish()
        except RestoreWriteError:
            logger.debug("a write failed as well while the extraction failed")
        raise
    writer.finish()
    extracted.files.update(writer.files)


def _extract_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    staging: Path,
    user: str | None,
    keys_filter: AuthorizedKeysFilter | None,
    extracted: Extracted,
    writer: FileWriter,
) -> None:
    name = checked_name(member.name)
    if name == INNER_MANIFEST:
        data = read_member(tar, member)
        extracted.manifest = json.loads(data)
        extracted.manifest_sha256 = hashlib.sha256(data).hexdigest()
        return
    if user and PurePosixPath(name).parts[0] != user:
        return

    destination = staging / name
    if member.isdir():
        destination.mkdir(mode=0o700, parents=True, exist_ok=True)
    elif member.isfile():
        _write_member(tar, member, destination, name, keys_filter, extracted, writer)
    elif member.issym():
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(member.linkname, destination)


def checked_name(name: str) -> str:
    """Return a member name, or raise IntegrityError when it leaves the target."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise IntegrityError(
            f"backup member {name!r} points outside the restore folder; the "
            "archive is not a trekeys backup, so do not restore it."
        )
    return path.as_posix()


def read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    """Return the data of a small member of a tar stream."""
    handle = tar.extractfile(member)
    if handle is None:
        raise IntegrityError(f"backup member {member.name} has no data.")
    return handle.read()


def _write_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    destination: Path,
    name: str,
    keys_filter: AuthorizedKeysFilter | None,
    extracted: Extracted,
    writer: FileWriter,
) -> None:
    destination.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if destination.parent.resolve() != destination.parent.absolute():
        raise IntegrityError(
            f"backup member {name} passes through a symbolic link; the archive "
            "is not a trekeys backup, so do not restore it."
        )
    source = tar.extractfile(member)
    if source is None:
        raise IntegrityError(f"backup member {name} has no data.")

    # The digest covers the bytes as backed up, so the manifest check also
    # passes for an authorized_keys file whose revoked keys are left out.
    writer.open(destination, name, member)
    if keys_filter is not None and name.endswith(".ssh/authorized_keys"):
        data = source.read()
        kept, removed = keys_filter(data)
        writer.write(data, hash_only=True)
        writer.write(kept, write_only=True)
        if removed:
            extracted.filtered.add(name)
            extracted.removed_ssh_keys.extend(f"{name}: {r}" for r in removed)
    else:
        while chunk := source.read(CHUNK):
            writer.write(chunk)
    writer.close_file()

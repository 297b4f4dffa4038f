"""Stream a home folder as a tar archive into gpg, with a manifest of every file.

The tar stream is written by Python's tarfile into gpg's stdin while each file
is hashed, and ends with a manifest member (`INNER_MANIFEST`) that lists every
file's path, size, mode and SHA-256. Memory stays bounded whatever the size
of the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

from trekeys import gpgtool
from trekeys.records import utcnow

logger = logging.getLogger(__name__)

CHUNK = 1 << 20
INNER_MANIFEST = ".trekeys-manifest.json"


def write_encrypted_archive(
    source: Path, output: Path, subkeys: list[str], home: Path
) -> dict[str, Any]:
    """Stream a tar of `source` into gpg, encrypting to `subkeys`, into `output`.

    Memory stays bounded: files are read in 1 MiB chunks and the tar stream
    goes through a pipe. Each subkey is given with a '!' so that gpg uses
    exactly that subkey, and ``--trust-model always`` because the caller has
    checked the keys itself.

    Returns:
        Manifest fields: file_count, total_bytes, manifest_sha256.
    """
    recipient_args = [arg for key in subkeys for arg in ("--recipient", key + "!")]
    command = gpgtool.gpg_command(
        gpgtool.open_home(home),
        "--trust-model",
        "always",
        "--no-encrypt-to",
        "--output",
        str(output),
        *recipient_args,
        "--encrypt",
    )
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=errors)
        stdin = cast(IO[bytes], process.stdin)
        gpgtool.widen_pipe(stdin)
        entries: list[dict[str, Any]] = []
        try:
            entries = _write_tar(source, stdin)
            stdin.close()
        except BrokenPipeError:
            logger.debug("gpg closed its input early while encrypting %s", source)
        finally:
            returncode = process.wait()
        if returncode != 0 or not entries:
            errors.seek(0)
            gpgtool.raise_for_gpg(
                f"encrypt the backup of {source}",
                errors.read().decode(errors="replace"),
                returncode,
                home,
            )

    files = [e for e in entries[:-1] if e["type"] == "file"]
    return {
        "file_count": len(files),
        "total_bytes": sum(e["size"] for e in files),
        "manifest_sha256": entries[-1]["sha256"],
    }


def _write_tar(source: Path, stream: IO[bytes]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    # Mode "w" on a counting wrapper, not the stream mode "w|": the stream
    # mode's buffer grows by concatenating bytes, which copies each 1 MiB
    # buffer once per 16 KiB written.
    with tarfile.TarFile(
        fileobj=cast(IO[bytes], _CountingWriter(stream)),
        mode="w",
        format=tarfile.PAX_FORMAT,
        copybufsize=CHUNK,
    ) as tar:
        for path in _walk(source):
            arcname = path.relative_to(source).as_posix()
            info = tar.gettarinfo(str(path), arcname)
            if info.isfile():
                with open(path, "rb") as handle:
                    reader = _HashingReader(handle)
                    tar.addfile(info, reader)
                entries.append(
                    {
                        "path": arcname,
                        "type": "file",
                        "size": info.size,
                        "sha256": reader.hexdigest(),
                        "mode": f"{info.mode:o}",
                    }
                )
            elif info.isdir() or info.issym():
                tar.addfile(info)
                kind = "dir" if info.isdir() else "symlink"
                entries.append({"path": arcname, "type": kind, "target": info.linkname})

        manifest = json.dumps({"files": entries}, indent=1, sort_keys=True).encode()
        info = tarfile.TarInfo(INNER_MANIFEST)
        info.size = len(manifest)
        info.mtime = int(utcnow().timestamp())
        tar.addfile(info, _HashingReader(_BytesReader(manifest)))
    entries.append(
        {"path": INNER_MANIFEST, "sha256": hashlib.sha256(manifest).hexdigest()}
    )
    return entries


def _walk(source: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(source):
        dirs.sort()
        base = Path(root)
        for name in dirs:
            yield base / name
        for name in sorted(files):
            yield base / name


class _CountingWriter:
    """A write-only pipe wrapper whose tell() counts the bytes written, for tarfile."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._offset = 0

    def write(self, data: bytes) -> int:
        self._stream.write(data)
        self._offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self._offset


class _HashingReader:
    """A file wrapper that hashes what tarfile reads from it."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self._hash.update(data)
        return bytes(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._offset = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._offset + size
        chunk = self._data[self._offset : end]
        self._offset += len(chunk)
        return bytes(chunk)


def file_sha256(path: Path) -> str:
    """Return the SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temporary name, fsync it and rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)

"""Read a tar stream member by member, handing out file data without extra copies.

Python's tarfile in stream mode copies each byte up to three times on its way
to the caller: CPython 3.11's `_Stream.__read` joins and slices its read
buffer, and `_FileInFile.readinto` copies the result into the file object's
buffer. `TarStream` reads the 512-byte headers itself, lets
`tarfile.TarInfo.frombuf` check them, applies the pax extended headers that
tarfile writes (path, linkpath, size, mtime), and returns file data as the
bytes objects read from the pipe, so each byte is copied once.

Only what trekeys backups contain is read: regular files, folders, symbolic
links and pax headers. GNU long-name members and sparse files raise
`tarfile.ReadError`, and other member types are skipped with their data. A
short stream raises `tarfile.ReadError`, like tarfile does.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import IO

BLOCK = tarfile.BLOCKSIZE
ENCODING = "utf-8"
REJECTED_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.GNUTYPE_SPARSE,
)


class TarStream:
    """Iterate over the members of a tar stream read from `stream`.

    Read each member's data with `chunks` or `read_all` before requesting the
    next member. Data left unread is skipped.
    """

    def __init__(self, stream: IO[bytes], chunk: int) -> None:
        self._stream = stream
        self._chunk = chunk
        self._left = 0
        self._padding = 0

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        while (member := self._next()) is not None:
            yield member

    def chunks(self) -> Iterator[bytes]:
        """Yield the current member's data in pieces of at most `chunk` bytes."""
        while self._left:
            data = self._read(min(self._left, self._chunk))
            self._left -= len(data)
            yield data
        if self._padding:
            self._read(self._padding)
            self._padding = 0

    def read_all(self) -> bytes:
        """Return the whole data of the current member; use it for small members."""
        return b"".join(self.chunks())

    def _next(self) -> tarfile.TarInfo | None:
        for _ in self.chunks():
            pass
        pax: dict[str, str] = {}
        while True:
            block = self._read(BLOCK)
            if block == bytes(BLOCK):
                return None
            try:
                member = tarfile.TarInfo.frombuf(block, ENCODING, "surrogateescape")
            except tarfile.HeaderError as exc:
                raise tarfile.ReadError(f"invalid tar header ({exc})") from exc
            if member.type in REJECTED_TYPES:
                raise tarfile.ReadError(
                    f"tar member type {member.type!r} is not supported in a backup"
                )
            self._start_data(member.size)
            if member.type == tarfile.XHDTYPE:
                pax.update(_parse_pax(self.read_all()))
            elif member.type == tarfile.XGLTYPE:
                self.read_all()
            else:
                _apply_pax(member, pax)
                self._start_data(member.size)
                if member.isfile() or member.isdir() or member.issym():
                    return member
                self.read_all()

    def _start_data(self, size: int) -> None:
        self._left = size
        self._padding = -size % BLOCK

    def _read(self, size: int) -> bytes:
        data = self._stream.read(size)
        if len(data) != size:
            raise tarfile.ReadError("unexpected end of the tar stream")
        return data


def _parse_pax(data: bytes) -> dict[str, str]:
    """Parse pax records, each ``LENGTH KEY=VALUE\\n``."""
    records: dict[str, str] = {}
    position = 0
    while position < len(data):
        space = data.find(b" ", position)
        if space < 0 or not data[position:space].isdigit():
            raise tarfile.ReadError("invalid pax header record")
        end = position + int(data[position:space])
        record = data[space + 1 : end]
        if end > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise tarfile.ReadError("invalid pax header record")
        key, value = record[:-1].split(b"=", 1)
        records[key.decode(ENCODING)] = value.decode(ENCODING, "surrogateescape")
        position = end
    return records


def _apply_pax(member: tarfile.TarInfo, pax: dict[str, str]) -> None:
    try:
        if "path" in pax:
            member.name = pax["path"]
        if "linkpath" in pax:
            member.linkname = pax["linkpath"]
        if "size" in pax:
            member.size = int(pax["size"])
        if "mtime" in pax:
            member.mtime = float(pax["mtime"])
    except ValueError as exc:
        raise tarfile.ReadError(f"invalid pax header value ({exc})") from exc
    if member.size < 0:
        raise tarfile.ReadError("negative member size in a pax header")

"""TarStream reads what tarfile writes and rejects damaged or unsupported streams."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from trekeys.tarstream import TarStream


def _archive(members: list[tuple[tarfile.TarInfo, bytes]], **options: object) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", **options) as tar:  # type: ignore[call-overload]
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buffer.getvalue()


def _member(
    name: str, kind: bytes = tarfile.REGTYPE, **fields: object
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for field, value in fields.items():
        setattr(info, field, value)
    return info


def _read(data: bytes, chunk: int = 1000) -> list[tuple[tarfile.TarInfo, bytes]]:
    tar = TarStream(io.BytesIO(data), chunk)
    return [(member, tar.read_all()) for member in tar]


def test_reads_pax_members_like_tarfile() -> None:
    long_name = "user0/" + "deep/" * 30 + "notes-ü.txt"
    big = os.urandom(5000)
    data = _archive(
        [
            (_member("user0", tarfile.DIRTYPE, mode=0o700), b""),
            (_member(long_name, mtime=1700000000.5, mode=0o640), big),
            (_member("user0/empty"), b""),
            (_member("user0/link", tarfile.SYMTYPE, linkname="notes"), b""),
        ],
        format=tarfile.PAX_FORMAT,
    )

    read = _read(data)

    assert [m.name for m, _ in read] == [
        "user0",
        long_name,
        "user0/empty",
        "user0/link",
    ]
    assert read[0][0].isdir()
    assert read[1][1] == big
    assert read[1][0].size == 5000
    assert read[1][0].mtime == 1700000000.5
    assert read[1][0].mode == 0o640
    assert read[2][1] == b""
    assert read[3][0].issym()
    assert read[3][0].linkname == "notes"


def test_chunks_are_at_most_chunk_bytes() -> None:
    data = _archive([(_member("a"), b"x" * 2500), (_member("b"), b"y" * 7)])
    tar = TarStream(io.BytesIO(data), 1000)

    sizes = {member.name: [len(c) for c in tar.chunks()] for member in tar}

    assert sizes == {"a": [1000, 1000, 500], "b": [7]}


def test_unread_data_and_other_types_are_skipped() -> None:
    data = _archive(
        [
            (_member("a"), b"first" * 300),
            (_member("hard", tarfile.LNKTYPE, linkname="a"), b""),
            (_member("fifo", tarfile.FIFOTYPE), b""),
            (_member("b"), b"second"),
        ],
        format=tarfile.GNU_FORMAT,
    )
    tar = TarStream(io.BytesIO(data), 1000)

    names = [member.name for member in tar]

    assert names == ["a", "b"]


def test_truncated_stream_raises() -> None:
    data = _archive([(_member("a"), os.urandom(3000))])

    with pytest.raises(tarfile.ReadError, match="unexpected end"):
        _read(data[:2048])


def test_corrupted_header_raises() -> None:
    data = bytearray(_archive([(_member("a"), b"data")]))
    data[0] ^= 0x01

    with pytest.raises(tarfile.ReadError, match="invalid tar header"):
        _read(bytes(data))


def test_gnu_long_name_raises() -> None:
    data = _archive([(_member("x" * 150), b"data")], format=tarfile.GNU_FORMAT)

    with pytest.raises(tarfile.ReadError, match="not supported"):
        _read(data)


def test_invalid_pax_record_raises() -> None:
    data = bytearray(_archive([(_member("é"), b"data")], format=tarfile.PAX_FORMAT))
    record = data.index(b"path=")
    data[record - 3 : record - 1] = b"99"
    header = tarfile.TarInfo.frombuf(bytes(data[:512]), "utf-8", "strict")
    assert header.type == tarfile.XHDTYPE

    with pytest.raises(tarfile.ReadError, match="invalid pax header record"):
        _read(bytes(data))

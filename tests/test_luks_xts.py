"""User-space AES-XTS against the cryptography package and real cryptsetup volumes."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from trekeys.cryptsetup import KdfSettings
from trekeys.errors import IntegrityError
from trekeys.luks2meta import read_header
from trekeys.luks_device import (
    SMALL_KEYSLOTS_BYTES,
    build_ext4_image,
    dump_volume_key,
    encrypt_in_place,
    reduce_size,
)
from trekeys.luks_recovery import decrypt_segment
from trekeys.xts import XtsDecryptor, decrypt_stream


def encrypt_reference(key: bytes, plain: bytes, sector_size: int, ivs: list[int]):
    """Encrypt sector by sector with cryptography's XTS, one tweak per sector."""
    out = b""
    for index, iv in enumerate(ivs):
        encryptor = Cipher(
            algorithms.AES(key), modes.XTS(iv.to_bytes(16, "little"))
        ).encryptor()
        sector = plain[index * sector_size : (index + 1) * sector_size]
        out += encryptor.update(sector) + encryptor.finalize()
    return out


@pytest.mark.parametrize("key_bytes", [32, 64])
@pytest.mark.parametrize("sector_size", [512, 1024, 4096])
def test_xts_matches_cryptography(key_bytes: int, sector_size: int) -> None:
    key = os.urandom(key_bytes)
    first = 1_000_003
    count = 9
    plain = os.urandom(sector_size * count)
    unit = sector_size // 512
    ivs = [(first + n) * unit + 7 for n in range(count)]
    cipher = encrypt_reference(key, plain, sector_size, ivs)

    decryptor = XtsDecryptor(key, sector_size, iv_offset=7, chunk_bytes=2 * sector_size)

    assert decryptor.decrypt(cipher, first) == plain


def test_xts_large_iv_counts_whole_sectors() -> None:
    key = os.urandom(64)
    plain = os.urandom(4096 * 3)
    cipher = encrypt_reference(key, plain, 4096, [40, 41, 42])

    assert XtsDecryptor(key, 4096, large_iv=True).decrypt(cipher, 40) == plain


def test_xts_high_sector_numbers() -> None:
    key = os.urandom(64)
    first = 2**60 - 3
    plain = os.urandom(512 * 5)
    cipher = encrypt_reference(key, plain, 512, [first + n for n in range(5)])

    assert XtsDecryptor(key, 512).decrypt(cipher, first) == plain


def test_xts_plain_truncates_to_32_bits() -> None:
    key = os.urandom(64)
    first = 2**32 - 2
    plain = os.urandom(512 * 4)
    ivs = [(first + n) % 2**32 for n in range(4)]
    cipher = encrypt_reference(key, plain, 512, ivs)

    assert XtsDecryptor(key, 512, iv_scheme="plain").decrypt(cipher, first) == plain


def test_xts_wrong_key_gives_other_bytes() -> None:
    key = os.urandom(64)
    plain = os.urandom(4096)
    cipher = encrypt_reference(key, plain, 4096, [0])

    assert XtsDecryptor(os.urandom(64), 4096).decrypt(cipher, 0) != plain


@pytest.mark.parametrize(
    ("key", "sector_size", "scheme", "message"),
    [
        (bytes(48), 512, "plain64", "256 or 512 bits"),
        (bytes(64), 300, "plain64", "sector size 300"),
        (bytes(64), 512, "essiv:sha256", "not supported in user space"),
    ],
)
def test_xts_rejects_bad_parameters(
    key: bytes, sector_size: int, scheme: str, message: str
) -> None:
    with pytest.raises(IntegrityError, match=message):
        XtsDecryptor(key, sector_size, iv_scheme=scheme)


def test_xts_rejects_partial_sector() -> None:
    with pytest.raises(IntegrityError, match="whole number of 512-byte sectors"):
        XtsDecryptor(bytes(64), 512).decrypt(bytes(700), 0)


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_decrypts_cryptsetup_volume(tmp_path: Path, sector_size: int) -> None:
    source = tmp_path / "files"
    source.mkdir()
    (source / "data.bin").write_bytes(os.urandom(300_000))
    image = tmp_path / "volume.img"
    build_ext4_image(source, image, 4 * 1024 * 1024, reduce_size(SMALL_KEYSLOTS_BYTES))
    with image.open("rb") as handle:
        original = handle.read(4 * 1024 * 1024)
    key = b"a test passphrase"

    encrypt_in_place(
        image,
        key,
        kdf=KdfSettings.test(),
        sector_size=sector_size,
        keyslots_bytes=SMALL_KEYSLOTS_BYTES,
    )
    segment = read_header(image).data_segment()
    decrypted = tmp_path / "decrypted.img"
    decrypt_segment(image, dump_volume_key(image, key), segment, decrypted)

    assert segment.sector_size == sector_size
    assert decrypted.read_bytes()[: len(original)] == original
    assert decrypted.stat().st_mode & 0o777 == 0o600
    listing = subprocess.run(
        ["debugfs", "-R", "ls -l /", str(decrypted)], capture_output=True, text=True
    )
    assert "data.bin" in listing.stdout


@pytest.mark.parametrize("workers", [1, 3])
def test_stream_matches_one_call(workers: int) -> None:
    key = os.urandom(64)
    data = os.urandom(512 * 1000)
    expected = XtsDecryptor(key, 512).decrypt(data, 77)
    target = io.BytesIO()

    written = decrypt_stream(
        io.BytesIO(data),
        target,
        XtsDecryptor(key, 512, chunk_bytes=512 * 64),
        length=len(data),
        first_sector=77,
        chunk_bytes=512 * 64,
        workers=workers,
    )

    assert written == len(data)
    assert target.getvalue() == expected


def test_stream_rejects_truncated_source() -> None:
    with pytest.raises(IntegrityError, match="it is truncated"):
        decrypt_stream(
            io.BytesIO(bytes(4096)),
            io.BytesIO(),
            XtsDecryptor(bytes(64), 4096),
            length=8192,
        )

"""User-space AES-XTS against the cryptography package and real cryptsetup volumes."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from trekeys import xts_native
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
from trekeys.xts import BACKENDS, XtsDecryptor, decrypt_stream


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key_bytes", [32, 64])
@pytest.mark.parametrize("sector_size", [512, 1024, 2048, 4096])
@pytest.mark.parametrize(
    ("iv_offset", "large_iv", "scheme"),
    [
        (0, False, "plain64"),
        (13, False, "plain64"),
        (5, True, "plain64"),
        (2**32 - 3, False, "plain"),
    ],
)
def test_backends_match_cryptography(
    backend: str,
    key_bytes: int,
    sector_size: int,
    iv_offset: int,
    large_iv: bool,
    scheme: str,
) -> None:
    key = os.urandom(key_bytes)
    first = 2**32 // (sector_size // 512) - 2
    count = 6
    plain = os.urandom(sector_size * count)
    unit = 1 if large_iv else sector_size // 512
    ivs = [(first + n) * unit + iv_offset for n in range(count)]
    if scheme == "plain":
        ivs = [iv % 2**32 for iv in ivs]
    cipher = encrypt_reference(key, plain, sector_size, ivs)

    decryptor = XtsDecryptor(
        key,
        sector_size,
        iv_scheme=scheme,
        iv_offset=iv_offset,
        large_iv=large_iv,
        chunk_bytes=4 * sector_size,
        backend=backend,
    )

    assert decryptor.backend == backend
    assert decryptor.decrypt(cipher, first) == plain
    assert (
        decryptor.clone().decrypt(cipher[sector_size:], first + 1)
        == plain[sector_size:]
    )


def test_default_backend_is_openssl() -> None:
    assert xts_native.load() is not None
    assert XtsDecryptor(bytes(range(64)), 4096).backend == "openssl"


def test_numpy_fallback_without_compiler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    xts_native.load.cache_clear()
    key = os.urandom(64)
    plain = os.urandom(512 * 3)
    cipher = encrypt_reference(key, plain, 512, [9, 10, 11])
    try:
        with caplog.at_level(logging.WARNING, logger="trekeys.xts_native"):
            decryptor = XtsDecryptor(key, 512)
        with pytest.raises(IntegrityError, match="could not be built"):
            XtsDecryptor(key, 512, backend="openssl")
    finally:
        xts_native.load.cache_clear()

    assert decryptor.backend == "numpy"
    assert decryptor.decrypt(cipher, 9) == plain
    assert "using the slower numpy path" in caplog.text
    assert not list((tmp_path / "cache" / "trekeys").glob("*/*.so"))


def test_concurrent_builds_share_one_library(tmp_path: Path) -> None:
    # Two processes start on an empty cache at once. The lock makes the second
    # wait and reuse the first one's build instead of compiling into it.
    environment = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    script = (
        "import logging; logging.basicConfig(level=logging.INFO); "
        "from trekeys import xts_native; print(xts_native.load().__file__)"
    )
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [child.communicate(timeout=120) for child in children]

    assert [child.returncode for child in children] == [0, 0], outputs
    paths = {stdout.strip() for stdout, _ in outputs}
    assert len(paths) == 1
    libraries = list((tmp_path / "trekeys").glob("xts-*/*.so"))
    assert [str(library) for library in libraries] == list(paths)
    assert not list((tmp_path / "trekeys").glob("xts-*/build-*"))
    assert sum("built the compiled" in stderr for _, stderr in outputs) == 1


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


def test_xts_rejects_unknown_backend() -> None:
    with pytest.raises(IntegrityError, match="backend 'aesni' is unknown"):
        XtsDecryptor(bytes(64), 512, backend="aesni")


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
    volume_key = dump_volume_key(image, key)
    with image.open("rb") as handle:
        handle.seek(segment.offset)
        ciphertext = handle.read(len(original))
    for backend in BACKENDS:
        decryptor = XtsDecryptor(
            volume_key, sector_size, iv_offset=segment.iv_tweak, backend=backend
        )
        assert decryptor.decrypt(ciphertext, 0) == original, backend
    assert decrypted.stat().st_mode & 0o777 == 0o600
    listing = subprocess.run(
        ["debugfs", "-R", "ls -l /", str(decrypted)], capture_output=True, text=True
    )
    assert "data.bin" in listing.stdout


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("workers", [1, 3])
def test_stream_matches_one_call(workers: int, backend: str) -> None:
    key = os.urandom(64)
    data = os.urandom(512 * 1000)
    expected = XtsDecryptor(key, 512, backend="numpy").decrypt(data, 77)
    target = io.BytesIO()

    written = decrypt_stream(
        io.BytesIO(data),
        target,
        XtsDecryptor(key, 512, chunk_bytes=512 * 64, backend=backend),
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


def test_stream_numpy_overlapping_batches() -> None:
    # The next batch is decrypted while the previous one is still running, so
    # each batch needs its own numpy scratch buffers.
    key = os.urandom(64)
    data = os.urandom(8 * 1024 * 1024)
    expected = XtsDecryptor(key, 4096, backend="openssl").decrypt(data, 5)
    target = io.BytesIO()

    decrypt_stream(
        io.BytesIO(data),
        target,
        XtsDecryptor(key, 4096, chunk_bytes=64 * 1024, backend="numpy"),
        length=len(data),
        first_sector=5,
        chunk_bytes=64 * 1024,
        workers=4,
    )

    assert target.getvalue() == expected

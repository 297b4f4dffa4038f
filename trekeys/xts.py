"""User-space AES-XTS decryption of LUKS data segments, many sectors per call.

dm-crypt encrypts each sector with AES-XTS (IEEE 1619). The sector number,
as a 128-bit little-endian integer ("plain64"), is encrypted under the second
half of the volume key. The result is the tweak of the sector's first 16-byte
block, and each following block's tweak is the previous one multiplied by
alpha in GF(2^128). Creating one cipher object per sector is slow, so this
module handles a whole chunk of sectors at once. One AES-ECB call under the
tweak key gives every sector's first tweak, and numpy expands the rest. The
chunk is then XORed with the tweaks, decrypted with one AES-ECB call under
the data key, and XORed again.

This is the one module that handles a raw volume key; callers pass it in
from the vault and drop it when they are done.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from trekeys.errors import IntegrityError

logger = logging.getLogger(__name__)

BLOCK = 16
DEFAULT_CHUNK_BYTES = 1 << 20

# Tweaks are expanded in groups of this many blocks: multiplying by alpha^r
# for r < 32 overflows by fewer than 32 bits, so the reduction by the XTS
# polynomial (x^128 + x^7 + x^2 + x + 1) stays inside one 64-bit word.
_GROUP = 32
_MASK32 = np.uint64(0xFFFFFFFF)
_POLY = np.uint64(0x87)
_1 = np.uint64(1)
_2 = np.uint64(2)
_7 = np.uint64(7)
IV_SCHEMES = ("plain64", "plain")
SECTOR_SIZES = (512, 1024, 2048, 4096)


def _mul_alpha_pow(
    lo: np.ndarray, hi: np.ndarray, shift: np.uint64
) -> tuple[np.ndarray, np.ndarray]:
    """Multiply 128-bit tweaks (lo, hi words) by alpha**shift, for 0 < shift < 58.

    Above 57 the reduction by 0x87 would overflow the low word.
    """
    back = np.uint64(64) - shift
    overflow = hi >> back
    reduction = overflow ^ (overflow << np.uint64(1))
    reduction ^= overflow << np.uint64(2)
    reduction ^= overflow << np.uint64(7)
    return (lo << shift) ^ reduction, (hi << shift) | (lo >> back)


class XtsDecryptor:
    """Decrypt runs of whole sectors encrypted with AES-XTS by dm-crypt.

    Scratch buffers for `chunk_bytes` of data are allocated once, so memory
    stays bounded and repeated calls avoid fresh page faults.

    Args:
        volume_key: 32 bytes (AES-128-XTS) or 64 bytes (AES-256-XTS); the
            first half is the data key and the second half the tweak key.
        sector_size: the encryption sector size in bytes (512 to 4096).
        iv_scheme: ``plain64`` (the LUKS2 default) or ``plain`` (the sector
            number truncated to 32 bits).
        iv_offset: added to every IV sector number (the LUKS2 ``iv_tweak``).
        large_iv: count IV sector numbers in `sector_size` units (dm-crypt's
            ``iv_large_sectors``) instead of 512-byte units. LUKS2 volumes
            made by cryptsetup 2.x count in 512-byte units.
        chunk_bytes: the maximum number of bytes decrypted in one pass.

    Raises:
        IntegrityError: the key length, sector size or IV scheme is unsupported.
    """

    def __init__(
        self,
        volume_key: bytes,
        sector_size: int,
        *,
        iv_scheme: str = "plain64",
        iv_offset: int = 0,
        large_iv: bool = False,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        _check_parameters(volume_key, sector_size, iv_scheme)

        self._settings = (volume_key, sector_size, iv_scheme, iv_offset, large_iv)
        self._chunk_bytes = chunk_bytes
        half = len(volume_key) // 2
        self._data = Cipher(algorithms.AES(volume_key[:half]), modes.ECB()).decryptor()
        self._tweak = Cipher(algorithms.AES(volume_key[half:]), modes.ECB()).encryptor()
        self.sector_size = sector_size
        self.iv_scheme = iv_scheme
        self.iv_offset = iv_offset
        self._iv_step = 1 if large_iv else sector_size // 512
        self._groups = sector_size // BLOCK // _GROUP
        self.chunk_sectors = max(1, chunk_bytes // sector_size)

        rows = self.chunk_sectors * self._groups
        self._tweaks = np.empty((rows, _GROUP, 2), dtype=np.uint64)
        self._masked = np.empty_like(self._tweaks)
        self._overflow, self._reduction, self._term = (
            np.empty((rows, _GROUP), dtype=np.uint64) for _ in range(3)
        )
        shifts = np.arange(_GROUP, dtype=np.uint64)
        self._shifts = shifts
        self._back = np.uint64(63) - shifts
        self._plain = bytearray(self.chunk_sectors * sector_size + BLOCK)

    def clone(self) -> XtsDecryptor:
        """Return a decryptor with the same key and its own scratch buffers."""
        key, sector_size, iv_scheme, iv_offset, large_iv = self._settings
        return XtsDecryptor(
            key,
            sector_size,
            iv_scheme=iv_scheme,
            iv_offset=iv_offset,
            large_iv=large_iv,
            chunk_bytes=self._chunk_bytes,
        )

    def decrypt(
        self, ciphertext: bytes | bytearray | memoryview, first_sector: int
    ) -> bytes:
        """Return the plaintext of whole sectors that start at `first_sector`.

        `first_sector` counts `sector_size` sectors from the start of the data
        segment.

        Raises:
            IntegrityError: the length is not a whole number of sectors.
        """
        output = bytearray(len(ciphertext))
        self.decrypt_into(ciphertext, first_sector, output)
        return bytes(output)

    def decrypt_into(
        self,
        ciphertext: bytes | bytearray | memoryview,
        first_sector: int,
        output: bytearray | memoryview,
    ) -> None:
        """Decrypt whole sectors that start at `first_sector` into `output`.

        Raises:
            IntegrityError: the length is not a whole number of sectors.
        """
        size = len(ciphertext)
        if size % self.sector_size or len(output) < size:
            raise IntegrityError(
                f"ciphertext of {size} bytes is not a whole number of "
                f"{self.sector_size}-byte sectors; the volume image may be truncated."
            )
        source = np.frombuffer(ciphertext, dtype="<u8")
        target = np.frombuffer(output, dtype="<u8")

        step = self.chunk_sectors * self.sector_size // 8
        sector = first_sector
        for start in range(0, size // 8, step):
            words = min(step, size // 8 - start)
            sectors = words * 8 // self.sector_size
            self._decrypt_chunk(
                source[start : start + words], sector, sectors, target[start:]
            )
            sector += sectors

    def _decrypt_chunk(
        self, source: np.ndarray, first_sector: int, sectors: int, target: np.ndarray
    ) -> None:
        rows = sectors * self._groups
        tweaks = self._tweaks[:rows]
        self._fill_tweaks(first_sector, sectors)

        masked = self._masked[:rows]
        np.bitwise_xor(source.reshape(tweaks.shape), tweaks, out=masked)
        size = rows * _GROUP * BLOCK
        self._data.update_into(masked.data.cast("B"), self._plain)

        plain = np.frombuffer(self._plain, dtype="<u8", count=size // 8)
        result = target[: size // 8].reshape(tweaks.shape)
        np.bitwise_xor(plain.reshape(tweaks.shape), tweaks, out=result)

    def _fill_tweaks(self, first_sector: int, sectors: int) -> None:
        """Fill the tweak of every block of `sectors` sectors, in data order."""
        step = self._iv_step
        numbers = np.arange(0, sectors * step, step, dtype=np.uint64)
        numbers += np.uint64((first_sector * step + self.iv_offset) % 2**64)
        if self.iv_scheme == "plain":
            numbers &= _MASK32
        ivs = np.zeros((sectors, 2), dtype="<u8")
        ivs[:, 0] = numbers
        first = np.frombuffer(self._tweak.update(ivs.tobytes()), dtype="<u8")

        # The first tweak of each group of 32 blocks, one group after another.
        base_lo = np.empty((sectors, self._groups), dtype=np.uint64)
        base_hi = np.empty_like(base_lo)
        base_lo[:, 0] = first[0::2]
        base_hi[:, 0] = first[1::2]
        for group in range(1, self._groups):
            lo, hi = _mul_alpha_pow(
                base_lo[:, group - 1], base_hi[:, group - 1], np.uint64(_GROUP)
            )
            base_lo[:, group] = lo
            base_hi[:, group] = hi
        self._expand(base_lo.reshape(-1), base_hi.reshape(-1))

    def _expand(self, base_lo: np.ndarray, base_hi: np.ndarray) -> None:
        """Multiply each group's first tweak by alpha**r, r = 0..31, in one pass.

        Each numpy call broadcasts the groups' first tweaks, shape (groups, 1),
        against the 32 shifts and writes straight into the tweak buffer in data
        order. This avoids the transposing copy that a block-major fill needs,
        which cost more CPU time than the AES calls (numpy 2.4, x86-64).
        Shifting right by (64 - r) is done as (x >> 1) >> (63 - r) because a
        shift by 64 is undefined.
        """
        rows = len(base_lo)
        overflow = self._overflow[:rows]
        reduction = self._reduction[:rows]
        term = self._term[:rows]
        tweaks = self._tweaks[:rows]
        shifts, back = self._shifts, self._back

        # The reduction of the bits shifted out of the top: clmul(overflow, 0x87).
        np.right_shift((base_hi >> _1)[:, None], back, out=overflow)
        np.left_shift(overflow, _1, out=reduction)
        np.bitwise_xor(reduction, overflow, out=reduction)
        np.left_shift(overflow, _2, out=term)
        np.bitwise_xor(reduction, term, out=reduction)
        np.left_shift(overflow, _7, out=term)
        np.bitwise_xor(reduction, term, out=reduction)

        np.left_shift(base_lo[:, None], shifts, out=term)
        np.bitwise_xor(term, reduction, out=tweaks[..., 0])
        np.right_shift((base_lo >> _1)[:, None], back, out=overflow)
        np.left_shift(base_hi[:, None], shifts, out=term)
        np.bitwise_or(term, overflow, out=tweaks[..., 1])


def _check_parameters(volume_key: bytes, sector_size: int, iv_scheme: str) -> None:
    if len(volume_key) not in (32, 64):
        raise IntegrityError(
            f"an AES-XTS volume key has 256 or 512 bits, not {len(volume_key) * 8}; "
            "check that the escrowed key belongs to this volume."
        )
    if sector_size not in SECTOR_SIZES:
        raise IntegrityError(
            f"sector size {sector_size} is not a power of two from 512 to 4096; "
            "check the LUKS2 segment metadata."
        )
    if iv_scheme not in IV_SCHEMES:
        raise IntegrityError(
            f"IV scheme {iv_scheme!r} is not supported in user space (only "
            f"{', '.join(IV_SCHEMES)}); recover this volume on a host with "
            "device-mapper."
        )


class Readable(Protocol):
    """A binary file that reads into a caller's buffer."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


class Writable(Protocol):
    """A binary file, or anything with a binary ``write``."""

    def write(self, data: memoryview, /) -> int | None: ...


def decrypt_stream(
    source: Readable,
    target: Writable,
    decryptor: XtsDecryptor,
    *,
    length: int,
    first_sector: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Decrypt `length` bytes from `source` to `target` in chunks, bounding memory.

    Each of `workers` threads (the CPU count, at most 4, by default) decrypts
    one chunk of every batch. numpy releases the GIL, so the tweak work runs
    in parallel, while the AES calls of the cryptography package do not.

    Returns:
        The number of bytes written.

    Raises:
        IntegrityError: the source ends early or `length` is not whole sectors.
    """
    sector = decryptor.sector_size
    if length % sector:
        raise IntegrityError(
            f"data segment of {length} bytes is not a whole number of {sector}-byte "
            "sectors; the volume image may be truncated."
        )
    chunk = max(sector, chunk_bytes - chunk_bytes % sector)
    workers = workers or min(os.cpu_count() or 1, 4)
    helpers = [decryptor] + [decryptor.clone() for _ in range(workers - 1)]

    # Both buffers are reused for every batch, so memory stays bounded.
    batch = chunk * workers
    incoming = bytearray(batch)
    outgoing = bytearray(batch)
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while done < length:
            wanted = min(batch, length - done)
            view = memoryview(incoming)[:wanted]
            got = source.readinto(view)
            if got != wanted:
                raise IntegrityError(
                    f"the volume image ended after {done + (got or 0)} of {length} "
                    "bytes of its data segment; it is truncated."
                )
            result = memoryview(outgoing)[:wanted]
            jobs = [
                pool.submit(
                    helper.decrypt_into,
                    view[start : start + chunk],
                    first_sector + (done + start) // sector,
                    result[start : start + chunk],
                )
                for helper, start in zip(helpers, range(0, wanted, chunk), strict=False)
            ]
            for job in jobs:
                job.result()
            target.write(result)
            done += wanted
            if progress is not None:
                progress(done)
    return done

"""User-space AES-XTS decryption of LUKS data segments, many sectors per call.

dm-crypt encrypts each sector with AES-XTS (IEEE 1619): the sector number,
as a 128-bit little-endian integer ("plain64"), is encrypted under the second
half of the volume key to give the tweak of the sector's first 16-byte block,
and each following block's tweak is the previous one multiplied by alpha in
GF(2^128). Creating one cipher object per sector is slow, so this module
computes the tweaks of a whole chunk of sectors at once: one AES-ECB call
under the tweak key for the first tweaks, a vectorised numpy expansion for
the rest, then XOR, one AES-ECB decryption under the data key, and XOR again.

This is the one module that handles a raw volume key; callers pass it in
from the vault and drop it when they are done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import BinaryIO

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from trekeys.errors import IntegrityError

logger = logging.getLogger(__name__)

BLOCK = 16
DEFAULT_CHUNK_BYTES = 4 << 20

# Tweaks are expanded in groups of this many blocks: multiplying by alpha^r
# for r < 32 overflows by fewer than 32 bits, so the reduction by the XTS
# polynomial (x^128 + x^7 + x^2 + x + 1) stays inside one 64-bit word.
_GROUP = 32
_MASK32 = np.uint64(0xFFFFFFFF)
_POLY = np.uint64(0x87)
_1 = np.uint64(1)
_63 = np.uint64(63)
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
        chunk_bytes: the most data decrypted in one pass.

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
        self._lo, self._hi, self._carry_lo, self._carry_hi = (
            np.empty(rows, dtype=np.uint64) for _ in range(4)
        )
        self._plain = bytearray(self.chunk_sectors * sector_size + BLOCK)

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
        """Fill the 32 tweaks of each group by doubling its first tweak 31 times.

        Each doubling is a handful of numpy calls over every group of the chunk
        at once, so the per-call cost is spread over thousands of tweaks.
        """
        rows = len(base_lo)
        tweaks = self._tweaks[:rows]
        lo = self._lo[:rows]
        hi = self._hi[:rows]
        carry_lo = self._carry_lo[:rows]
        carry_hi = self._carry_hi[:rows]
        lo[:] = base_lo
        hi[:] = base_hi
        tweaks[:, 0, 0] = lo
        tweaks[:, 0, 1] = hi

        for block in range(1, _GROUP):
            np.right_shift(lo, _63, out=carry_lo)
            np.right_shift(hi, _63, out=carry_hi)
            np.left_shift(hi, _1, out=hi)
            hi |= carry_lo
            np.left_shift(lo, _1, out=lo)
            np.multiply(carry_hi, _POLY, out=carry_hi)
            lo ^= carry_hi
            tweaks[:, block, 0] = lo
            tweaks[:, block, 1] = hi


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


def decrypt_stream(
    source: BinaryIO,
    target: BinaryIO,
    decryptor: XtsDecryptor,
    *,
    length: int,
    first_sector: int = 0,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Decrypt `length` bytes from `source` to `target` in chunks, bounding memory.

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

    done = 0
    while done < length:
        wanted = min(chunk, length - done)
        data = source.read(wanted)
        if len(data) != wanted:
            raise IntegrityError(
                f"the volume image ended after {done + len(data)} of {length} bytes "
                "of its data segment; it is truncated."
            )
        target.write(decryptor.decrypt(data, first_sector + done // sector))
        done += wanted
        if progress is not None:
            progress(done)
    return done

"""User-space decryption of a LUKS2 volume against ``openssl speed``.

The recovery drill decrypts a volume's data segment without device-mapper
(`trekeys.xts`). This benchmark formats a sparse image as LUKS2 with 4096-
and 512-byte sectors, decrypts its whole data segment in a child process, and
compares the throughput with ``openssl speed -elapsed -evp aes-256-xts`` at
the same block size, measured in the same run. Both figures use wall-clock
time (openssl's default divides by CPU time), so a busy host slows both. The
child's peak RSS must stay under 128 MiB whatever the volume size.

The volume size is TREKEYS_BENCH_LUKS_MIB (default 1024 MiB, 64 MiB with
--quick).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import Ratio

TARGET_RATIO = 0.25
MAX_RSS_MIB = 128
SECTOR_SIZES = (4096, 512)

# The child decrypts with the volume key read from its standard input and
# prints the bytes, the seconds taken and its peak RSS in KiB; the key never
# appears in argv.
_CHILD = """
import resource, sys, time
from pathlib import Path
from trekeys.luks2meta import read_header
from trekeys.xts import XtsDecryptor, decrypt_stream

class Discard:
    def write(self, data):
        return len(data)

image = Path(sys.argv[1])
key = bytes.fromhex(sys.stdin.read().strip())
segment = read_header(image).data_segment()
length = image.stat().st_size - segment.offset
length -= length % segment.sector_size
decryptor = XtsDecryptor(key, segment.sector_size)
with image.open("rb") as source:
    source.seek(segment.offset)
    started = time.perf_counter()
    decrypt_stream(source, Discard(), decryptor, length=length)
    elapsed = time.perf_counter() - started
print(length, elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def openssl_speed(block: int, seconds: int) -> float:
    """Return openssl's AES-256-XTS throughput in MiB/s for `block`-byte inputs."""
    result = subprocess.run(
        [
            "openssl",
            "speed",
            "-mr",
            "-seconds",
            str(seconds),
            "-bytes",
            str(block),
            "-evp",
            "aes-256-xts",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    match = re.search(r"^\+F:\d+:[^:]+:([0-9.]+)", result.stdout, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"unexpected openssl speed output: {result.stdout[-200:]}")
    return float(match.group(1)) / (1024 * 1024)


def make_volume(folder: Path, size_mib: int, sector_size: int) -> tuple[Path, str]:
    """Format a sparse image as LUKS2 and return it with its volume key in hex."""
    from trekeys.cryptsetup import KdfSettings
    from trekeys.luks_device import SMALL_KEYSLOTS_BYTES, dump_volume_key, format_volume

    image = folder / f"volume-{sector_size}.img"
    with image.open("wb") as handle:
        handle.truncate(size_mib * 1024 * 1024)
    passphrase = os.urandom(16).hex().encode()
    format_volume(
        image,
        passphrase,
        kdf=KdfSettings.test(),
        sector_size=sector_size,
        keyslots_bytes=SMALL_KEYSLOTS_BYTES,
    )
    # Fill the data segment so that reads come from real blocks, not holes.
    with image.open("r+b") as handle:
        handle.seek(4 * 1024 * 1024)
        chunk = os.urandom(4 * 1024 * 1024)
        for _ in range(max(0, size_mib - 4) // 4):
            handle.write(chunk)
    return image, dump_volume_key(image, passphrase).hex()


def decrypt_in_child(image: Path, key_hex: str) -> tuple[float, float]:
    """Return (MiB/s, peak RSS in MiB) of a child process that decrypts `image`."""
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(image)],
        input=key_hex,
        capture_output=True,
        text=True,
        check=True,
    )
    length, seconds, peak_kib = result.stdout.split()
    return int(length) / (1024 * 1024) / float(seconds), int(peak_kib) / 1024


def measure(quick: bool) -> list[Ratio]:
    size_mib = int(os.environ.get("TREKEYS_BENCH_LUKS_MIB", 64 if quick else 1024))
    seconds = 1 if quick else 3
    results = []
    with tempfile.TemporaryDirectory(prefix="trekeys-bench-") as folder:
        for sector_size in SECTOR_SIZES:
            image, key_hex = make_volume(Path(folder), size_mib, sector_size)
            speed, rss = decrypt_in_child(image, key_hex)
            image.unlink()
            reference = openssl_speed(sector_size, seconds)
            ratio = speed / reference
            results.append(
                Ratio(
                    f"luks: user-space XTS, {sector_size}-byte sectors, {size_mib} MiB",
                    speed,
                    reference,
                    "MiB/s",
                    ratio,
                    f"ratio >= {TARGET_RATIO}",
                    ratio >= TARGET_RATIO,
                )
            )
            results.append(
                Ratio(
                    f"luks: peak RSS of the decryption, {sector_size}-byte sectors",
                    rss,
                    MAX_RSS_MIB,
                    "MiB",
                    rss / MAX_RSS_MIB,
                    f"RSS < {MAX_RSS_MIB} MiB",
                    rss < MAX_RSS_MIB,
                )
            )
    return results

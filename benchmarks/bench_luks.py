"""User-space decryption of a LUKS2 volume against ``openssl speed``.

The recovery drill decrypts a volume's data segment without device-mapper
(`trekeys.xts`). This benchmark formats a sparse image as LUKS2 with 4096-
and 512-byte sectors, decrypts its whole data segment in a child process, and
compares the throughput with ``openssl speed -evp aes-256-xts`` at the same
block size, measured in the same run. It reports two ratios: wall-clock time
against ``openssl speed -elapsed``, and CPU time (all the child's threads)
against openssl's default, which divides by CPU time. On a busy shared host
the wall-clock figures swing with the load; the CPU-time ratio is the steady
one. The child's peak RSS must stay under 128 MiB whatever the volume size.

The child uses the default backend of `trekeys.xts` (the compiled OpenSSL
loop when it builds) and the row names it. The numpy fallback is measured
too and reported apart, which shows what a host without a C compiler gets.

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
# prints the backend, the bytes, the wall-clock and CPU seconds taken and its
# peak RSS in KiB;
# the key never appears in argv. An empty backend argument means the default.
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
decryptor = XtsDecryptor(key, segment.sector_size, backend=sys.argv[2] or None)
with image.open("rb") as source:
    source.seek(segment.offset)
    started, cpu = time.perf_counter(), time.process_time()
    decrypt_stream(source, Discard(), decryptor, length=length)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(decryptor.backend, length, elapsed, cpu, peak_kib)
"""


def openssl_speed(block: int, seconds: int, *, elapsed: bool) -> float:
    """Return openssl's AES-256-XTS throughput in MiB/s for `block`-byte inputs.

    With `elapsed`, openssl divides by wall-clock time, otherwise by CPU time.
    """
    result = subprocess.run(
        [
            "openssl",
            "speed",
            *(["-elapsed"] if elapsed else []),
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


def decrypt_in_child(
    image: Path, key_hex: str, backend: str = ""
) -> tuple[str, float, float, float]:
    """Return the backend, wall-clock and CPU MiB/s, and peak RSS in MiB."""
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(image), backend],
        input=key_hex,
        capture_output=True,
        text=True,
        check=True,
    )
    used, length, seconds, cpu, peak_kib = result.stdout.split()
    mib = int(length) / (1024 * 1024)
    return used, mib / float(seconds), mib / float(cpu), int(peak_kib) / 1024


def _speed_ratio(name: str, speed: float, reference: float, target: bool) -> Ratio:
    ratio = speed / reference
    if not target:
        return Ratio(name, speed, reference, "MiB/s", ratio, "reported apart", True)
    return Ratio(
        name,
        speed,
        reference,
        "MiB/s",
        ratio,
        f"ratio >= {TARGET_RATIO}",
        ratio >= TARGET_RATIO,
    )


def measure(quick: bool) -> list[Ratio]:
    size_mib = int(os.environ.get("TREKEYS_BENCH_LUKS_MIB", 64 if quick else 1024))
    seconds = 1 if quick else 3
    results = []
    with tempfile.TemporaryDirectory(prefix="trekeys-bench-") as folder:
        for sector_size in SECTOR_SIZES:
            image, key_hex = make_volume(Path(folder), size_mib, sector_size)
            backend, wall, cpu, rss = decrypt_in_child(image, key_hex)
            _, _, numpy_cpu, _ = decrypt_in_child(image, key_hex, "numpy")
            image.unlink()
            wall_reference = openssl_speed(sector_size, seconds, elapsed=True)
            cpu_reference = openssl_speed(sector_size, seconds, elapsed=False)
            label = f"{sector_size}-byte sectors, {size_mib} MiB"
            results += [
                _speed_ratio(
                    f"luks: XTS ({backend}), wall clock, {label}",
                    wall,
                    wall_reference,
                    target=True,
                ),
                _speed_ratio(
                    f"luks: XTS ({backend}), CPU time, {label}",
                    cpu,
                    cpu_reference,
                    target=True,
                ),
                _speed_ratio(
                    f"luks: XTS (numpy fallback), CPU time, {label}",
                    numpy_cpu,
                    cpu_reference,
                    target=False,
                ),
            ]
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

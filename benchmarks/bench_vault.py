"""The vault at scale: add, update, look up, build, open and list, and peak memory.

Each figure is a ratio measured in the same run: trekeys at a large vault
against trekeys at a small one (the costs must not grow with the vault), or
trekeys against ``keepassxc-cli ls`` on the same file. The KDF is timed on its
own and taken out of the open-and-list comparison by subtracting the time to
open an empty vault with the same KDF settings, for both tools.

Sizes: ``TREKEYS_BENCH_RECORDS`` (default 10,000; 2,000 with ``--quick``).
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Ratio
from trekeys.records import KeyKind, KeyRecord
from trekeys.vault import KdfSettings, Vault, VaultCredentials

CREDENTIALS = VaultCredentials(bytes(range(32)))
KDF = KdfSettings.test()
SMALL = 10

# VmHWM (the peak resident set) starts afresh at exec, whereas ru_maxrss of a
# child started by this large benchmark process may carry the parent's peak.
_PEAK_SCRIPT = """
import re, sys
from pathlib import Path
from trekeys.vault import Vault, VaultCredentials
vault = Vault.open(Path(sys.argv[1]), VaultCredentials(bytes(range(32))),
                   read_only=True)
records = vault.find()
status = Path("/proc/self/status").read_text()
print(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1), len(records))
"""

_KEEPASSXC_PEAK_SCRIPT = """
import resource, subprocess, sys
subprocess.run(["keepassxc-cli", "ls", "-q", "-R", "-f", sys.argv[1]],
               input=sys.argv[2] + "\\n", capture_output=True, text=True, check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _record(number: int) -> KeyRecord:
    return KeyRecord(
        id=f"inst{number % 300}/key-{number}",
        kind=(KeyKind.LUKS_VOLUME, KeyKind.FILE_KEY, KeyKind.SSH)[number % 3],
        purpose="benchmark key",
        owner=f"instance:inst{number % 300}",
        cryptoperiod_days=365,
        strength_bits=256,
        protects=[f"volume:inst{number % 300}"],
    )


def _build(path: Path, count: int) -> float:
    """Create a vault of `count` records in one session; return the seconds."""
    started = time.perf_counter()
    with Vault.create(path, CREDENTIALS, kdf=KDF) as vault:
        for number in range(count):
            vault.add(_record(number), b"k" * 32)
    return time.perf_counter() - started


def _per_call(vault: Vault, start: int, calls: int, action: str) -> float:
    timings = []
    for number in range(start, start + calls):
        started = time.perf_counter()
        if action == "add":
            vault.add(_record(number), b"k" * 32)
        else:
            record = vault.get(_record(number).id)
            record.attributes["touched"] = str(number)
            vault.update(record)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1000


def _add_and_update_at(folder: Path, size: int) -> tuple[float, float]:
    path = folder / f"grow-{size}.kdbx"
    _build(path, size - 1)
    with Vault.open(path, CREDENTIALS) as vault:
        add = _per_call(vault, size, 50, "add")
        update = _per_call(vault, size, 50, "update")
    return add, update


def _cold_lookup(path: Path, count: int, rounds: int = 5) -> float:
    """Median milliseconds of a first `get` of a random id right after opening."""
    rng = random.Random(count)
    timings = []
    for _ in range(rounds):
        vault = Vault.open(path, CREDENTIALS, read_only=True)
        for number in rng.sample(range(count), min(count, SMALL)):
            started = time.perf_counter()
            vault.get(_record(number).id)
            timings.append(time.perf_counter() - started)
        vault.close()
    return statistics.median(timings) * 1000


def _open_and_list(path: Path, rounds: int = 3) -> float:
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        with Vault.open(path, CREDENTIALS, read_only=True) as vault:
            vault.find()
        timings.append(time.perf_counter() - started)
    return min(timings)


def _keepassxc_ls(path: Path, rounds: int = 3) -> float:
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        subprocess.run(
            ["keepassxc-cli", "ls", "-q", "-R", "-f", str(path)],
            input=CREDENTIALS.password + "\n",
            capture_output=True,
            text=True,
            check=True,
        )
        timings.append(time.perf_counter() - started)
    return min(timings)


def _peak_mib(script: str, *args: str) -> float:
    output = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(output[0]) / 1024  # both scripts print KiB


def measure(quick: bool) -> list[Ratio]:
    """Measure the vault's scale ratios; see the module docstring."""
    large = int(os.environ.get("TREKEYS_BENCH_RECORDS", 2_000 if quick else 10_000))
    medium = large // 10
    folder = Path(tempfile.mkdtemp(prefix="trekeys-bench-vault-"))
    try:
        return _measure_in(folder, large, medium)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _measure_in(folder: Path, large: int, medium: int) -> list[Ratio]:
    results = []

    # Add and update one record at `large` against at SMALL records.
    add_small, update_small = _add_and_update_at(folder, SMALL)
    add_large, update_large = _add_and_update_at(folder, large)
    results.append(
        _ratio(f"add record #{large:,} vs #{SMALL}", add_large, add_small, "ms", 2.0)
    )
    results.append(
        _ratio(
            f"update by id at {large:,} vs {SMALL}",
            update_large,
            update_small,
            "ms",
            2.0,
        )
    )

    # Build a vault of `large` records against one of `medium`: linear is 10x.
    build_large = _build(folder / "large.kdbx", large)
    build_medium = _build(folder / "medium.kdbx", medium)
    _build(folder / "small.kdbx", SMALL)
    _build(folder / "empty.kdbx", 0)
    results.append(
        _ratio(
            f"build {large:,} records vs {medium:,}",
            build_large,
            build_medium,
            "s",
            12.0,
        )
    )

    lookup_large = _cold_lookup(folder / "large.kdbx", large)
    lookup_small = _cold_lookup(folder / "small.kdbx", SMALL)
    results.append(
        _ratio(
            f"look up by id at {large:,} vs {SMALL}",
            lookup_large,
            lookup_small,
            "ms",
            2.0,
        )
    )

    # Open and list against keepassxc-cli ls, both without KDF and startup.
    kdf_seconds = KDF.measure_seconds()
    ours = _open_and_list(folder / "large.kdbx") - _open_and_list(folder / "empty.kdbx")
    theirs = _keepassxc_ls(folder / "large.kdbx") - _keepassxc_ls(folder / "empty.kdbx")
    results.append(
        _ratio(
            f"open+list {large:,} vs keepassxc-cli ls (no KDF)", ours, theirs, "s", 1.5
        )
    )
    production = KdfSettings.production()
    results.append(
        Ratio(
            name=f"KDF alone: test {KDF.memory_kib // 1024} MiB vs production",
            measured=kdf_seconds,
            reference=production.measure_seconds(),
            unit="s",
            ratio=0.0,
            target="reported apart",
            passed=True,
        )
    )

    inventory_ratio = _inventory_vs_open(folder / "large.kdbx")
    results.append(inventory_ratio)

    ours_peak = _peak_mib(_PEAK_SCRIPT, str(folder / "large.kdbx"))
    theirs_peak = _peak_mib(
        _KEEPASSXC_PEAK_SCRIPT, str(folder / "large.kdbx"), CREDENTIALS.password
    )
    results.append(
        Ratio(
            name=f"peak memory, open+list {large:,} (ref: keepassxc-cli)",
            measured=ours_peak,
            reference=theirs_peak,
            unit="MiB",
            ratio=ours_peak,
            target="< 256 MiB",
            passed=ours_peak < 256,
        )
    )
    return results


def _inventory_vs_open(path: Path) -> Ratio:
    from trekeys.inventory import build_inventory

    started = time.perf_counter()
    vault = Vault.open(path, CREDENTIALS, read_only=True)
    opened = time.perf_counter() - started
    started = time.perf_counter()
    build_inventory(vault, kind="file-key")
    build_inventory(vault, owner="instance:inst7", state="pre-activation")
    listed = time.perf_counter() - started
    vault.close()
    return _ratio(
        "inventory with filters vs opening the vault", listed, opened, "s", 2.0
    )


def _ratio(
    name: str, measured: float, reference: float, unit: str, limit: float
) -> Ratio:
    ratio = measured / reference if reference > 0 else float("inf")
    return Ratio(
        name, measured, reference, unit, ratio, f"ratio <= {limit:g}", ratio <= limit
    )

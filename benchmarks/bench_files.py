"""File encryption and transfer manifests against gpg, openssl and sha256sum.

Encryption and decryption of one large file by trekeys (OpenPGP through gpg,
passphrase and escrow recipient) are compared with plain ``gpg`` using the
same settings and with ``openssl enc -aes-256-ctr``. The manifest of a folder
(HMAC-SHA-256 of every file) is compared with ``sha256sum`` over the same
files. Peak RSS covers the trekeys process and the gpg it runs.

Sizes: TREKEYS_BENCH_FILE_MIB (default 512, 64 with --quick) and
TREKEYS_BENCH_MANIFEST_MIB (default 512, 64 with --quick). The files go to
TREKEYS_BENCH_DIR (default: the system temporary folder); a RAM-backed
folder such as /dev/shm takes disk speed out of the comparison.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import Ratio
from trekeys import gpgrun, pgpfile, transfer
from trekeys.vault import KdfSettings, Vault, VaultCredentials

PASSPHRASE = "benchmark-passphrase-not-secret-7341"
MIB = 1 << 20
RSS_LIMIT_MIB = 128.0
ROUNDS = 3

# The child process runs one trekeys operation and reports how long the call
# took (without interpreter start-up), its own peak RSS and that of the gpg
# it waited for, in KiB.
_CHILD = """
import json, resource, sys, time
from pathlib import Path
from trekeys import files, pgpfile
mode, source, dest, home, recipient = sys.argv[1:6]
passphrase = sys.stdin.readline().rstrip("\\n")
started = time.perf_counter()
if mode == "encrypt":
    pgpfile.encrypt(Path(source), Path(dest), home=Path(home), recipient=recipient,
                    passphrase=passphrase, settings=pgpfile.S2kSettings.test())
else:
    files.decrypt_path(Path(source), Path(dest), passphrase=passphrase)
seconds = time.perf_counter() - started
own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": seconds, "self_kib": own, "children_kib": children}))
"""


def measure(quick: bool) -> list[Ratio]:
    """Return the throughput and memory ratios of file encryption and manifests."""
    file_mib = int(os.environ.get("TREKEYS_BENCH_FILE_MIB", 64 if quick else 512))
    manifest_mib = int(
        os.environ.get("TREKEYS_BENCH_MANIFEST_MIB", 64 if quick else 512)
    )
    work = Path(
        tempfile.mkdtemp(
            prefix="trekeys-bench-files-", dir=os.environ.get("TREKEYS_BENCH_DIR")
        )
    )
    try:
        return _measure_encryption(work, file_mib) + _measure_manifest(
            work, manifest_mib
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure_encryption(work: Path, size_mib: int) -> list[Ratio]:
    plain = work / "plain.bin"
    _write_random(plain, size_mib)
    escrow = pgpfile.generate_escrow_key("benchmark escrow")
    home = work / "escrow-home"
    pgpfile.import_key(home, escrow.public)
    passphrase_file = work / "passphrase"
    passphrase_file.write_text(PASSPHRASE)
    passphrase_file.chmod(0o600)

    # Rounds interleave the tools, so that drift in disk speed during the run
    # affects each of them alike; the best time of each is kept.
    times: dict[str, list[float]] = {}
    peaks: list[float] = []
    for _ in range(ROUNDS):
        for operation in ("encrypt", "decrypt"):
            seconds, peak = _trekeys(work, operation, plain, home, escrow)
            times.setdefault(f"trekeys {operation}", []).append(seconds)
            peaks.append(peak)
        _time(times, "gpg encrypt", lambda: _gpg_encrypt(work, plain, home, escrow))
        _time(times, "gpg decrypt", lambda: _gpg_decrypt(work, home))
        _time(times, "openssl encrypt", lambda: _openssl(work, plain, passphrase_file))
        _time(
            times,
            "openssl decrypt",
            lambda: _openssl(work, plain, passphrase_file, decrypt=True),
        )
    best = {name: min(values) for name, values in times.items()}
    enc_time, dec_time = best["trekeys encrypt"], best["trekeys decrypt"]
    gpg_enc, gpg_dec = best["gpg encrypt"], best["gpg decrypt"]
    ssl_enc, ssl_dec = best["openssl encrypt"], best["openssl decrypt"]

    def rate(seconds: float) -> float:
        return size_mib / seconds

    label = f"{size_mib} MiB file"
    peak = max(peaks)
    return [
        _ratio(f"encrypt {label} vs gpg", rate(enc_time), rate(gpg_enc), 0.9),
        _ratio(f"decrypt {label} vs gpg", rate(dec_time), rate(gpg_dec), 0.9),
        _ratio(
            f"encrypt {label} vs openssl aes-256-ctr",
            rate(enc_time),
            rate(ssl_enc),
            None,
        ),
        _ratio(
            f"decrypt {label} vs openssl aes-256-ctr",
            rate(dec_time),
            rate(ssl_dec),
            None,
        ),
        Ratio(
            name=f"peak RSS, encrypt and decrypt {label}",
            measured=peak,
            reference=RSS_LIMIT_MIB,
            unit="MiB",
            ratio=peak / RSS_LIMIT_MIB,
            target=f"peak RSS < {RSS_LIMIT_MIB:.0f} MiB",
            passed=peak < RSS_LIMIT_MIB,
        ),
    ]


def _measure_manifest(work: Path, size_mib: int) -> list[Ratio]:
    folder = work / "transfer"
    folder.mkdir()
    file_count = max(1, size_mib // 4)
    for number in range(file_count):
        _write_random(folder / f"part-{number:04d}.bin", max(1, size_mib // file_count))
    vault = Vault.create(
        work / "vault.kdbx", VaultCredentials(bytes(32)), kdf=KdfSettings.test()
    )
    with vault:
        transfer.create_channel_key(vault, "bench-import")
        seconds = _best_time(
            lambda: transfer.create_manifest(
                vault, "bench-import", folder, work / "m.json", overwrite=True
            )
        )
    names = sorted(str(p) for p in folder.iterdir())
    reference = _best_time(
        lambda: subprocess.run(
            ["sha256sum", *names], check=True, stdout=subprocess.DEVNULL
        )
    )
    return [
        _ratio(
            f"manifest of {size_mib} MiB in {file_count} files vs sha256sum",
            size_mib / seconds,
            size_mib / reference,
            0.8,
        )
    ]


def _trekeys(
    work: Path, mode: str, plain: Path, home: Path, escrow: pgpfile.EscrowKey
) -> tuple[float, float]:
    cipher = work / "trekeys.gpg"
    source, dest = (plain, cipher) if mode == "encrypt" else (cipher, work / "out")
    dest.unlink(missing_ok=True)
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(source), str(dest), str(home)]
        + [escrow.fingerprint],
        input=PASSPHRASE + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    usage = json.loads(result.stdout.strip().splitlines()[-1])
    return usage["seconds"], max(usage["self_kib"], usage["children_kib"]) / 1024


def _gpg_encrypt(
    work: Path, plain: Path, home: Path, escrow: pgpfile.EscrowKey
) -> None:
    cipher = work / "gpg.gpg"
    cipher.unlink(missing_ok=True)
    arguments = [
        "--no-autostart", "--trust-model", "always", "--compress-algo", "none",
        *pgpfile.S2kSettings.test().arguments(), "--symmetric", "--encrypt",
        "--recipient", escrow.fingerprint, "--output", str(cipher), str(plain),
    ]  # fmt: skip
    run = gpgrun.run_gpg(home, arguments, passphrase=PASSPHRASE)
    if run.returncode != 0:
        raise RuntimeError(f"gpg failed: {run.stderr_tail}")
    _fsync(cipher)


def _fsync(path: Path) -> None:
    """Flush a reference tool's output to disk, as trekeys does before renaming."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _gpg_decrypt(work: Path, home: Path) -> None:
    out = work / "gpg.out"
    out.unlink(missing_ok=True)
    arguments = [
        "--no-autostart",
        "--output",
        str(out),
        "--decrypt",
        str(work / "gpg.gpg"),
    ]
    run = gpgrun.run_gpg(home, arguments, passphrase=PASSPHRASE)
    if run.returncode != 0:
        raise RuntimeError(f"gpg failed: {run.stderr_tail}")


def _openssl(
    work: Path, plain: Path, passphrase_file: Path, *, decrypt: bool = False
) -> None:
    source, dest = (
        (work / "ssl.enc", work / "ssl.out") if decrypt else (plain, work / "ssl.enc")
    )
    subprocess.run(
        ["openssl", "enc", "-aes-256-ctr", "-pbkdf2", "-iter", "1000"]
        + (["-d"] if decrypt else [])
        + ["-pass", f"file:{passphrase_file}", "-in", str(source), "-out", str(dest)],
        check=True,
    )
    _fsync(dest)


def _time(times: dict[str, list[float]], name: str, run: Callable[[], None]) -> None:
    started = time.perf_counter()
    run()
    times.setdefault(name, []).append(time.perf_counter() - started)


def _best_time(run: Callable[[], object]) -> float:
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def _ratio(name: str, measured: float, reference: float, floor: float | None) -> Ratio:
    ratio = measured / reference
    return Ratio(
        name=name,
        measured=measured,
        reference=reference,
        unit="MiB/s",
        ratio=ratio,
        target=f"ratio >= {floor}" if floor is not None else "reported only",
        passed=ratio >= floor if floor is not None else True,
    )


def _write_random(path: Path, size_mib: int) -> None:
    with open(path, "wb") as handle:
        for _ in range(size_mib):
            handle.write(os.urandom(MIB))

"""Backup and restore throughput against plain ``tar | gpg`` pipelines.

A home folder of TREKEYS_BENCH_BACKUP_MIB MiB (512 by default, 32 with
--quick; half random bytes, half text) is backed up with
`trekeys.backup.create_backup` and restored with
`trekeys.restore.restore_backup`, each in a child process so that its peak
RSS can be read. The references are ``tar -c | gpg --encrypt`` to the same
three subkeys and ``gpg --decrypt | tar -x`` with the same key. Each side
runs `ROUNDS` times and the fastest run counts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import Ratio
from trekeys import backup, gpgkeys
from trekeys.lab import Lab, create_lab

ROUNDS = 2
RSS_LIMIT_MIB = 128

_CHILD = """
import json, resource, sys, time
from pathlib import Path
from trekeys import backup, restore
from trekeys.lab import Lab
lab = Lab.load(sys.argv[1])
with lab.open_vault() as vault:
    started = time.perf_counter()
    if sys.argv[2] == "backup":
        made = backup.create_backup(lab, vault, "alpha")
        name = made.name
    else:
        chosen = backup.find_backup(lab, "alpha", sys.argv[3])
        restore.restore_backup(
            lab, vault, chosen, key_id="gpg/admin", target=Path(sys.argv[4])
        )
        name = chosen.name
    seconds = time.perf_counter() - started
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "rss_kib": rss, "name": name}))
"""


def measure(quick: bool) -> list[Ratio]:
    """Return backup and restore throughput and peak RSS ratios."""
    size_mib = 32 if quick else int(os.environ.get("TREKEYS_BENCH_BACKUP_MIB", "512"))
    root = Path(tempfile.mkdtemp(prefix="tkb-"))
    try:
        lab = _make_lab(root, size_mib)
        return _measure_lab(lab, size_mib)
    finally:
        for home in [
            *(root / "lab" / "keyrings").glob("*"),
            root / "lab" / "offline-media" / "gnupg",
        ]:
            gpgkeys.stop_agent(home)
        shutil.rmtree(root, ignore_errors=True)


def _make_lab(root: Path, size_mib: int) -> Lab:
    lab = create_lab(root / "lab", steps=[])
    with lab.open_vault() as vault:
        gpgkeys.create_backup_keys(lab, vault)
    home = backup.home_dir(lab, "alpha")
    text = b"cohort,subject,measurement,value\n" + b"A,1001,weight,71.5\n" * 4096
    for index in range(size_mib // 2):
        user = home / f"user{index % 8}" / "data"
        user.mkdir(parents=True, exist_ok=True)
        (user / f"random-{index}.bin").write_bytes(os.urandom(1 << 20))
        copies = (1 << 20) // len(text) + 1
        (user / f"table-{index}.csv").write_bytes((text * copies)[: 1 << 20])
    return lab


def _measure_lab(lab: Lab, size_mib: int) -> list[Ratio]:
    home = backup.home_dir(lab, "alpha")
    with lab.open_vault() as vault:
        recipients = backup.select_recipients(lab, vault, "alpha")
        passphrase = gpgkeys.read_passphrase(vault, "gpg/admin", "benchmark")
    public = gpgkeys.open_home(gpgkeys.public_home(lab))
    admin = gpgkeys.open_home(gpgkeys.admin_home(lab))
    reference_archive = lab.root / "reference.tar.gpg"

    ours_backup, ref_backup, ours_restore, ref_restore = [], [], [], []
    backup_rss = restore_rss = 0.0
    for round_number in range(ROUNDS):
        ref_backup.append(
            _reference_backup(home, reference_archive, public, recipients)
        )
        result = _child(lab, "backup")
        ours_backup.append(result["seconds"])
        backup_rss = max(backup_rss, result["rss_kib"] / 1024)

        ref_restore.append(
            _reference_restore(reference_archive, admin, passphrase, lab)
        )
        target = lab.work_dir / f"restore-{round_number}"
        result = _child(lab, "restore", result["name"], str(target))
        ours_restore.append(result["seconds"])
        restore_rss = max(restore_rss, result["rss_kib"] / 1024)
        shutil.rmtree(target)
    gpgkeys.stop_agent(admin)

    return [
        _throughput(
            "backup of a home folder", size_mib, min(ours_backup), min(ref_backup)
        ),
        _throughput(
            "restore with one key", size_mib, min(ours_restore), min(ref_restore)
        ),
        _rss("backup peak RSS", backup_rss),
        _rss("restore peak RSS", restore_rss),
    ]


def _reference_backup(
    home: Path, output: Path, public: Path, recipients: list[backup.Recipient]
) -> float:
    output.unlink(missing_ok=True)
    gpg = gpgkeys.gpg_command(
        public, "--trust-model", "always", "--output", str(output)
    )
    for recipient in recipients:
        gpg += ["--recipient", recipient.subkey + "!"]
    started = time.perf_counter()
    tar = subprocess.Popen(
        ["tar", "-cf", "-", "-C", str(home), "."], stdout=subprocess.PIPE
    )
    subprocess.run([*gpg, "--encrypt"], stdin=tar.stdout, check=True)
    tar.wait()
    return time.perf_counter() - started


def _reference_restore(archive: Path, admin: Path, passphrase: str, lab: Lab) -> float:
    target = lab.work_dir / "reference"
    target.mkdir(parents=True)
    started = time.perf_counter()
    with gpgkeys.passphrase_fd(passphrase) as fd:
        gpg = subprocess.Popen(
            gpgkeys.gpg_command(
                admin,
                "--pinentry-mode",
                "loopback",
                "--passphrase-fd",
                str(fd),
                "--decrypt",
                str(archive),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            pass_fds=(fd,),
        )
        subprocess.run(
            ["tar", "-xf", "-", "-C", str(target)], stdin=gpg.stdout, check=True
        )
        gpg.wait()
    seconds = time.perf_counter() - started
    shutil.rmtree(target)
    return seconds


def _child(lab: Lab, *arguments: str) -> dict:
    output = subprocess.run(
        [sys.executable, "-c", _CHILD, str(lab.root), *arguments],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def _throughput(name: str, size_mib: int, ours: float, reference: float) -> Ratio:
    measured, baseline = size_mib / ours, size_mib / reference
    ratio = measured / baseline
    return Ratio(
        f"{name}, {size_mib} MiB",
        measured,
        baseline,
        "MiB/s",
        ratio,
        "ratio >= 0.90",
        ratio >= 0.90,
    )


def _rss(name: str, mib: float) -> Ratio:
    return Ratio(
        name,
        mib,
        RSS_LIMIT_MIB,
        "MiB",
        mib / RSS_LIMIT_MIB,
        f"< {RSS_LIMIT_MIB} MiB",
        mib < RSS_LIMIT_MIB,
    )

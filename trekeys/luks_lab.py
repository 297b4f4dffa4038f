"""The demo TRE's storage volumes: one small LUKS2 image per project instance.

Each instance gets a folder of realistic research files (a cohort CSV, notes,
a nested results folder and a binary model file), an ext4 image of them
encrypted in place with test-strength keyslot KDF settings, and its keys,
header backup and file manifest in the vault.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from trekeys.cryptsetup import KdfSettings
from trekeys.lab import Lab
from trekeys.luks import provision_volume
from trekeys.luks_device import SMALL_KEYSLOTS_BYTES
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

LAB_FS_BYTES = 8 * 1024 * 1024


def write_research_files(folder: Path, instance: str, users: list[str]) -> None:
    """Write a small, realistic set of project files into the new `folder`."""
    rng = random.Random(f"trekeys-lab-{instance}")
    folder.mkdir(mode=0o700, parents=True)
    (folder / "README.txt").write_text(
        f"Project instance {instance}: analysis of a linked cohort.\n"
        f"Researchers: {', '.join(users)}.\n",
        encoding="utf-8",
    )

    cohort = folder / "cohort"
    cohort.mkdir()
    rows = ["participant_id,age,sex,bmi,systolic_bp,smoker"]
    for number in range(1, 401):
        smoker = rng.choice(["yes", "no"])
        rows.append(
            f"P{number:05d},{rng.randint(18, 90)},{rng.choice('FM')},"
            f"{rng.uniform(17, 40):.1f},{rng.randint(95, 180)},{smoker}"
        )
    (cohort / "participants.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")

    results = folder / "analysis" / "results"
    results.mkdir(parents=True)
    (results / "summary.txt").write_text(
        "Logistic regression, outcome hypertension: odds ratio for smoking "
        f"{rng.uniform(1.1, 2.5):.2f}.\n",
        encoding="utf-8",
    )
    (folder / "analysis" / "model.bin").write_bytes(rng.randbytes(96 * 1024))
    (folder / "notes").mkdir()
    for user in users:
        (folder / "notes" / f"{user}.md").write_text(
            f"# Notes of {user}\n\n- checked the cohort extract\n", encoding="utf-8"
        )


def build_lab(lab: Lab, vault: Vault) -> None:
    """Build every instance's data folder, LUKS2 volume image and vault records."""
    for instance, users in lab.instances.items():
        folder = lab.instance_dir(instance)
        write_research_files(folder / "data", instance, users)
        provision_volume(
            lab,
            vault,
            instance,
            folder / "volume.img",
            kdf=KdfSettings.test(),
            source_dir=folder / "data",
            fs_bytes=LAB_FS_BYTES,
            keyslots_bytes=SMALL_KEYSLOTS_BYTES,
            boot_key_file=folder / "boot.key",
        )

"""The demo TRE ("lab"): a small but real TRE built on local files.

`create_lab` builds the vault on a stand-in portable device, one share file
per custodian, and then runs the build step of each capability (volumes, user
files, certificates, backups, SSH keys) in the order of `LAB_STEPS`. Every
drill notebook runs against a lab by default.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trekeys.audit import Actor
from trekeys.custody import (
    Custodian,
    check_each_share,
    combine_shares,
    generate_master_secret,
    master_fingerprint,
    read_share_file,
    split_master_secret,
    write_share_file,
)
from trekeys.errors import CredentialError, LabError, ShareError
from trekeys.records import KeyKind, KeyRecord, KeyState
from trekeys.vault import KdfSettings, Vault, VaultCredentials

logger = logging.getLogger(__name__)

MARKER = "trekeys-lab.json"
VAULT_MASTER_ID = "tre/vault-master"

# Build steps of the capabilities, run in this order by `create_lab`. Each is
# "module:function", and the function takes (lab, vault).
LAB_STEPS: list[str] = [
    "trekeys.reports:build_lab",
    "trekeys.luks:build_lab",
    "trekeys.tls:build_lab",
    "trekeys.files:build_lab",
    "trekeys.transfer:build_lab",
    "trekeys.wrap:build_lab",
    "trekeys.ssh:build_lab",
    "trekeys.backup:build_lab",
    "trekeys.incident:build_lab",
    "trekeys.ceremony:build_lab",
]

DEMO_CUSTODIANS = (
    Custodian("TRE System Administrator", "Sam Admin"),
    Custodian("Information Security Manager", "Isla Manager"),
    Custodian("Operations Manager", "Omar Operations"),
)

DEMO_INSTANCES: dict[str, list[str]] = {"alpha": ["alice", "bob"], "beta": ["carol"]}

DEMO_SERVICES = ("portal.tre.internal", "gitlab.tre.internal", "jupyter.tre.internal")


@dataclass
class Lab:
    """A demo TRE folder and its configuration."""

    root: Path
    config: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path | str) -> Lab:
        """Load the lab at `root`.

        Raises:
            LabError: the folder does not exist or is not a trekeys lab.
        """
        root = Path(root).resolve()
        if not root.is_dir():
            raise LabError(
                f"lab folder {root} does not exist; create it with "
                "'trekeys lab create'."
            )
        marker = root / MARKER
        if not marker.is_file():
            raise LabError(
                f"{root} is not a trekeys lab (no {MARKER}); create one with "
                "'trekeys lab create'."
            )
        try:
            config = json.loads(marker.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise LabError(f"{marker} is not valid JSON; recreate the lab.") from exc
        return cls(root=root, config=config)

    # Paths of the stand-in devices and folders.

    @property
    def portable_device(self) -> Path:
        return self.root / "portable-device"

    @property
    def vault_path(self) -> Path:
        return self.portable_device / "vault.kdbx"

    @property
    def keyfile_path(self) -> Path:
        return self.portable_device / "vault.keyx"

    @property
    def custodians_dir(self) -> Path:
        return self.root / "custodians"

    @property
    def instances_dir(self) -> Path:
        return self.root / "instances"

    @property
    def backup_media(self) -> Path:
        return self.root / "backup-media"

    @property
    def offline_media(self) -> Path:
        return self.root / "offline-media"

    @property
    def services_dir(self) -> Path:
        return self.root / "services"

    @property
    def work_dir(self) -> Path:
        """Scratch space for drills; each drill removes what it writes here."""
        return self.root / "work"

    @property
    def instances(self) -> dict[str, list[str]]:
        """Project instances and their users."""
        return dict(self.config.get("instances", {}))

    @property
    def services(self) -> list[str]:
        """DNS names of the TRE's web services."""
        return list(self.config.get("services", []))

    def instance_dir(self, instance: str) -> Path:
        return self.instances_dir / instance

    def share_files(self) -> list[Path]:
        """Return every custodian's share file in the lab."""
        return sorted(self.custodians_dir.glob("*.share"))

    @property
    def kdf(self) -> KdfSettings:
        """The KDF settings the lab was built with."""
        values = self.config.get("kdf", {})
        return KdfSettings(**values) if values else KdfSettings.test()

    @property
    def fast_kdf(self) -> bool:
        """Whether the lab uses weak, test-strength KDF settings for speed."""
        return bool(self.config.get("fast_kdf", True))

    def credentials(
        self, share_files: Sequence[Path] | None = None
    ) -> VaultCredentials:
        """Rebuild the vault credentials from share files and the lab's key file.

        With no `share_files`, the first `threshold` share files of the lab are used.
        """
        files = (
            list(share_files) if share_files else self.share_files()[: self.threshold]
        )
        if not files:
            raise ShareError(f"no custody share files in {self.custodians_dir}.")
        master = combine_shares(read_share_file(Path(path)) for path in files)
        return VaultCredentials(master, self.keyfile_path)

    @property
    def threshold(self) -> int:
        return int(self.config.get("threshold", 2))

    def open_vault(
        self,
        share_files: Sequence[Path] | None = None,
        *,
        actor: Actor | None = None,
        read_only: bool = False,
    ) -> Vault:
        """Open the lab's vault with the custodians' shares."""
        return self.open_vault_with(
            self.credentials(share_files), actor=actor, read_only=read_only
        )

    def open_vault_with(
        self,
        credentials: VaultCredentials,
        *,
        actor: Actor | None = None,
        read_only: bool = False,
    ) -> Vault:
        """Open the lab's vault, pointing to staged shares of an unfinished re-split.

        Raises:
            CredentialError: the credentials do not open the vault; when a
                re-split stopped after re-keying, the message names the folder
                that holds the only shares that open it.
        """
        try:
            return Vault.open(
                self.vault_path, credentials, actor=actor, read_only=read_only
            )
        except CredentialError as exc:
            staged = sorted(self.custodians_dir.glob(".resplit-*"))
            if not staged:
                raise
            raise CredentialError(
                f"{exc} A custody re-split did not finish: its new shares are in "
                f"{staged[-1]}; use them, then move them into {self.custodians_dir}."
            ) from exc

    def check_each_share(self, vault: Vault) -> list[dict[str, Any]]:
        """Check every custodian's share file on its own against the vault's master."""
        fingerprint = vault.get(VAULT_MASTER_ID).fingerprint
        return check_each_share(self.share_files(), self.threshold, fingerprint)

    def save_config(self) -> None:
        """Write the lab configuration back to its marker file."""
        _write_json(self.root / MARKER, self.config)


def create_lab(
    root: Path | str,
    *,
    fast_kdf: bool = True,
    threshold: int = 2,
    custodians: Sequence[Custodian] = DEMO_CUSTODIANS,
    steps: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Lab:
    """Build a demo TRE under `root`, which must be missing or empty.

    Args:
        root: the lab folder.
        fast_kdf: use test-strength KDF settings (fast; demo only).
        threshold: how many custodian shares open the vault.
        custodians: the share holders.
        steps: the capability build steps to run; all of `LAB_STEPS` by default.
        progress: called with the name of each step as it starts.

    Raises:
        LabError: `root` exists and is not empty, or a build step failed.
    """
    root = Path(root).resolve()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise LabError(
            f"{root} exists and is not empty; choose a new folder for the lab."
        )

    kdf = KdfSettings.test() if fast_kdf else KdfSettings.production()
    root.mkdir(parents=True, exist_ok=True)
    lab = Lab(
        root,
        {
            "trekeys_lab": 1,
            "instances": DEMO_INSTANCES,
            "services": list(DEMO_SERVICES),
            "threshold": threshold,
            "custodians": [
                {"role": c.role, "name": c.name, "share": f"{c.slug}.share"}
                for c in custodians
            ],
            "fast_kdf": fast_kdf,
            "kdf": {
                "time_cost": kdf.time_cost,
                "memory_kib": kdf.memory_kib,
                "parallelism": kdf.parallelism,
            },
        },
    )
    for folder in (
        lab.portable_device,
        lab.custodians_dir,
        lab.instances_dir,
        lab.backup_media,
        lab.offline_media,
        lab.services_dir,
    ):
        folder.mkdir(mode=0o700)

    vault = _create_custody_and_vault(lab, custodians, threshold, kdf)
    with vault:
        for step in steps if steps is not None else LAB_STEPS:
            if progress is not None:
                progress(step)
            _run_step(step, lab, vault)
        lab.save_config()
    logger.info("created demo TRE at %s", root)
    return lab


def _create_custody_and_vault(
    lab: Lab, custodians: Sequence[Custodian], threshold: int, kdf: KdfSettings
) -> Vault:
    master = generate_master_secret()
    split = split_master_secret(master, custodians, threshold)
    for custodian, mnemonic in split.shares.items():
        write_share_file(
            lab.custodians_dir / f"{custodian.slug}.share", custodian, mnemonic
        )
    write_keyfile(lab.keyfile_path)

    credentials = VaultCredentials(master, lab.keyfile_path)
    actor = Actor("TRE System Administrators", "trekeys lab")
    vault = Vault.create(
        lab.vault_path,
        credentials,
        kdf=kdf,
        actor=actor,
        meta={
            "custody": {
                "split": split.identifier,
                "threshold": threshold,
                "custodians": [{"role": c.role, "name": c.name} for c in custodians],
            },
        },
    )
    vault.add(
        KeyRecord(
            id=VAULT_MASTER_ID,
            kind=KeyKind.VAULT_MASTER,
            purpose="Master secret of the KeePass vault, split among the custodians.",
            owner="tre",
            custodian="Information Security Manager",
            state=KeyState.ACTIVE,
            algorithm="SLIP-39 Shamir split of a 256-bit secret",
            strength_bits=256,
            fingerprint=master_fingerprint(master),
            protects=["key:*"],
            locations=[f"custodian share: {c.role}" for c in custodians],
            attributes={"threshold": str(threshold), "split": split.identifier},
        )
    )
    return vault


def write_keyfile(path: Path) -> None:
    """Write a new KeePass 2.0 XML key file holding 256 random bits, mode 0600."""
    key = secrets.token_bytes(32)
    digest = hashlib.sha256(key).hexdigest()[:8].upper()
    hex_key = key.hex().upper()
    groups = " ".join(hex_key[i : i + 8] for i in range(0, len(hex_key), 8))
    text = (
        '<?xml version="1.0" encoding="utf-8"?>\n<KeyFile>\n'
        "  <Meta>\n    <Version>2.0</Version>\n  </Meta>\n"
        f'  <Key>\n    <Data Hash="{digest}">{groups}</Data>\n  </Key>\n</KeyFile>\n'
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def _run_step(step: str, lab: Lab, vault: Vault) -> None:
    module_name, _, function_name = step.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    logger.info("lab step %s", step)
    function(lab, vault)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)

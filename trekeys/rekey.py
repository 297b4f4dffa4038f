"""The rotator of the vault's master secret: a new secret and new custodian shares.

`rotate_key` follows the rotator contract of `trekeys.incident`. It keeps the
id ``tre/vault-master`` for the new master secret, because the lab and the
share checks look the master up by that id. It records the old secret under
a new id, ``tre/vault-master/split-<old split>``, in the compromised or
deactivated state.

Order of work, so that a failure never leaves the lab without working
shares: the new shares are written to a staging folder, the vault is
re-keyed and saved, and only then are the old share files moved to a
``retired-<split>`` folder and the new ones moved into their place.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from trekeys.custody import (
    Custodian,
    generate_master_secret,
    master_fingerprint,
    split_master_secret,
    write_share_file,
)
from trekeys.errors import IncidentError
from trekeys.lab import VAULT_MASTER_ID, Lab
from trekeys.records import KeyKind, KeyState, utcnow
from trekeys.vault import Vault, VaultCredentials

logger = logging.getLogger(__name__)


def rotate_key(
    lab: Lab, vault: Vault, key_id: str, *, reason: str, compromised: bool
) -> list[str]:
    """Replace the vault's master secret and split the new one among the custodians.

    Returns:
        ``[tre/vault-master]``: the same id, now for the new master secret.

    Raises:
        IncidentError: `key_id` is not the lab's vault master, or the vault is
            not the lab's.
    """
    record = vault.get(key_id)
    if key_id != VAULT_MASTER_ID or record.kind is not KeyKind.VAULT_MASTER:
        raise IncidentError(
            f"key {key_id} is not the vault master {VAULT_MASTER_ID}; rotate it "
            "with the rotator of its own kind."
        )
    if vault.path.resolve() != lab.vault_path.resolve():
        raise IncidentError(
            f"vault {vault.path} is not the vault of lab {lab.root}; open the lab's "
            "own vault to re-split its custody."
        )

    custodians = [Custodian(c["role"], c["name"]) for c in lab.config["custodians"]]
    master = generate_master_secret()
    split = split_master_secret(master, custodians, lab.threshold)
    staging = lab.custodians_dir / f".new-{split.identifier}"
    staging.mkdir(mode=0o700)
    try:
        for custodian, mnemonic in split.shares.items():
            write_share_file(staging / f"{custodian.slug}.share", custodian, mnemonic)
        old_split = _record_new_master(
            vault, split.identifier, master, reason, compromised
        )
        vault.update_meta(
            custody={**vault.meta.get("custody", {}), "split": split.identifier}
        )
        vault.change_credentials(VaultCredentials(master, lab.keyfile_path))
    except BaseException:
        shutil.rmtree(staging)
        raise

    _swap_share_files(lab, staging, old_split)
    logger.info("vault master re-split: %s replaces %s", split.identifier, old_split)
    return [VAULT_MASTER_ID]


def _record_new_master(
    vault: Vault, identifier: str, master: bytes, reason: str, compromised: bool
) -> str:
    """Record the old master under a retired id and the new one under the usual id."""
    current = vault.get(VAULT_MASTER_ID)
    old_split = current.attributes.get("split", "unknown")
    retired = dataclasses.replace(
        current,
        id=f"{VAULT_MASTER_ID}/split-{old_split}",
        purpose=f"Earlier vault master secret (split {old_split}); it opens only "
        "vault generations saved before it was replaced.",
        protects=[],
        locations=[f"retired custodian shares: custodians/retired-{old_split}"],
        history=list(current.history),
        attributes=dict(current.attributes),
    )
    retired.transition(
        KeyState.COMPROMISED if compromised else KeyState.DEACTIVATED, reason
    )
    vault.add(retired)

    now = utcnow()
    renewed = dataclasses.replace(
        current,
        fingerprint=master_fingerprint(master),
        created=now,
        activated=now,
        attributes={**current.attributes, "split": identifier},
        history=[
            *current.history,
            {
                "at": now.isoformat(),
                "from": "active",
                "to": "active",
                "reason": f"new master secret, split {identifier}: {reason}",
            },
        ],
    )
    vault.update(
        renewed, operation="rotate", detail=f"split {old_split} -> {identifier}"
    )
    return old_split


def _swap_share_files(lab: Lab, staging: Path, old_split: str) -> None:
    retired = lab.custodians_dir / f"retired-{old_split}"
    retired.mkdir(mode=0o700, exist_ok=True)
    for old in lab.share_files():
        old.rename(retired / old.name)
    for new in sorted(staging.glob("*.share")):
        new.rename(lab.custodians_dir / new.name)
    staging.rmdir()

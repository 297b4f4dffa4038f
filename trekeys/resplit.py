"""Re-splitting custody: a new master secret, a re-keyed vault, new shares.

When a custodian leaves, or the threshold changes, the vault gets a new
256-bit master secret split among the new custodians. The vault is re-keyed
under it (new composite key, new KDF salt) in one save, so every share of the
old split stops working. The record ``tre/vault-master`` takes the new
fingerprint, and the old master stays in the vault as a destroyed tombstone
so that the audit trail can still name it.

The new shares are first written to a staging folder beside the share files,
then renamed into place one by one after the vault has been re-keyed. If the
process dies between the two steps, the staging folder
``.resplit-<split id>`` holds the only shares that open the vault.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trekeys.custody import (
    Custodian,
    combine_shares,
    generate_master_secret,
    master_fingerprint,
    read_share_file,
    split_master_secret,
    write_share_file,
)
from trekeys.errors import CredentialError, PolicyError
from trekeys.lab import VAULT_MASTER_ID, Lab
from trekeys.records import KeyKind, KeyRecord, KeyState, utcnow
from trekeys.vault import KdfSettings, Vault, VaultCredentials, list_generations

logger = logging.getLogger(__name__)


@dataclass
class ResplitResult:
    """The changes of a re-split: the old and new split ids and the share files."""

    old_split: str
    new_split: str
    threshold: int
    share_files: dict[str, Path] = field(default_factory=dict)
    removed_share_files: list[Path] = field(default_factory=list)
    tombstone_id: str = ""


def resplit_custody(
    vault: Vault,
    custodians: Sequence[Custodian],
    threshold: int,
    share_dir: Path,
    *,
    keyfile: Path | None,
    reason: str,
    kdf: KdfSettings | None = None,
    compromised: bool = False,
) -> ResplitResult:
    """Re-key the vault under a new master secret split among `custodians`.

    Args:
        vault: the open, writable vault; the re-key saves it.
        custodians: the new share holders.
        threshold: how many of their shares open the vault.
        share_dir: the folder of share files, named ``<role slug>.share``; share
            files of custodians no longer listed are removed.
        keyfile: the key file of the composite key (kept as it is), or None.
        reason: why custody is re-split, kept in the audit log and history.
        kdf: new KDF settings, or None to keep the vault's.
        compromised: the old master secret was disclosed, so its tombstone is
            destroyed-compromised rather than destroyed.

    Returns:
        The old and new split identifiers and the new share files.

    Raises:
        ShareError: the threshold does not fit the custodians.
        CredentialError: the new shares do not rebuild the new master secret.
    """
    share_dir = Path(share_dir)
    master = generate_master_secret()
    split = split_master_secret(master, custodians, threshold)
    old_split = str(vault.meta.get("custody", {}).get("split", "unknown"))

    # Stage the new shares before touching the vault, so a failure here costs
    # nothing but the staging folder.
    staging = share_dir / f".resplit-{split.identifier}"
    staging.mkdir(mode=0o700)
    try:
        for custodian, mnemonic in split.shares.items():
            write_share_file(staging / f"{custodian.slug}.share", custodian, mnemonic)
        _verify_shares(sorted(staging.glob("*.share")), threshold, master)
        tombstone_id = _record_new_master(
            vault, master, split.identifier, reason, compromised
        )
        _record_custody_meta(vault, split.identifier, threshold, custodians)
        detail = f"split {old_split} -> {split.identifier}: {reason}"
        vault.rekey(VaultCredentials(master, keyfile), kdf=kdf, detail=detail)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    result = ResplitResult(old_split, split.identifier, threshold)
    result.tombstone_id = tombstone_id
    _install_shares(staging, share_dir, result)
    logger.info(
        "re-split custody of vault %s: split %s -> %s, %d of %d",
        vault.path,
        old_split,
        split.identifier,
        threshold,
        len(custodians),
    )
    return result


def resplit_lab_custody(
    lab: Lab,
    vault: Vault,
    *,
    custodians: Sequence[Custodian] | None = None,
    threshold: int | None = None,
    reason: str,
    compromised: bool = False,
) -> ResplitResult:
    """Re-split the demo TRE's custody and update the lab's configuration.

    With no `custodians` or `threshold`, the lab's current ones are kept: the
    split is new, the people are the same.
    """
    custodians = list(custodians or lab_custodians(lab))
    threshold = threshold or lab.threshold
    result = resplit_custody(
        vault,
        custodians,
        threshold,
        lab.custodians_dir,
        keyfile=_keyfile(lab),
        reason=reason,
        compromised=compromised,
    )

    lab.config["threshold"] = threshold
    lab.config["custodians"] = [
        {"role": c.role, "name": c.name, "share": f"{c.slug}.share"} for c in custodians
    ]
    lab.save_config()
    return result


def rotate_key(
    lab: Lab, vault: Vault, key_id: str, *, reason: str, compromised: bool
) -> list[str]:
    """Rotate the vault master for a compromise response or a routine rotation.

    This is the vault-master rotator of `trekeys.response_plan.ROTATORS`: a
    re-split among the lab's current custodians with the same threshold.

    Returns:
        ``[tre/vault-master]``: the same id, now for the new master secret.

    Raises:
        PolicyError: `key_id` is not the vault master.
    """
    if key_id != VAULT_MASTER_ID:
        raise PolicyError(
            f"key {key_id} is not the vault master {VAULT_MASTER_ID}; rotate it "
            "with the rotator of its own kind."
        )
    resplit_lab_custody(lab, vault, reason=reason, compromised=compromised)
    return [VAULT_MASTER_ID]


def lab_custodians(lab: Lab) -> list[Custodian]:
    """Return the custodians named in the lab's configuration."""
    return [Custodian(c["role"], c["name"]) for c in lab.config.get("custodians", [])]


def _verify_shares(files: list[Path], threshold: int, master: bytes) -> None:
    rebuilt = combine_shares(read_share_file(p) for p in files[:threshold])
    if master_fingerprint(rebuilt) != master_fingerprint(master):
        raise CredentialError(
            "the new custody shares do not rebuild the new master secret; the vault "
            "was not changed, run the re-split again."
        )


def _record_new_master(
    vault: Vault, master: bytes, split_id: str, reason: str, compromised: bool = False
) -> str:
    # The old master stays as a destroyed tombstone with its own id, so the
    # inventory and the audit trail still show which split held the vault when.
    now = utcnow()
    if VAULT_MASTER_ID not in vault:
        vault.add(
            KeyRecord(
                id=VAULT_MASTER_ID,
                kind=KeyKind.VAULT_MASTER,
                purpose="Master secret of the KeePass vault, split among custodians.",
                owner="tre",
                custodian="Information Security Manager",
                state=KeyState.ACTIVE,
                algorithm="SLIP-39 Shamir split of a 256-bit secret",
                strength_bits=256,
                protects=["key:*"],
            )
        )
    current = vault.get(VAULT_MASTER_ID)
    old_split = current.attributes.get("split", "unknown")
    tombstone_id = f"{VAULT_MASTER_ID}/split-{old_split}"
    if tombstone_id in vault:
        tombstone_id = f"{tombstone_id}-{now.strftime('%Y%m%dT%H%M%S')}"
    old = KeyRecord.from_dict({**current.to_dict(), "id": tombstone_id})
    old.purpose = f"Earlier master secret of the vault (split {old_split})."
    old.protects = []
    old.attributes = {**old.attributes, "held_by": "; ".join(old.locations)}
    old.locations = []
    old.history = list(current.history)
    vault.add(old)
    retirement = (
        (KeyState.COMPROMISED, KeyState.DESTROYED_COMPROMISED)
        if compromised
        else (KeyState.DEACTIVATED, KeyState.DESTROYED)
    )
    for state in retirement:
        vault.transition(tombstone_id, state, f"custody re-split: {reason}")

    current.fingerprint = master_fingerprint(master)
    current.activated = now
    current.attributes = {
        **current.attributes,
        "split": split_id,
        "previous_split": old_split,
        "rekeyed": now.isoformat(),
    }
    vault.update(current, operation="resplit-custody", detail=reason, keep_history=True)
    return tombstone_id


def _record_custody_meta(
    vault: Vault, split_id: str, threshold: int, custodians: Sequence[Custodian]
) -> None:
    custody = dict(vault.meta.get("custody", {}))
    history = list(custody.pop("history", []))
    if custody:
        history.append({**custody, "replaced": utcnow().isoformat()})
    vault.update_meta(
        custody={
            "split": split_id,
            "threshold": threshold,
            "custodians": [{"role": c.role, "name": c.name} for c in custodians],
            "history": history,
        }
    )
    record = vault.get(VAULT_MASTER_ID)
    record.attributes["threshold"] = str(threshold)
    record.locations = [f"custodian share: {c.role}" for c in custodians]
    vault.update(record, operation="update", detail="custody locations")


def _install_shares(staging: Path, share_dir: Path, result: ResplitResult) -> None:
    # Each rename is atomic; share files of custodians who left are removed
    # because they belong to a split that no longer opens the vault.
    new_names = {p.name for p in staging.glob("*.share")}
    for name in sorted(new_names):
        target = share_dir / name
        os.replace(staging / name, target)
        result.share_files[name.removesuffix(".share")] = target
    for old in sorted(share_dir.glob("*.share")):
        if old.name not in new_names:
            old.unlink()
            result.removed_share_files.append(old)
    _fsync_dir(share_dir)
    staging.rmdir()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class ResplitProof:
    """The evidence of a re-split drill: what changed and what was shown to fail."""

    result: ResplitResult
    old_shares_rejected: bool
    generations_reject_old_shares: bool
    new_shares_open: bool
    share_checks: list[dict[str, Any]]


def resplit_and_prove(lab: Lab, vault: Vault, *, reason: str) -> ResplitProof:
    """Re-split the lab's custody among the same custodians and prove the effect.

    The old shares are read into memory only, never copied to disk, and are
    used to try the live vault and every generation read-only: each attempt
    must fail with a credential error. The new share files must open the vault
    and each must be valid on its own.
    """
    old_files = lab.share_files()[: lab.threshold]
    old_master = combine_shares(read_share_file(p) for p in old_files)
    old_credentials = VaultCredentials(old_master, _keyfile(lab))

    result = resplit_lab_custody(lab, vault, reason=reason)

    files = [lab.vault_path, *list_generations(lab.vault_path)]
    rejected = [_rejects(path, old_credentials) for path in files]
    with Vault.open(lab.vault_path, lab.credentials(), read_only=True) as reopened:
        new_open = (
            reopened.get(VAULT_MASTER_ID).attributes.get("split") == result.new_split
        )
    return ResplitProof(
        result=result,
        old_shares_rejected=rejected[0],
        generations_reject_old_shares=all(rejected[1:]),
        new_shares_open=new_open,
        share_checks=lab.check_each_share(vault),
    )


def _keyfile(lab: Lab) -> Path | None:
    return lab.keyfile_path if lab.keyfile_path.is_file() else None


def _rejects(path: Path, credentials: VaultCredentials) -> bool:
    try:
        Vault.open(path, credentials, read_only=True).close()
    except CredentialError:
        return True
    return False

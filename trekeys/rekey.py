"""The rotator of the vault master, for the compromise response and rotation.

It follows the rotator contract of `trekeys.response_plan` and delegates the
work to the custody re-split (`trekeys.resplit`). That makes a new master
secret and new shares for the same custodians and threshold, re-keys the
vault, removes the earlier generations and keeps the old master as a
destroyed tombstone. The
record ``tre/vault-master`` keeps its id for the new secret, because the lab
and the share checks look the master up by that id. After a compromise the
tombstone is marked destroyed-compromised, so the records show that the old
split was disclosed.
"""

from __future__ import annotations

import logging

from trekeys.errors import IncidentError
from trekeys.lab import VAULT_MASTER_ID, Lab
from trekeys.records import KeyKind, KeyState
from trekeys.resplit import resplit_lab_custody
from trekeys.vault import Vault

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

    result = resplit_lab_custody(lab, vault, reason=reason)
    if compromised:
        vault.transition(result.tombstone_id, KeyState.DESTROYED_COMPROMISED, reason)
        vault.save()
    logger.info(
        "vault master rotated: split %s replaces %s", result.new_split, result.old_split
    )
    return [VAULT_MASTER_ID]

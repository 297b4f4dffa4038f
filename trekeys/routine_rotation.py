"""Routine rotation of keys whose cryptoperiod has ended or is about to end.

Rotation goes through the same per-kind rotators as a compromise response
(`trekeys.response_plan.ROTATORS`), called with ``compromised=False``. The old key
is deactivated afterwards, unless its rotator re-keyed it in place, so it can
still process data it protected before (decrypt, verify) but protects nothing
new, as NIST SP 800-57 Part 1 describes for the deactivated state.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from trekeys.depgraph import DependencyGraph
from trekeys.errors import RotatorMissingError
from trekeys.inventory import build_inventory
from trekeys.lab import Lab
from trekeys.records import KeyKind, KeyState
from trekeys.response_plan import (
    ROTATORS,
    missing_rotators,
    order_keys,
    resolve_rotator,
)
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

DUE_FLAGS = {"cryptoperiod-ended", "cryptoperiod-ending"}

# States from which a rotated key is deactivated; a rotator may have done it.
_IN_USE = {KeyState.ACTIVE, KeyState.SUSPENDED}


def find_due_keys(vault: Vault, *, warning_days: int = 30) -> list[dict[str, str]]:
    """Return the keys whose cryptoperiod has ended or ends within `warning_days`.

    Returns:
        One row per key: id, kind, state, expires, flags, and whether a
        rotator is installed for its kind.
    """
    rows = build_inventory(vault, warning_days=warning_days)
    due = [r for r in rows if DUE_FLAGS & set(r.flags)]
    missing = missing_rotators([KeyKind(r.kind) for r in due])
    return [
        {
            "id": r.id,
            "kind": r.kind,
            "state": r.state,
            "expires": r.expires,
            "flags": ", ".join(r.flags),
            "rotator": "installed" if KeyKind(r.kind) not in missing else "missing",
        }
        for r in due
    ]


def rotate_keys(
    lab: Lab,
    vault: Vault,
    key_ids: Sequence[str],
    *,
    reason: str,
    rotators: Mapping[KeyKind, str] | None = None,
) -> dict[str, list[str]]:
    """Rotate `key_ids` in a safe order and deactivate the old keys.

    The vault is saved after each key, so a failure keeps the keys already
    rotated.

    Returns:
        The new key ids, by old key id.

    Raises:
        RecordNotFoundError: a key id is unknown.
        RotatorMissingError: a key's kind has no installed rotator; nothing
            is rotated.
    """
    table = ROTATORS if rotators is None else rotators
    graph = DependencyGraph.from_vault(vault)
    records = [vault.get(key_id) for key_id in key_ids]
    for kind, target in missing_rotators([r.kind for r in records], table).items():
        affected = [r.id for r in records if r.kind is kind]
        raise RotatorMissingError(kind.value, target, affected)

    rotated: dict[str, list[str]] = {}
    for key_id in order_keys(graph, list(key_ids)):
        rotate = resolve_rotator(table[vault.get(key_id).kind])
        new_ids = list(rotate(lab, vault, key_id, reason=reason, compromised=False))
        old = vault.get(key_id)
        if key_id not in new_ids and old.state in _IN_USE:
            vault.transition(key_id, KeyState.DEACTIVATED, reason)
        vault.save()
        rotated[key_id] = new_ids
        logger.info("rotated %s: new keys %s", key_id, ", ".join(new_ids))
    return rotated

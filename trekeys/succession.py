"""Helpers shared by the rotations of file, wrapping and MAC keys.

A rotated key gets a new record whose id carries a generation suffix
(``files/alice`` becomes ``files/alice.v2``), so that the old record stays
in the vault to open or verify what it protected before.
"""

from __future__ import annotations

import re

from trekeys.records import KeyState
from trekeys.vault import Vault

_GENERATION = re.compile(r"^(?P<base>.+?)(?:\.v(?P<number>\d+))?$")


def next_key_id(vault: Vault, key_id: str) -> str:
    """Return the id of the next generation of `key_id` that the vault lacks."""
    match = _GENERATION.match(key_id)
    base = match.group("base") if match else key_id
    number = int(match.group("number") or 1) if match else 1
    while True:
        number += 1
        candidate = f"{base}.v{number}"
        if candidate not in vault:
            return candidate


def retire_key(vault: Vault, key_id: str, *, reason: str, compromised: bool) -> None:
    """Move a replaced key to compromised, or to deactivated when it is still sound.

    A deactivated key may still decrypt or verify what it protected before
    (NIST SP 800-57 Part 1, 5.3.4); a compromised one is kept only to
    recover data and to trace what it exposed.
    """
    record = vault.get(key_id)
    target = KeyState.COMPROMISED if compromised else KeyState.DEACTIVATED
    if record.state is target:
        return
    vault.transition(key_id, target, reason)

"""Key records and the key-state machine.

A key record describes one key without holding its material: what it is for,
who owns and holds it, its state and dates, and what it protects. The states
and allowed transitions follow NIST SP 800-57 Part 1 Rev. 5, section 7.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from trekeys.errors import RecordError, StateTransitionError

_KEY_ID = re.compile(r"^[a-z0-9][a-z0-9._:/@-]{0,199}$")


class KeyState(StrEnum):
    """Key states of NIST SP 800-57 Part 1."""

    PRE_ACTIVATION = "pre-activation"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    DEACTIVATED = "deactivated"
    COMPROMISED = "compromised"
    DESTROYED = "destroyed"
    DESTROYED_COMPROMISED = "destroyed-compromised"


class KeyKind(StrEnum):
    """Kinds of key that the TRE manages."""

    VAULT_MASTER = "vault-master"
    LUKS_VOLUME = "luks-volume"
    LUKS_PASSPHRASE = "luks-passphrase"
    LUKS_BOOT_KEY = "luks-boot-key"
    FILE_KEY = "file-key"
    TLS_CA = "tls-ca"
    TLS_CERT = "tls-cert"
    GPG = "gpg"
    SSH = "ssh"
    WRAPPING = "wrapping"
    MAC = "mac"
    SIGNING = "signing"


_ALLOWED: dict[KeyState, frozenset[KeyState]] = {
    KeyState.PRE_ACTIVATION: frozenset(
        {KeyState.ACTIVE, KeyState.COMPROMISED, KeyState.DESTROYED}
    ),
    KeyState.ACTIVE: frozenset(
        {KeyState.SUSPENDED, KeyState.DEACTIVATED, KeyState.COMPROMISED}
    ),
    KeyState.SUSPENDED: frozenset(
        {KeyState.ACTIVE, KeyState.DEACTIVATED, KeyState.COMPROMISED}
    ),
    KeyState.DEACTIVATED: frozenset({KeyState.DESTROYED, KeyState.COMPROMISED}),
    KeyState.COMPROMISED: frozenset({KeyState.DESTROYED_COMPROMISED}),
    KeyState.DESTROYED: frozenset({KeyState.DESTROYED_COMPROMISED}),
    KeyState.DESTROYED_COMPROMISED: frozenset(),
}

# States in which the key material must already be gone: the record is a tombstone.
TOMBSTONE_STATES = frozenset({KeyState.DESTROYED, KeyState.DESTROYED_COMPROMISED})

# States in which a key may still be used to protect new data.
USABLE_STATES = frozenset({KeyState.ACTIVE})


def allowed_transitions(state: KeyState) -> frozenset[KeyState]:
    """Return the states that a key in `state` may move to."""
    return _ALLOWED[state]


def utcnow() -> datetime:
    """Return the current time in UTC, second precision."""
    return datetime.now(UTC).replace(microsecond=0)


@dataclass
class KeyRecord:
    """The description of one key, without its material.

    Attributes:
        id: a stable identifier such as ``alpha/luks-volume``.
        kind: the kind of key.
        purpose: one sentence on what the key is for.
        owner: whom the key belongs to, such as ``instance:alpha`` or
            ``user:alice`` or ``tre``.
        custodian: the role that holds the key.
        state: the NIST SP 800-57 state.
        created, activated, expires: dates in UTC.
        cryptoperiod_days: how long the key may be active before rotation.
        fingerprint: a public identifier (SHA-256 of a public key, certificate
            or key check value); never the key.
        algorithm: for example ``aes-xts-plain64``, ``ed25519``, ``rsa4096``.
        strength_bits: security strength as in NIST SP 800-57 Table 2.
        protects: references to what the key protects, such as
            ``volume:alpha``, ``backup:alpha/2026-12-01``, ``key:alpha/boot``.
        signs: references to what the key has signed.
        locations: where copies of the key material or its backups are held.
        attributes: kind-specific metadata, such as a LUKS UUID.
        history: state changes, each with time, from, to and reason.
    """

    id: str
    kind: KeyKind
    purpose: str
    owner: str
    custodian: str = "TRE System Administrators"
    state: KeyState = KeyState.PRE_ACTIVATION
    created: datetime = field(default_factory=utcnow)
    activated: datetime | None = None
    expires: datetime | None = None
    cryptoperiod_days: int | None = None
    fingerprint: str = ""
    algorithm: str = ""
    strength_bits: int = 0
    protects: list[str] = field(default_factory=list)
    signs: list[str] = field(default_factory=list)
    locations: list[str] = field(default_factory=list)
    attributes: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not _KEY_ID.match(self.id):
            raise RecordError(
                f"invalid key id {self.id!r}; use lower-case letters, digits and "
                "'.-_:/@', starting with a letter or digit, at most 200 characters."
            )
        self.kind = KeyKind(self.kind)
        self.state = KeyState(self.state)

    @property
    def is_tombstone(self) -> bool:
        """Whether the key material has been destroyed."""
        return self.state in TOMBSTONE_STATES

    def cryptoperiod_end(self) -> datetime | None:
        """Return when the cryptoperiod ends: the expiry, or activation plus period."""
        ends = []
        if self.expires is not None:
            ends.append(self.expires)
        if self.cryptoperiod_days is not None:
            start = self.activated or self.created
            ends.append(start + timedelta(days=self.cryptoperiod_days))
        return min(ends) if ends else None

    def transition(
        self, new_state: KeyState, reason: str, *, at: datetime | None = None
    ) -> None:
        """Move the record to `new_state`, checking the transition and keeping history.

        Raises:
            StateTransitionError: the transition is not allowed from the current state.
        """
        new_state = KeyState(new_state)
        if new_state not in _ALLOWED[self.state]:
            raise StateTransitionError(self.id, self.state.value, new_state.value)

        when = at or utcnow()
        self.history.append(
            {
                "at": when.isoformat(),
                "from": self.state.value,
                "to": new_state.value,
                "reason": reason,
            }
        )
        self.state = new_state
        if new_state is KeyState.ACTIVE and self.activated is None:
            self.activated = when

    def to_dict(self) -> dict[str, Any]:
        """Return the record as JSON-ready values."""
        data = dataclasses.asdict(self)
        data["kind"] = self.kind.value
        data["state"] = self.state.value
        for name in ("created", "activated", "expires"):
            value = getattr(self, name)
            data[name] = value.isoformat() if value is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KeyRecord:
        """Build a record from `to_dict` output.

        Raises:
            RecordError: a field is missing or has the wrong type.
        """
        values = dict(data)
        try:
            for name in ("created", "activated", "expires"):
                if values.get(name):
                    values[name] = datetime.fromisoformat(values[name])
                else:
                    values[name] = None if name != "created" else utcnow()
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in values.items() if k in known})
        except (TypeError, ValueError) as exc:
            raise RecordError(
                f"invalid key record {data.get('id')!r}: {exc}; "
                "the vault entry may have been edited outside trekeys."
            ) from exc

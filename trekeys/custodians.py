"""The custodian register: who holds which custody share or key file, and since when.

Each entry names a person, their policy role, what they hold, since when,
under which version of the key management policy, and when they acknowledged
their duties. The register lives in the vault's metadata, so it is as
protected as the keys and every change is in the audit log. It feeds the key
inventory (one row per holding) and the compromise plan: a custodian who
leaves still knows their share, so the master secret must be split anew, and
a key file they held must be replaced.

Holdings are written ``share:<split id>:<share file>`` or
``key-file:<file name>:<first 16 hex digits of its SHA-256>``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import TYPE_CHECKING, Any

from trekeys.errors import RecordError
from trekeys.records import utcnow
from trekeys.vault import Vault

if TYPE_CHECKING:
    from trekeys.lab import Lab

logger = logging.getLogger(__name__)

META_KEY = "custodian_register"
POLICY_VERSION = "ISMS-09-07 v1.5"
DUTIES = (
    "keep the share or key file in the physical safe, never copy it to a networked "
    "machine, bring it to ceremonies, and report its loss at once"
)


@dataclass
class CustodianEntry:
    """One holding of one custodian.

    Attributes:
        name: the person.
        role: their policy role.
        holds: the share or key file, as ``share:...`` or ``key-file:...``.
        since: when they received it (UTC, ISO 8601).
        policy_version: the policy in force when they received it.
        duties_acknowledged: when they acknowledged their duties, or "".
        duties: the duties they acknowledged.
        left: when they gave up the holding or left, or "".
        left_reason: why.
    """

    name: str
    role: str
    holds: str
    since: str
    policy_version: str = POLICY_VERSION
    duties_acknowledged: str = ""
    duties: str = DUTIES
    left: str = ""
    left_reason: str = ""

    @property
    def active(self) -> bool:
        return not self.left

    @property
    def kind(self) -> str:
        """``share`` or ``key-file``."""
        return self.holds.split(":", 1)[0]


@dataclass(frozen=True)
class RequiredAction:
    """An action the compromise plan requires because of a custodian change."""

    trigger: str
    custodian: str
    holds: str
    action: str


def load_register(vault: Vault) -> list[CustodianEntry]:
    """Return the register entries stored in the vault, oldest first."""
    known = {f.name for f in fields(CustodianEntry)}
    return [
        CustodianEntry(**{k: v for k, v in raw.items() if k in known})
        for raw in vault.meta.get(META_KEY, [])
    ]


def _save(
    vault: Vault, entries: list[CustodianEntry], operation: str, detail: str
) -> None:
    vault.update_meta(**{META_KEY: [asdict(e) for e in entries]})
    vault.record_operation(operation, "custodian-register", "success", detail)


def _check_holding(holds: str) -> None:
    kind, _, rest = holds.partition(":")
    if kind not in ("share", "key-file") or rest.count(":") != 1:
        raise RecordError(
            f"invalid holding {holds!r}; write 'share:<split id>:<share file>' or "
            "'key-file:<file name>:<sha256 prefix>'."
        )


def add_custodian(
    vault: Vault,
    name: str,
    role: str,
    holds: str,
    *,
    since: datetime | None = None,
    policy_version: str = POLICY_VERSION,
    duties_acknowledged: datetime | None = None,
) -> CustodianEntry:
    """Add a holding to the register.

    Several custodians may hold copies of one key file, but a share has one
    holder at a time.

    Raises:
        RecordError: the holding is malformed, or the share is held by someone
            still active, or this person already holds it.
    """
    _check_holding(holds)
    entries = load_register(vault)
    for entry in entries:
        if not entry.active or entry.holds != holds:
            continue
        if entry.kind == "share" or entry.name == name:
            raise RecordError(
                f"{holds} is already held by {entry.name} since {entry.since}; "
                "record their departure first."
            )

    entry = CustodianEntry(
        name=name,
        role=role,
        holds=holds,
        since=(since or utcnow()).isoformat(),
        policy_version=policy_version,
        duties_acknowledged=duties_acknowledged.isoformat()
        if duties_acknowledged
        else "",
    )
    entries.append(entry)
    _save(vault, entries, "add-custodian", f"{name} ({role}) holds {holds}")
    logger.info("custodian %s now holds %s", name, holds)
    return entry


def acknowledge_duties(vault: Vault, name: str, *, at: datetime | None = None) -> int:
    """Record that `name` acknowledged the duties of all their active holdings.

    Returns:
        The number of holdings updated.

    Raises:
        RecordError: `name` holds nothing.
    """
    entries = load_register(vault)
    mine = [e for e in entries if e.name == name and e.active]
    if not mine:
        raise RecordError(
            f"{name} holds no share or key file in the custodian register."
        )
    for entry in mine:
        entry.duties_acknowledged = (at or utcnow()).isoformat()
    _save(vault, entries, "acknowledge-duties", name)
    return len(mine)


def record_departure(
    vault: Vault, name: str, reason: str, *, at: datetime | None = None
) -> list[RequiredAction]:
    """Record that a custodian gave up all holdings, and return what must follow.

    Raises:
        RecordError: `name` holds nothing.
    """
    entries = load_register(vault)
    mine = [e for e in entries if e.name == name and e.active]
    if not mine:
        raise RecordError(
            f"{name} holds no share or key file in the custodian register."
        )
    for entry in mine:
        entry.left = (at or utcnow()).isoformat()
        entry.left_reason = reason
    _save(vault, entries, "custodian-left", f"{name}: {reason}")
    logger.warning("custodian %s left (%s); a re-split is required", name, reason)
    return [a for a in required_actions(vault) if a.custodian == name]


def record_new_split(
    vault: Vault,
    split: str,
    holders: list[tuple[str, str, str]],
    *,
    at: datetime | None = None,
) -> list[CustodianEntry]:
    """Record a re-split: close every active share of another split and add the
    new shares, each as (name, role, share file), with duties still to be
    acknowledged.

    Returns:
        The new entries.
    """
    when = (at or utcnow()).isoformat()
    entries = load_register(vault)
    for entry in entries:
        if (
            entry.active
            and entry.kind == "share"
            and entry.holds.split(":")[1] != split
        ):
            entry.left = when
            entry.left_reason = f"share retired by the re-split to {split}"

    added = [
        CustodianEntry(name=name, role=role, holds=f"share:{split}:{share}", since=when)
        for name, role, share in holders
    ]
    _save(vault, [*entries, *added], "record-split", f"split {split}: {len(added)}")
    logger.info("custodian register: split %s with %d shares", split, len(added))
    return added


def _current_split(vault: Vault) -> str:
    return str(vault.meta.get("custody", {}).get("split", ""))


def required_actions(vault: Vault) -> list[RequiredAction]:
    """Return the open actions the register calls for, for the compromise plan.

    A departed custodian's share of the current split calls for a re-split,
    which closes once the vault records a new split. A departed custodian's key
    file calls for a new key file, which closes once an active entry holds a
    key file of the same name with another digest. Missing acknowledgments of
    duties are listed too.
    """
    entries = load_register(vault)
    split = _current_split(vault)
    active_key_files = {e.holds for e in entries if e.active and e.kind == "key-file"}

    actions = []
    for entry in entries:
        if entry.active and not entry.duties_acknowledged:
            actions.append(
                RequiredAction(
                    "duties not acknowledged",
                    entry.name,
                    entry.holds,
                    f"record {entry.name}'s acknowledgment of the custodian duties",
                )
            )
        if entry.active:
            continue
        if entry.kind == "share" and entry.holds.split(":")[1] == split:
            actions.append(
                RequiredAction(
                    "custodian left",
                    entry.name,
                    entry.holds,
                    f"re-split required: {entry.name} still knows a share of split "
                    f"{split}; run the custody-resplit ceremony with two custodians",
                )
            )
        if entry.kind == "key-file" and not _key_file_replaced(entry, active_key_files):
            actions.append(
                RequiredAction(
                    "custodian left",
                    entry.name,
                    entry.holds,
                    f"replace key file {entry.holds.split(':')[1]} held by "
                    f"{entry.name} and re-key the vault with the new one",
                )
            )
    return actions


def _key_file_replaced(entry: CustodianEntry, active: set[str]) -> bool:
    name = entry.holds.split(":")[1]
    return any(h.split(":")[1] == name and h != entry.holds for h in active)


def register_rows(vault: Vault) -> list[dict[str, Any]]:
    """Return one inventory row per holding, with flags for open actions."""
    open_actions = required_actions(vault)
    rows = []
    for entry in load_register(vault):
        flags = sorted(
            {
                "re-split-required"
                if "re-split" in a.action
                else a.trigger.replace(" ", "-")
                for a in open_actions
                if a.custodian == entry.name and a.holds == entry.holds
            }
        )
        rows.append(
            {
                "id": f"custody/{entry.holds}",
                "kind": entry.kind,
                "custodian": entry.name,
                "role": entry.role,
                "since": entry.since[:10],
                "policy": entry.policy_version,
                "duties acknowledged": entry.duties_acknowledged[:10] or "no",
                "state": "active" if entry.active else f"left {entry.left[:10]}",
                "flags": ",".join(flags),
            }
        )
    return rows


def key_file_holding(name: str, content: bytes) -> str:
    """Return the holding string of a key file with this name and content."""
    return f"key-file:{name}:{hashlib.sha256(content).hexdigest()[:16]}"


def add_lab_custodians(lab: Lab, vault: Vault) -> None:
    """Fill the register from the lab's custodians: each holds one share, and the
    TRE System Administrator and the Information Security Manager hold the key
    file too, as the policy asks that both keep keys to the vault."""
    split = _current_split(vault)
    key_file = key_file_holding(lab.keyfile_path.name, lab.keyfile_path.read_bytes())
    now = utcnow()
    for custodian in lab.config.get("custodians", []):
        name, role = custodian["name"], custodian["role"]
        add_custodian(
            vault,
            name,
            role,
            f"share:{split}:{custodian['share']}",
            since=now,
            duties_acknowledged=now,
        )
        if role in ("TRE System Administrator", "Information Security Manager"):
            add_custodian(
                vault, name, role, key_file, since=now, duties_acknowledged=now
            )

"""The inventory of every key and its use, with cryptoperiod alerts and exports.

The key management policy asks for an inventory of all cryptographic keys and
their use, including the storage devices used for backups. Each row names a
key, its state and dates, what it protects and where its copies are, and
carries flags for keys past or near the end of their cryptoperiod.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from trekeys.errors import DestinationExistsError
from trekeys.records import KeyRecord, KeyState, utcnow
from trekeys.vault import Vault, strength_bits_of

logger = logging.getLogger(__name__)

VAULT_STRENGTH_BITS = 256
DEFAULT_WARNING_DAYS = 30

_LIVE_STATES = {KeyState.PRE_ACTIVATION, KeyState.ACTIVE, KeyState.SUSPENDED}


@dataclass
class InventoryRow:
    """One key in the inventory."""

    id: str
    kind: str
    owner: str
    custodian: str
    state: str
    algorithm: str
    strength_bits: int
    age_days: int
    expires: str
    days_left: int | None
    protects: str
    locations: str
    fingerprint: str
    flags: list[str] = field(default_factory=list)


def build_row(record: KeyRecord, now: datetime, warning_days: int) -> InventoryRow:
    """Return the inventory row of one record, with its flags."""
    end = record.cryptoperiod_end()
    days_left = None if end is None else (end - now).days
    flags = list(_flags(record, now, end, warning_days))
    return InventoryRow(
        id=record.id,
        kind=record.kind.value,
        owner=record.owner,
        custodian=record.custodian,
        state=record.state.value,
        algorithm=record.algorithm,
        strength_bits=record.strength_bits,
        age_days=(now - record.created).days,
        expires=end.date().isoformat() if end else "",
        days_left=days_left,
        protects=", ".join(record.protects),
        locations=", ".join(record.locations),
        fingerprint=record.fingerprint,
        flags=flags,
    )


def _flags(record: KeyRecord, now: datetime, end: datetime | None, warning_days: int):
    if record.state in _LIVE_STATES and end is not None:
        if end <= now:
            yield "cryptoperiod-ended"
        elif end - now <= timedelta(days=warning_days):
            yield "cryptoperiod-ending"
    if record.state is KeyState.COMPROMISED:
        yield "compromised"
    if record.attributes.get("header_backup_stale") == "true":
        yield "stale-header-backup"
    last_proof = record.attributes.get("last_recovery_proof")
    if last_proof and record.state in _LIVE_STATES:
        if now - datetime.fromisoformat(last_proof) > timedelta(days=365):
            yield "recovery-proof-overdue"


def build_inventory(
    vault: Vault,
    *,
    kind: str | None = None,
    owner: str | None = None,
    state: str | None = None,
    now: datetime | None = None,
    warning_days: int = DEFAULT_WARNING_DAYS,
) -> list[InventoryRow]:
    """Return an inventory row for every record that matches the filters."""
    now = now or utcnow()
    records = vault.find(kind=kind, owner=owner, state=state)
    return [build_row(record, now, warning_days) for record in records]


def vault_strength_check(vault: Vault) -> tuple[bool, str]:
    """Check the policy rule: the vault is at least as strong as every key it holds."""
    strongest = strength_bits_of(vault.get(key_id) for key_id in vault.ids())
    holds = strongest <= VAULT_STRENGTH_BITS
    message = (
        f"vault protection {VAULT_STRENGTH_BITS} bits (256-bit master secret, AES-256 "
        f"or ChaCha20 payload); strongest key held {strongest} bits: "
        + ("meets the policy" if holds else "VIOLATES the policy")
    )
    return holds, message


def to_json(rows: list[InventoryRow]) -> str:
    """Return the inventory as a JSON array."""
    return json.dumps([asdict(row) for row in rows], indent=2)


def to_csv(rows: list[InventoryRow]) -> str:
    """Return the inventory as CSV with a header row."""
    buffer = io.StringIO()
    names = list(InventoryRow.__dataclass_fields__)
    writer = csv.DictWriter(buffer, fieldnames=names)
    writer.writeheader()
    for row in rows:
        values = asdict(row)
        values["flags"] = ";".join(row.flags)
        writer.writerow(values)
    return buffer.getvalue()


_TABLE_COLUMNS = (
    ("id", 34),
    ("kind", 15),
    ("owner", 16),
    ("state", 12),
    ("age_days", 8),
    ("expires", 10),
    ("flags", 20),
    ("protects", 24),
    ("locations", 0),
)


def to_table(rows: list[InventoryRow]) -> str:
    """Return the inventory as fixed-width text, one key per line."""
    header = " ".join(
        f"{name.replace('_days', ' (d)'):{width}}" for name, width in _TABLE_COLUMNS
    )
    lines = [header.rstrip()]
    for row in rows:
        values = asdict(row)
        values["flags"] = ",".join(row.flags) or "-"
        cells = [f"{values[name]!s:{width}}" for name, width in _TABLE_COLUMNS]
        lines.append(" ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def export_inventory(
    rows: list[InventoryRow], folder: Path, *, now: datetime | None = None
) -> dict[str, Path]:
    """Write the inventory as CSV and JSON files in `folder`, named by UTC time.

    Each file is written under a temporary name and renamed, so a reader never
    sees half a file.

    Returns:
        The paths written, keyed by format ("csv", "json").

    Raises:
        DestinationExistsError: a file of that name already exists.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = (now or utcnow()).strftime("%Y%m%dT%H%M%SZ")
    written = {}
    for extension, text in (("csv", to_csv(rows)), ("json", to_json(rows))):
        target = folder / f"inventory-{stamp}.{extension}"
        if target.exists():
            raise DestinationExistsError(target)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
        written[extension] = target
    logger.info("exported the inventory of %d keys to %s", len(rows), folder)
    return written

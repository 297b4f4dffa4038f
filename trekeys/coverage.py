"""Recovery-test coverage: when each key was last proven recoverable, and by what.

A drill that recovers a key records the time and the report that proves it
in the key record's ``last_recovery_proof`` and ``last_recovery_report``
attributes. The coverage table lists every key that still protects data,
with its last proof, and flags proofs older than the configured interval and
keys never proven at all.

The custody check here tests each custodian's share on its own. A share counts
as good only if it rebuilds the master secret together with other shares. So
one bad share is named even while a threshold of good ones still opens the
vault, and a good share is never blamed for a bad neighbour.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from trekeys.custody import check_each_share
from trekeys.errors import RecordError
from trekeys.records import KeyRecord, utcnow
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

DEFAULT_PROOF_INTERVAL_DAYS = 365
PROOF_ATTRIBUTE = "last_recovery_proof"
REPORT_ATTRIBUTE = "last_recovery_report"
VAULT_MASTER_ID = "tre/vault-master"


@dataclass
class CoverageRow:
    """The recovery-proof status of one key.

    Attributes:
        key_id: the key.
        kind: its kind.
        state: its NIST SP 800-57 state.
        last_proof: when it was last proven recoverable (ISO 8601), or "".
        report: the report that proves it, or "".
        age_days: days since the last proof, or None.
        status: ``proven``, ``overdue`` or ``never proven``.
    """

    key_id: str
    kind: str
    state: str
    last_proof: str
    report: str
    age_days: int | None
    status: str


def record_recovery_proof(
    vault: Vault, key_id: str, report: str, *, at: datetime | None = None
) -> KeyRecord:
    """Record that `report` proved `key_id` recoverable at `at` (now by default)."""
    record = vault.get(key_id)
    if record.is_tombstone:
        raise RecordError(
            f"key {key_id} was destroyed; a recovery proof of a tombstone means "
            "nothing, so check the key id."
        )
    record.attributes[PROOF_ATTRIBUTE] = (at or utcnow()).isoformat()
    record.attributes[REPORT_ATTRIBUTE] = report
    vault.update(record, operation="recovery-proof", detail=report)
    return record


def recovery_coverage(
    vault: Vault,
    *,
    now: datetime | None = None,
    interval_days: int = DEFAULT_PROOF_INTERVAL_DAYS,
) -> list[CoverageRow]:
    """Return the recovery-proof status of every key that is not a tombstone."""
    now = now or utcnow()
    limit = timedelta(days=interval_days)
    rows = []
    for key_id in sorted(vault.ids()):
        record = vault.get(key_id)
        if record.is_tombstone:
            continue
        proof = record.attributes.get(PROOF_ATTRIBUTE, "")
        age = None
        status = "never proven"
        if proof:
            age = (now - datetime.fromisoformat(proof)).days
            status = (
                "overdue" if now - datetime.fromisoformat(proof) > limit else "proven"
            )
        rows.append(
            CoverageRow(
                key_id=key_id,
                kind=record.kind.value,
                state=record.state.value,
                last_proof=proof,
                report=record.attributes.get(REPORT_ATTRIBUTE, ""),
                age_days=age,
                status=status,
            )
        )
    return rows


def check_lab_shares(
    share_files: Sequence[Path], threshold: int, vault: Vault
) -> list[dict[str, Any]]:
    """Check each share against the fingerprint of the vault's master secret record."""
    fingerprint = vault.get(VAULT_MASTER_ID).fingerprint
    return check_each_share(share_files, threshold, fingerprint)

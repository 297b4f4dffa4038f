"""Proof, per kind of key, that old keys are shut out and new keys work.

After a response, `verify_replacements` checks with the tools themselves, not
only with the records. An old LUKS passphrase or boot key must no longer open
its keyslot, and the new one must. An old volume key must no longer match the
volume's header digest, the new one must, and the files must recover. An old
TLS certificate must be listed in its CA's CRL, and its replacement must carry
a different public key. No backup may stay encrypted to an old GPG key, and a
re-encrypted backup must restore with each of its recipients. Kinds without a
check here are covered by the record checks of
`trekeys.incident_report.verify_response` only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import serialization

from trekeys.lab import Lab
from trekeys.records import KeyKind
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

Check = Callable[[Lab, Vault, str, list[str]], list[dict[str, Any]]]


def _spki(public_key: Any) -> bytes:
    return bytes(
        public_key.public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )


def _row(check: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"check": check, "passed": bool(passed), "detail": detail}


def check_keyslot_secret(
    lab: Lab, vault: Vault, old_id: str, new_ids: list[str]
) -> list[dict[str, Any]]:
    """Check that the old passphrase or boot key fails and the new one opens."""
    from trekeys.luks import verify_keyslot_secret

    rows = [
        _row(
            f"old {old_id} no longer opens the volume",
            not verify_keyslot_secret(lab, vault, old_id),
            "cryptsetup open --test-passphrase",
        )
    ]
    for new_id in new_ids:
        rows.append(
            _row(
                f"new {new_id} opens the volume",
                verify_keyslot_secret(lab, vault, new_id),
                "cryptsetup open --test-passphrase",
            )
        )
    return rows


def check_volume_key(
    lab: Lab, vault: Vault, old_id: str, new_ids: list[str]
) -> list[dict[str, Any]]:
    """Check that the old volume key no longer matches the volume, and the new does."""
    from trekeys.luks import verify_volume_key
    from trekeys.luks_recovery import run_recovery_drill

    old = vault.get(old_id)
    if old.is_tombstone:
        rows = [
            _row(
                f"old {old_id} was destroyed after the re-encryption",
                True,
                f"{old.state.value}: its material is no longer in the vault",
            )
        ]
    else:
        rows = [
            _row(
                f"old {old_id} no longer decrypts the re-encrypted volume",
                not verify_volume_key(lab, vault, old_id),
                "checked against the LUKS2 header's volume key digest",
            )
        ]
    for new_id in new_ids:
        rows.append(
            _row(
                f"new {new_id} matches the volume",
                verify_volume_key(lab, vault, new_id),
                "checked against the LUKS2 header's volume key digest",
            )
        )

    instance = old.owner.removeprefix("instance:")
    outcome = run_recovery_drill(lab, vault, instance)
    rows.append(
        _row(
            f"files of volume {instance} recover with the new keys",
            outcome.files_from_passphrase > 0
            and outcome.files_from_escrow > 0
            and outcome.live_unchanged,
            f"{outcome.files_from_passphrase} files by passphrase, "
            f"{outcome.files_from_escrow} by the escrowed volume key, "
            "all matching the manifest",
        )
    )
    return rows


def check_certificate(
    lab: Lab, vault: Vault, old_id: str, new_ids: list[str]
) -> list[dict[str, Any]]:
    """Check that the old certificate is revoked and the new one has a new key."""
    from trekeys.tls_records import load_record_certificate
    from trekeys.tls_revoke import crl_entries

    old = vault.get(old_id)
    issuer = old.attributes.get("issuer", "")
    serial = old.attributes.get("serial", "")
    listed = crl_entries(vault, issuer) if issuer and issuer != "self" else {}
    rows = [
        _row(
            f"old certificate of {old_id} is in the CRL of {issuer}",
            serial in listed,
            f"serial {serial}: {listed.get(serial, 'not listed')}",
        )
    ]

    old_key = load_record_certificate(vault, old_id).public_key()
    for new_id in new_ids:
        new_key = load_record_certificate(vault, new_id).public_key()
        rows.append(
            _row(
                f"new certificate of {new_id} carries a new key",
                _spki(new_key) != _spki(old_key),
                "public keys compared",
            )
        )
    return rows


def check_backup_key(
    lab: Lab, vault: Vault, old_id: str, new_ids: list[str]
) -> list[dict[str, Any]]:
    """Check that no backup is left encrypted to the old GPG key.

    The newest backup encrypted to each new key is then restored once with
    every one of its recipients and compared with its manifest.
    """
    from trekeys.restore import drill_restore
    from trekeys.rotation import find_backups_for_key

    left = find_backups_for_key(lab, vault, old_id)
    rows = [
        _row(
            f"no backup is still encrypted to old {old_id}",
            not left,
            ", ".join(b.reference for b in left) or "OpenPGP recipients read",
        )
    ]
    lab.work_dir.mkdir(mode=0o700, exist_ok=True)
    for new_id in new_ids:
        found = find_backups_for_key(lab, vault, new_id)
        rows.append(
            _row(
                f"backups are encrypted to new {new_id}",
                bool(found),
                f"{len(found)} backups",
            )
        )
        if not found:
            continue
        newest = found[-1]
        reports = drill_restore(lab, vault, newest, work_dir=lab.work_dir)
        rows.append(
            _row(
                f"{newest.reference} restores with each recipient",
                bool(reports) and all(r.passed for r in reports),
                ", ".join(
                    f"{r.key_id}: {'ok' if r.passed else r.error}" for r in reports
                ),
            )
        )
    return rows


CHECKS: dict[KeyKind, Check] = {
    KeyKind.GPG: check_backup_key,
    KeyKind.LUKS_PASSPHRASE: check_keyslot_secret,
    KeyKind.LUKS_BOOT_KEY: check_keyslot_secret,
    KeyKind.LUKS_VOLUME: check_volume_key,
    KeyKind.TLS_CERT: check_certificate,
}


def verify_replacements(
    lab: Lab, vault: Vault, new_keys: dict[str, list[str]]
) -> list[dict[str, Any]]:
    """Run the kind's check for every replaced key that has one.

    Args:
        lab: the lab.
        vault: the open vault.
        new_keys: the new key ids by old key id, as a response returns them.

    Returns:
        One row per check: check, passed, detail.
    """
    rows: list[dict[str, Any]] = []
    for old_id, new_ids in new_keys.items():
        check = CHECKS.get(vault.get(old_id).kind)
        if check is None or not new_ids or old_id in new_ids:
            continue
        rows.extend(check(lab, vault, old_id, new_ids))
    logger.info("checked %d replaced keys with their tools", len(rows))
    return rows

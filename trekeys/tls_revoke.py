"""Revocation of the TRE's service certificates and the CA's CRLs.

Revoking lists the certificate in the issuing CA's CRL with the RFC 5280
reason given, and moves its key to the compromised state for key compromise
or to the deactivated state for any other reason. Superseded certificates,
replaced by a renewal, are listed too, with the reason ``superseded``. The
vault is the source of truth: each CRL is rebuilt from the certificate
history on the key records and signed by the CA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509

from trekeys.errors import CertificateError, PolicyError
from trekeys.records import KeyKind, KeyRecord, KeyState, allowed_transitions
from trekeys.tls_ca import resolve_now
from trekeys.tls_deploy import write_public_file
from trekeys.tls_records import (
    CRL_ATTACHMENT,
    REVOKED,
    SELF_SIGNED,
    SUPERSEDED,
    current_entry,
    find_active_ca,
    json_attribute,
    load_record_certificate,
    mark_certificate,
    path_for_record,
    path_from_record,
    require_tls_record,
)
from trekeys.tls_x509 import (
    REVOCATION_REASONS,
    RevokedEntry,
    build_crl,
    check_ca_usable,
    crl_pem,
    load_private_key,
)
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

DEFAULT_CRL_DAYS = 7


def revoke_certificate(
    vault: Vault,
    key_id: str,
    reason: str,
    *,
    now: datetime | None = None,
    publish: bool = True,
) -> KeyRecord:
    """Revoke the current certificate of a service key and publish the CA's CRL.

    The key moves to the compromised state for ``keyCompromise`` and to the
    deactivated state for any other reason. Deployed files stay in place until
    they are replaced, and the audit reports them as revoked.

    Raises:
        CertificateError: `reason` is not an RFC 5280 reason trekeys accepts.
        PolicyError: the key is a CA (rotate it instead).
    """
    now = resolve_now(now)
    if reason not in REVOCATION_REASONS:
        raise CertificateError(
            f"unknown revocation reason {reason!r}; use one of "
            f"{', '.join(REVOCATION_REASONS)}."
        )
    record = require_tls_record(vault, key_id)
    if record.kind is KeyKind.TLS_CA:
        raise PolicyError(
            f"{key_id} is a CA and cannot revoke itself; replace it with "
            f"'trekeys tls rotate {key_id}'."
        )

    entry = current_entry(record)
    retire_certificate(vault, record, reason, replaced_by=None, now=now)
    if publish:
        publish_crl_if_ca(vault, entry["issuer"], now=now)
    logger.info("revoked %s (serial %s): %s", key_id, entry["serial"], reason)
    return record


def retire_certificate(
    vault: Vault,
    record: KeyRecord,
    reason: str,
    *,
    replaced_by: str | None,
    now: datetime,
) -> None:
    """Revoke the record's current certificate and move the key out of use."""
    status = SUPERSEDED if reason == "superseded" else REVOKED
    mark_certificate(record, record.fingerprint, status, reason, now)
    record.attributes["revocation_reason"] = reason
    if replaced_by:
        record.attributes["replaced_by"] = replaced_by
    vault.update(
        record,
        operation="revoke",
        detail=f"serial {record.attributes['serial']}: {reason}",
    )

    # A CA compromise lets an attacker issue certificates, but it does not
    # expose the service keys, so only keyCompromise marks the key compromised.
    target = KeyState.COMPROMISED if reason == "keyCompromise" else KeyState.DEACTIVATED
    if record.state is not target and target in allowed_transitions(record.state):
        note = f"certificate revoked: {reason}" + (
            f", replaced by {replaced_by}" if replaced_by else ""
        )
        vault.transition(record.id, target, note)


@dataclass(frozen=True)
class PublishedCrl:
    """A CRL that was signed and published."""

    ca_id: str
    number: int
    revoked_serials: list[str]
    path: Path | None
    pem: bytes


def publish_crl(
    vault: Vault,
    ca_id: str | None = None,
    *,
    out_path: Path | None = None,
    next_update_days: int = DEFAULT_CRL_DAYS,
    now: datetime | None = None,
) -> PublishedCrl:
    """Sign a new CRL listing every revoked or superseded certificate of the CA,
    store it in the vault and write it to `out_path` or the CA's publish folder.

    Raises:
        CertificateError: there is no such CA.
        CertificateValidityError: the CA is expired or not yet valid.
    """
    now = resolve_now(now)
    ca = vault.get(ca_id) if ca_id else find_active_ca(vault)
    if ca.kind is not KeyKind.TLS_CA or ca.is_tombstone:
        raise CertificateError(f"{ca.id} is not a usable TLS CA; give the CA's key id.")
    ca_certificate = load_record_certificate(vault, ca.id)
    check_ca_usable(ca_certificate, now, ca.id)

    entries = _revoked_entries(vault, ca.id)
    number = int(ca.attributes.get("crl_number", "0")) + 1
    ca_key = load_private_key(vault.read_secret(ca.id, "sign a CRL"), source=ca.id)
    crl = build_crl(
        ca_certificate,
        ca_key,
        entries,
        number=number,
        this_update=now,
        next_update_days=next_update_days,
    )
    pem = crl_pem(crl)

    ca.attributes["crl_number"] = str(number)
    path = out_path or _default_crl_path(vault, ca)
    if path is not None:
        write_public_file(Path(path), pem)
        ca.attributes["crl_path"] = path_for_record(vault, Path(path))
    vault.update(
        ca, operation="publish-crl", detail=f"CRL {number}, {len(entries)} revoked"
    )
    vault.add_attachment(ca.id, CRL_ATTACHMENT, pem)
    logger.info("published CRL %d of %s with %d entries", number, ca.id, len(entries))
    return PublishedCrl(
        ca.id, number, [format(e.serial, "x") for e in entries], path, pem
    )


def crl_entries(vault: Vault, ca_id: str) -> dict[str, str]:
    """Return the serials (hex) and reasons listed in the CA's latest CRL."""
    pem = vault.read_attachment(ca_id, CRL_ATTACHMENT)
    listed = {}
    for revoked in x509.load_pem_x509_crl(pem):
        try:
            reason = revoked.extensions.get_extension_for_class(x509.CRLReason)
            listed[format(revoked.serial_number, "x")] = reason.value.reason.value
        except x509.ExtensionNotFound:
            listed[format(revoked.serial_number, "x")] = "unspecified"
    return listed


def _default_crl_path(vault: Vault, ca: KeyRecord) -> Path | None:
    folder = ca.attributes.get("publish_dir")
    if not folder:
        return None
    return path_from_record(vault, folder) / f"{ca.id.replace('/', '-')}.crl.pem"


def _revoked_entries(vault: Vault, ca_id: str) -> list[RevokedEntry]:
    entries = []
    for record in vault.find(kind=KeyKind.TLS_CERT.value):
        for entry in json_attribute(record, "certificates"):
            if entry["issuer"] != ca_id or entry["status"] not in (REVOKED, SUPERSEDED):
                continue
            entries.append(
                RevokedEntry(
                    int(entry["serial"], 16),
                    datetime.fromisoformat(entry["revoked_at"]),
                    entry["reason"],
                )
            )
    return sorted(entries, key=lambda e: e.revoked_at)


def publish_crl_if_ca(vault: Vault, issuer_id: str, *, now: datetime) -> None:
    if issuer_id == SELF_SIGNED:
        return
    issuer = vault.get(issuer_id)
    if issuer.state is KeyState.ACTIVE:
        publish_crl(vault, issuer_id, now=now)

"""Renewal, revocation, CRLs and key rotation of the TRE's TLS certificates.

A certificate is renewed once a set fraction of its lifetime has passed (two
thirds by default), with the same key while the key's cryptoperiod lasts or
with a new key. The earlier certificate is then superseded: it is listed in
the CA's CRL with the RFC 5280 reason ``superseded``, and the new one is
deployed wherever the old one was. Revocation lists the certificate with the
reason given and moves its key to the deactivated or, for key compromise,
the compromised state.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509

from trekeys.errors import CertificateError, PolicyError
from trekeys.lab import Lab
from trekeys.records import KeyKind, KeyRecord, KeyState, allowed_transitions
from trekeys.tls_ca import (
    DEFAULT_KEY_CRYPTOPERIOD_DAYS,
    MAX_CERT_DAYS,
    check_lifetime,
    create_ca,
    deploy_certificate,
    deployment_targets,
    new_service_key,
    resolve_now,
    sign_service_certificate,
    write_public_file,
)
from trekeys.tls_records import (
    CRL_ATTACHMENT,
    REVOKED,
    SELF_SIGNED,
    SUPERSEDED,
    current_entry,
    find_active_ca,
    json_attribute,
    keep_certificate_attachment,
    load_record_certificate,
    mark_certificate,
    path_for_record,
    path_from_record,
    record_certificate,
    require_tls_record,
    service_of,
    set_json_attribute,
    store_certificate,
)
from trekeys.tls_x509 import (
    REVOCATION_REASONS,
    RevokedEntry,
    build_crl,
    check_ca_usable,
    crl_pem,
    key_type_for,
    load_private_key,
    parse_subject_names,
)
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

DEFAULT_RENEW_AFTER = 2 / 3
DEFAULT_CRL_DAYS = 7


def renewal_due(
    record: KeyRecord,
    *,
    renew_after: float = DEFAULT_RENEW_AFTER,
    now: datetime | None = None,
) -> bool:
    """Return whether `renew_after` (a fraction) of the certificate's lifetime has
    passed, so that it should be renewed."""
    if not 0 < renew_after <= 1:
        raise PolicyError(
            f"renew_after {renew_after} is not a fraction of the lifetime; give a "
            "number above 0 and at most 1, such as 0.67."
        )
    entry = current_entry(record)
    starts = datetime.fromisoformat(entry["not_before"])
    ends = datetime.fromisoformat(entry["not_after"])
    return resolve_now(now) >= starts + (ends - starts) * renew_after


def renew_certificate(
    vault: Vault,
    key_id: str,
    *,
    new_key: bool = False,
    days: int | None = None,
    max_days: int = MAX_CERT_DAYS,
    now: datetime | None = None,
) -> KeyRecord:
    """Issue a new certificate for an active service key and deploy it wherever
    the old one was; the old certificate is superseded.

    Args:
        vault: the open vault.
        key_id: the tls-cert key to renew.
        new_key: generate a new key; the old key is deactivated.
        days: the new lifetime, by default the old one.
        max_days: the longest lifetime allowed.
        now: the time of renewal.

    Returns:
        The record that holds the new certificate: the same one, or the new key's.

    Raises:
        PolicyError: the key is not active, or its cryptoperiod ends before the
            new certificate would (renew with `new_key`).
    """
    now = resolve_now(now)
    record = _active_service_record(vault, key_id)
    days = days or int(record.attributes.get("lifetime_days", "365"))
    check_lifetime(days, max_days)
    old_entry = current_entry(record)

    if new_key:
        renewed = _replace_key(vault, record, days=days, reason="superseded", now=now)
    else:
        renewed = _renew_same_key(vault, record, days=days, now=now)

    _publish_crl_if_ca(vault, old_entry["issuer"], now=now)
    logger.info(
        "renewed %s as %s, serial %s", key_id, renewed.id, renewed.attributes["serial"]
    )
    return renewed


def renew_due_certificates(
    vault: Vault,
    *,
    renew_after: float = DEFAULT_RENEW_AFTER,
    new_key: bool = False,
    now: datetime | None = None,
) -> list[KeyRecord]:
    """Renew every active service certificate whose renewal is due."""
    renewed = []
    for record in vault.find(kind=KeyKind.TLS_CERT.value, state=KeyState.ACTIVE.value):
        if renewal_due(record, renew_after=renew_after, now=now):
            renewed.append(
                renew_certificate(vault, record.id, new_key=new_key, now=now)
            )
    return renewed


def _renew_same_key(
    vault: Vault, record: KeyRecord, *, days: int, now: datetime
) -> KeyRecord:
    key_ends = (record.activated or record.created) + timedelta(
        days=record.cryptoperiod_days or DEFAULT_KEY_CRYPTOPERIOD_DAYS
    )
    if now + timedelta(days=days) > key_ends:
        raise PolicyError(
            f"the cryptoperiod of key {record.id} ends on {key_ends.date()}, before a "
            f"{days}-day certificate would; renew with a new key (--new-key)."
        )
    old = current_entry(record)
    key = load_private_key(
        vault.read_secret(record.id, "renew certificate"), source=record.id
    )
    names = parse_subject_names(json.loads(record.attributes["names"]))
    certificate, issuer_id = sign_service_certificate(
        vault,
        key,
        names,
        days=days,
        self_signed=old["issuer"] == SELF_SIGNED,
        ca_id=None,
        now=now,
    )

    keep_certificate_attachment(vault, record.id, old["serial"])
    mark_certificate(record, old["fingerprint"], SUPERSEDED, "superseded", now)
    record_certificate(record, certificate, issuer_id)
    store_certificate(vault, record.id, certificate)
    vault.update(
        record, operation="renew", detail=f"serial {record.attributes['serial']}"
    )
    for target in deployment_targets(vault, record):
        deploy_certificate(vault, record.id, target)
    return record


def _replace_key(
    vault: Vault,
    record: KeyRecord,
    *,
    days: int,
    reason: str,
    now: datetime,
    ca_id: str | None = None,
) -> KeyRecord:
    """Issue a new key and certificate for the same service and names, deploy it
    where the old key was, and retire the old key with `reason`."""
    old = current_entry(record)
    new_record = new_service_key(
        vault,
        service_of(record),
        parse_subject_names(json.loads(record.attributes["names"])),
        self_signed=old["issuer"] == SELF_SIGNED,
        days=days,
        key_type=key_type_for(record.algorithm),
        ca_id=ca_id,
        key_cryptoperiod_days=record.cryptoperiod_days or DEFAULT_KEY_CRYPTOPERIOD_DAYS,
        now=now,
    )
    for target in deployment_targets(vault, record):
        deploy_certificate(vault, new_record.id, target, replace=True)
    set_json_attribute(record, "deployments", [])
    record.locations = [
        loc for loc in record.locations if not loc.startswith("deployed:")
    ]
    _retire(vault, record, reason, replaced_by=new_record.id, now=now)
    return new_record


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
    _retire(vault, record, reason, replaced_by=None, now=now)
    if publish:
        _publish_crl_if_ca(vault, entry["issuer"], now=now)
    logger.info("revoked %s (serial %s): %s", key_id, entry["serial"], reason)
    return record


def _retire(
    vault: Vault,
    record: KeyRecord,
    reason: str,
    *,
    replaced_by: str | None,
    now: datetime,
) -> None:
    """Revoke the record's current certificate and move the key out of use."""
    mark_certificate(
        record,
        record.fingerprint,
        REVOKED if reason != "superseded" else SUPERSEDED,
        reason,
        now,
    )
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
        why = f"certificate revoked: {reason}" + (
            f", replaced by {replaced_by}" if replaced_by else ""
        )
        vault.transition(record.id, target, why)


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


def _publish_crl_if_ca(vault: Vault, issuer_id: str, *, now: datetime) -> None:
    if issuer_id == SELF_SIGNED:
        return
    issuer = vault.get(issuer_id)
    if issuer.state is KeyState.ACTIVE:
        publish_crl(vault, issuer_id, now=now)


def _active_service_record(vault: Vault, key_id: str) -> KeyRecord:
    record = require_tls_record(vault, key_id)
    if record.kind is not KeyKind.TLS_CERT or record.state is not KeyState.ACTIVE:
        raise PolicyError(
            f"{key_id} is a {record.state.value} {record.kind.value} key; only an "
            "active service key can be renewed or rotated."
        )
    return record


def rotate_key(
    lab: Lab, vault: Vault, key_id: str, *, reason: str, compromised: bool
) -> list[str]:
    """Replace a TLS key with a new one, for routine rotation or after compromise.

    For a service key: the certificate is revoked (``keyCompromise`` when
    compromised, else ``superseded``), a new key and certificate are issued for
    the same names, deployed where the old ones were, and a new CRL is published.

    For a CA: a new CA is created and published beside the old one, every
    active service certificate of the old CA is reissued from the new CA with a
    new key and redeployed, the old CA signs a last CRL listing all of them
    (``cACompromise`` or ``superseded``), its root certificate is withdrawn from
    the publish folder, and the old CA moves to compromised or deactivated.

    Args:
        lab: the TRE, for the default publish folder of a CA.
        vault: the open vault.
        key_id: a tls-cert or tls-ca key.
        reason: why the key is rotated, kept in the key's history.
        compromised: whether the key is known or suspected to be compromised.

    Returns:
        The ids of the new keys, the new CA first.
    """
    record = require_tls_record(vault, key_id)
    now = resolve_now(None)
    if record.kind is KeyKind.TLS_CA:
        return _rotate_ca(
            lab, vault, record, reason=reason, compromised=compromised, now=now
        )

    if record.state is not KeyState.ACTIVE:
        raise PolicyError(
            f"{key_id} is {record.state.value}; only an active key can be rotated."
        )
    revocation = "keyCompromise" if compromised else "superseded"
    issuer_id = current_entry(record)["issuer"]
    days = int(record.attributes.get("lifetime_days", "365"))
    new_record = _replace_key(
        vault, record, days=min(days, MAX_CERT_DAYS), reason=revocation, now=now
    )
    vault.record_operation(
        "rotate", key_id, "success", f"{reason}; new key {new_record.id}"
    )
    _publish_crl_if_ca(vault, issuer_id, now=now)
    return [new_record.id]


def _rotate_ca(
    lab: Lab,
    vault: Vault,
    old_ca: KeyRecord,
    *,
    reason: str,
    compromised: bool,
    now: datetime,
) -> list[str]:
    stored_dir = old_ca.attributes.get("publish_dir")
    publish_dir = (
        path_from_record(vault, stored_dir) if stored_dir else default_publish_dir(lab)
    )
    old_certificate = load_record_certificate(vault, old_ca.id)
    new_ca = create_ca(
        vault,
        days=int(old_ca.cryptoperiod_days or 1826),
        key_type=key_type_for(old_ca.algorithm, default="ecdsa-p384"),
        publish_dir=publish_dir,
        now=now,
        allow_active=True,
    )
    new_ids = [new_ca.id]

    revocation = "cACompromise" if compromised else "superseded"
    services = [
        r
        for r in vault.find(kind=KeyKind.TLS_CERT.value, state=KeyState.ACTIVE.value)
        if r.attributes.get("issuer") == old_ca.id
    ]
    for service in services:
        days = int(service.attributes.get("lifetime_days", "365"))
        replacement = _replace_key(
            vault, service, days=days, reason=revocation, now=now, ca_id=new_ca.id
        )
        new_ids.append(replacement.id)

    if old_ca.state is KeyState.ACTIVE and now < old_certificate.not_valid_after_utc:
        publish_crl(vault, old_ca.id, now=now)
    target = KeyState.COMPROMISED if compromised else KeyState.DEACTIVATED
    if old_ca.state is not target:
        vault.transition(old_ca.id, target, f"{reason}; replaced by {new_ca.id}")
    withdrawn = publish_dir / f"{old_ca.id.replace('/', '-')}.pem"
    withdrawn.unlink(missing_ok=True)
    publish_crl(vault, new_ca.id, now=now)
    vault.record_operation(
        "rotate", old_ca.id, "success", f"{reason}; new CA {new_ca.id}"
    )
    logger.info(
        "rotated CA %s to %s and reissued %d certificates",
        old_ca.id,
        new_ca.id,
        len(services),
    )
    return new_ids


def default_publish_dir(lab: Lab) -> Path:
    """Return the folder where the lab publishes CA certificates and CRLs."""
    return lab.root / "pki"

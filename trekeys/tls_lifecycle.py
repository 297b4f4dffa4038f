"""Renewal and key rotation of the TRE's TLS certificates.

A certificate is renewed once a set fraction of its lifetime has passed (two
thirds by default), with the same key while the key's cryptoperiod lasts or
with a new key. The earlier certificate is then superseded: it is listed in
the CA's CRL with the RFC 5280 reason ``superseded``, and the new one is
deployed wherever the old one was. Rotation after a compromise revokes,
reissues with new keys and redeploys (see `rotate_key`).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from pathlib import Path

from trekeys.errors import PolicyError
from trekeys.lab import Lab
from trekeys.records import KeyKind, KeyRecord, KeyState
from trekeys.tls_ca import (
    DEFAULT_KEY_CRYPTOPERIOD_DAYS,
    MAX_CERT_DAYS,
    check_lifetime,
    create_ca,
    new_service_key,
    resolve_now,
    sign_service_certificate,
)
from trekeys.tls_deploy import check_targets, deploy_certificate, deployment_targets
from trekeys.tls_names import parse_subject_names
from trekeys.tls_records import (
    SELF_SIGNED,
    SUPERSEDED,
    current_entry,
    keep_certificate_attachment,
    load_record_certificate,
    mark_certificate,
    path_from_record,
    record_certificate,
    require_tls_record,
    service_of,
    set_json_attribute,
    store_certificate,
)
from trekeys.tls_revoke import publish_crl, publish_crl_if_ca, retire_certificate
from trekeys.tls_x509 import (
    key_type_for,
    load_private_key,
)
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

DEFAULT_RENEW_AFTER = 2 / 3


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
        max_days: the maximum lifetime in days.
        now: the time of renewal.

    Returns:
        The record that contains the new certificate: the same one, or the new key's.

    Raises:
        PolicyError: the key is not active, or its cryptoperiod ends before the
            new certificate would (renew with `new_key`).
    """
    now = resolve_now(now)
    record = _active_service_record(vault, key_id)
    days = days or int(record.attributes.get("lifetime_days", "365"))
    check_lifetime(days, max_days)
    check_targets(deployment_targets(vault, record))
    old_entry = current_entry(record)

    if new_key:
        renewed = _replace_key(vault, record, days=days, reason="superseded", now=now)
    else:
        renewed = _renew_same_key(vault, record, days=days, now=now)

    publish_crl_if_ca(vault, old_entry["issuer"], now=now)
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
    """Renew every active service certificate whose renewal is due.

    A key whose cryptoperiod would end before its renewed certificate gets a new
    key even when `new_key` is False, so that one old key does not stop the batch.
    """
    now = resolve_now(now)
    renewed = []
    for record in vault.find(kind=KeyKind.TLS_CERT.value, state=KeyState.ACTIVE.value):
        if not renewal_due(record, renew_after=renew_after, now=now):
            continue
        days = int(record.attributes.get("lifetime_days", "365"))
        replace_key = new_key or now + timedelta(days=days) > key_expiry(record)
        renewed.append(
            renew_certificate(vault, record.id, new_key=replace_key, now=now)
        )
    return renewed


def key_expiry(record: KeyRecord) -> datetime:
    """Return when a service key's cryptoperiod ends, after which it must not be
    used in a new certificate."""
    return (record.activated or record.created) + timedelta(
        days=record.cryptoperiod_days or DEFAULT_KEY_CRYPTOPERIOD_DAYS
    )


def _renew_same_key(
    vault: Vault, record: KeyRecord, *, days: int, now: datetime
) -> KeyRecord:
    key_ends = key_expiry(record)
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
    check_targets(deployment_targets(vault, record))
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
    retire_certificate(vault, record, reason, replaced_by=new_record.id, now=now)
    return new_record


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

    For a CA: a new CA is created and published beside the old one. Every active
    service certificate of the old CA is reissued from the new CA with a new key
    and redeployed. The old CA then signs a last CRL that lists all of them
    (``cACompromise`` or ``superseded``), its root certificate is withdrawn from
    the publish folder, and it moves to compromised or deactivated.

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
    publish_crl_if_ca(vault, issuer_id, now=now)
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

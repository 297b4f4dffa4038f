"""How the vault records of TLS keys store their certificates and deployments.

A TLS key record (kind ``tls-ca`` or ``tls-cert``) holds the private key as
its material, the current certificate as the attachment ``certificate.pem``
and earlier certificates as ``certificate-<serial>.pem``. Its attributes are
strings, so lists are stored as JSON:

- ``certificates``: every certificate issued for the key, with its serial,
  fingerprint, validity, issuer key id and status (current, superseded or
  revoked, with the RFC 5280 reason and time);
- ``deployments``: the chain and key paths the certificate was deployed to;
- ``names``: the DNS names and IP addresses in the subjectAltName;
- ``issuer``: the key id of the issuing CA, or ``self`` for self-signed.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509

from trekeys.errors import CertificateError
from trekeys.records import KeyKind, KeyRecord, KeyState
from trekeys.tls_x509 import certificate_pem, fingerprint, load_certificates
from trekeys.vault import Vault

CERTIFICATE_ATTACHMENT = "certificate.pem"
CRL_ATTACHMENT = "crl.pem"
SELF_SIGNED = "self"
KEY_ID_PREFIX = "tls/"
CA_KEY_ID = "tls/ca"

# Certificate statuses in the ``certificates`` attribute.
CURRENT = "current"
SUPERSEDED = "superseded"
REVOKED = "revoked"


def json_attribute(record: KeyRecord, name: str) -> Any:
    """Return a JSON attribute of a record, or an empty list when it is unset."""
    return json.loads(record.attributes.get(name, "[]"))


def set_json_attribute(record: KeyRecord, name: str, value: Any) -> None:
    """Store `value` as a JSON attribute of a record."""
    record.attributes[name] = json.dumps(value, sort_keys=True)


def path_for_record(vault: Vault, path: Path) -> str:
    """Return how a file path is stored on a key record.

    Paths inside the folder that holds the vault's device folder (the root of a
    demo TRE) are stored relative to it, so that a copied TRE stays whole;
    other paths are stored absolute.
    """
    base = _record_base(vault)
    absolute = Path(path).resolve()
    if absolute.is_relative_to(base):
        return str(absolute.relative_to(base))
    return str(absolute)


def path_from_record(vault: Vault, text: str) -> Path:
    """Return the absolute path of a path stored by `path_for_record`."""
    path = Path(text)
    return path if path.is_absolute() else _record_base(vault) / path


def _record_base(vault: Vault) -> Path:
    return vault.path.resolve().parent.parent


def service_of(record: KeyRecord) -> str:
    """Return the DNS name of the service that a tls-cert record protects."""
    for reference in record.protects:
        if reference.startswith("service:"):
            return reference.removeprefix("service:")
    return ""


def next_key_id(vault: Vault, base: str) -> str:
    """Return `base` if unused, else `base@2`, `base@3`, ... for a later key."""
    if base not in vault:
        return base
    generation = 2
    while f"{base}@{generation}" in vault:
        generation += 1
    return f"{base}@{generation}"


def find_active_ca(vault: Vault, ca_id: str | None = None) -> KeyRecord:
    """Return the CA record `ca_id`, or the newest active CA.

    Raises:
        CertificateError: there is no active CA, or `ca_id` is not an active CA.
    """
    if ca_id is not None:
        record = vault.get(ca_id)
        if record.kind is not KeyKind.TLS_CA or record.state is not KeyState.ACTIVE:
            raise CertificateError(
                f"{ca_id} is not an active TLS CA (it is a {record.state.value} "
                f"{record.kind.value} key); choose an active CA."
            )
        return record
    active = vault.find(kind=KeyKind.TLS_CA.value, state=KeyState.ACTIVE.value)
    if not active:
        raise CertificateError(
            "the vault has no active TLS CA; create one with 'trekeys tls ca create' "
            "or issue a self-signed certificate."
        )
    return max(active, key=lambda r: r.created)


def find_service_key(vault: Vault, service: str) -> KeyRecord | None:
    """Return the active tls-cert record of `service`, or None."""
    for record in vault.find(kind=KeyKind.TLS_CERT.value):
        if service_of(record) == service and record.state is KeyState.ACTIVE:
            return record
    return None


def require_tls_record(vault: Vault, key_id: str) -> KeyRecord:
    """Return the record of a TLS key.

    Raises:
        RecordNotFoundError: no record has that id.
        CertificateError: the record is not a TLS key.
    """
    record = vault.get(key_id)
    if record.kind not in (KeyKind.TLS_CA, KeyKind.TLS_CERT):
        raise CertificateError(
            f"{key_id} is a {record.kind.value} key, not a TLS key; give a tls/ id."
        )
    return record


def load_record_certificate(vault: Vault, key_id: str) -> x509.Certificate:
    """Return the current certificate of a TLS key from its vault attachment."""
    pem = vault.read_attachment(key_id, CERTIFICATE_ATTACHMENT)
    return load_certificates(pem, source=f"the certificate of {key_id}")[0]


def record_certificate(
    record: KeyRecord, certificate: x509.Certificate, issuer_id: str
) -> dict[str, Any]:
    """Add `certificate` as the record's current one; return its history entry."""
    entry = {
        "serial": format(certificate.serial_number, "x"),
        "fingerprint": fingerprint(certificate),
        "not_before": certificate.not_valid_before_utc.isoformat(),
        "not_after": certificate.not_valid_after_utc.isoformat(),
        "issuer": issuer_id,
        "status": CURRENT,
    }
    history = json_attribute(record, "certificates")
    history.append(entry)
    set_json_attribute(record, "certificates", history)
    record.fingerprint = entry["fingerprint"]
    record.expires = certificate.not_valid_after_utc
    record.attributes["serial"] = entry["serial"]
    record.attributes["issuer"] = issuer_id
    return entry


def mark_certificate(
    record: KeyRecord, fingerprint_hex: str, status: str, reason: str, at: datetime
) -> None:
    """Mark one certificate of a record superseded or revoked, keeping the first
    revocation time unless the reason gets worse (key compromise)."""
    history = json_attribute(record, "certificates")
    for entry in history:
        if entry["fingerprint"] != fingerprint_hex:
            continue
        if entry["status"] == REVOKED and reason != "keyCompromise":
            return
        entry["status"] = status
        entry["reason"] = reason
        entry.setdefault("revoked_at", at.isoformat())
    set_json_attribute(record, "certificates", history)


def current_entry(record: KeyRecord) -> dict[str, Any]:
    """Return the history entry of the record's current certificate."""
    for entry in json_attribute(record, "certificates"):
        if entry["fingerprint"] == record.fingerprint:
            return dict(entry)
    raise CertificateError(
        f"the record of {record.id} has no certificate history; it may have been "
        "edited outside trekeys."
    )


def keep_certificate_attachment(vault: Vault, key_id: str, serial_hex: str) -> None:
    """Copy the current certificate to ``certificate-<serial>.pem`` before a renewal."""
    pem = vault.read_attachment(key_id, CERTIFICATE_ATTACHMENT)
    vault.add_attachment(key_id, f"certificate-{serial_hex}.pem", pem)


def store_certificate(vault: Vault, key_id: str, certificate: x509.Certificate) -> None:
    """Store `certificate` as the current certificate attachment of a key."""
    vault.add_attachment(key_id, CERTIFICATE_ATTACHMENT, certificate_pem(certificate))


def find_certificate_owner(
    vault: Vault, fingerprint_hex: str
) -> tuple[KeyRecord, dict[str, Any]] | None:
    """Return the record and history entry of a certificate, by its fingerprint."""
    for kind in (KeyKind.TLS_CERT, KeyKind.TLS_CA):
        for record in vault.find(kind=kind.value):
            for entry in json_attribute(record, "certificates"):
                if entry["fingerprint"] == fingerprint_hex:
                    return record, entry
    return None

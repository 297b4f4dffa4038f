"""The internal TRE root CA and service certificates: create, issue and import.

Workstations trust one root, the TRE CA, instead of one certificate per
service. The CA's private key exists only in the vault: trekeys reads it for
the moment of signing and never writes it to a file. Service keys leave the
vault only when a certificate is deployed (see `trekeys.tls_deploy`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from trekeys.errors import CertificateError, PolicyError, RecordError
from trekeys.records import KeyKind, KeyRecord, KeyState, utcnow
from trekeys.tls_deploy import write_public_file
from trekeys.tls_names import SubjectNames, parse_subject_names
from trekeys.tls_records import (
    CA_KEY_ID,
    KEY_ID_PREFIX,
    SELF_SIGNED,
    find_active_ca,
    find_service_key,
    load_record_certificate,
    next_key_id,
    path_for_record,
    path_from_record,
    record_certificate,
    store_certificate,
)
from trekeys.tls_x509 import (
    PrivateKey,
    build_ca_certificate,
    build_service_certificate,
    certificate_pem,
    check_ca_usable,
    check_key_matches,
    describe_key,
    generate_private_key,
    load_certificates,
    load_private_key,
    private_key_pem,
    subject_alt_names,
)
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

DEFAULT_CA_DAYS = 1826
DEFAULT_CERT_DAYS = 365
# The CA/Browser Forum caps publicly trusted server certificates at 398 days.
# Browsers do not apply the cap to private roots, but the TRE keeps it so that
# service keys and certificates turn over at least yearly.
MAX_CERT_DAYS = 398
DEFAULT_KEY_CRYPTOPERIOD_DAYS = 730


def resolve_now(now: datetime | None) -> datetime:
    """Return `now`, or the current UTC time; naive datetimes are rejected.

    Raises:
        CertificateError: `now` has no time zone.
    """
    if now is None:
        return utcnow()
    if now.tzinfo is None:
        raise CertificateError(
            f"the time {now.isoformat()} has no time zone; give an aware datetime."
        )
    return now


def create_ca(
    vault: Vault,
    *,
    common_name: str = "TRE Root CA",
    organization: str = "Trusted Research Environment",
    days: int = DEFAULT_CA_DAYS,
    key_type: str = "ecdsa-p384",
    publish_dir: Path | None = None,
    now: datetime | None = None,
    allow_active: bool = False,
) -> KeyRecord:
    """Create a root CA whose private key stays in the vault.

    Args:
        vault: the open vault.
        common_name: the CA's CN; the creation time is appended to tell
            generations apart.
        organization: the CA's O.
        days: the CA's lifetime.
        key_type: one of `KEY_TYPES`.
        publish_dir: where the root certificate and CRL are published for the
            workstations, or None.
        now: the start of validity (for back-dated demo data).
        allow_active: create it even though another CA is active (rotation).

    Raises:
        RecordError: another CA is active and `allow_active` is False.
    """
    now = resolve_now(now)
    active = vault.find(kind=KeyKind.TLS_CA.value, state=KeyState.ACTIVE.value)
    if active and not allow_active:
        raise RecordError(
            f"CA {active[0].id} is already active; replace it with "
            f"'trekeys tls rotate {active[0].id}' instead of creating another."
        )

    key = generate_private_key(key_type)
    name = f"{common_name} {now:%Y-%m-%dT%H%M}Z"
    certificate = build_ca_certificate(key, name, organization, now, days)
    key_id = next_key_id(vault, CA_KEY_ID)
    record = _new_record(
        key_id,
        KeyKind.TLS_CA,
        key,
        f"Root CA of the TRE that signs service certificates and CRLs ({name}).",
        now=now,
        cryptoperiod_days=days,
    )
    record.custodian = "Information Security Manager"
    record.signs = [f"crl:{key_id}"]
    record.attributes.update(
        {"mode": "root", "subject": certificate.subject.rfc4514_string()}
    )
    if publish_dir is not None:
        record.attributes["publish_dir"] = path_for_record(vault, Path(publish_dir))
    record_certificate(record, certificate, SELF_SIGNED)

    vault.add(record, private_key_pem(key))
    store_certificate(vault, key_id, certificate)
    logger.info("created TLS CA %s (%s, %d days)", key_id, record.fingerprint, days)
    if publish_dir is not None:
        publish_ca_certificate(vault, key_id)
    return record


def issue_certificate(
    vault: Vault,
    service: str,
    *,
    names: Sequence[str] = (),
    self_signed: bool = False,
    days: int = DEFAULT_CERT_DAYS,
    max_days: int = MAX_CERT_DAYS,
    key_type: str = "ecdsa-p256",
    ca_id: str | None = None,
    key_cryptoperiod_days: int = DEFAULT_KEY_CRYPTOPERIOD_DAYS,
    now: datetime | None = None,
) -> KeyRecord:
    """Generate a key for `service` and issue its certificate.

    Args:
        vault: the open vault.
        service: the service's DNS name; the key id becomes ``tls/<service>``.
        names: further DNS names and IP addresses for the subjectAltName.
        self_signed: sign with the service's own key instead of the CA.
        days: the certificate's lifetime.
        max_days: the maximum lifetime in days.
        key_type: one of `KEY_TYPES`.
        ca_id: the issuing CA, by default the newest active one.
        key_cryptoperiod_days: how long the key may be used, across renewals.
        now: the start of validity (for back-dated demo data).

    Raises:
        HostnameError: a name is not a valid DNS name or IP address.
        PolicyError: `days` is above `max_days`.
        RecordError: the service already has an active certificate.
        CertificateValidityError: the CA is expired or not yet valid.
        CertificateError: the CA expires before the new certificate would.
    """
    service = service_dns_name(service)
    subject_names = parse_subject_names([service, *names])
    check_lifetime(days, max_days)
    existing = find_service_key(vault, service)
    if existing is not None:
        raise RecordError(
            f"{service} already has an active certificate ({existing.id}); renew it "
            f"with 'trekeys tls renew {existing.id}'."
        )

    return new_service_key(
        vault,
        service,
        subject_names,
        self_signed=self_signed,
        days=days,
        key_type=key_type,
        ca_id=ca_id,
        key_cryptoperiod_days=key_cryptoperiod_days,
        now=resolve_now(now),
    )


def service_dns_name(service: str) -> str:
    """Return the normalized DNS name of a service, which names its key.

    Raises:
        HostnameError: `service` is not a valid DNS name or IP address.
        CertificateError: `service` is an IP address.
    """
    names = parse_subject_names([service])
    if not names.dns_names:
        raise CertificateError(
            f"the service {service!r} must be named by a DNS name; give IP addresses "
            "as extra names."
        )
    return names.dns_names[0]


def check_lifetime(days: int, max_days: int) -> None:
    """Check a requested certificate lifetime against the allowed maximum.

    Raises:
        PolicyError: `days` is not between 1 and `max_days`.
    """
    if not 1 <= days <= max_days:
        raise PolicyError(
            f"a certificate lifetime of {days} days is not allowed; choose 1 to "
            f"{max_days} days."
        )


def new_service_key(
    vault: Vault,
    service: str,
    names: SubjectNames,
    *,
    self_signed: bool,
    days: int,
    key_type: str,
    ca_id: str | None,
    key_cryptoperiod_days: int,
    now: datetime,
) -> KeyRecord:
    """Generate a service key, issue its certificate and add its record."""
    key = generate_private_key(key_type)
    certificate, issuer_id = sign_service_certificate(
        vault, key, names, days=days, self_signed=self_signed, ca_id=ca_id, now=now
    )

    key_id = next_key_id(vault, f"{KEY_ID_PREFIX}{service}")
    record = _new_record(
        key_id,
        KeyKind.TLS_CERT,
        key,
        f"TLS server key and certificate of {service}.",
        now=now,
        cryptoperiod_days=key_cryptoperiod_days,
    )
    record.protects = [f"service:{service}"]
    record.attributes.update(
        {
            "mode": "self-signed" if self_signed else "ca",
            "names": json.dumps(names.as_strings()),
            "lifetime_days": str(days),
        }
    )
    record_certificate(record, certificate, issuer_id)
    vault.add(record, private_key_pem(key))
    store_certificate(vault, key_id, certificate)
    if issuer_id != SELF_SIGNED:
        add_signed_reference(vault, issuer_id, key_id)
    logger.info(
        "issued certificate %s for %s, serial %s, until %s",
        key_id,
        service,
        record.attributes["serial"],
        certificate.not_valid_after_utc.date(),
    )
    return record


def sign_service_certificate(
    vault: Vault,
    key: PrivateKey,
    names: SubjectNames,
    *,
    days: int,
    self_signed: bool,
    ca_id: str | None,
    now: datetime,
) -> tuple[x509.Certificate, str]:
    """Issue a certificate for `key`, by the CA or self-signed; return it and the
    issuer's key id (``self`` when self-signed)."""
    if self_signed:
        return build_service_certificate(key, names, now, days), SELF_SIGNED

    ca = find_active_ca(vault, ca_id)
    ca_certificate = load_record_certificate(vault, ca.id)
    check_ca_usable(ca_certificate, now, ca.id)
    ends = now + timedelta(days=days)
    if ends > ca_certificate.not_valid_after_utc:
        raise CertificateError(
            f"CA {ca.id} expires on {ca_certificate.not_valid_after_utc.date()}, "
            f"before a {days}-day certificate would; rotate the CA first or issue "
            "for fewer days."
        )
    ca_key = load_private_key(
        vault.read_secret(ca.id, "sign a service certificate"), source=ca.id
    )
    certificate = build_service_certificate(
        key, names, now, days, issuer=(ca_certificate, ca_key)
    )
    return certificate, ca.id


def add_signed_reference(vault: Vault, ca_id: str, key_id: str) -> None:
    """Note on the CA's record that it signed the certificate of `key_id`."""
    ca = vault.get(ca_id)
    reference = f"cert:{key_id}"
    if reference not in ca.signs:
        ca.signs.append(reference)
        vault.update(ca, operation="sign", detail=reference)


def import_certificate(
    vault: Vault, service: str, chain_path: Path, key_path: Path
) -> KeyRecord:
    """Bring an existing self-signed or TRE-CA certificate and its key under
    management, as the active key of `service`.

    Raises:
        CertificateError: a file is unreadable, or the issuer is not a vault CA.
        CertificateKeyMismatchError: the key is not the certificate's key.
        RecordError: the service already has an active certificate.
    """
    certificates = load_certificates(
        _read_input(Path(chain_path)), source=str(chain_path)
    )
    leaf = certificates[0]
    key = load_private_key(_read_input(Path(key_path)), source=str(key_path))
    check_key_matches(leaf, key, source=str(key_path))
    service = service_dns_name(service)
    names = parse_subject_names([service, *subject_alt_names(leaf)])
    if find_service_key(vault, names.dns_names[0]) is not None:
        raise RecordError(
            f"{names.dns_names[0]} already has an active certificate; revoke it "
            "before importing another."
        )
    issuer_id = _issuer_in_vault(vault, leaf)

    key_id = next_key_id(vault, f"{KEY_ID_PREFIX}{names.dns_names[0]}")
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    record = _new_record(
        key_id,
        KeyKind.TLS_CERT,
        key,
        f"TLS server key and certificate of {names.dns_names[0]} (imported).",
        now=utcnow(),
        cryptoperiod_days=DEFAULT_KEY_CRYPTOPERIOD_DAYS,
    )
    record.protects = [f"service:{names.dns_names[0]}"]
    record.attributes.update(
        {
            "mode": "self-signed" if issuer_id == SELF_SIGNED else "ca",
            "names": json.dumps(names.as_strings()),
            "lifetime_days": str(max(1, lifetime.days)),
            "imported_from": str(Path(chain_path).resolve()),
        }
    )
    record_certificate(record, leaf, issuer_id)
    vault.add(record, private_key_pem(key))
    store_certificate(vault, key_id, leaf)
    if issuer_id != SELF_SIGNED:
        add_signed_reference(vault, issuer_id, key_id)
    logger.info("imported certificate %s from %s", key_id, chain_path)
    return record


def _read_input(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertificateError(
            f"cannot read {path} ({exc.strerror}); check the path and permissions."
        ) from exc


def _issuer_in_vault(vault: Vault, leaf: x509.Certificate) -> str:
    if leaf.issuer == leaf.subject:
        return SELF_SIGNED
    for ca in vault.find(kind=KeyKind.TLS_CA.value):
        if ca.is_tombstone:
            continue
        try:
            leaf.verify_directly_issued_by(load_record_certificate(vault, ca.id))
        except (ValueError, TypeError, InvalidSignature):
            continue
        return ca.id
    raise CertificateError(
        f"the certificate for {leaf.subject.rfc4514_string()} was issued by "
        f"{leaf.issuer.rfc4514_string()}, which is not a CA in the vault; issue a "
        "new certificate with 'trekeys tls issue' instead."
    )


def publish_ca_certificate(vault: Vault, ca_id: str) -> Path:
    """Write the CA certificate to its publish folder for the workstations' trust
    stores, atomically, and return the path."""
    record = vault.get(ca_id)
    folder = path_from_record(vault, record.attributes["publish_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ca_id.replace('/', '-')}.pem"
    write_public_file(path, certificate_pem(load_record_certificate(vault, ca_id)))
    logger.info("published CA certificate %s to %s", ca_id, path)
    return path


def _new_record(
    key_id: str,
    kind: KeyKind,
    key: PrivateKey,
    purpose: str,
    *,
    now: datetime,
    cryptoperiod_days: int,
) -> KeyRecord:
    algorithm, strength = describe_key(key)
    record = KeyRecord(
        id=key_id,
        kind=kind,
        purpose=purpose,
        owner="tre",
        created=now,
        cryptoperiod_days=cryptoperiod_days,
        algorithm=algorithm,
        strength_bits=strength,
        locations=["vault"],
    )
    record.transition(KeyState.ACTIVE, "certificate issued", at=now)
    return record

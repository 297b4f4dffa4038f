"""X.509 building blocks for the TRE's certificates: keys, certificates, CRLs.

Private keys exist as objects only in this module. The other TLS modules take
key ids, read the PEM from the vault and pass it straight to the functions
here, or, when deploying, to the 0600 key file a web server reads.

The certificate profile follows RFC 5280 and the CA/Browser Forum baseline
requirements where they apply to a private PKI. Serials are 159 random bits,
and the subjectAltName lists every name. basicConstraints and keyUsage are
critical, both key identifiers are present, and service certificates carry
the serverAuth extended key usage.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trekeys.errors import (
    CertificateError,
    CertificateKeyMismatchError,
    CertificateValidityError,
)
from trekeys.tls_names import SubjectNames

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# Workstation clocks drift; a certificate that starts a few minutes early is
# accepted at once by a client whose clock is slightly behind.
CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class KeyType:
    """A supported key algorithm for certificates.

    Attributes:
        name: the trekeys name, such as ``ecdsa-p256``.
        strength_bits: the security strength in NIST SP 800-57 Part 1, Table 2.
        generate: returns a new private key.
    """

    name: str
    strength_bits: int
    generate: Callable[[], PrivateKey]


KEY_TYPES: dict[str, KeyType] = {
    "ecdsa-p256": KeyType(
        "ecdsa-p256", 128, lambda: ec.generate_private_key(ec.SECP256R1())
    ),
    "ecdsa-p384": KeyType(
        "ecdsa-p384", 192, lambda: ec.generate_private_key(ec.SECP384R1())
    ),
    "rsa-3072": KeyType(
        "rsa-3072",
        128,
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=3072),
    ),
}

# The reasons of RFC 5280 section 5.3.1 that an operator may give for revoking.
REVOCATION_REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
}


def generate_private_key(key_type: str) -> PrivateKey:
    """Return a new private key of `key_type` (a key of `KEY_TYPES`).

    Raises:
        CertificateError: the key type is not supported.
    """
    if key_type not in KEY_TYPES:
        raise CertificateError(
            f"unsupported key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}."
        )
    return KEY_TYPES[key_type].generate()


def key_type_for(algorithm: str, default: str = "ecdsa-p256") -> str:
    """Return the key type to use when replacing a key of `algorithm`: the same
    one when trekeys can generate it, else `default`."""
    return algorithm if algorithm in KEY_TYPES else default


def describe_key(key: PrivateKey) -> tuple[str, int]:
    """Return the algorithm name and security strength in bits of a private key.

    Raises:
        CertificateError: the key is weaker than 112 bits or on another curve.
    """
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise CertificateError(
                f"an RSA key of {key.key_size} bits is too weak; use at least 2048."
            )
        # NIST SP 800-57 Part 1, Table 2: RSA 2048 gives 112 bits, 3072 gives 128.
        return f"rsa-{key.key_size}", 128 if key.key_size >= 3072 else 112
    curves = {"secp256r1": "ecdsa-p256", "secp384r1": "ecdsa-p384"}
    if key.curve.name not in curves:
        raise CertificateError(
            f"unsupported elliptic curve {key.curve.name}; use P-256 or P-384 keys."
        )
    name = curves[key.curve.name]
    return name, KEY_TYPES[name].strength_bits


def private_key_pem(key: PrivateKey) -> str:
    """Return the key as unencrypted PKCS#8 PEM, for the vault or a 0600 file."""
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return data.decode("ascii")


def load_private_key(pem: bytes | str, *, source: str) -> PrivateKey:
    """Load an unencrypted PEM private key; `source` names it in errors.

    Raises:
        CertificateError: the data is not an unencrypted RSA or EC private key.
    """
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CertificateError(
            f"{source} is not an unencrypted PEM private key; export it without a "
            "passphrase to a 0600 file and try again."
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertificateError(f"{source} is not an RSA or EC key; use one of those.")
    return key


def load_certificates(pem: bytes, *, source: str) -> list[x509.Certificate]:
    """Load every certificate from PEM data, leaf first as a server sends them.

    Raises:
        CertificateError: the data contains no PEM certificate.
    """
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise CertificateError(
            f"{source} contains no valid PEM certificate; check the file."
        ) from exc
    return certificates


def certificate_pem(certificate: x509.Certificate) -> bytes:
    """Return one certificate as PEM bytes."""
    return certificate.public_bytes(serialization.Encoding.PEM)


def fingerprint(certificate: x509.Certificate) -> str:
    """Return the SHA-256 fingerprint of the certificate's DER encoding, in hex."""
    der = certificate.public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(der).hexdigest()


def subject_alt_names(certificate: x509.Certificate) -> list[str]:
    """Return the DNS names and IP addresses in the subjectAltName, or none."""
    try:
        extension = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
    except x509.ExtensionNotFound:
        return []
    names = extension.value.get_values_for_type(x509.DNSName)
    ips = extension.value.get_values_for_type(x509.IPAddress)
    return list(names) + [str(ip) for ip in ips]


def is_ca_certificate(certificate: x509.Certificate) -> bool:
    """Return whether basicConstraints marks the certificate as a CA."""
    try:
        constraints = certificate.extensions.get_extension_for_class(
            x509.BasicConstraints
        )
    except x509.ExtensionNotFound:
        return False
    return constraints.value.ca


def check_key_matches(
    certificate: x509.Certificate, key: PrivateKey, *, source: str
) -> None:
    """Check that `key` is the private key of `certificate`.

    Raises:
        CertificateKeyMismatchError: the public keys differ.
    """
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    ours = key.public_key().public_bytes(serialization.Encoding.DER, public)
    theirs = certificate.public_key().public_bytes(serialization.Encoding.DER, public)
    if ours != theirs:
        raise CertificateKeyMismatchError(
            f"the private key in {source} does not match the certificate "
            f"{fingerprint(certificate)[:16]}; give the key that the certificate was "
            "issued for."
        )


def check_ca_usable(
    ca_certificate: x509.Certificate, at: datetime, key_id: str
) -> None:
    """Check that a CA certificate is valid at `at`, so it may sign.

    Raises:
        CertificateValidityError: the CA is expired or not yet valid.
    """
    starts = ca_certificate.not_valid_before_utc
    ends = ca_certificate.not_valid_after_utc
    if at < starts:
        raise CertificateValidityError(
            f"CA {key_id} is not valid until {starts.isoformat()}; check the system "
            "clock or wait until then."
        )
    if at >= ends:
        raise CertificateValidityError(
            f"CA {key_id} expired on {ends.isoformat()}; create a new CA with "
            "'trekeys tls rotate' and distribute its root to the workstations."
        )


def build_ca_certificate(
    key: PrivateKey, common_name: str, organization: str, starts: datetime, days: int
) -> x509.Certificate:
    """Build a self-signed root CA certificate that may sign certificates and CRLs."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    # A root that only issues service certificates needs no intermediates, so
    # pathLenConstraint 0 stops a leaked service key from acting as a CA.
    builder = (
        _base_builder(name, name, key, starts, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(key_id, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(key_id),
            critical=False,
        )
    )
    return builder.sign(key, _hash_for(key))


def build_service_certificate(
    key: PrivateKey,
    names: SubjectNames,
    starts: datetime,
    days: int,
    *,
    issuer: tuple[x509.Certificate, PrivateKey] | None = None,
) -> x509.Certificate:
    """Build a TLS server certificate for `names`.

    Args:
        key: the service's private key.
        names: the names the certificate covers; the first becomes the CN.
        starts: the start of validity, before the clock-skew allowance.
        days: the lifetime in days.
        issuer: the CA certificate and key that sign, or None for self-signed.
    """
    # RFC 5280 caps the CN at 64 characters; clients match the subjectAltName,
    # which carries the full name.
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, names.as_strings()[0][:64])]
    )
    own_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    if issuer is None:
        issuer_name, signing_key = subject, key
        authority = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            own_id
        )
    else:
        issuer_name, signing_key = issuer[0].subject, issuer[1]
        authority = x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer[1].public_key()
        )

    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in names.dns_names]
    alt_names += [x509.IPAddress(ip) for ip in names.ip_addresses]
    builder = (
        _base_builder(subject, issuer_name, key, starts, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(key_encipherment=isinstance(key, rsa.RSAPrivateKey)),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(own_id, critical=False)
        .add_extension(authority, critical=False)
    )
    return builder.sign(signing_key, _hash_for(signing_key))


@dataclass(frozen=True)
class RevokedEntry:
    """One revoked certificate for a CRL."""

    serial: int
    revoked_at: datetime
    reason: str


def build_crl(
    ca_certificate: x509.Certificate,
    ca_key: PrivateKey,
    revoked: Sequence[RevokedEntry],
    *,
    number: int,
    this_update: datetime,
    next_update_days: int,
) -> x509.CertificateRevocationList:
    """Build a CRL signed by the CA that lists `revoked` with their reasons."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_certificate.subject)
        .last_update(this_update)
        .next_update(this_update + timedelta(days=next_update_days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    for entry in revoked:
        revoked_certificate = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
            .add_extension(
                x509.CRLReason(REVOCATION_REASONS[entry.reason]), critical=False
            )
            .build()
        )
        builder = builder.add_revoked_certificate(revoked_certificate)
    return builder.sign(ca_key, _hash_for(ca_key))


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    """Return a CRL as PEM bytes."""
    return crl.public_bytes(serialization.Encoding.PEM)


def _base_builder(
    subject: x509.Name,
    issuer: x509.Name,
    key: PrivateKey,
    starts: datetime,
    days: int,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(starts - CLOCK_SKEW)
        .not_valid_after(starts + timedelta(days=days))
    )


def _key_usage(
    *, cert_sign: bool = False, key_encipherment: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _hash_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()

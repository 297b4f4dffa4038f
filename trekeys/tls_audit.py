"""The certificate audit: what is deployed and served, checked against the vault.

The audit reads every certificate file that a key record lists as deployed and
every PEM certificate under the scanned folders, and connects to each live
endpoint given. For each certificate it reports subject, subjectAltName,
issuer, expiry and days left. It also reports whether the vault records it as
a key's current certificate, whether it was revoked or superseded, and whether
it verifies for its service name against the TRE's trusted roots.

A deployed or served certificate fails the audit when it is expired, revoked
or superseded, or when its key file does not match it. It also fails when it
does not verify for its service name, or when it sits where the vault records
another key's certificate. A certificate that expires within the warning
period or is unknown to the vault but verifies, or an endpoint that cannot be
reached, is a warning. Failures and warnings are reported per certificate and
per endpoint, and the audit always goes on.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.verification import (
    PolicyBuilder,
    Store,
    Subject,
    VerificationError,
)

from trekeys.errors import (
    CertificateError,
    CertificateKeyMismatchError,
    EndpointError,
)
from trekeys.lab import Lab
from trekeys.records import KeyKind, KeyState
from trekeys.tls_ca import (
    resolve_now,
)
from trekeys.tls_deploy import deployment_targets
from trekeys.tls_endpoints import (
    DEFAULT_TIMEOUT_SECONDS,
    Endpoint,
    fetch_certificate,
    verify_endpoint,
)
from trekeys.tls_lifecycle import default_publish_dir
from trekeys.tls_records import (
    CURRENT,
    SELF_SIGNED,
    find_certificate_owner,
    load_record_certificate,
    service_of,
)
from trekeys.tls_x509 import (
    certificate_pem,
    check_key_matches,
    fingerprint,
    is_ca_certificate,
    load_certificates,
    load_private_key,
    subject_alt_names,
)
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

DEFAULT_WARNING_DAYS = 30


@dataclass
class CertificateFinding:
    """The audit result for one deployed file or live endpoint.

    Attributes:
        source: the file path or ``host:port``.
        origin: ``file`` or ``endpoint``.
        service: the name the certificate should verify for.
        error: why no certificate could be read, for an unreachable endpoint
            or an unreadable file; the other fields are then empty.
    """

    source: str
    origin: str
    service: str = ""
    subject: str = ""
    sans: list[str] = field(default_factory=list)
    issuer: str = ""
    serial: str = ""
    not_before: datetime | None = None
    not_after: datetime | None = None
    days_left: int | None = None
    is_ca: bool = False
    vault_key: str = ""
    vault_status: str = "not in vault"
    revoked: bool = False
    revocation_reason: str = ""
    hostname_verified: bool | None = None
    verification_detail: str = ""
    key_matches: bool | None = None
    error: str = ""
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """``FAIL``, ``WARN`` or ``ok``."""
        if self.failures:
            return "FAIL"
        return "WARN" if self.warnings else "ok"

    def to_row(self) -> dict[str, Any]:
        """Return the finding as one table row, problems in upper case first."""
        expiry = self.not_after.date().isoformat() if self.not_after else ""
        return {
            "verdict": self.verdict,
            "source": self.source,
            "service": self.service,
            "subject": self.subject,
            "SANs": ", ".join(self.sans),
            "issuer": self.issuer,
            "expires": expiry,
            "days left": "" if self.days_left is None else self.days_left,
            "vault": f"{self.vault_key} ({self.vault_status})"
            if self.vault_key
            else self.vault_status,
            "revoked": self.revocation_reason if self.revoked else "no",
            "hostname verified": _yes_no(self.hostname_verified),
            "key matches": _yes_no(self.key_matches),
            "problems": "; ".join(self.failures + self.warnings + [self.error]).strip(
                "; "
            ),
        }


@dataclass
class TlsAuditReport:
    """The findings of one audit run."""

    checked_at: datetime
    warning_days: int
    findings: list[CertificateFinding]

    @property
    def failures(self) -> list[CertificateFinding]:
        """Findings that must be fixed now: expired, revoked, wrong key, unverified."""
        return [f for f in self.findings if f.failures]

    @property
    def warnings(self) -> list[CertificateFinding]:
        """Findings that need attention soon but are not failures."""
        return [f for f in self.findings if f.warnings and not f.failures]

    @property
    def passed(self) -> bool:
        """Whether nothing expired, revoked or mismatched is deployed or served."""
        return not self.failures

    def rows(self, *, highlight: bool = False) -> list[dict[str, Any]]:
        """Return every finding as a table row, failures first, then by expiry.

        With `highlight`, the verdict, expiry and days left of failures and
        warnings are set in Markdown bold, for the notebook's table.
        """
        order = {"FAIL": 0, "WARN": 1, "ok": 2}
        ranked = sorted(
            self.findings,
            key=lambda f: (order[f.verdict], f.days_left if f.days_left else 0),
        )
        rows = [finding.to_row() for finding in ranked]
        if highlight:
            for row in rows:
                if row["verdict"] != "ok":
                    for column in ("verdict", "expires", "days left"):
                        if row[column] != "":
                            row[column] = f"**{row[column]}**"
        return rows


def audit_tls(
    lab: Lab,
    vault: Vault,
    *,
    scan_dirs: Sequence[Path] | None = None,
    endpoints: Sequence[Endpoint | str] = (),
    warning_days: int = DEFAULT_WARNING_DAYS,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    now: datetime | None = None,
) -> TlsAuditReport:
    """Audit deployed certificate files and live endpoints against the vault.

    Args:
        lab: the TRE; its services and publish folders are scanned by default.
        vault: the open vault.
        scan_dirs: folders to search for PEM certificate files, recursively;
            when given, only recorded deployments inside them are audited. By
            default the lab's folders and every recorded deployment.
        endpoints: live endpoints, as `Endpoint` or ``service@host:port`` text.
        warning_days: report certificates that expire within this many days.
        timeout: seconds to wait for each endpoint.
        now: the time to check validity at.
    """
    now = resolve_now(now)
    folders = (
        list(scan_dirs)
        if scan_dirs is not None
        else [lab.services_dir, default_publish_dir(lab)]
    )
    auditor = _Auditor(vault, now, warning_days)
    findings = auditor.audit_files(folders, every_deployment=scan_dirs is None)
    for endpoint in endpoints:
        parsed = (
            endpoint if isinstance(endpoint, Endpoint) else Endpoint.parse(endpoint)
        )
        findings.append(auditor.audit_endpoint(parsed, timeout))
    logger.info(
        "TLS audit: %d certificates, %d failures",
        len(findings),
        sum(1 for f in findings if f.failures),
    )
    return TlsAuditReport(now, warning_days, findings)


class _Auditor:
    """The vault's view of certificates, shared by every finding of one audit."""

    def __init__(self, vault: Vault, now: datetime, warning_days: int) -> None:
        self.vault = vault
        self.now = now
        self.warning_days = warning_days
        self.roots = [
            load_record_certificate(vault, ca.id)
            for ca in vault.find(kind=KeyKind.TLS_CA.value, state=KeyState.ACTIVE.value)
        ]

    def audit_files(
        self, folders: Sequence[Path], *, every_deployment: bool
    ) -> list[CertificateFinding]:
        """Audit the certificate files in `folders` and the recorded deployments,
        all of them or only those inside `folders`."""
        roots = [folder.resolve() for folder in folders]
        deployments: dict[Path, _Deployment] = {}
        for record in self.vault.find(kind=KeyKind.TLS_CERT.value):
            for target in deployment_targets(self.vault, record):
                inside = any(target.chain_path.is_relative_to(r) for r in roots)
                if not (every_deployment or inside):
                    continue
                deployments[target.chain_path] = _Deployment(
                    record.id, service_of(record), target.key_path
                )
        found = {p.resolve() for folder in folders for p in _pem_files(folder)}

        findings = []
        for path in sorted(found | set(deployments)):
            if not path.exists():
                missing = self._missing(path, deployments[path].key_id)
                if missing is not None:
                    findings.append(missing)
                continue
            findings.append(self.audit_file(path, deployments.get(path)))
        return findings

    def audit_file(
        self, path: Path, deployment: _Deployment | None = None
    ) -> CertificateFinding:
        """Audit one chain file and, for a recorded deployment, the key file
        beside it and whether the file still contains that key's certificate."""
        finding = CertificateFinding(str(path), "file")
        try:
            chain = load_certificates(path.read_bytes(), source=str(path))
        except (CertificateError, OSError) as exc:
            finding.error = str(exc)
            finding.warnings.append("unreadable certificate file")
            return finding
        if deployment is None:
            self._describe(finding, chain)
            return finding

        # A recorded deployment is checked as a service certificate even when
        # the file now contains a CA certificate: `openssl req -x509` marks its
        # self-signed output CA:TRUE, and such a swap must not skip the checks.
        self._describe(
            finding, chain, service=deployment.service, service_certificate=True
        )
        if finding.vault_key != deployment.key_id:
            finding.failures.append(f"not a certificate of {deployment.key_id}")
        self._check_key_file(finding, chain[0], deployment.key_path)
        return finding

    def audit_endpoint(self, endpoint: Endpoint, timeout: float) -> CertificateFinding:
        """Audit the certificate a live endpoint serves, by a real handshake."""
        finding = CertificateFinding(endpoint.address, "endpoint", endpoint.server_name)
        try:
            leaf = fetch_certificate(endpoint, timeout=timeout)
            self._describe(
                finding, [leaf], service=endpoint.server_name, offline_check=False
            )
            verified, detail = verify_endpoint(
                endpoint, self._anchors_pem(leaf), timeout=timeout
            )
        except EndpointError as exc:
            finding.error = str(exc)
            finding.warnings.append(f"endpoint {exc.reason}")
            return finding
        finding.hostname_verified = verified
        finding.verification_detail = detail
        if not verified:
            finding.failures.append(f"handshake does not verify: {detail}")
        return finding

    def _describe(
        self,
        finding: CertificateFinding,
        chain: list[x509.Certificate],
        *,
        service: str = "",
        offline_check: bool = True,
        service_certificate: bool = False,
    ) -> None:
        """Fill in the certificate's fields and check it. `offline_check` selects
        the offline chain and host name check, which endpoints replace by a real
        handshake. That check skips CA certificates unless `service_certificate`
        marks the file as deployed for a service."""
        leaf = chain[0]
        finding.subject = leaf.subject.rfc4514_string()
        finding.issuer = leaf.issuer.rfc4514_string()
        finding.sans = subject_alt_names(leaf)
        finding.serial = format(leaf.serial_number, "x")
        finding.not_before = leaf.not_valid_before_utc
        finding.not_after = leaf.not_valid_after_utc
        finding.days_left = (finding.not_after - self.now).days
        finding.is_ca = is_ca_certificate(leaf)
        self._check_validity(finding, leaf)
        self._check_vault(finding, leaf)
        finding.service = service or finding.service or next(iter(finding.sans), "")
        if offline_check and (service_certificate or not finding.is_ca):
            self._check_hostname(finding, chain)

    def _check_validity(
        self, finding: CertificateFinding, leaf: x509.Certificate
    ) -> None:
        starts, ends = leaf.not_valid_before_utc, leaf.not_valid_after_utc
        if ends <= self.now:
            finding.failures.append(f"expired {_days(self.now - ends)} ago")
        elif self.now < starts:
            finding.warnings.append("not yet valid")
        elif (ends - self.now).days <= self.warning_days:
            finding.warnings.append(f"expires in {_days(ends - self.now)}")

    def _check_vault(self, finding: CertificateFinding, leaf: x509.Certificate) -> None:
        owner = find_certificate_owner(self.vault, fingerprint(leaf))
        if owner is None:
            finding.warnings.append("certificate not in the vault")
            return
        record, entry = owner
        finding.vault_key = record.id
        finding.service = service_of(record)
        status = entry["status"]
        if status == CURRENT and record.state is not KeyState.ACTIVE:
            status = record.state.value
        finding.vault_status = status
        if entry["status"] != CURRENT:
            finding.revoked = True
            finding.revocation_reason = entry.get("reason", entry["status"])
            finding.failures.append(
                f"{entry['status']} ({finding.revocation_reason}) but still deployed"
            )
        elif record.state is not KeyState.ACTIVE:
            finding.failures.append(f"key {record.id} is {record.state.value}")

    def _check_hostname(
        self, finding: CertificateFinding, chain: list[x509.Certificate]
    ) -> None:
        leaf = chain[0]
        anchors = self._anchors(leaf)
        if not finding.service:
            finding.hostname_verified = False
            finding.verification_detail = "no service name to verify"
            finding.failures.append("no service name to verify")
            return
        try:
            verifier = (
                PolicyBuilder()
                .store(Store(anchors))
                .time(self.now)
                .build_server_verifier(_subject_for(finding.service))
            )
            verifier.verify(leaf, chain[1:])
        except (VerificationError, ValueError) as exc:
            finding.hostname_verified = False
            finding.verification_detail = str(exc)
            finding.failures.append(f"does not verify for {finding.service}")
            return
        finding.hostname_verified = True
        finding.verification_detail = "verified against the TRE roots"

    def _check_key_file(
        self, finding: CertificateFinding, leaf: x509.Certificate, key_path: Path
    ) -> None:
        try:
            key = load_private_key(key_path.read_bytes(), source=str(key_path))
            check_key_matches(leaf, key, source=str(key_path))
        except CertificateKeyMismatchError:
            finding.key_matches = False
            finding.failures.append(
                f"key file {key_path.name} does not match the certificate"
            )
            return
        except (CertificateError, OSError) as exc:
            finding.key_matches = False
            finding.failures.append(f"key file {key_path.name} is unusable: {exc}")
            return
        finding.key_matches = True

    def _anchors(self, leaf: x509.Certificate) -> list[x509.Certificate]:
        """Return the TRE roots, plus the leaf itself when the vault stores it as a
        current self-signed certificate (self-signed mode has no CA)."""
        owner = find_certificate_owner(self.vault, fingerprint(leaf))
        if (
            owner
            and owner[1]["issuer"] == SELF_SIGNED
            and owner[1]["status"] == CURRENT
        ):
            return [*self.roots, leaf]
        return list(self.roots)

    def _anchors_pem(self, leaf: x509.Certificate) -> bytes:
        return b"".join(certificate_pem(c) for c in self._anchors(leaf))

    def _missing(self, path: Path, key_id: str) -> CertificateFinding | None:
        """Report a recorded deployment whose file is gone, if its key is active."""
        record = self.vault.get(key_id)
        if record.state is not KeyState.ACTIVE:
            return None
        finding = CertificateFinding(str(path), "file", service_of(record))
        finding.vault_key = key_id
        finding.error = f"{path} is recorded as deployed but missing"
        finding.warnings.append("deployed file missing")
        return finding


@dataclass(frozen=True)
class _Deployment:
    """A recorded deployment: the key, the service it serves and its key file."""

    key_id: str
    service: str
    key_path: Path


def _days(span: timedelta) -> str:
    days = span.days
    return f"{days} day" if days == 1 else f"{days} days"


def _pem_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = []
    for path in folder.rglob("*.pem"):
        if path.is_file() and b"BEGIN CERTIFICATE" in path.read_bytes()[:4096]:
            found.append(path)
    return found


def _subject_for(name: str) -> Subject:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _yes_no(value: bool | None) -> str:
    if value is None:
        return "n/a"
    return "yes" if value else "NO"

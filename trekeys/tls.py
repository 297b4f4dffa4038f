"""TLS certificates for the TRE's web services: the public interface.

The TRE's web services are reached only from TRE workstations, whose browsers
must authenticate the server (policy 4.1.3). trekeys runs an internal root CA
whose private key stays in the vault, issues and deploys service certificates,
renews them before they expire, revokes them with a CRL, rotates keys after a
compromise, and audits what is deployed and served. Self-signed certificates
are supported for services that cannot use the CA.

The work is split by concern; this module re-exports the functions that the
CLI, the notebooks and other capabilities call:

- `trekeys.tls_names`, `trekeys.tls_x509`: names, keys, certificate and CRL
  profiles;
- `trekeys.tls_records`: how certificates are stored on key records;
- `trekeys.tls_ca`: the CA, issuance and import;
- `trekeys.tls_deploy`: writing chains and keys where web servers read them;
- `trekeys.tls_lifecycle`, `trekeys.tls_revoke`: renewal, rotation,
  revocation and CRLs;
- `trekeys.tls_audit`, `trekeys.tls_endpoints`, `trekeys.tls_chart`: the audit.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from trekeys.lab import Lab
from trekeys.records import utcnow
from trekeys.tls_audit import (
    CertificateFinding,
    TlsAuditReport,
    audit_tls,
)
from trekeys.tls_ca import (
    DEFAULT_CERT_DAYS,
    MAX_CERT_DAYS,
    create_ca,
    import_certificate,
    issue_certificate,
    publish_ca_certificate,
)
from trekeys.tls_chart import (
    expiry_timeline_alt,
    expiry_timeline_html,
    expiry_timeline_png,
)
from trekeys.tls_deploy import (
    DeployTarget,
    chain_pem,
    deploy_certificate,
    deployment_targets,
    undeploy_certificate,
)
from trekeys.tls_endpoints import (
    Endpoint,
    serve_deployments,
    serve_tls,
    verify_endpoint,
)
from trekeys.tls_lifecycle import (
    DEFAULT_RENEW_AFTER,
    default_publish_dir,
    renew_certificate,
    renew_due_certificates,
    renewal_due,
    rotate_key,
)
from trekeys.tls_records import find_active_ca, find_service_key
from trekeys.tls_revoke import (
    PublishedCrl,
    crl_entries,
    publish_crl,
    revoke_certificate,
)
from trekeys.vault import Vault

__all__ = [
    "DEFAULT_CERT_DAYS",
    "DEFAULT_RENEW_AFTER",
    "MAX_CERT_DAYS",
    "CertificateFinding",
    "DeployTarget",
    "Endpoint",
    "PublishedCrl",
    "TlsAuditReport",
    "audit_tls",
    "build_lab",
    "chain_pem",
    "create_ca",
    "crl_entries",
    "default_publish_dir",
    "deploy_certificate",
    "deployment_targets",
    "expiry_timeline_alt",
    "expiry_timeline_html",
    "expiry_timeline_png",
    "find_active_ca",
    "find_service_key",
    "import_certificate",
    "issue_certificate",
    "publish_ca_certificate",
    "publish_crl",
    "renew_certificate",
    "renew_due_certificates",
    "renewal_due",
    "revoke_certificate",
    "rotate_key",
    "serve_deployments",
    "serve_tls",
    "undeploy_certificate",
    "verify_endpoint",
]

logger = logging.getLogger(__name__)

# Ages of the demo certificates, in days since issue, and their lifetimes.
# jupyter is 380 days into a 397-day certificate: it expires in 17 days, so
# the audit warns about it, but nothing in the demo TRE has expired.
_DEMO_CA_AGE_DAYS = 400
_DEMO_CERTIFICATES = {
    "portal.tre.internal": (10, 365),
    "gitlab.tre.internal": (100, 365),
    "jupyter.tre.internal": (380, 397),
}


def build_lab(lab: Lab, vault: Vault) -> None:
    """Give the demo TRE a root CA and a deployed certificate for each service.

    The CA was created 400 days ago and publishes its root and CRL under
    ``pki/``. Each service of the lab gets a certificate deployed under
    ``services/<service>/``; one of them expires within 30 days.
    """
    now = utcnow()
    ca = create_ca(
        vault,
        now=now - timedelta(days=_DEMO_CA_AGE_DAYS),
        publish_dir=default_publish_dir(lab),
    )
    for service in lab.services:
        age, days = _DEMO_CERTIFICATES.get(service, (10, DEFAULT_CERT_DAYS))
        record = issue_certificate(
            vault,
            service,
            names=[service.split(".")[0]],
            days=days,
            ca_id=ca.id,
            now=now - timedelta(days=age),
        )
        folder = lab.services_dir / service
        folder.mkdir(mode=0o755, exist_ok=True)
        deploy_certificate(vault, record.id, folder)
    publish_crl(vault, ca.id, now=now)
    logger.info("demo TRE: CA %s and %d certificates", ca.id, len(lab.services))

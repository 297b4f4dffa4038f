"""``trekeys tls``: the TRE's CA and service certificates."""

from __future__ import annotations

import json
from pathlib import Path

import click

from trekeys import tls
from trekeys.cli.common import lab_option, open_lab_vault, share_option
from trekeys.tls_deploy import DeployTarget
from trekeys.tls_x509 import KEY_TYPES, REVOCATION_REASONS


def register(main: click.Group) -> None:
    main.add_command(tls_group)


@click.group("tls")
def tls_group() -> None:
    """Issue, deploy, renew, revoke and audit TLS certificates."""


@tls_group.group("ca")
def ca_group() -> None:
    """Manage the TRE's root CA."""


@ca_group.command("create")
@lab_option
@share_option
@click.option(
    "--days",
    type=int,
    default=1826,
    show_default=True,
    help="Lifetime of the CA certificate in days.",
)
@click.option(
    "--key-type",
    type=click.Choice(list(KEY_TYPES)),
    default="ecdsa-p384",
    show_default=True,
    help="Algorithm of the CA key.",
)
def ca_create(lab_dir, share_files, days, key_type) -> None:
    """Create the root CA; its key stays in the vault, its certificate goes to pki/."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        record = tls.create_ca(
            vault,
            days=days,
            key_type=key_type,
            publish_dir=tls.default_publish_dir(lab),
        )
    click.echo(f"created {record.id}, fingerprint {record.fingerprint}")


@tls_group.command("issue")
@lab_option
@share_option
@click.argument("service")
@click.option(
    "--name",
    "names",
    multiple=True,
    help="Another DNS name or IP address for the certificate; repeat as needed.",
)
@click.option("--self-signed", is_flag=True, help="Sign with the service's own key.")
@click.option(
    "--days",
    type=int,
    default=tls.DEFAULT_CERT_DAYS,
    show_default=True,
    help=f"Lifetime in days, at most {tls.MAX_CERT_DAYS}.",
)
@click.option(
    "--key-type",
    type=click.Choice(list(KEY_TYPES)),
    default="ecdsa-p256",
    show_default=True,
    help="Algorithm of the service key.",
)
@click.option(
    "--deploy",
    "deploy_dir",
    type=click.Path(path_type=Path),
    help="Folder to deploy fullchain.pem and privkey.pem to.",
)
def issue(
    lab_dir, share_files, service, names, self_signed, days, key_type, deploy_dir
):
    """Generate a key for SERVICE (a DNS name) and issue its certificate."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        record = tls.issue_certificate(
            vault,
            service,
            names=names,
            self_signed=self_signed,
            days=days,
            key_type=key_type,
        )
        if deploy_dir is not None:
            tls.deploy_certificate(vault, record.id, deploy_dir)
    click.echo(
        f"issued {record.id}: serial {record.attributes['serial']}, expires "
        f"{record.expires:%Y-%m-%d}"
    )


@tls_group.command("import")
@lab_option
@share_option
@click.argument("service")
@click.option("--chain", type=click.Path(path_type=Path), required=True)
@click.option("--key", "key_path", type=click.Path(path_type=Path), required=True)
def import_command(lab_dir, share_files, service, chain, key_path) -> None:
    """Bring an existing certificate and its key for SERVICE under management."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        record = tls.import_certificate(vault, service, chain, key_path)
    click.echo(f"imported {record.id}, fingerprint {record.fingerprint}")


@tls_group.command("deploy")
@lab_option
@share_option
@click.argument("key_id")
@click.argument("folder", type=click.Path(path_type=Path), required=False)
@click.option("--chain-path", type=click.Path(path_type=Path), help="Chain file path.")
@click.option("--key-path", type=click.Path(path_type=Path), help="Key file path.")
@click.option("--replace", is_flag=True, help="Replace files not deployed by trekeys.")
def deploy(lab_dir, share_files, key_id, folder, chain_path, key_path, replace):
    """Write KEY_ID's chain and key (0600) to FOLDER or to the paths given."""
    if folder is None and (chain_path is None or key_path is None):
        raise click.UsageError("give FOLDER, or both --chain-path and --key-path.")
    target = (
        DeployTarget.in_folder(folder)
        if folder is not None
        else DeployTarget(chain_path, key_path)
    )
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        written = tls.deploy_certificate(vault, key_id, target, replace=replace)
    click.echo(f"deployed {key_id} to {written.chain_path} and {written.key_path}")


@tls_group.command("renew")
@lab_option
@share_option
@click.argument("key_id", required=False)
@click.option("--due", is_flag=True, help="Renew every certificate that is due.")
@click.option(
    "--renew-after",
    type=float,
    default=tls.DEFAULT_RENEW_AFTER,
    show_default=True,
    help="With --due: the fraction of the lifetime after which renewal is due.",
)
@click.option("--new-key", is_flag=True, help="Generate a new key as well.")
def renew(lab_dir, share_files, key_id, due, renew_after, new_key) -> None:
    """Renew KEY_ID, or with --due every certificate past its renewal point."""
    if (key_id is None) == (not due):
        raise click.UsageError("give either KEY_ID or --due.")
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        if due:
            renewed = tls.renew_due_certificates(
                vault, renew_after=renew_after, new_key=new_key
            )
        else:
            renewed = [tls.renew_certificate(vault, key_id, new_key=new_key)]
    for record in renewed:
        click.echo(f"renewed {record.id}: serial {record.attributes['serial']}")
    if not renewed:
        click.echo("no certificate is due for renewal")


@tls_group.command("revoke")
@lab_option
@share_option
@click.argument("key_id")
@click.option(
    "--reason",
    type=click.Choice(list(REVOCATION_REASONS)),
    required=True,
    help="The RFC 5280 revocation reason.",
)
def revoke(lab_dir, share_files, key_id, reason) -> None:
    """Revoke KEY_ID's certificate and publish the CA's CRL."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        record = tls.revoke_certificate(vault, key_id, reason)
    click.echo(f"revoked {record.id} ({reason}); the key is now {record.state.value}")


@tls_group.command("crl")
@lab_option
@share_option
@click.option("--ca", "ca_id", help="The CA's key id; the active CA by default.")
@click.option("--out", type=click.Path(path_type=Path), help="Where to write the CRL.")
def crl(lab_dir, share_files, ca_id, out) -> None:
    """Sign and publish a new CRL."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        published = tls.publish_crl(vault, ca_id, out_path=out)
    click.echo(
        f"CRL {published.number} of {published.ca_id}: "
        f"{len(published.revoked_serials)} revoked, written to {published.path}"
    )


@tls_group.command("rotate")
@lab_option
@share_option
@click.argument("key_id")
@click.option("--reason", required=True, help="Why the key is replaced.")
@click.option("--compromised", is_flag=True, help="The key is (suspected) compromised.")
def rotate(lab_dir, share_files, key_id, reason, compromised) -> None:
    """Replace KEY_ID (a service key or the CA) with a new key and redeploy."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        new_ids = tls.rotate_key(
            lab, vault, key_id, reason=reason, compromised=compromised
        )
    click.echo(f"rotated {key_id}; new keys: {', '.join(new_ids)}")


@tls_group.command("audit")
@lab_option
@share_option
@click.option(
    "--scan",
    "scan_dirs",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Folder to search for certificate files; the lab's by default.",
)
@click.option(
    "--endpoint",
    "endpoints",
    multiple=True,
    help="A live endpoint as host:port or service@host:port; repeat as needed.",
)
@click.option("--warning-days", type=int, default=30, show_default=True)
@click.option("--timeout", type=float, default=3.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option("--chart", type=click.Path(path_type=Path), help="Write a PNG timeline.")
def audit(
    lab_dir, share_files, scan_dirs, endpoints, warning_days, timeout, as_json, chart
):
    """Audit deployed certificates and live endpoints; exit 1 if any fails."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        report = tls.audit_tls(
            lab,
            vault,
            scan_dirs=list(scan_dirs) or None,
            endpoints=endpoints,
            warning_days=warning_days,
            timeout=timeout,
        )
    rows = report.rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
    else:
        for row in rows:
            problems = f"  [{row['problems']}]" if row["problems"] else ""
            service = row["service"] or "-"
            # An endpoint that could not be reached has no expiry to count.
            days = "-" if row["days left"] == "" else f"{row['days left']}d"
            click.echo(
                f"{row['verdict']:4} {days:>6} {service:28} {row['source']}{problems}"
            )
    if chart is not None:
        chart.write_bytes(tls.expiry_timeline_png(report))
    failed = len(report.failures)
    warned = len(report.warnings)
    click.echo(
        f"{len(rows)} certificates, {failed} failing, {warned} "
        f"warning{'' if warned == 1 else 's'}",
        err=True,
    )
    raise SystemExit(1 if failed else 0)

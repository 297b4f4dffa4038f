"""``trekeys transfer``: MAC keys of transfer channels and folder manifests."""

from __future__ import annotations

from pathlib import Path

import click

from trekeys import transfer
from trekeys.cli.common import (
    compromised_option,
    lab_option,
    open_lab_vault,
    rotation_reason_option,
    share_option,
)


def register(main: click.Group) -> None:
    main.add_command(transfer_group)


@click.group("transfer")
def transfer_group() -> None:
    """MAC keys for data in transit and HMAC-SHA-256 folder manifests."""


@transfer_group.command("create-key")
@lab_option
@share_option
@click.argument("channel")
@click.option("--owner", default="tre", show_default=True, help="The key's owner.")
def create_key(lab_dir, share_files, channel, owner) -> None:
    """Create the MAC key of the transfer CHANNEL, such as alpha-import."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        record = transfer.create_channel_key(vault, channel, owner=owner)
    click.echo(f"{record.id} created (key check value {record.fingerprint})")


@transfer_group.command("manifest")
@lab_option
@share_option
@click.argument("channel")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    help="The manifest; FOLDER.manifest.json beside the folder by default.",
)
@click.option("--overwrite", is_flag=True, help="Replace the manifest if it exists.")
def manifest(lab_dir, share_files, channel, folder, output, overwrite) -> None:
    """List FOLDER's files with HMACs under CHANNEL's key and MAC the manifest."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        path = transfer.create_manifest(
            vault, channel, folder, output, overwrite=overwrite
        )
    click.echo(f"wrote manifest {path}")


@transfer_group.command("verify")
@lab_option
@share_option
@click.argument("manifest_path", type=click.Path(exists=True, path_type=Path))
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify(lab_dir, share_files, manifest_path, folder) -> None:
    """Check FOLDER against MANIFEST_PATH; exit 1 naming every changed file."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        report = transfer.verify_manifest(vault, manifest_path, folder)
    click.echo(report.describe())


@transfer_group.command("rotate")
@lab_option
@share_option
@click.argument("key_id")
@rotation_reason_option
@compromised_option
def rotate(lab_dir, share_files, key_id, reason, compromised) -> None:
    """Give the channel of KEY_ID a new MAC key; the old one only verifies."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        new_ids = transfer.rotate_key(
            lab, vault, key_id, reason=reason, compromised=compromised
        )
    click.echo(f"{key_id} replaced by {', '.join(new_ids)}")

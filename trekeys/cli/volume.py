"""``trekeys volume``: LUKS2 storage volumes, header backups, recovery, lifecycle."""

from __future__ import annotations

from pathlib import Path

import click

from trekeys.cli.common import lab_option, open_lab_vault, share_option
from trekeys.cryptsetup import KdfSettings
from trekeys.luks import (
    check_header_backup_current,
    current_key,
    destroy_volume,
    provision_volume,
    refresh_header_backup,
    rotate_key,
)
from trekeys.luks_device import DEFAULT_SECTOR_SIZE
from trekeys.luks_recovery import recover_files, run_recovery_drill
from trekeys.records import KeyKind


def register(main: click.Group) -> None:
    main.add_command(volume)


@click.group()
def volume() -> None:
    """Provision LUKS2 volumes, back up headers, prove and perform recovery."""


@volume.command("provision")
@lab_option
@share_option
@click.argument("instance")
@click.option(
    "--device",
    type=click.Path(path_type=Path),
    required=True,
    help="Block device or image file to format (a new image with --from-dir).",
)
@click.option(
    "--from-dir",
    "source_dir",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="Build a new image holding an ext4 file system of this folder's files.",
)
@click.option(
    "--sector-size",
    type=click.Choice(["512", "4096"]),
    default=str(DEFAULT_SECTOR_SIZE),
    show_default=True,
    help="Encryption sector size in bytes.",
)
@click.option(
    "--test-kdf",
    is_flag=True,
    help="Use PBKDF2 with 1000 iterations for the keyslots (tests and demos only) "
    "instead of Argon2id with cryptsetup's benchmarked costs.",
)
def provision(
    lab_dir, share_files, instance, device, source_dir, sector_size, test_kdf
) -> None:
    """Create INSTANCE's LUKS2 volume and escrow its keys and header backup."""
    kdf = KdfSettings.test() if test_kdf else KdfSettings.production()
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        ids = provision_volume(
            lab,
            vault,
            instance,
            device,
            kdf=kdf,
            source_dir=source_dir,
            sector_size=int(sector_size),
        )
    click.echo(f"provisioned {device}: {ids.volume}, {ids.passphrase}, {ids.boot_key}")
    click.echo(f"keyslot KDF: {kdf.describe()}")


@volume.command("backup-header")
@lab_option
@share_option
@click.argument("instance")
def backup_header(lab_dir, share_files, instance) -> None:
    """Back up INSTANCE's live LUKS header, verify it and store it."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        record = current_key(vault, instance, KeyKind.LUKS_VOLUME)
        media = refresh_header_backup(lab, vault, record.id)
    click.echo(f"header backup of {record.id} stored in the vault and at {media}")


@volume.command("check-header")
@lab_option
@share_option
@click.argument("instance")
def check_header(lab_dir, share_files, instance) -> None:
    """Check that the stored header backup still matches the live header."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        record = current_key(vault, instance, KeyKind.LUKS_VOLUME)
        current = check_header_backup_current(lab, vault, record.id)
    if not current:
        click.echo(
            f"header backup of {record.id} is STALE; run 'trekeys volume "
            f"backup-header {instance}'"
        )
        raise SystemExit(1)
    click.echo(f"header backup of {record.id} matches the live header")


@volume.command("drill")
@lab_option
@share_option
@click.argument("instance")
@click.option(
    "--report",
    default="",
    help="Report name to record with the proof [default: 'cli drill <UTC time> "
    "by <actor>'].",
)
def drill(lab_dir, share_files, instance, report) -> None:
    """Prove INSTANCE's volume recovers: header restore, passphrase, escrowed key."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        outcome = run_recovery_drill(
            lab, vault, instance, report=report, origin="cli drill"
        )
    click.echo(
        f"recovered LUKS {outcome.uuid}: {outcome.files_from_passphrase} files "
        f"with the passphrase, {outcome.files_from_escrow} with the escrowed volume "
        f"key; live volume unchanged: {outcome.live_unchanged}"
    )


@volume.command("recover")
@lab_option
@share_option
@click.argument("instance")
@click.option(
    "--out",
    "target",
    type=click.Path(path_type=Path),
    required=True,
    help="New folder for the recovered files.",
)
@click.option(
    "--device-mapper",
    is_flag=True,
    help="Map the volume read-only and mount it (needs root and device-mapper) "
    "instead of decrypting a copy in user space.",
)
def recover(lab_dir, share_files, instance, target, device_mapper) -> None:
    """Recover INSTANCE's files with the escrowed volume key into a new folder."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        count = recover_files(
            lab, vault, instance, target, use_device_mapper=device_mapper
        )
    click.echo(f"recovered {count} files into {target}")


@volume.command("rotate")
@lab_option
@share_option
@click.argument("key_id")
@click.option("--reason", required=True, help="Why the key is replaced.")
@click.option(
    "--compromised", is_flag=True, help="Mark the old key compromised, not superseded."
)
def rotate(lab_dir, share_files, key_id, reason, compromised) -> None:
    """Replace KEY_ID: a new keyslot secret, or re-encryption for a volume key."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        new_ids = rotate_key(lab, vault, key_id, reason=reason, compromised=compromised)
    click.echo(f"{key_id} replaced by {', '.join(new_ids)}")


@volume.command("destroy")
@lab_option
@share_option
@click.argument("instance")
@click.option(
    "--confirm-uuid", required=True, help="The volume's LUKS UUID, as confirmation."
)
@click.option("--reason", required=True, help="Why the volume is destroyed.")
def destroy(lab_dir, share_files, instance, confirm_uuid, reason) -> None:
    """Erase INSTANCE's volume for good; its key records become tombstones."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        destroyed = destroy_volume(
            lab, vault, instance, confirm_uuid=confirm_uuid, reason=reason
        )
    click.echo(
        f"destroyed the volume of {instance}; tombstones: {', '.join(destroyed)}"
    )

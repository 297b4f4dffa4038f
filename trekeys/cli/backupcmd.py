"""``trekeys backup``: GPG backup keys, encrypted home backups and restores."""

from __future__ import annotations

from pathlib import Path

import click

from trekeys import backup, gpgkeys, restore, rotation
from trekeys.cli.common import lab_option, open_lab_vault, share_option


def register(main: click.Group) -> None:
    main.add_command(backup_group)


@click.group("backup")
def backup_group() -> None:
    """Back up home folders to three GPG keys, restore them and rotate the keys."""


@backup_group.command("create-keys")
@lab_option
@share_option
@click.option(
    "--algorithm",
    type=click.Choice(sorted(gpgkeys.ALGORITHMS)),
    default=gpgkeys.DEFAULT_ALGORITHM,
    show_default=True,
    help="Primary key and encryption subkey type of the new keys.",
)
def create_keys(lab_dir: Path, share_files: tuple[Path, ...], algorithm: str) -> None:
    """Create the admin, offline admin and instance keys that are missing."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        if gpgkeys.ADMIN_KEY_ID in vault:
            created = [
                gpgkeys.create_instance_key(lab, vault, i, algorithm=algorithm).id
                for i in lab.instances
                if f"gpg/instance-{i}" not in vault
            ]
        else:
            created = gpgkeys.create_backup_keys(lab, vault, algorithm=algorithm)
    for key_id in created:
        click.echo(f"created {key_id}")


@backup_group.command("create")
@click.argument("instance")
@lab_option
@share_option
def create(instance: str, lab_dir: Path, share_files: tuple[Path, ...]) -> None:
    """Back up the home folder of INSTANCE to its three recipient keys."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        made = backup.create_backup(lab, vault, instance)
    click.echo(f"{made.reference} -> {made.archive}")
    for recipient in made.recipients:
        click.echo(f"  {recipient.role:14} {recipient.key_id:24} {recipient.subkey}")


@backup_group.command("list")
@click.argument("instances", nargs=-1)
@lab_option
def list_command(instances: tuple[str, ...], lab_dir: Path) -> None:
    """List the backups of INSTANCES (all by default), oldest first."""
    from trekeys.lab import Lab

    lab = Lab.load(lab_dir)
    for instance in instances or tuple(lab.instances):
        for item in backup.list_backups(lab, instance):
            tested = "restore-tested" if item.passed_restore_test else "untested"
            click.echo(
                f"{item.reference:40} {item.manifest['created']}  "
                f"{item.manifest['file_count']:6} files  {tested}"
            )


@backup_group.command("verify")
@click.argument("instance")
@click.argument("name", required=False)
@lab_option
def verify(instance: str, name: str | None, lab_dir: Path) -> None:
    """Check a backup's size, SHA-256 and recipients without decrypting it."""
    from trekeys.lab import Lab

    item = backup.find_backup(Lab.load(lab_dir), instance, name)
    backup.verify_archive_file(item)
    click.echo(f"{item.reference}: size, SHA-256 and recipients match the manifest")


@backup_group.command("restore")
@click.argument("instance")
@click.argument("name", required=False)
@click.option(
    "--key", "key_id", required=True, help="Recipient key id to decrypt with."
)
@click.option(
    "--target",
    type=click.Path(path_type=Path),
    required=True,
    help="New folder to restore into; it must not exist.",
)
@click.option("--user", help="Restore only this user's folder.")
@click.option(
    "--keep-revoked-ssh-keys",
    is_flag=True,
    help="Restore authorized_keys as backed up, including keys in the KRL.",
)
@lab_option
@share_option
def restore_command(
    instance: str,
    name: str | None,
    key_id: str,
    target: Path,
    user: str | None,
    keep_revoked_ssh_keys: bool,
    lab_dir: Path,
    share_files: tuple[Path, ...],
) -> None:
    """Restore backup NAME of INSTANCE (the newest by default) with one key."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        item = backup.find_backup(lab, instance, name)
        report = restore.restore_backup(
            lab,
            vault,
            item,
            key_id=key_id,
            target=target,
            user=user,
            drop_revoked_ssh_keys=not keep_revoked_ssh_keys,
        )
    click.echo(f"restored {report.files} files ({report.bytes} bytes) into {target}")
    for line in report.removed_ssh_keys:
        click.echo(f"  left out revoked SSH key {line}")


@backup_group.command("drill")
@click.argument("instance")
@click.argument("name", required=False)
@click.option("--user", help="Restore only this user's folder.")
@lab_option
@share_option
def drill(
    instance: str,
    name: str | None,
    user: str | None,
    lab_dir: Path,
    share_files: tuple[Path, ...],
) -> None:
    """Restore a backup with each of its keys separately; exit 1 if any fails."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        item = backup.find_backup(lab, instance, name)
        reports = restore.drill_restore(
            lab, vault, item, work_dir=lab.work_dir, user=user
        )
    for report in reports:
        outcome = "PASS" if report.passed else "FAIL"
        click.echo(
            f"{outcome} {report.key_id}: {report.error or f'{report.files} files'}"
        )
    raise SystemExit(0 if all(r.passed for r in reports) else 1)


@backup_group.command("prune")
@click.argument("instance")
@click.option(
    "--keep",
    type=int,
    default=backup.DEFAULT_KEEP,
    show_default=True,
    help="How many of the newest backups to keep; the newest restore-tested one "
    "is kept as well.",
)
@lab_option
@share_option
def prune(
    instance: str, keep: int, lab_dir: Path, share_files: tuple[Path, ...]
) -> None:
    """Delete old backups of INSTANCE beyond the retention count."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        removed = backup.prune_backups(lab, vault, instance, keep=keep)
    for name in removed:
        click.echo(f"deleted backup:{instance}/{name}")


@backup_group.command("recipients")
@click.argument("instance")
@click.argument("name", required=False)
@lab_option
@share_option
def recipients(
    instance: str, name: str | None, lab_dir: Path, share_files: tuple[Path, ...]
) -> None:
    """Show which recipients of a backup can still open it."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        item = backup.find_backup(lab, instance, name)
        rows = rotation.recipients_status(lab, vault, item)
    for row in rows:
        can = "can open" if row["can open"] else "CANNOT open"
        click.echo(f"{row['key_id']:24} {row['role']:14} {row['state']:14} {can}")


@backup_group.command("for-key")
@click.argument("key_id")
@lab_option
@share_option
def for_key(key_id: str, lab_dir: Path, share_files: tuple[Path, ...]) -> None:
    """List the backups that are encrypted to KEY_ID."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        found = rotation.find_backups_for_key(lab, vault, key_id)
    for item in found:
        click.echo(item.reference)


@backup_group.command("rotate")
@click.argument("key_id")
@click.option("--reason", required=True, help="Why the key is replaced.")
@click.option(
    "--compromised",
    is_flag=True,
    help="Mark the old key compromised and revoke it, instead of deactivating it.",
)
@click.option(
    "--reencrypt",
    is_flag=True,
    help="Re-encrypt the old key's backups to the new set of recipients.",
)
@lab_option
@share_option
def rotate(
    key_id: str,
    reason: str,
    compromised: bool,
    reencrypt: bool,
    lab_dir: Path,
    share_files: tuple[Path, ...],
) -> None:
    """Replace the GPG backup key KEY_ID and report the backups that used it."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        affected = rotation.find_backups_for_key(lab, vault, key_id)
        new_ids = rotation.rotate_key(
            lab,
            vault,
            key_id,
            reason=reason,
            compromised=compromised,
            reencrypt=reencrypt,
        )
    click.echo(f"{key_id} replaced by {', '.join(new_ids)}")
    verb = "re-encrypted" if reencrypt else "still encrypted to the old key"
    for item in affected:
        click.echo(f"  {item.reference}: {verb}")

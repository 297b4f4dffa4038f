"""``trekeys ssh``: SSH key pairs, the access inventory and revocation."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from trekeys import gpgkeys, rotation, ssh
from trekeys.cli.common import lab_option, open_lab_vault, share_option


def register(main: click.Group) -> None:
    main.add_command(ssh_group)


@click.group("ssh")
def ssh_group() -> None:
    """Create, inventory and revoke the SSH keys of users and hosts."""


@ssh_group.command("create")
@click.argument("instance")
@click.argument("user", required=False)
@click.option("--host", is_flag=True, help="Create the instance's host key instead.")
@lab_option
@share_option
def create(
    instance: str,
    user: str | None,
    host: bool,
    lab_dir: Path,
    share_files: tuple[Path, ...],
) -> None:
    """Create an Ed25519 key pair for USER on INSTANCE, or the host key with --host."""
    if not host and not user:
        raise click.UsageError("give a USER or --host.")
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        if host:
            record = ssh.create_host_key(lab, vault, instance)
        else:
            record = ssh.create_user_key(lab, vault, instance, str(user))
    click.echo(f"created {record.id} {record.fingerprint}")


@ssh_group.command("inventory")
@click.option(
    "--key",
    "key_id",
    default=gpgkeys.ADMIN_KEY_ID,
    show_default=True,
    help="GPG key that decrypts the backups.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@lab_option
@share_option
def inventory(
    key_id: str, as_json: bool, lab_dir: Path, share_files: tuple[Path, ...]
) -> None:
    """List which SSH key opens which account, from the newest backups."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        entries = ssh.build_access_inventory(lab, vault, key_id=key_id)
    if as_json:
        click.echo(json.dumps([asdict(e) for e in entries], indent=2))
        return
    for e in entries:
        flag = " REVOKED" if e.revoked else ""
        click.echo(f"{e.instance:8} {e.account:10} {e.key_id:20} {e.fingerprint}{flag}")


@ssh_group.command("revoke")
@click.argument("key_id")
@click.option("--reason", required=True, help="Why the key is revoked.")
@click.option(
    "--retired",
    is_flag=True,
    help="Mark the key deactivated rather than compromised.",
)
@lab_option
@share_option
def revoke(
    key_id: str,
    reason: str,
    retired: bool,
    lab_dir: Path,
    share_files: tuple[Path, ...],
) -> None:
    """List KEY_ID in the KRL, mark it in the vault and drop it on restores."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        record = ssh.revoke_ssh_key(
            lab, vault, key_id, reason=reason, compromised=not retired
        )
    click.echo(f"revoked {key_id} ({record.state.value}); KRL {ssh.krl_path(lab)}")


@ssh_group.command("rotate")
@click.argument("key_id")
@click.option("--reason", required=True, help="Why the key is replaced.")
@click.option("--compromised", is_flag=True, help="Mark the old key compromised.")
@lab_option
@share_option
def rotate(
    key_id: str,
    reason: str,
    compromised: bool,
    lab_dir: Path,
    share_files: tuple[Path, ...],
) -> None:
    """Revoke KEY_ID and replace it with a new key for the same account or host."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        new_ids = rotation.rotate_key(
            lab, vault, key_id, reason=reason, compromised=compromised
        )
    click.echo(f"{key_id} revoked and replaced by {', '.join(new_ids)}")

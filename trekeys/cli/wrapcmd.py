"""``trekeys wrap``: wrap keys for delivery to users and record each distribution."""

from __future__ import annotations

from pathlib import Path

import click

from trekeys import wrap
from trekeys.cli.common import (
    compromised_option,
    lab_option,
    open_lab_vault,
    rotation_reason_option,
    share_option,
)


def register(main: click.Group) -> None:
    main.add_command(wrap_group)


@click.group("wrap")
def wrap_group() -> None:
    """Key-wrapping keys (RFC 5649) that carry keys to TRE users."""


@wrap_group.command("create-key")
@lab_option
@share_option
@click.argument("user")
def create_key(lab_dir, share_files, user) -> None:
    """Create the wrapping key of USER."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        record = wrap.create_wrapping_key(vault, user)
    click.echo(f"{record.id} created (key check value {record.fingerprint})")


@wrap_group.command("send")
@lab_option
@share_option
@click.argument("key_id")
@click.argument("user")
@click.option("--output", type=click.Path(path_type=Path), help="The package file.")
@click.option("--overwrite", is_flag=True, help="Replace the package if it exists.")
def send(lab_dir, share_files, key_id, user, output, overwrite) -> None:
    """Wrap KEY_ID under USER's wrapping key into a package and record it."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        package = wrap.wrap_key(lab, vault, key_id, user, output, overwrite=overwrite)
    click.echo(f"wrapped {key_id} for {user}: {package}")


@wrap_group.command("unwrap")
@click.argument("package", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--wrapping-key-file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The user's wrapping key file.",
)
@click.option("--output", required=True, type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace the output if it exists.")
def unwrap(package, wrapping_key_file, output, overwrite) -> None:
    """Unwrap PACKAGE on the user's side into a new 0600 key file."""
    wrap.unwrap_to_file(package, wrapping_key_file, output, overwrite=overwrite)
    click.echo(f"unwrapped {package} to {output}")


@wrap_group.command("verify")
@lab_option
@share_option
@click.argument("package", type=click.Path(exists=True, path_type=Path))
def verify(lab_dir, share_files, package) -> None:
    """Check that PACKAGE unwraps to the key the vault holds."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        row = wrap.verify_package(vault, package)
    click.echo(f"{package} unwraps to {row['key']} under {row['wrapping key']}")


@wrap_group.command("list")
@lab_option
@share_option
@click.option("--user", help="Only distributions to this user.")
def list_distributions(lab_dir, share_files, user) -> None:
    """List every recorded distribution: to whom, when, which key, under which key."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        rows = wrap.list_distributions(vault, user)
    for row in rows:
        click.echo(
            f"{row['at']}  {row['to']:16} {row['key']:28} {row['wrapping_key']:18} "
            f"{row['package']}"
        )


@wrap_group.command("export-key")
@lab_option
@share_option
@click.argument("user")
@click.option("--output", required=True, type=click.Path(path_type=Path))
def export_key(lab_dir, share_files, user, output) -> None:
    """Write USER's wrapping key to a new 0600 file for the handover (audited)."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        wrap.export_wrapping_key(vault, user, output)
    click.echo(f"wrote the wrapping key of {user} to {output}; hand it over in person")


@wrap_group.command("rotate")
@lab_option
@share_option
@click.argument("key_id")
@rotation_reason_option
@compromised_option
def rotate(lab_dir, share_files, key_id, reason, compromised) -> None:
    """Replace the wrapping key KEY_ID and send its keys again under the new one."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        new_ids = wrap.rotate_key(
            lab, vault, key_id, reason=reason, compromised=compromised
        )
    click.echo(f"{key_id} replaced by {', '.join(new_ids)}")

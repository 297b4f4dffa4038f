"""``trekeys files``: encrypt users' files with escrowed keys and recover them."""

from __future__ import annotations

from pathlib import Path

import click

from trekeys import escrow, files
from trekeys.cli.common import (
    compromised_option,
    lab_option,
    open_lab_vault,
    rotation_reason_option,
    share_option,
)
from trekeys.passphrases import check_passphrase_strength
from trekeys.runbook import read_secret_input

passphrase_file_option = click.option(
    "--passphrase-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read the passphrase from this file instead of a prompt that does not echo.",
)
overwrite_option = click.option(
    "--overwrite", is_flag=True, help="Replace the output file if it exists."
)


def register(main: click.Group) -> None:
    main.add_command(files_group)


@click.group("files")
def files_group() -> None:
    """Encrypt users' files for their passphrase and an escrow key; recover them."""


@files_group.command("create-key")
@lab_option
@share_option
@click.argument("user")
def create_key(lab_dir, share_files, user) -> None:
    """Create the escrow key of USER."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        record = escrow.create_escrow_key(lab, vault, user)
    click.echo(f"{record.id} created (OpenPGP {record.fingerprint})")


@files_group.command("encrypt")
@lab_option
@share_option
@click.argument("user")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    help="The ciphertext; SOURCE with .gpg (or .tar.gpg for a folder) by default.",
)
@passphrase_file_option
@overwrite_option
def encrypt(lab_dir, share_files, user, source, output, passphrase_file, overwrite):
    """Encrypt the file or folder SOURCE of USER for their passphrase and escrow."""
    if passphrase_file:
        passphrase = read_secret_input("", file=str(passphrase_file))
    else:
        passphrase = click.prompt(
            "Passphrase (not echoed)", hide_input=True, confirmation_prompt=True
        )
    check_passphrase_strength(passphrase, user_inputs=[user])
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        dest = files.encrypt_path(
            lab, vault, user, source, output, passphrase=passphrase, overwrite=overwrite
        )
    click.echo(f"encrypted {source} to {dest}")


@files_group.command("decrypt")
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dest", type=click.Path(path_type=Path))
@passphrase_file_option
@overwrite_option
def decrypt(source, dest, passphrase_file, overwrite) -> None:
    """Decrypt SOURCE to DEST with the user's passphrase (no vault needed)."""
    passphrase = read_secret_input(
        "Passphrase (not echoed): ",
        file=str(passphrase_file) if passphrase_file else None,
    )
    files.decrypt_path(source, dest, passphrase=passphrase, overwrite=overwrite)
    click.echo(f"decrypted {source} to {dest}")


@files_group.command("recover")
@lab_option
@share_option
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--reason", required=True, help="Why the file is recovered (audited).")
@click.option("--key-id", help="The escrow key; found from the message by default.")
def recover(lab_dir, share_files, source, dest, reason, key_id) -> None:
    """Recover SOURCE from the escrow into the new place DEST."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        files.recover_path(lab, vault, source, dest, reason=reason, key_id=key_id)
    click.echo(f"recovered {source} to {dest}; the recovery is in the audit log")


@files_group.command("show")
@lab_option
@share_option
@click.argument("user")
def show(lab_dir, share_files, user) -> None:
    """Show USER's escrow and passphrase keys and the files they protect."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        summary = escrow.user_summary(lab, vault, user)
    for name in ("user", "escrow key", "passphrase key"):
        click.echo(f"{name}: {summary[name]}")
    for path in summary["files"]:
        click.echo(f"protects: {path}")


@files_group.command("rotate")
@lab_option
@share_option
@click.argument("key_id")
@rotation_reason_option
@compromised_option
def rotate(lab_dir, share_files, key_id, reason, compromised) -> None:
    """Replace the escrow key or passphrase KEY_ID and re-encrypt its files."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        new_ids = files.rotate_key(
            lab, vault, key_id, reason=reason, compromised=compromised
        )
    click.echo(f"{key_id} replaced by {', '.join(new_ids)}")

"""Options and helpers shared by the command modules."""

from __future__ import annotations

from pathlib import Path

import click

from trekeys.custody import combine_shares
from trekeys.lab import Lab
from trekeys.runbook import credentials_for
from trekeys.vault import Vault, VaultCredentials

lab_option = click.option(
    "--lab",
    "lab_dir",
    type=click.Path(path_type=Path),
    default=Path("lab"),
    show_default=True,
    help="Folder of the TRE (the demo TRE by default).",
)
share_option = click.option(
    "--share",
    "share_files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A custodian's share file; repeat up to the threshold. '--share -' asks "
    "for the shares at a prompt that does not echo. Without it, the files named "
    "in TREKEYS_SHARE_FILES or the lab's custodian folder are used.",
)

rotation_reason_option = click.option(
    "--reason", required=True, help="Why the key is replaced (audited)."
)
compromised_option = click.option(
    "--compromised", is_flag=True, help="Mark the old key compromised, not deactivated."
)


def open_lab_vault(lab_dir: Path, share_files: tuple[Path, ...]) -> tuple[Lab, Vault]:
    """Load the lab and open its vault with the given shares."""
    lab = Lab.load(lab_dir)
    return lab, lab.open_vault_with(lab_credentials(lab, share_files))


def lab_credentials(lab: Lab, share_files: tuple[Path, ...]) -> VaultCredentials:
    """Rebuild the vault credentials from share files, or a prompt for '-'."""
    if [str(p) for p in share_files] == ["-"]:
        words = [
            click.prompt(
                f"Custody share {number} of {lab.threshold} (not echoed)",
                hide_input=True,
            )
            for number in range(1, lab.threshold + 1)
        ]
        return VaultCredentials(combine_shares(words), lab.keyfile_path)
    return credentials_for(lab, share_files=[str(p.resolve()) for p in share_files])

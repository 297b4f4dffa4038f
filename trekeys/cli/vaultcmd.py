"""``trekeys vault`` and ``trekeys custody``: the vault file and its custodians."""

from __future__ import annotations

import sys

import click

from trekeys.cli.common import (
    lab_credentials,
    lab_option,
    open_lab_vault,
    share_option,
)
from trekeys.custody import Custodian
from trekeys.errors import ShareError
from trekeys.generations import describe_generations, restore_generation
from trekeys.inventory import vault_strength_check
from trekeys.lab import Lab
from trekeys.resplit import lab_custodians, resplit_lab_custody
from trekeys.vault import KdfSettings


def register(main: click.Group) -> None:
    main.add_command(vault)
    main.add_command(custody)


@click.group()
def vault() -> None:
    """Inspect the vault file, its KDF and its generations; restore a generation."""


@vault.command("info")
@lab_option
@share_option
def info(lab_dir, share_files) -> None:
    """Show the vault's format, cipher, KDF, custody, generations and strength rule."""
    _, opened = open_lab_vault(lab_dir, share_files)
    with opened:
        custody_meta = opened.meta.get("custody", {})
        holds, strength = vault_strength_check(opened)
        lines = [
            ("file", str(opened.path)),
            ("format", "KDBX 4"),
            ("cipher", opened.cipher_description),
            ("KDF", opened.kdf_description),
            ("records", str(len(opened.ids()))),
            (
                "custody",
                f"split {custody_meta.get('split', '?')}, "
                f"{custody_meta.get('threshold', '?')} of "
                f"{len(custody_meta.get('custodians', []))} custodians",
            ),
            ("generations", str(len(describe_generations(opened.path)))),
            ("strength rule", strength),
        ]
    for name, value in lines:
        click.echo(f"{name + ':':15} {value}")
    if not holds:
        sys.exit(1)


@vault.command("generations")
@lab_option
def generations(lab_dir) -> None:
    """List the earlier generations of the vault, newest first."""
    lab = Lab.load(lab_dir)
    rows = describe_generations(lab.vault_path)
    if not rows:
        click.echo(f"no generations of {lab.vault_path} yet")
        return
    click.echo(f"{'#':>3} {'saved (UTC)':20} {'bytes':>10} name")
    for number, row in enumerate(rows, start=1):
        click.echo(f"{number:>3} {row.saved:20} {row.size:>10} {row.path.name}")


@vault.command("restore")
@lab_option
@share_option
@click.argument("generation")
def restore(lab_dir, share_files, generation) -> None:
    """Make GENERATION (a name or number from 'vault generations') the live vault.

    The live file is kept as a generation first, so the restore can be undone.
    """
    lab = Lab.load(lab_dir)
    credentials = lab_credentials(lab, share_files)
    restored = restore_generation(lab.vault_path, generation, credentials)
    click.echo(f"restored {restored.name} as {lab.vault_path}")


@vault.command("tune-kdf")
@click.option(
    "--seconds",
    type=float,
    default=1.0,
    show_default=True,
    help="Target time of one key derivation, in seconds.",
)
@click.option(
    "--memory-mib",
    type=click.IntRange(8, 4096),
    default=256,
    show_default=True,
    help="Argon2id memory, in MiB.",
)
def tune_kdf(seconds, memory_mib) -> None:
    """Measure Argon2id settings that take about SECONDS on this machine."""
    settings = KdfSettings.tune(seconds, memory_kib=memory_mib * 1024)
    measured = settings.measure_seconds()
    click.echo(f"{settings.describe()}: {measured:.2f} s per derivation here")


@click.group()
def custody() -> None:
    """Check the custodians' shares or re-split the vault's master secret."""


@custody.command("check")
@lab_option
@share_option
def check(lab_dir, share_files) -> None:
    """Check each custodian's share file on its own; exit 1 if any is bad."""
    lab, opened = open_lab_vault(lab_dir, share_files)
    with opened:
        rows = lab.check_each_share(opened)
    for row in rows:
        verdict = "valid" if row["valid"] else "INVALID"
        click.echo(f"{row['custodian']:32} {verdict:8} {row['detail']}")
    if not all(row["valid"] for row in rows):
        sys.exit(1)


@custody.command("resplit")
@lab_option
@share_option
@click.option(
    "--custodian",
    "custodian_specs",
    multiple=True,
    metavar="ROLE=NAME",
    help="A custodian of the new split; repeat for each. Default: the current ones.",
)
@click.option(
    "--threshold",
    type=click.IntRange(1, 16),
    help="How many shares open the vault after the split. Default: unchanged.",
)
@click.option(
    "--reason", required=True, help="Why custody changes (kept in the audit log)."
)
@click.option(
    "--compromised",
    is_flag=True,
    help="The old master secret was disclosed: its tombstone is marked "
    "destroyed-compromised instead of destroyed.",
)
def resplit(
    lab_dir, share_files, custodian_specs, threshold, reason, compromised
) -> None:
    """Re-key the vault under a new master secret and write new share files.

    Every share of the old split stops opening the vault.
    """
    lab, opened = open_lab_vault(lab_dir, share_files)
    custodians = [_parse_custodian(spec) for spec in custodian_specs] or None
    with opened:
        result = resplit_lab_custody(
            lab,
            opened,
            custodians=custodians,
            threshold=threshold,
            reason=reason,
            compromised=compromised,
        )
    click.echo(
        f"split {result.old_split} replaced by {result.new_split}, "
        f"{result.threshold} of {len(result.share_files)} custodians"
    )
    for name, path in sorted(result.share_files.items()):
        click.echo(f"  new share for {name}: {path}")
    for path in result.removed_share_files:
        click.echo(f"  removed share of a former custodian: {path}")
    click.echo(f"custodians now: {', '.join(c.role for c in lab_custodians(lab))}")


def _parse_custodian(spec: str) -> Custodian:
    role, _, name = spec.partition("=")
    if not role.strip() or not name.strip():
        raise ShareError(
            f"invalid custodian {spec!r}; write it as ROLE=NAME, for example "
            "'Operations Manager=Omar Operations'."
        )
    return Custodian(role.strip(), name.strip())

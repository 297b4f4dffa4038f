"""``trekeys lab``: build the demo TRE."""

from __future__ import annotations

from pathlib import Path

import click

from trekeys.lab import create_lab


def register(main: click.Group) -> None:
    main.add_command(lab)


@click.group()
def lab() -> None:
    """Build and inspect the embedded demo TRE."""


@lab.command("create")
@click.argument("directory", type=click.Path(path_type=Path), default=Path("lab"))
@click.option(
    "--strong-kdf",
    is_flag=True,
    help="Use production Argon2id settings for the vault (slow) instead of "
    "the test-strength demo settings.",
)
@click.option(
    "--threshold",
    type=click.IntRange(1, 3),
    default=2,
    show_default=True,
    help="How many of the three custodians' shares open the vault.",
)
def create(directory: Path, strong_kdf: bool, threshold: int) -> None:
    """Build a demo TRE in DIRECTORY, which must be missing or empty."""

    def progress(step: str) -> None:
        click.echo(
            f"  building {step.partition(':')[0].removeprefix('trekeys.')}", err=True
        )

    built = create_lab(
        directory, fast_kdf=not strong_kdf, threshold=threshold, progress=progress
    )
    click.echo(f"Demo TRE created in {built.root}")

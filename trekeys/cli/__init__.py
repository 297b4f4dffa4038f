"""The ``trekeys`` command: a thin layer over the library.

Each command group lives in its own module and registers itself on `main`.
Usage errors exit with status 2 and other trekeys errors with status 1, with
one "Error: ..." line on standard error.
"""

from __future__ import annotations

import logging
import sys

import click

from trekeys import __version__
from trekeys.errors import TrekeysError


class TrekeysGroup(click.Group):
    """A click group that turns trekeys errors into one clear line and status 1."""

    def invoke(self, ctx: click.Context):  # type: ignore[no-untyped-def]
        try:
            return super().invoke(ctx)
        except TrekeysError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)


@click.group(cls=TrekeysGroup)
@click.version_option(__version__, prog_name="trekeys")
@click.option(
    "-v", "--verbose", count=True, help="Log more: -v for INFO, -vv for DEBUG."
)
def main(verbose: int) -> None:
    """Manage the keys of a Trusted Research Environment and prove they recover."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _register() -> None:
    from trekeys.cli import (
        backupcmd,
        ceremony,
        filescmd,
        incident,
        keys,
        labcmd,
        runs,
        sshcmd,
        tls,
        transfercmd,
        vaultcmd,
        volume,
        wrapcmd,
    )

    for module in (
        labcmd,
        keys,
        runs,
        backupcmd,
        filescmd,
        incident,
        sshcmd,
        tls,
        transfercmd,
        vaultcmd,
        volume,
        wrapcmd,
        ceremony,
    ):
        module.register(main)


_register()

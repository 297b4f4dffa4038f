"""``trekeys drill``: run the runbooks headless and write reports."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from trekeys.drills import DEFAULT_TIMEOUT_SECONDS, discover_notebooks, run_drills


def register(main: click.Group) -> None:
    main.add_command(drill)


@click.command()
@click.argument("names", nargs=-1)
@click.option(
    "--lab",
    "lab_dir",
    type=click.Path(path_type=Path),
    default=Path("lab"),
    show_default=True,
    help="Folder of the TRE to run the drills against.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("reports"),
    show_default=True,
    help="Folder for the dated report folders and index.",
)
@click.option(
    "--timeout",
    type=int,
    default=DEFAULT_TIMEOUT_SECONDS,
    show_default=True,
    help="Seconds a single notebook cell may run before the drill is stopped.",
)
@click.option("--list", "list_only", is_flag=True, help="List the drills and exit.")
def drill(names, lab_dir, out_dir, timeout, list_only) -> None:
    """Run the named drills (all by default) and write reports; exit 1 if any fails."""
    if list_only:
        for name in discover_notebooks():
            click.echo(name)
        return

    from tqdm import tqdm

    total = len(names) if names else len(discover_notebooks())
    with tqdm(total=total, unit="drill", file=sys.stderr) as bar:
        started: list[str] = []

        def progress(name: str) -> None:
            if started:
                bar.update(1)
            started.append(name)
            bar.set_description(name)

        run = run_drills(
            lab_dir, out_dir, names=names or None, timeout=timeout, on_progress=progress
        )
        bar.update(total - bar.n)

    for result in run.drills:
        click.echo(
            f"{result.outcome:10} {result.name}"
            + (f": {result.error}" if result.error else "")
        )
    click.echo(f"Reports: {run.folder}")
    click.echo(f"Index: {(Path(out_dir) / 'index.html').resolve()}")
    raise SystemExit(0 if run.passed else 1)

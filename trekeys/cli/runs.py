"""``trekeys drill``: run the runbooks headless and write reports."""

from __future__ import annotations

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

    chosen = list(names) or list(discover_notebooks())
    with tqdm(
        total=len(chosen), unit="drill", file=click.get_text_stream("stderr")
    ) as bar:

        def progress(name: str) -> None:
            bar.set_description(name)
            bar.update(0 if bar.n == 0 and bar.desc == name else 1)

        run = run_drills(
            lab_dir, out_dir, names=names or None, timeout=timeout, on_progress=progress
        )
        bar.update(bar.total - bar.n)

    for result in run.drills:
        click.echo(
            f"{result.outcome:10} {result.name}"
            + (f": {result.error}" if result.error else "")
        )
    click.echo(f"Reports: {run.folder}")
    click.echo(f"Index: {(Path(out_dir) / 'index.html').resolve()}")
    raise SystemExit(0 if run.passed else 1)

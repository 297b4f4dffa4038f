"""``trekeys drill`` and ``trekeys report``: run the runbooks, check the reports."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from trekeys.drillparams import parse_parameter_options
from trekeys.drills import (
    DEFAULT_TIMEOUT_SECONDS,
    DrillResult,
    discover_notebooks,
    run_drills,
)
from trekeys.reports import INDEX, prune_runs
from trekeys.signing import verify_run_folder


def register(main: click.Group) -> None:
    main.add_command(drill)
    main.add_command(report)


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
    help="Folder for the dated run folders and index.html.",
)
@click.option(
    "--param",
    "param_options",
    multiple=True,
    metavar="NAME=VALUE",
    help="Set a runbook parameter, converted to the type of its default; repeat "
    "for more. Goes to every chosen drill that declares it. Never a secret.",
)
@click.option(
    "--timeout",
    type=float,
    default=DEFAULT_TIMEOUT_SECONDS,
    show_default=True,
    help="Seconds a whole notebook may run before the drill is stopped.",
)
@click.option("--list", "list_only", is_flag=True, help="List the drills and exit.")
def drill(names, lab_dir, out_dir, param_options, timeout, list_only) -> None:
    """Run the named drills (all by default) and write reports; exit 1 if any fails."""
    if list_only:
        for name in discover_notebooks():
            click.echo(name)
        return

    from tqdm.std import tqdm

    parameters = parse_parameter_options(param_options)
    total = len(names) or len(discover_notebooks())
    bars: list[tqdm] = []

    # The bar starts with the first drill, after every input was checked, so
    # that an input error is the only thing printed.
    def on_start(name: str) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="drill", file=sys.stderr))
        bars[0].set_description(name)

    def on_finish(result: DrillResult) -> None:
        bars[0].update(1)

    try:
        run = run_drills(
            lab_dir,
            out_dir,
            names=names or None,
            parameters=parameters,
            timeout=timeout,
            on_start=on_start,
            on_finish=on_finish,
        )
    finally:
        for bar in bars:
            bar.close()

    for result in run.drills:
        line = f"{result.outcome:11} {result.name}"
        click.echo(line + (f": {result.error}" if result.error else ""))
    for error in run.errors:
        click.echo(f"run error: {error}", err=True)
    click.echo(f"Reports: {run.folder}")
    click.echo(f"Index: {(Path(out_dir) / INDEX).resolve()}")
    raise SystemExit(0 if run.passed else 1)


@click.group()
def report() -> None:
    """Verify and prune drill reports."""


@report.command("verify")
@click.argument("run_folder", type=click.Path(path_type=Path))
@click.option(
    "--fingerprint",
    help="SHA-256 fingerprint of the trusted report-signing key (from the "
    "inventory); without it, the key named in the manifest is trusted.",
)
def verify(run_folder: Path, fingerprint: str | None) -> None:
    """Check the signed manifest of RUN_FOLDER and every report's SHA-256."""
    result = verify_run_folder(run_folder, fingerprint=fingerprint)
    click.echo(
        f"{run_folder}: {result.files_checked} files match the manifest signed by "
        f"report-signing key {result.fingerprint}"
    )
    if fingerprint is None:
        click.echo(
            "Compare that fingerprint with tre/report-signing in the inventory, "
            "or pass --fingerprint."
        )


@report.command("prune")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=Path("reports"),
    show_default=True,
    help="The reports folder.",
)
@click.option(
    "--keep",
    type=int,
    default=12,
    show_default=True,
    help="How many of the newest run folders to keep.",
)
@click.option("--dry-run", is_flag=True, help="List what would go; remove nothing.")
def prune(out_dir: Path, keep: int, dry_run: bool) -> None:
    """Remove old run folders, always keeping each drill's latest passing run."""
    removed = prune_runs(out_dir, keep, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for folder in removed:
        click.echo(f"{verb} {folder}")
    click.echo(f"{len(removed)} run folder(s) {verb}")

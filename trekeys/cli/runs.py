"""``trekeys drill`` and ``trekeys report``: run the runbooks, check the reports."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import click

from trekeys.approvals import approve_runbooks, describe_pins, pin_runbooks
from trekeys.cli.common import open_lab_vault, share_option
from trekeys.drillparams import parse_parameter_options
from trekeys.drills import (
    DEFAULT_TIMEOUT_SECONDS,
    DrillResult,
    changes_keys,
    discover_notebooks,
    run_drills,
    select_notebooks,
)
from trekeys.reports import INDEX, prune_runs
from trekeys.signing import signer_of_run, verify_run_folder


def register(main: click.Group) -> None:
    main.add_command(drill)
    main.add_command(report)
    main.add_command(runbook)


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
@click.option(
    "--require-approved",
    is_flag=True,
    help="Reject any chosen runbook that is not in its approved version.",
)
@click.option(
    "--safe-only",
    is_flag=True,
    help="Run only the drills that change no key: recovery, restore and audit "
    "drills. Use it for scheduled runs against a live TRE.",
)
@click.option("--list", "list_only", is_flag=True, help="List the drills and exit.")
def drill(
    names,
    lab_dir,
    out_dir,
    param_options,
    timeout,
    require_approved,
    safe_only,
    list_only,
) -> None:
    """Run the named drills (all by default) and write reports; exit 1 if any fails."""
    if list_only:
        for name, path in discover_notebooks().items():
            kind = "changes keys" if changes_keys(path) else "safe"
            click.echo(f"{name:24} {kind}")
        return

    from tqdm.std import tqdm

    parameters = parse_parameter_options(param_options)
    total = len(select_notebooks(names or None, safe_only=safe_only))
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
            require_approved=require_approved,
            safe_only=safe_only,
        )
    finally:
        for bar in bars:
            bar.close()

    for result in run.drills:
        if result.runbook.get("status", "approved") != "approved":
            status = result.runbook["status"]
            click.echo(f"warning: {result.notebook} is {status}", err=True)
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
    help="Full SHA-256 fingerprint (64 hex digits) of the trusted report-signing "
    "key, as 'trekeys key show tre/report-signing' prints it.",
)
@click.option(
    "--lab",
    "lab_dir",
    type=click.Path(path_type=Path),
    help="Take the trusted key from this TRE's vault: the signing key that lists "
    "the run among what it signed.",
)
@share_option
def verify(
    run_folder: Path,
    fingerprint: str | None,
    lab_dir: Path | None,
    share_files: tuple[Path, ...],
) -> None:
    """Check the signed manifest of RUN_FOLDER and every report's SHA-256.

    The signing key must match a trusted one, given with --fingerprint or read
    from the vault with --lab; a manifest can otherwise name any key.
    """
    if fingerprint is None and lab_dir is None:
        raise click.UsageError(
            "give --fingerprint or --lab, so that the manifest's signing key is "
            "checked against a key you trust."
        )
    if fingerprint is not None and len(fingerprint) != 64:
        raise click.BadParameter(
            "give the full fingerprint of 64 hex digits, not a prefix.",
            param_hint="--fingerprint",
        )
    if lab_dir is not None:
        _, vault = open_lab_vault(lab_dir, share_files)
        with vault:
            fingerprint = signer_of_run(vault, run_folder.resolve().name).fingerprint

    result = verify_run_folder(run_folder, fingerprint=fingerprint)
    click.echo(
        f"{run_folder}: {result.files_checked} files match the manifest signed by "
        f"the trusted report-signing key {result.fingerprint}"
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
@click.option(
    "--retention-days",
    type=click.IntRange(min=0),
    default=None,
    help="Keep every run younger than this many days (default: 7 years).",
)
@click.option("--dry-run", is_flag=True, help="List what would go; remove nothing.")
def prune(out_dir: Path, keep: int, retention_days: int | None, dry_run: bool) -> None:
    """Remove old run folders, always keeping each drill's latest passing run."""
    retention = None if retention_days is None else timedelta(days=retention_days)
    removed = prune_runs(out_dir, keep, dry_run=dry_run, retention=retention)
    for folder in removed:
        click.echo(f"{'would remove' if dry_run else 'removed'} {folder}")
    verb = "would be removed" if dry_run else "removed"
    click.echo(f"{len(removed)} run folder(s) {verb}")


@click.group()
def runbook() -> None:
    """Approve runbook versions and show which ones changed since approval."""


@runbook.command("status")
@click.argument("names", nargs=-1)
def status(names: tuple[str, ...]) -> None:
    """Show each runbook's SHA-256, git commit and approval status."""
    pins = pin_runbooks(select_notebooks(names or None))
    for line in describe_pins(list(pins.values())):
        click.echo(line)


@runbook.command("approve")
@click.argument("names", nargs=-1, required=True)
@click.option("--by", "approved_by", required=True, help="Name of the approver.")
@click.option(
    "--role",
    default="Information Security Manager",
    show_default=True,
    help="The approver's role in the key management policy.",
)
def approve(names: tuple[str, ...], approved_by: str, role: str) -> None:
    """Record the committed version of the named runbooks as approved."""
    rows = approve_runbooks(select_notebooks(names), approved_by, role)
    for row in rows:
        click.echo(
            f"approved {row['notebook']} sha256 {row['sha256']} "
            f"commit {row['git_commit'] or '(not in git)'}"
        )

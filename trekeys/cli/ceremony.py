"""``trekeys ceremony``: run a witnessed key ceremony and verify its transcript."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import yaml

from trekeys.ceremony import Ceremony, Participant, start_lab_ceremony
from trekeys.cli.common import lab_option, open_lab_vault, share_option
from trekeys.coverage import DEFAULT_PROOF_INTERVAL_DAYS, recovery_coverage
from trekeys.custodians import register_rows, required_actions
from trekeys.errors import CeremonyError
from trekeys.evidence import text_evidence
from trekeys.lab import Lab
from trekeys.offline_signature import offline_signer_if_reachable
from trekeys.retention import DEFAULT_RETENTION_YEARS, prune_evidence, retention_period
from trekeys.signing_key import load_public_key_pem
from trekeys.transcript import read_transcript, verify_transcript, verify_with_vault
from trekeys.transcript_report import render_markdown


def register(main: click.Group) -> None:
    main.add_command(ceremony)


def read_participants(path: Path) -> list[Participant]:
    """Read participants from a JSON or YAML file: a list, or a mapping with a
    ``participants`` list, of entries with role, name and optional custodian."""
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CeremonyError(
            f"participants file {path} cannot be read as JSON or YAML; fix it and "
            "try again."
        ) from exc
    if isinstance(data, dict):
        data = data.get("participants")
    if not isinstance(data, list) or not all(isinstance(p, dict) for p in data):
        raise CeremonyError(
            f"participants file {path} must hold a list of entries with role and name."
        )
    return [Participant.from_dict(entry) for entry in data]


folder_argument = click.argument("folder", type=click.Path(path_type=Path))
transcript_argument = click.argument(
    "transcript", type=click.Path(path_type=Path, exists=True, dir_okay=False)
)


@click.group()
def ceremony() -> None:
    """Run a witnessed key ceremony and check its sealed transcript."""


@ceremony.command("start")
@click.argument("procedure")
@folder_argument
@click.option(
    "--participants",
    "participants_file",
    required=True,
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="JSON or YAML file listing each participant's role and name.",
)
@click.option(
    "--subject", default="", help="What the ceremony is about, such as a key id."
)
@lab_option
def start(procedure, folder, participants_file, subject, lab_dir) -> None:
    """Start PROCEDURE in a new FOLDER if every required role is present."""
    lab = Lab.load(lab_dir)
    participants = read_participants(participants_file)
    run = start_lab_ceremony(lab, procedure, participants, folder, subject=subject)
    click.echo(f"ceremony {procedure} started in {folder} (dry run on the demo TRE)")
    click.echo(f"next step: {run.pending_steps[0]}")


@ceremony.command("step")
@folder_argument
@click.argument("step_id")
@click.option("--by", "actor", required=True, help="Name of the participant acting.")
@click.option("--witness", help="Name of the witness, in another role.")
@click.option("--outcome", required=True, help="One sentence on what the step did.")
@click.option(
    "--file",
    "files",
    multiple=True,
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="A file the step produced; repeat for each.",
)
@click.option(
    "--evidence",
    "evidence_files",
    multiple=True,
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="A text file of tool output to keep verbatim; it must hold no secret.",
)
def step(folder, step_id, actor, witness, outcome, files, evidence_files) -> None:
    """Record STEP_ID of the ceremony in FOLDER."""
    run = Ceremony.resume(folder)
    evidence = [
        text_evidence(path.name, path.read_text(encoding="utf-8"))
        for path in evidence_files
    ]
    run.perform(
        step_id,
        by=actor,
        witness=witness,
        outcome=outcome,
        evidence=evidence,
        files=list(files),
    )
    pending = run.pending_steps
    click.echo(f"recorded step {step_id}; next: {pending[0] if pending else 'seal'}")


@ceremony.command("deviate")
@folder_argument
@click.argument("step_id")
@click.option("--what", "what_happened", required=True, help="What happened.")
@click.option("--instead", required=True, help="What was done instead.")
@click.option("--by", "reporter", required=True, help="Who reports the deviation.")
@click.option("--ack", "acknowledger", required=True, help="Who acknowledges it.")
@click.option("--skipped", is_flag=True, help="The planned step was not performed.")
def deviate(folder, step_id, what_happened, instead, reporter, acknowledger, skipped):
    """Record a deviation at STEP_ID of the ceremony in FOLDER."""
    run = Ceremony.resume(folder)
    run.deviate(
        step_id,
        what_happened=what_happened,
        instead=instead,
        reported_by=reporter,
        acknowledged_by=acknowledger,
        skipped=skipped,
    )
    click.echo(f"recorded a deviation at step {step_id}")


@ceremony.command("status")
@folder_argument
def status(folder) -> None:
    """Show who is present and which planned steps remain."""
    run = Ceremony.resume(folder)
    click.echo(f"procedure: {run.procedure.name}")
    for participant in run.present.values():
        click.echo(f"present: {participant.name} ({participant.role})")
    click.echo(
        f"pending steps: {', '.join(run.pending_steps) or 'none; ready to seal'}"
    )


@ceremony.command("seal")
@folder_argument
@lab_option
@share_option
@click.option(
    "--offline-home",
    type=click.Path(path_type=Path),
    help="GNUPGHOME of the offline admin key; sealed with the vault key alone if "
    "it is not mounted.",
)
@click.option("--offline-fingerprint", help="Fingerprint of the offline admin key.")
@click.option(
    "--offline-passphrase-file",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="File holding the offline key's passphrase (read, never echoed).",
)
def seal(
    folder,
    lab_dir,
    share_files,
    offline_home,
    offline_fingerprint,
    offline_passphrase_file,
) -> None:
    """Write the manifest and seal the ceremony in FOLDER with the vault key."""
    signer = None
    if offline_home is not None and offline_fingerprint:
        passphrase = (
            offline_passphrase_file.read_text(encoding="utf-8").rstrip("\n")
            if offline_passphrase_file
            else None
        )
        signer = offline_signer_if_reachable(
            offline_home, offline_fingerprint, passphrase
        )
    run = Ceremony.resume(folder)
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        path = run.seal(vault, offline_signer=signer)
    offline = "and the offline key" if signer else "only (offline key not used)"
    click.echo(f"sealed {path} with the vault key {offline}")


@ceremony.command("verify")
@transcript_argument
@lab_option
@share_option
@click.option(
    "--public-key",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    help="Trusted PEM public key of the ceremony-signing key; verifies without "
    "the vault, so the access is not written to the vault's audit log.",
)
@click.option(
    "--gnupghome",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="GNUPGHOME holding the offline admin public key, to check its signature.",
)
@click.option("--offline-fingerprint", help="Expected offline admin key fingerprint.")
def verify(
    transcript, lab_dir, share_files, public_key, gnupghome, offline_fingerprint
) -> None:
    """Check TRANSCRIPT's hash chain and signatures; exit 1 naming any bad entry."""
    if public_key is not None:
        result = verify_transcript(
            transcript,
            load_public_key_pem(public_key),
            gnupghome=gnupghome,
            offline_fingerprint=offline_fingerprint,
        )
        click.echo("note: verified without the vault; no audit entry was written")
    else:
        _, vault = open_lab_vault(lab_dir, share_files)
        with vault:
            result = verify_with_vault(
                transcript,
                vault,
                gnupghome=gnupghome,
                offline_fingerprint=offline_fingerprint,
            )
    click.echo(f"transcript intact: {result.entries} entries, chain verifies")
    click.echo(f"vault signature verifies; signer SHA-256: {result.signer}")
    click.echo(f"offline signature: {result.offline}")


@ceremony.command("show")
@transcript_argument
@lab_option
@share_option
def show(transcript, lab_dir, share_files) -> None:
    """Print TRANSCRIPT as Markdown; the access is written to the audit log."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        entries, seal_line = read_transcript(transcript, vault, "shown on the terminal")
    click.echo(render_markdown(entries, seal_line), nl=False)


@ceremony.group("register")
def register_group() -> None:
    """Show the custodian register."""


@register_group.command("list")
@lab_option
@share_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def register_list(lab_dir, share_files, as_json) -> None:
    """List who holds which share or key file, and the open actions."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        rows = register_rows(vault)
        actions = required_actions(vault)
    if as_json:
        click.echo(
            json.dumps(
                {"register": rows, "actions": [a.__dict__ for a in actions]}, indent=2
            )
        )
        return
    for row in rows:
        click.echo(
            f"{row['custodian']:20} {row['role']:30} {row['id']:50} {row['state']:16} "
            f"{row['flags']}"
        )
    for action in actions:
        click.echo(f"ACTION {action.custodian}: {action.action}")


@ceremony.command("coverage")
@lab_option
@share_option
@click.option(
    "--interval-days",
    type=int,
    default=DEFAULT_PROOF_INTERVAL_DAYS,
    show_default=True,
    help="Flag keys whose last recovery proof is older than this many days.",
)
def coverage(lab_dir, share_files, interval_days) -> None:
    """List when each key was last proven recoverable, and by which report."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        rows = recovery_coverage(vault, interval_days=interval_days)
    for row in rows:
        click.echo(
            f"{row.key_id:40} {row.status:13} {row.last_proof[:10]:10} {row.report}"
        )


@ceremony.command("prune")
@click.argument("reports", type=click.Path(path_type=Path, file_okay=False))
@lab_option
@share_option
@click.option(
    "--years",
    type=float,
    default=DEFAULT_RETENTION_YEARS,
    show_default=True,
    help="Retention period in years.",
)
@click.option(
    "--yes", is_flag=True, help="Remove the folders; without it, only list them."
)
def prune(reports, lab_dir, share_files, years, yes) -> None:
    """Remove report and transcript folders past retention, keeping each drill's
    latest passing report."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        plan = prune_evidence(
            reports, vault=vault, period=retention_period(years), dry_run=not yes
        )
    for folder in plan.remove:
        click.echo(f"{'removed' if yes else 'would remove'} {folder}")
    for folder, reason in plan.keep.items():
        click.echo(f"keep {folder}: {reason}")

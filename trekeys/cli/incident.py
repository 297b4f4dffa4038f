"""``trekeys incident``: compromise impact, response plan and response."""

from __future__ import annotations

import json

import click

from trekeys.cli.common import lab_option, open_lab_vault, share_option
from trekeys.depgraph import Impact, find_impact
from trekeys.incident import ResponsePlan, build_plan, close_incident, respond
from trekeys.notify import build_notifications, load_stakeholders


def register(main: click.Group) -> None:
    main.add_command(incident)


@click.group()
def incident() -> None:
    """Analyse and respond to the compromise of keys."""


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print JSON instead of text."
)


@incident.command("impact")
@lab_option
@share_option
@json_option
@click.argument("key_ids", nargs=-1, required=True)
def impact_command(lab_dir, share_files, as_json, key_ids) -> None:
    """List what the compromise of KEY_IDS exposes: data, keys, signatures, backups."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        impact = find_impact(vault, list(key_ids))
    if as_json:
        click.echo(json.dumps(impact.to_dict(), indent=2))
        return
    click.echo("\n".join(format_impact(impact)))


@incident.command("plan")
@lab_option
@share_option
@json_option
@click.argument("key_ids", nargs=-1, required=True)
def plan_command(lab_dir, share_files, as_json, key_ids) -> None:
    """Print the ordered response plan for the compromise of KEY_IDS."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        plan = build_plan(vault, list(key_ids))
    if as_json:
        click.echo(json.dumps(plan.to_dict(), indent=2))
        return
    click.echo("\n".join(format_plan(plan)))


@incident.command("respond")
@lab_option
@share_option
@click.argument("key_ids", nargs=-1, required=True)
@click.option(
    "--dry-run", is_flag=True, help="Show the steps that would run; change nothing."
)
@click.option(
    "--notify",
    type=click.Choice(["unplanned", "planned"]),
    default="unplanned",
    show_default=True,
    help="Which kind of unavailability the drafted messages announce.",
)
def respond_command(lab_dir, share_files, key_ids, dry_run, notify) -> None:
    """Carry out the response to the compromise of KEY_IDS, resuming an open one."""
    lab, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        impact = find_impact(vault, list(key_ids))
        plan, result = respond(lab, vault, list(key_ids), dry_run=dry_run)
        notes = build_notifications(
            load_stakeholders(lab.config),
            impact,
            unavailability=notify,
            incident_id=plan.incident_id,
            instances=lab.instances,
        )

    click.echo("\n".join(format_plan(plan)))
    label = "would run" if dry_run else "done now"
    click.echo(f"\n{label}: {', '.join(result.would_run or result.done_now) or '-'}")
    click.echo(f"done before: {', '.join(result.done_before) or '-'}")
    for old, new in result.new_keys.items():
        click.echo(f"  {old} -> {', '.join(new) or '(marked compromised only)'}")
    click.echo("\nNotifications to send:")
    for note in notes:
        click.echo(f"--- to {note.name} ({note.role}) <{note.contact}>")
        click.echo(f"Subject: {note.subject}\n\n{note.body}\n")
    if not dry_run:
        click.echo(
            f"Incident {plan.incident_id} stays open until the notifications are "
            "sent and the cause is found; then run 'trekeys incident close "
            f"{plan.incident_id} --note TEXT'."
        )


@incident.command("close")
@lab_option
@share_option
@click.argument("incident_id")
@click.option(
    "--note",
    required=True,
    help="Note stored on the incident: who found the cause and sent the "
    "notifications, and where that is recorded.",
)
def close_command(lab_dir, share_files, incident_id, note) -> None:
    """Close INCIDENT_ID once its response is complete and its open items are done."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        close_incident(vault, incident_id, note)
    click.echo(f"incident {incident_id} closed")


def format_impact(impact: Impact) -> list[str]:
    """Return the impact as lines of text."""
    lines = [f"Compromise of {', '.join(impact.leaked)}", "", "Keys compromised:"]
    lines += [
        f"  {k.key_id} ({k.kind}, {k.state}) via {' -> '.join(k.path)}"
        for k in impact.keys
    ]
    lines += ["", "Data that may be exposed:"]
    lines += [
        f"  {d.ref}: {d.where}; since {d.since}, by {d.protected_by}"
        for d in impact.data
    ] or ["  none"]
    lines += ["", "Signatures and certificates that may be invalid:"]
    lines += [f"  {s.ref}: {s.reason} ({s.signer})" for s in impact.signatures] or [
        "  none"
    ]
    lines += ["", "Backups and the recipients that can still open them:"]
    lines += [
        f"  {b.ref}: {', '.join(b.still_open_with) or 'NONE'}" for b in impact.backups
    ] or ["  none"]
    if impact.unknown_refs:
        lines += ["", f"References to unknown keys: {', '.join(impact.unknown_refs)}"]
    return lines


def format_plan(plan: ResponsePlan) -> list[str]:
    """Return the response plan as lines of text."""
    lines = [f"Response plan {plan.incident_id} for {', '.join(plan.leaked)}"]
    for step in plan.steps:
        how = step.rotator or "state change only"
        lines.append(f"{step.id} ({step.kind}, {how})")
        lines += [f"    - {a.text} [{a.role}]" for a in step.actions]
    return lines

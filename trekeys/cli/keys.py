"""``trekeys inventory``, ``trekeys key`` and ``trekeys audit``."""

from __future__ import annotations

from pathlib import Path

import click

from trekeys.cli.common import lab_option, open_lab_vault, share_option
from trekeys.inventory import (
    build_inventory,
    to_csv,
    to_json,
    to_table,
    vault_strength_check,
)
from trekeys.records import KeyState, allowed_transitions


def register(main: click.Group) -> None:
    main.add_command(inventory)
    main.add_command(key)
    main.add_command(audit)


@click.command()
@lab_option
@share_option
@click.option("--kind", help="Only keys of this kind, such as luks-volume.")
@click.option("--owner", help="Only keys of this owner, such as instance:alpha.")
@click.option(
    "--state",
    type=click.Choice([s.value for s in KeyState]),
    help="Only keys in this state.",
)
@click.option(
    "--warning-days",
    type=int,
    default=30,
    show_default=True,
    help="Flag keys whose cryptoperiod ends within this many days.",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
    help="Output format.",
)
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    help="Write to this file instead of standard output.",
)
def inventory(
    lab_dir, share_files, kind, owner, state, warning_days, output_format, output
) -> None:
    """List every key with its state, dates, use and cryptoperiod flags."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        rows = build_inventory(
            vault, kind=kind, owner=owner, state=state, warning_days=warning_days
        )
        _, strength = vault_strength_check(vault)

    if output_format == "json":
        text = to_json(rows)
    elif output_format == "csv":
        text = to_csv(rows)
    else:
        text = to_table(rows) + strength + "\n"

    if output:
        output.write_text(text, encoding="utf-8")
    else:
        click.echo(text, nl=False)


@click.group()
def key() -> None:
    """Show a key record or change its state."""


@key.command("show")
@lab_option
@share_option
@click.argument("key_id")
def show(lab_dir, share_files, key_id) -> None:
    """Show the record of KEY_ID (never its material)."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        record = vault.get(key_id)
    for name, value in record.to_dict().items():
        click.echo(f"{name}: {value}")
    allowed = ", ".join(s.value for s in allowed_transitions(record.state)) or "none"
    click.echo(f"allowed next states: {allowed}")


@key.command("set-state")
@lab_option
@share_option
@click.argument("key_id")
@click.argument("state", type=click.Choice([s.value for s in KeyState]))
@click.option(
    "--reason", required=True, help="Why the state changes (kept in history)."
)
def set_state(lab_dir, share_files, key_id, state, reason) -> None:
    """Move KEY_ID to STATE, if NIST SP 800-57 allows it."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        record = vault.transition(key_id, KeyState(state), reason)
    click.echo(f"{record.id} is now {record.state.value}")


@click.group()
def audit() -> None:
    """Check the hash-chained audit log."""


@audit.command("verify")
@lab_option
@share_option
def verify(lab_dir, share_files) -> None:
    """Verify the audit log's chain and that it ends at the head stored in the vault."""
    _, vault = open_lab_vault(lab_dir, share_files)
    with vault:
        head = vault.meta.get("audit_head")
        count = vault.audit_log.verify(head)
    click.echo(
        f"audit log intact: {count} entries, ending at the head stored in the vault"
    )

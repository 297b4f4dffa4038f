"""Render a ceremony transcript as Markdown for people: auditors and witnesses.

Every section starts with the dry-run mark when the ceremony was a dry run,
so that no page printed or shown on its own can pass for a production
ceremony. Tool output is shown verbatim in code blocks, as recorded.
"""

from __future__ import annotations

import json
import re
from typing import Any

DRY_RUN_MARK = "**DRY RUN on the demo TRE: not a production ceremony.**"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _person(value: dict[str, Any] | None) -> str:
    if not value:
        return "none"
    return f"{value.get('name')} ({value.get('role')})"


def _fence(text: str) -> str:
    # A fence longer than any backtick run inside keeps the output verbatim.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text.rstrip()}\n{fence}"


def render_sections(
    entries: list[dict[str, Any]], seal: dict[str, Any] | None = None
) -> list[str]:
    """Return the transcript as Markdown sections, each marked if a dry run."""
    dry_run = any(entry.get("dry_run") for entry in entries)
    sections = []
    for entry in entries:
        renderer = _RENDERERS.get(entry.get("type", ""), _render_other)
        sections.append(renderer(entry))
    if seal is not None:
        sections.append(_render_seal(seal))
    if dry_run:
        sections = [f"{DRY_RUN_MARK}\n\n{section}" for section in sections]
    return sections


def render_markdown(
    entries: list[dict[str, Any]], seal: dict[str, Any] | None = None
) -> str:
    """Return the whole transcript as one Markdown document."""
    return "\n\n---\n\n".join(render_sections(entries, seal)) + "\n"


def _render_start(entry: dict[str, Any]) -> str:
    rows = ["| role | name | custodian |", "|---|---|---|"]
    for person in entry.get("participants", []):
        rows.append(
            f"| {_cell(person['role'])} | {_cell(person['name'])} | "
            f"{'yes' if person.get('custodian') else 'no'} |"
        )
    return (
        f"## Ceremony: {entry.get('title')} ({entry.get('procedure')})\n\n"
        f"Started {entry.get('time')} UTC; policy {entry.get('policy')}; subject "
        f"{entry.get('subject') or 'none'}; {entry.get('environment') or ''}\n\n"
        f"Planned steps: {', '.join(entry.get('planned_steps', []))}\n\n"
        + "\n".join(rows)
    )


def _render_step(entry: dict[str, Any]) -> str:
    lines = [
        f"## Step {entry.get('step_id')}: {entry.get('title')}",
        "",
        f"- time: {entry.get('time')} UTC (entry {entry.get('seq')})",
        f"- performed by: {_person(entry.get('actor'))}",
        f"- witnessed by: {_person(entry.get('witness'))}",
        f"- outcome: {entry.get('outcome')}",
    ]
    if not entry.get("planned"):
        lines.append("- not in the approved script: see the deviation before it")
    for label, value in entry.get("fingerprints", {}).items():
        lines.append(f"- read aloud, {label}: `{value}`")
    for produced in entry.get("files", []):
        lines.append(f"- produced {produced['path']}: SHA-256 `{produced['sha256']}`")
    for item in entry.get("evidence", []):
        lines.extend(["", _render_evidence(item)])
    return "\n".join(lines)


def _render_evidence(item: dict[str, Any]) -> str:
    kind = item.get("kind")
    if kind == "tool-output":
        heading = f"Tool output of `{' '.join(item.get('command', []))}` "
        heading += f"(exit status {item.get('returncode')}):"
        body = item.get("stdout", "") + (
            f"\n[stderr]\n{item['stderr']}" if item.get("stderr") else ""
        )
        return f"{heading}\n\n{_fence(body)}"
    if kind == "text":
        return f"{item.get('label')}:\n\n{_fence(item.get('text', ''))}"
    if kind == "inventory":
        before = json.dumps(item.get("before"), indent=1, sort_keys=True)
        after = json.dumps(item.get("after"), indent=1, sort_keys=True)
        return (
            f"Inventory rows changed ({item.get('label')}), before:\n\n{_fence(before)}"
            f"\n\nafter:\n\n{_fence(after)}"
        )
    return _fence(json.dumps(item, indent=1, sort_keys=True))


def _render_deviation(entry: dict[str, Any]) -> str:
    kind = "Skipped step" if entry.get("skipped") else "Deviation"
    return (
        f"## {kind} at step {entry.get('step_id')}\n\n"
        f"- time: {entry.get('time')} UTC (entry {entry.get('seq')})\n"
        f"- what happened: {entry.get('what_happened')}\n"
        f"- done instead: {entry.get('instead')}\n"
        f"- reported by: {_person(entry.get('reported_by'))}\n"
        f"- acknowledged by: {_person(entry.get('acknowledged_by'))}"
    )


def _render_manifest(entry: dict[str, Any]) -> str:
    rows = ["| file | bytes | SHA-256 (read aloud) | step | changed since |"]
    rows.append("|---|---|---|---|---|")
    for row in entry.get("files", []):
        rows.append(
            f"| {_cell(row['path'])} | {row['bytes']} | `{row['read_aloud']}` | "
            f"{row.get('step_id') or ''} | "
            f"{'CHANGED' if row.get('changed_since_step') else 'no'} |"
        )
    return "## Manifest of files produced\n\n" + "\n".join(rows)


def _render_end(entry: dict[str, Any]) -> str:
    return (
        f"## End\n\nEnded {entry.get('time')} UTC: {entry.get('steps')} steps, "
        f"{entry.get('deviations')} deviations."
    )


def _render_seal(seal: dict[str, Any]) -> str:
    offline = seal.get("offline_signature")
    signer = (seal.get("vault_signature") or {}).get("key_id")
    return (
        "## Seal\n\n"
        f"- entries: {seal.get('entries')}, last hash `{seal.get('head')}`\n"
        f"- signed by the vault key {signer} (Ed25519)\n"
        "- offline admin key: "
        + (f"signed by `{offline['fingerprint']}`" if offline else "not reachable")
    )


def _render_other(entry: dict[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k not in ("hash", "prev")}
    return f"## {entry.get('type')}\n\n{_fence(json.dumps(body, indent=1))}"


_RENDERERS = {
    "start": _render_start,
    "step": _render_step,
    "deviation": _render_deviation,
    "manifest": _render_manifest,
    "end": _render_end,
}

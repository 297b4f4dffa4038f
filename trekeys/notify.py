"""The stakeholder register and the notifications of an incident or a rotation.

The register lives in the lab configuration under ``stakeholders``: one entry
per person with a role, a name, a contact and a scope. The scope names the
part of the TRE that concerns them: ``tre`` (everything), ``instance:<name>`` (a
project instance's volume, files and backups) or ``service:<dns name>``.
`build_notifications` picks the stakeholders that an impact concerns and
writes one message per role, for unplanned unavailability (a compromise) or
planned unavailability (a routine rotation). trekeys drafts the messages; it
does not send them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trekeys.depgraph import Impact
from trekeys.errors import IncidentError

PLANNED = "planned"
UNPLANNED = "unplanned"

DEMO_STAKEHOLDERS: tuple[Mapping[str, str], ...] = (
    {
        "role": "Information Security Manager",
        "name": "Isla Manager",
        "contact": "isla.manager@tre.example",
        "scope": "tre",
    },
    {
        "role": "Operations Manager",
        "name": "Omar Operations",
        "contact": "omar.operations@tre.example",
        "scope": "tre",
    },
    {
        "role": "TRE System Administrators",
        "name": "Sam Admin",
        "contact": "tre-sysadmins@tre.example",
        "scope": "tre",
    },
    {
        "role": "Data owner",
        "name": "Dr Alpha Lead",
        "contact": "alpha-lead@research.example",
        "scope": "instance:alpha",
    },
    {
        "role": "Project users",
        "name": "alpha project users",
        "contact": "alpha-users@research.example",
        "scope": "instance:alpha",
    },
    {
        "role": "Data owner",
        "name": "Dr Beta Lead",
        "contact": "beta-lead@research.example",
        "scope": "instance:beta",
    },
    {
        "role": "Project users",
        "name": "beta project users",
        "contact": "beta-users@research.example",
        "scope": "instance:beta",
    },
    {
        "role": "Service users",
        "name": "TRE web service users",
        "contact": "tre-users@tre.example",
        "scope": "service:*",
    },
)

_REQUIRED = ("role", "name", "contact")


@dataclass(frozen=True)
class Stakeholder:
    """A person or group to tell about an incident or a planned outage."""

    role: str
    name: str
    contact: str
    scope: str = "tre"


@dataclass(frozen=True)
class Notification:
    """One drafted message to a stakeholder."""

    role: str
    name: str
    contact: str
    subject: str
    body: str


def load_stakeholders(config: Mapping[str, Any]) -> list[Stakeholder]:
    """Read the stakeholder register from a lab configuration.

    Raises:
        IncidentError: the register is missing or an entry lacks a field.
    """
    entries = config.get("stakeholders")
    if not entries:
        raise IncidentError(
            "the lab configuration has no stakeholder register; add a "
            "'stakeholders' list (role, name, contact, scope) to trekeys-lab.json."
        )
    register = []
    for number, entry in enumerate(entries, start=1):
        missing = [name for name in _REQUIRED if not entry.get(name)]
        if missing:
            raise IncidentError(
                f"stakeholder entry {number} lacks {', '.join(missing)}; "
                "complete it in trekeys-lab.json."
            )
        register.append(Stakeholder(**{k: str(v) for k, v in entry.items()}))
    return register


def scope_of(ref: str, instances: Mapping[str, Sequence[str]]) -> set[str]:
    """Return the scopes that one data reference belongs to.

    Args:
        ref: a data reference such as ``volume:alpha`` or ``files:alice``.
        instances: the project instances and their users, to place user files.
    """
    prefix, _, name = ref.partition(":")
    if prefix in ("volume", "backup"):
        return {f"instance:{name.split('/')[0]}"}
    if prefix == "files":
        return {f"instance:{i}" for i, users in instances.items() if name in users}
    if prefix == "service":
        return {f"service:{name}", "service:*"}
    return set()


def affected_scopes(
    impact: Impact, instances: Mapping[str, Sequence[str]] | None = None
) -> set[str]:
    """Return the scopes that an impact touches: the TRE, instances and services."""
    scopes = {"tre"}
    for item in impact.data:
        scopes |= scope_of(item.ref, instances or {})
    return scopes


def build_notifications(
    register: Iterable[Stakeholder],
    impact: Impact,
    *,
    unavailability: str = UNPLANNED,
    incident_id: str = "",
    instances: Mapping[str, Sequence[str]] | None = None,
) -> list[Notification]:
    """Draft a message for each stakeholder whose scope the impact touches.

    Args:
        register: the stakeholder register.
        impact: the impact of the compromise or of the planned rotation.
        unavailability: ``unplanned`` for a compromise, ``planned`` for a rotation.
        incident_id: the incident or change id, quoted in each subject.
        instances: the project instances and their users, to place user files.

    Raises:
        IncidentError: `unavailability` is neither planned nor unplanned.
    """
    if unavailability not in (PLANNED, UNPLANNED):
        raise IncidentError(
            f"unknown unavailability {unavailability!r}; use 'planned' or 'unplanned'."
        )
    known = instances or {}
    scopes = affected_scopes(impact, known)
    chosen = [s for s in register if s.scope in scopes]
    return [
        _draft(person, impact, unavailability, incident_id, known) for person in chosen
    ]


def _draft(
    person: Stakeholder,
    impact: Impact,
    unavailability: str,
    incident_id: str,
    instances: Mapping[str, Sequence[str]],
) -> Notification:
    label = f" {incident_id}" if incident_id else ""
    if unavailability == UNPLANNED:
        subject = f"Key compromise{label}: unplanned service interruption"
        opening = (
            "A cryptographic key of the TRE may have been disclosed. Keys are being "
            "replaced now, and the data and services below may be unavailable "
            "while that runs."
        )
    else:
        subject = f"Planned key rotation{label}: short service interruption"
        opening = (
            "A scheduled key rotation will replace the keys below. The data and "
            "services below may be briefly unavailable while that runs."
        )
    affected = _lines_for(person.scope, impact, instances)
    body = "\n".join(
        [
            f"Dear {person.name} ({person.role}),",
            "",
            opening,
            "",
            "What concerns you:",
            *[f"- {line}" for line in affected],
            "",
            _request_for(person.role, unavailability),
        ]
    )
    return Notification(person.role, person.name, person.contact, subject, body)


def _lines_for(
    scope: str, impact: Impact, instances: Mapping[str, Sequence[str]]
) -> list[str]:
    if scope == "tre":
        lines = [f"key {k.key_id} ({k.kind})" for k in impact.keys]
        return lines + [f"{d.ref}: {d.where}" for d in impact.data]
    lines = [
        f"{d.ref}: {d.where}"
        for d in impact.data
        if scope in scope_of(d.ref, instances)
    ]
    return lines or ["no data of yours is known to be affected"]


def _request_for(role: str, unavailability: str) -> str:
    if role == "Information Security Manager":
        return "Please coordinate the response and approve each step of the plan."
    if role == "Operations Manager":
        return "Please coordinate the response and confirm service recovery."
    if role == "TRE System Administrators":
        return "Please carry out the steps assigned to you in the response plan."
    if unavailability == UNPLANNED:
        return (
            "Please report anything unusual you saw, and wait for our all-clear "
            "before using the affected data or services."
        )
    return "No action is needed from you; we will confirm when the work is done."


def notification_rows(notifications: Sequence[Notification]) -> list[dict[str, str]]:
    """Return notifications as table rows for a notebook or the CLI."""
    return [
        {"role": n.role, "name": n.name, "contact": n.contact, "subject": n.subject}
        for n in notifications
    ]

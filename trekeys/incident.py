"""The response to a key compromise: carrying out the plan, with resume.

`trekeys.response_plan` builds the ordered plan from the impact.
`execute_plan` calls each step's rotator, records each finished step in the
vault's metadata and saves the vault straight away, so a response that fails
halfway stops, reports what was done and what was not, and resumes without
repeating a step.

An incident is "open" while steps remain, then "response complete, open items
remain" once every step is done. People still have to find the cause and send
the drafted notifications, so only `close_incident`, called when they have,
closes it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trekeys.errors import IncidentError, ResponseStepError
from trekeys.lab import Lab
from trekeys.records import KeyKind, KeyState, utcnow
from trekeys.response_plan import (
    ISM,
    KIND_ACTIONS,
    OPERATIONS,
    ROTATORS,
    SYSADMINS,
    Action,
    PlanStep,
    ResponsePlan,
    build_plan,
    missing_rotators,
    needs_rotation,
    order_keys,
    resolve_rotator,
)
from trekeys.vault import Vault

__all__ = [
    "ISM",
    "KIND_ACTIONS",
    "OPERATIONS",
    "ROTATORS",
    "SYSADMINS",
    "Action",
    "PlanStep",
    "ResponsePlan",
    "ResponseResult",
    "build_lab",
    "build_plan",
    "close_incident",
    "execute_plan",
    "find_open_incident",
    "incident_records",
    "load_incident",
    "missing_rotators",
    "needs_rotation",
    "order_keys",
    "resolve_rotator",
    "respond",
]

logger = logging.getLogger(__name__)

# Values of an incident record's "status".
OPEN = "open"
RESPONSE_COMPLETE = "response complete, open items remain"
CLOSED = "closed"

_OUT_OF_USE = {
    KeyState.DEACTIVATED,
    KeyState.COMPROMISED,
    KeyState.DESTROYED,
    KeyState.DESTROYED_COMPROMISED,
}


@dataclass
class ResponseResult:
    """The outcome of one `execute_plan` run: steps done, skipped or only planned."""

    incident_id: str
    dry_run: bool
    done_now: list[str] = field(default_factory=list)
    done_before: list[str] = field(default_factory=list)
    would_run: list[str] = field(default_factory=list)
    new_keys: dict[str, list[str]] = field(default_factory=dict)


def find_open_incident(vault: Vault, key_ids: Sequence[str]) -> ResponsePlan | None:
    """Return the stored plan of an unfinished response to the same leaked keys."""
    for record in incident_records(vault).values():
        if record["status"] == OPEN and sorted(record["plan"]["leaked"]) == sorted(
            key_ids
        ):
            return ResponsePlan.from_dict(record["plan"])
    return None


def incident_records(vault: Vault) -> dict[str, dict[str, Any]]:
    """Return every incident stored in the vault, by incident id."""
    return dict(vault.meta.get("incidents", {}))


def load_incident(vault: Vault, incident_id: str) -> dict[str, Any]:
    """Return one stored incident.

    Raises:
        IncidentError: no incident has that id.
    """
    records = incident_records(vault)
    if incident_id not in records:
        raise IncidentError(
            f"no incident {incident_id!r} in the vault; known incidents: "
            f"{', '.join(sorted(records)) or 'none'}."
        )
    return records[incident_id]


def execute_plan(
    lab: Lab,
    vault: Vault,
    plan: ResponsePlan,
    *,
    dry_run: bool = False,
    rotators: Mapping[KeyKind, str] | None = None,
) -> ResponseResult:
    """Carry out the plan's steps that are not done yet, saving after each.

    Leave a raised `ResponseStepError` out of the ``with vault`` block: the
    vault then drops the failed step's unsaved changes and keeps its audit
    entries, while the steps already finished stay saved.

    Raises:
        ResponseStepError: a step failed; the earlier steps stay done.
    """
    result = ResponseResult(plan.incident_id, dry_run)
    done = _done_steps(vault, plan.incident_id)
    if dry_run:
        for step in plan.steps:
            target = result.done_before if step.id in done else result.would_run
            target.append(step.id)
        return result

    _store_incident(vault, plan)
    for step in plan.steps:
        if step.id in done:
            result.done_before.append(step.id)
            continue
        result.new_keys[step.key_id] = _run_step(lab, vault, plan, step, rotators)
        result.done_now.append(step.id)

    _complete_response(vault, plan.incident_id)
    return result


def _run_step(
    lab: Lab,
    vault: Vault,
    plan: ResponsePlan,
    step: PlanStep,
    rotators: Mapping[KeyKind, str] | None,
) -> list[str]:
    table = ROTATORS if rotators is None else rotators
    reason = f"incident {plan.incident_id}: compromise of {', '.join(plan.leaked)}"
    logger.info("incident %s: starting step %s", plan.incident_id, step.id)
    try:
        new_ids: list[str] = []
        if step.rotator and not _replaced_earlier(vault, plan, step):
            rotate = resolve_rotator(table.get(KeyKind(step.kind), step.rotator))
            new_ids = list(
                rotate(lab, vault, step.key_id, reason=reason, compromised=True)
            )
        # A rotator that re-keys in place returns the same id for the new key.
        if step.key_id not in new_ids:
            _mark_compromised(vault, step.key_id, reason)
        missing = [k for k in new_ids if k not in vault]
        if missing:
            raise IncidentError(
                f"the rotator of {step.key_id} returned keys that are not in the "
                f"vault: {', '.join(missing)}."
            )
    except Exception as exc:  # any rotator failure stops the plan
        vault.record_operation("incident-step", step.key_id, "failure", str(exc))
        done = sorted(_done_steps(vault, plan.incident_id))
        not_done = [s.id for s in plan.steps if s.id not in done]
        logger.warning(
            "incident %s: step %s failed: %s", plan.incident_id, step.id, exc
        )
        raise ResponseStepError(plan.incident_id, step.id, done, not_done) from exc

    _mark_step_done(vault, plan.incident_id, step, new_ids)
    vault.save()
    return new_ids


def _replaced_earlier(vault: Vault, plan: ResponsePlan, step: PlanStep) -> bool:
    """Return whether an earlier step already took this key out of use.

    A CA rotation, for example, reissues the certificates it signed, so the
    later steps for those certificates only mark the old keys compromised.
    """
    planned = {k["key_id"]: k["state"] for k in plan.impact["keys"]}
    current = vault.get(step.key_id).state
    replaced = current.value != planned.get(step.key_id) and current in _OUT_OF_USE
    if replaced:
        logger.info(
            "incident %s: %s was replaced by an earlier step",
            plan.incident_id,
            step.key_id,
        )
    return replaced


def _mark_compromised(vault: Vault, key_id: str, reason: str) -> None:
    record = vault.get(key_id)
    if record.is_tombstone or record.state is KeyState.COMPROMISED:
        return
    vault.transition(key_id, KeyState.COMPROMISED, reason)


def _done_steps(vault: Vault, incident_id: str) -> set[str]:
    record = incident_records(vault).get(incident_id, {})
    return {k for k, v in record.get("steps", {}).items() if v["status"] == "done"}


def _store_incident(vault: Vault, plan: ResponsePlan) -> None:
    incidents = incident_records(vault)
    if plan.incident_id in incidents:
        return
    incidents[plan.incident_id] = {
        "status": OPEN,
        "opened": utcnow().isoformat(),
        "opened_by": f"{vault.actor.role}: {vault.actor.name}",
        "plan": plan.to_dict(),
        "steps": {},
    }
    vault.update_meta(incidents=incidents)
    vault.record_operation(
        "incident-open", ",".join(plan.leaked), "success", plan.incident_id
    )
    vault.save()


def _mark_step_done(
    vault: Vault, incident_id: str, step: PlanStep, new_ids: list[str]
) -> None:
    incidents = incident_records(vault)
    incidents[incident_id]["steps"][step.id] = {
        "status": "done",
        "at": utcnow().isoformat(),
        "by": f"{vault.actor.role}: {vault.actor.name}",
        "new_keys": new_ids,
    }
    vault.update_meta(incidents=incidents)
    vault.record_operation(
        "incident-step",
        step.key_id,
        "success",
        f"{incident_id} {step.id}; new keys: {', '.join(new_ids) or 'none'}",
    )


def _complete_response(vault: Vault, incident_id: str) -> None:
    incidents = incident_records(vault)
    if incidents[incident_id]["status"] != OPEN:
        return
    incidents[incident_id]["status"] = RESPONSE_COMPLETE
    incidents[incident_id]["responded"] = utcnow().isoformat()
    vault.update_meta(incidents=incidents)
    vault.record_operation(
        "incident-response-complete", "incident", "success", incident_id
    )
    vault.save()


def close_incident(vault: Vault, incident_id: str, note: str) -> None:
    """Close an incident whose open items people have done.

    Args:
        note: who did the open items (cause found, notifications sent), and
            where that is recorded.

    Raises:
        IncidentError: no incident has that id, or its response steps are not
            all done yet.
    """
    record = load_incident(vault, incident_id)
    if record["status"] == CLOSED:
        return
    if record["status"] != RESPONSE_COMPLETE:
        raise IncidentError(
            f"incident {incident_id} cannot be closed because its response steps "
            "are not done; run 'trekeys incident respond' with the same keys first."
        )

    incidents = incident_records(vault)
    incidents[incident_id] = {
        **record,
        "status": CLOSED,
        "closed": utcnow().isoformat(),
        "closed_by": f"{vault.actor.role}: {vault.actor.name}",
        "closing_note": note,
    }
    vault.update_meta(incidents=incidents)
    vault.record_operation("incident-close", "incident", "success", incident_id)
    vault.save()
    logger.info("incident %s closed: %s", incident_id, note)


def respond(
    lab: Lab,
    vault: Vault,
    key_ids: Sequence[str],
    *,
    dry_run: bool = False,
    rotators: Mapping[KeyKind, str] | None = None,
) -> tuple[ResponsePlan, ResponseResult]:
    """Plan and carry out the response to `key_ids`, resuming an open one.

    Returns:
        The plan (stored, or newly built) and what this run did.
    """
    plan = find_open_incident(vault, key_ids)
    if plan is None:
        plan = build_plan(vault, key_ids, rotators=rotators)
    result = execute_plan(lab, vault, plan, dry_run=dry_run, rotators=rotators)
    return plan, result


def build_lab(lab: Lab, vault: Vault) -> None:
    """Add the demo stakeholder register to the lab's configuration."""
    from trekeys.notify import DEMO_STAKEHOLDERS

    lab.config["stakeholders"] = [dict(s) for s in DEMO_STAKEHOLDERS]

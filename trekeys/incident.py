"""The response to a key compromise: a plan from the impact, and its execution.

`build_plan` turns an impact into one step per compromised key, in a safe
order: a key that protects another is replaced first, so that no new key is
ever stored under, or wrapped by, a compromised one. Each step lists the
actions of its kind with the role responsible, and is carried out by the
rotator registered for that kind in `ROTATORS`: a "module:function" that
takes ``(lab, vault, key_id, *, reason, compromised)`` and returns the ids
of the new keys.

`execute_plan` records each finished step in the vault's metadata and saves
the vault straight away, so a response that fails halfway stops, reports
what was done and what was not, and resumes without repeating a step.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from trekeys.depgraph import DependencyGraph, Impact, find_impact
from trekeys.errors import IncidentError, ResponseStepError, RotatorMissingError
from trekeys.lab import Lab
from trekeys.records import KeyKind, KeyState, utcnow
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

ISM = "Information Security Manager"
OPERATIONS = "Operations Manager"
SYSADMINS = "TRE System Administrators"

Rotator = Callable[..., list[str]]

# The capability module that rotates each kind of key.
ROTATORS: dict[KeyKind, str] = {
    KeyKind.VAULT_MASTER: "trekeys.rekey:rotate_key",
    KeyKind.LUKS_VOLUME: "trekeys.luks:rotate_key",
    KeyKind.LUKS_PASSPHRASE: "trekeys.luks:rotate_key",
    KeyKind.LUKS_BOOT_KEY: "trekeys.luks:rotate_key",
    KeyKind.FILE_KEY: "trekeys.files:rotate_key",
    KeyKind.WRAPPING: "trekeys.wrap:rotate_key",
    KeyKind.MAC: "trekeys.transfer:rotate_key",
    KeyKind.TLS_CA: "trekeys.tls:rotate_key",
    KeyKind.TLS_CERT: "trekeys.tls:rotate_key",
    KeyKind.GPG: "trekeys.backup:rotate_key",
    KeyKind.SSH: "trekeys.ssh:rotate_key",
    KeyKind.SIGNING: "trekeys.reports:rotate_key",
}

# The actions of each kind's response, with the role that carries each out.
KIND_ACTIONS: dict[KeyKind, list[tuple[str, str]]] = {
    KeyKind.VAULT_MASTER: [
        ("generate a new vault master secret", ISM),
        ("split it into new custodian shares and retire the old ones", ISM),
    ],
    KeyKind.LUKS_PASSPHRASE: [
        ("replace the recovery passphrase keyslot", SYSADMINS),
        ("take a new header backup", SYSADMINS),
    ],
    KeyKind.LUKS_BOOT_KEY: [
        ("replace the boot unlock key keyslot", SYSADMINS),
        ("take a new header backup", SYSADMINS),
    ],
    KeyKind.LUKS_VOLUME: [
        ("change the passphrase and boot key keyslots", SYSADMINS),
        ("re-encrypt the volume under a new volume key", SYSADMINS),
        ("take a new header backup and escrow the new volume key", SYSADMINS),
    ],
    KeyKind.FILE_KEY: [
        ("re-encrypt the user's files with a new file key", SYSADMINS),
        ("escrow the new file key", SYSADMINS),
    ],
    KeyKind.WRAPPING: [
        ("create a new wrapping key", SYSADMINS),
        ("re-wrap and redistribute the keys it wrapped", OPERATIONS),
    ],
    KeyKind.MAC: [
        ("create a new MAC key for the channel", SYSADMINS),
        ("redistribute it to both ends of the channel", OPERATIONS),
    ],
    KeyKind.TLS_CA: [
        ("revoke the CA and publish a final CRL", ISM),
        ("create a new CA and reissue every certificate it signed", SYSADMINS),
        ("redeploy the certificates and the new root to workstations", SYSADMINS),
    ],
    KeyKind.TLS_CERT: [
        ("revoke the certificate (reason: key compromise)", ISM),
        ("reissue it with a new key", SYSADMINS),
        ("redeploy it to the service", SYSADMINS),
        ("publish a new CRL", ISM),
    ],
    KeyKind.GPG: [
        ("generate and store a revocation certificate", ISM),
        ("create a new GPG key", SYSADMINS),
        ("re-encrypt the backups to the new set of recipients", SYSADMINS),
    ],
    KeyKind.SSH: [
        ("revoke the key (key revocation list, authorized_keys)", SYSADMINS),
        ("generate and install a new key pair", SYSADMINS),
    ],
    KeyKind.SIGNING: [
        ("create a new report-signing key", ISM),
        ("re-sign the report manifests that must stay trusted", ISM),
    ],
}

# Order among keys that do not protect each other: the vault and the keys
# that protect other keys first, then keys over data, then signatures.
_KIND_RANK = {
    kind: rank
    for rank, kind in enumerate(
        [
            KeyKind.VAULT_MASTER,
            KeyKind.WRAPPING,
            KeyKind.TLS_CA,
            KeyKind.LUKS_PASSPHRASE,
            KeyKind.LUKS_BOOT_KEY,
            KeyKind.LUKS_VOLUME,
            KeyKind.FILE_KEY,
            KeyKind.GPG,
            KeyKind.SSH,
            KeyKind.MAC,
            KeyKind.TLS_CERT,
            KeyKind.SIGNING,
        ]
    )
}


@dataclass
class Action:
    """One action of a step and the role that carries it out."""

    text: str
    role: str


@dataclass
class PlanStep:
    """The replacement of one compromised key."""

    id: str
    key_id: str
    kind: str
    rotator: str
    actions: list[Action]


@dataclass
class ResponsePlan:
    """The ordered response to a compromise, stored in the vault while it runs."""

    incident_id: str
    leaked: list[str]
    created: str
    steps: list[PlanStep]
    impact: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResponsePlan:
        steps = [
            PlanStep(**{**s, "actions": [Action(**a) for a in s["actions"]]})
            for s in data["steps"]
        ]
        return cls(
            data["incident_id"],
            list(data["leaked"]),
            data["created"],
            steps,
            dict(data["impact"]),
        )


@dataclass
class ResponseResult:
    """What one run of `execute_plan` did."""

    incident_id: str
    dry_run: bool
    done_now: list[str] = field(default_factory=list)
    done_before: list[str] = field(default_factory=list)
    would_run: list[str] = field(default_factory=list)
    new_keys: dict[str, list[str]] = field(default_factory=dict)


def new_incident_id() -> str:
    """Return an incident id made of the current UTC time."""
    return "inc-" + utcnow().strftime("%Y%m%dT%H%M%SZ")


def resolve_rotator(target: str) -> Rotator:
    """Import the rotator named by "module:function".

    Raises:
        ModuleNotFoundError, AttributeError: the module or function is missing.
    """
    module_name, _, function_name = target.partition(":")
    function: Rotator = getattr(importlib.import_module(module_name), function_name)
    return function


def missing_rotators(
    kinds: Sequence[KeyKind], rotators: Mapping[KeyKind, str] | None = None
) -> dict[KeyKind, str]:
    """Return the kinds among `kinds` whose rotator cannot be imported."""
    table = ROTATORS if rotators is None else rotators
    missing = {}
    for kind in dict.fromkeys(kinds):
        target = table.get(kind, "")
        try:
            resolve_rotator(target)
        except (ModuleNotFoundError, AttributeError, ValueError):
            missing[kind] = target or "no registered rotator"
    return missing


def order_keys(graph: DependencyGraph, key_ids: Sequence[str]) -> list[str]:
    """Sort keys so that every key comes before the keys it protects."""
    chosen = set(key_ids)
    waiting = {k: {p for p in chosen if k in graph.edges[p]} for k in chosen}
    ordered: list[str] = []
    while waiting:
        ready = [k for k, before in waiting.items() if not before - set(ordered)]
        ready.sort(key=lambda k: (_KIND_RANK[graph.records[k].kind], k))
        ordered.append(ready[0])
        del waiting[ready[0]]
    return ordered


def build_plan(
    vault: Vault,
    key_ids: str | Sequence[str],
    *,
    rotators: Mapping[KeyKind, str] | None = None,
    incident_id: str | None = None,
) -> ResponsePlan:
    """Build the response plan for the compromise of `key_ids`.

    Raises:
        RecordNotFoundError, KeyDestroyedError, DependencyCycleError: as
            `find_impact`.
        RotatorMissingError: a compromised key's kind has no installed rotator.
    """
    table = ROTATORS if rotators is None else rotators
    impact = find_impact(vault, key_ids)
    graph = DependencyGraph.from_vault(vault)
    ordered = order_keys(graph, impact.key_ids)
    to_rotate = [k for k in ordered if needs_rotation(graph, k, impact.leaked)]

    kinds = [graph.records[k].kind for k in to_rotate]
    for kind, target in missing_rotators(kinds, table).items():
        affected = [k for k in to_rotate if graph.records[k].kind is kind]
        raise RotatorMissingError(kind.value, target, affected)

    steps: list[PlanStep] = []
    for key_id in ordered:
        record = graph.records[key_id]
        if key_id in to_rotate:
            actions = [Action(text, role) for text, role in KIND_ACTIONS[record.kind]]
            rotator = table[record.kind]
        elif record.state is KeyState.DEACTIVATED:
            actions = [Action("mark the key compromised; it is no longer used", ISM)]
            rotator = ""
        else:
            continue
        actions.extend(_certificate_actions(impact, key_id))
        step_id = f"{len(steps) + 1:02d}-{key_id}"
        steps.append(PlanStep(step_id, key_id, record.kind.value, rotator, actions))
    return ResponsePlan(
        incident_id or new_incident_id(),
        list(impact.leaked),
        utcnow().isoformat(),
        steps,
        impact.to_dict(),
    )


def needs_rotation(graph: DependencyGraph, key_id: str, leaked: Sequence[str]) -> bool:
    """Return whether a compromised key must be replaced by its rotator.

    A key that is no longer in use (deactivated) is only marked compromised. A
    key already compromised was handled before, unless it is one of the
    leaked keys: an operator may mark a leaked key compromised before the
    response starts.
    """
    state = graph.records[key_id].state
    if state is KeyState.DEACTIVATED:
        return False
    return state is not KeyState.COMPROMISED or key_id in leaked


def _certificate_actions(impact: Impact, key_id: str) -> list[Action]:
    signed = [s.ref for s in impact.signatures if s.signer == key_id]
    if not signed:
        return []
    return [Action(f"treat as untrusted until replaced: {', '.join(signed)}", ISM)]


def find_open_incident(vault: Vault, key_ids: Sequence[str]) -> ResponsePlan | None:
    """Return the stored plan of an unfinished response to the same leaked keys."""
    for record in incident_records(vault).values():
        if record["status"] == "open" and sorted(record["plan"]["leaked"]) == sorted(
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

    _close_incident(vault, plan.incident_id)
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
        if step.rotator:
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
        "status": "open",
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


def _close_incident(vault: Vault, incident_id: str) -> None:
    incidents = incident_records(vault)
    if incidents[incident_id]["status"] == "closed":
        return
    incidents[incident_id]["status"] = "closed"
    incidents[incident_id]["closed"] = utcnow().isoformat()
    vault.update_meta(incidents=incidents)
    vault.record_operation("incident-close", "incident", "success", incident_id)
    vault.save()


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

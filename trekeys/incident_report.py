"""Evidence for a compromise response or a routine rotation.

The runbooks call these functions to choose the keys of a drill and to prove
that a dry run changed nothing. They also check the outcome of a response
from the records and the custody shares, build the timeline of an incident
and list what is still open. None of them reads key material.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from trekeys.depgraph import DependencyGraph
from trekeys.errors import CredentialError, IncidentError, RotatorMissingError
from trekeys.incident import (
    ResponsePlan,
    ResponseResult,
    build_plan,
    load_incident,
    missing_rotators,
)
from trekeys.lab import VAULT_MASTER_ID, Lab
from trekeys.records import KeyKind, KeyState
from trekeys.vault import Vault, list_generations

logger = logging.getLogger(__name__)

_USABLE = {KeyState.ACTIVE, KeyState.PRE_ACTIVATION, KeyState.SUSPENDED}
_GONE = {KeyState.DESTROYED, KeyState.DESTROYED_COMPROMISED}


def hash_lab_files(lab: Lab) -> dict[str, str]:
    """Return the SHA-256 of every file under the lab, by path relative to it."""
    hashes = {}
    for path in sorted(lab.root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            hashes[str(path.relative_to(lab.root))] = digest
    return hashes


def changed_files(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """Return the paths added, removed or changed between two `hash_lab_files`."""
    paths = set(before) | set(after)
    return sorted(p for p in paths if before.get(p) != after.get(p))


def choose_drill_keys(vault: Vault) -> tuple[list[str], str]:
    """Pick the keys a compromise drill leaks, preferring the realistic case.

    The first choice is a project instance's key (its GPG key, else its LUKS
    recovery passphrase) and a service's TLS key.
    When their rotators are not installed, the drill falls back to fewer
    keys, and last to the vault master, whose rotator trekeys always has.

    Returns:
        The key ids, and one sentence saying why they were chosen.

    Raises:
        IncidentError: no candidate has rotators for every key it affects.
    """
    # A project instance's GPG key is the policy's instance key. A lab without
    # GPG keys uses the instance's LUKS recovery passphrase instead.
    instance_keys = [
        r.id
        for kind in (KeyKind.GPG, KeyKind.LUKS_PASSPHRASE)
        for r in vault.find(kind=kind.value, state="active")
        if r.owner.startswith("instance:")
    ]
    service_keys = [
        r.id
        for r in vault.find(kind=KeyKind.TLS_CERT.value, state="active")
        if any(p.startswith("service:") for p in r.protects)
    ]
    candidates = [
        (
            instance_keys[:1] + service_keys[:1],
            "a project instance key and a service key",
        ),
        (instance_keys[:1], "a project instance key (no service key can be rotated)"),
        (service_keys[:1], "a service key (no instance key can be rotated)"),
        ([VAULT_MASTER_ID], "the vault master: no instance or service key rotator"),
    ]
    for key_ids, why in candidates:
        if not key_ids:
            continue
        try:
            build_plan(vault, key_ids)
        except RotatorMissingError as exc:
            logger.info("drill candidate %s skipped: %s", key_ids, exc)
            continue
        return key_ids, why
    raise IncidentError(
        "no drill candidate has rotators installed for every key it affects; "
        "install the capability modules or pass leaked_keys explicitly."
    )


def verify_response(
    vault: Vault, plan: ResponsePlan, result: ResponseResult
) -> list[dict[str, Any]]:
    """Check the outcome of a response from the records.

    Returns:
        One row per check: check, passed, detail.
    """
    graph = DependencyGraph.from_vault(vault)
    new_keys = sorted({k for ids in result.new_keys.values() for k in ids})
    rows = []

    for step in plan.steps:
        record = graph.records[step.key_id]
        if step.key_id in result.new_keys.get(step.key_id, []):
            check = f"{step.key_id} was re-keyed in place with new material"
            passed = record.state is KeyState.ACTIVE
        else:
            check = f"old key {step.key_id} is marked compromised"
            passed = _is_compromised(record.state)
        rows.append(_row(check, passed, f"now {record.state.value}"))

    for key_id in new_keys:
        state = graph.records[key_id].state
        rows.append(
            _row(
                f"new key {key_id} is active",
                state is KeyState.ACTIVE,
                f"state {state.value}",
            )
        )

    compromised = [k for k, r in graph.records.items() if _is_compromised(r.state)]
    leaks = [(c, n) for c in compromised for n in graph.edges[c] if n in new_keys]
    rows.append(
        _row(
            "no compromised key protects a new key",
            not leaks,
            ", ".join(f"{c} protects {n}" for c, n in leaks)
            or f"{len(new_keys)} new keys",
        )
    )

    for ref in sorted({d["ref"] for d in plan.impact["data"]}):
        holders = [
            k for k in graph.holders_of(ref) if graph.records[k].state in _USABLE
        ]
        rows.append(
            _row(
                f"{ref} is recoverable with a key in use",
                bool(holders),
                ", ".join(holders) or "no usable key protects it",
            )
        )
    return rows


def verify_custody(lab: Lab, vault: Vault) -> list[dict[str, Any]]:
    """Check custody after the vault master was replaced.

    Each current share must rebuild the master secret, the old master must
    be a tombstone, and every kept generation of the vault must open with
    the current credentials, so no copy under the old key is left.

    Returns:
        One row per check: check, passed, detail.
    """
    rows = []
    for share in lab.check_each_share(vault):
        rows.append(
            _row(
                f"share of {share['custodian']} is valid",
                share["valid"],
                share["detail"],
            )
        )

    old_masters = [k for k in vault.ids() if k.startswith(f"{VAULT_MASTER_ID}/split-")]
    for key_id in old_masters:
        state = vault.get(key_id).state
        rows.append(
            _row(f"old master {key_id} is destroyed", state in _GONE, state.value)
        )

    credentials = lab.credentials()
    generations = list_generations(lab.vault_path)
    failed = []
    for generation in generations:
        try:
            Vault.open(generation, credentials, read_only=True).close()
        except CredentialError:
            failed.append(generation.name)
    rows.append(
        _row(
            "every vault generation opens with the current shares only",
            not failed,
            ", ".join(failed) or f"{len(generations)} generations",
        )
    )
    return rows


def incident_timeline(vault: Vault, incident_id: str) -> list[dict[str, str]]:
    """Return the timeline of an incident: opened, each step, response done, closed."""
    record = load_incident(vault, incident_id)
    rows = [
        {
            "time": record["opened"],
            "event": "incident opened",
            "by": record["opened_by"],
        }
    ]
    for step_id, step in sorted(record["steps"].items(), key=lambda s: s[1]["at"]):
        new = ", ".join(step["new_keys"]) or "none"
        rows.append(
            {
                "time": step["at"],
                "event": f"step {step_id} done; new: {new}",
                "by": step["by"],
            }
        )
    if record.get("responded"):
        rows.append(
            {
                "time": record["responded"],
                "event": "response complete, open items remain",
                "by": record["opened_by"],
            }
        )
    if record.get("closed"):
        rows.append(
            {
                "time": record["closed"],
                "event": f"incident closed: {record.get('closing_note', '')}",
                "by": record.get("closed_by", record["opened_by"]),
            }
        )
    return rows


def open_items(
    plan: ResponsePlan, notifications_drafted: int, dry_run: bool
) -> list[dict[str, str]]:
    """List what a person must still do after trekeys carried out the plan."""
    items = [
        {
            "item": "find out how the key was disclosed, and close that path",
            "role": "Information Security Manager",
        },
        {
            "item": f"send the {notifications_drafted} drafted notifications "
            "(trekeys drafts them, it does not send them)",
            "role": "Information Security Manager",
        },
    ]
    if dry_run:
        items.append(
            {
                "item": "run the response for real: this was a dry run",
                "role": "Information Security Manager",
            }
        )
    for backup in plan.impact["backups"]:
        if not backup["still_open_with"]:
            items.append(
                {
                    "item": f"{backup['ref']}: no uncompromised recipient "
                    "left; restore it and back it up again",
                    "role": "TRE System Administrators",
                }
            )
    for ref in plan.impact["unknown_refs"]:
        items.append(
            {
                "item": f"records reference an unknown key {ref}; correct them",
                "role": "TRE System Administrators",
            }
        )
    if any(s.key_id == VAULT_MASTER_ID for s in plan.steps):
        items.append(
            {
                "item": "hand each custodian their new share; collect and destroy "
                "the paper copies of the old shares",
                "role": "Information Security Manager",
            }
        )
    return items


def rotatable(kinds: Sequence[KeyKind]) -> list[KeyKind]:
    """Return the kinds among `kinds` whose rotator is installed."""
    missing = missing_rotators(kinds)
    return [k for k in dict.fromkeys(kinds) if k not in missing]


def _is_compromised(state: KeyState) -> bool:
    return state in (KeyState.COMPROMISED, KeyState.DESTROYED_COMPROMISED)


def _row(check: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"check": check, "passed": bool(passed), "detail": detail}

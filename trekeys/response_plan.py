"""The response plan: the keys to replace, their order, roles and rotators.

`build_plan` turns the impact of a compromise into one step per compromised
key, in a safe order: a key that protects another is replaced first, so that
no new key is ever stored under, or wrapped by, a compromised one. Each step
lists the actions of its kind with the role responsible, and names the
rotator registered for that kind in `ROTATORS`: a "module:function" that
takes ``(lab, vault, key_id, *, reason, compromised)`` and returns the ids
of the new keys.
"""

from __future__ import annotations

import heapq
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from trekeys.depgraph import DependencyGraph, impact_from_graph
from trekeys.errors import RotatorMissingError
from trekeys.records import KeyKind, KeyState, utcnow
from trekeys.vault import Vault

ISM = "Information Security Manager"
OPERATIONS = "Operations Manager"
SYSADMINS = "TRE System Administrators"

Rotator = Callable[..., list[str]]

# The capability module that rotates each kind of key.
ROTATORS: dict[KeyKind, str] = {
    KeyKind.VAULT_MASTER: "trekeys.resplit:rotate_key",
    KeyKind.LUKS_VOLUME: "trekeys.luks:rotate_key",
    KeyKind.LUKS_PASSPHRASE: "trekeys.luks:rotate_key",
    KeyKind.LUKS_BOOT_KEY: "trekeys.luks:rotate_key",
    KeyKind.FILE_KEY: "trekeys.files:rotate_key",
    KeyKind.WRAPPING: "trekeys.wrap:rotate_key",
    KeyKind.MAC: "trekeys.transfer:rotate_key",
    KeyKind.TLS_CA: "trekeys.tls_lifecycle:rotate_key",
    KeyKind.TLS_CERT: "trekeys.tls_lifecycle:rotate_key",
    KeyKind.GPG: "trekeys.response_plan:rotate_backup_key",
    KeyKind.SSH: "trekeys.rotation:rotate_key",
    KeyKind.SIGNING: "trekeys.signing:rotate_key",
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


def rotate_backup_key(
    lab: Any, vault: Vault, key_id: str, *, reason: str, compromised: bool
) -> list[str]:
    """Rotate a GPG backup key and, after a compromise, re-encrypt its backups.

    Re-encryption to the new set of recipients is part of the response to a
    compromised backup key, so this adapter turns it on for that case only.
    """
    from trekeys.rotation import rotate_key

    return rotate_key(
        lab,
        vault,
        key_id,
        reason=reason,
        compromised=compromised,
        reencrypt=compromised,
    )


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
    """Sort keys so that every key comes before the keys it protects.

    Keys that do not protect each other are ordered by kind, then by id.

    Raises:
        DependencyCycleError: the keys protect each other in a cycle.
    """
    chosen = set(key_ids)
    protectors = dict.fromkeys(chosen, 0)
    for key_id in chosen:
        for target in graph.edges[key_id]:
            if target in chosen:
                protectors[target] += 1

    # Kahn's topological sort, taking the lowest (kind rank, id) that is ready.
    ready = [_order_key(graph, k) for k, count in protectors.items() if count == 0]
    heapq.heapify(ready)
    ordered: list[str] = []
    while ready:
        _, key_id = heapq.heappop(ready)
        ordered.append(key_id)
        for target in graph.edges[key_id]:
            if target in chosen:
                protectors[target] -= 1
                if protectors[target] == 0:
                    heapq.heappush(ready, _order_key(graph, target))

    if len(ordered) < len(chosen):
        graph.require_acyclic(sorted(chosen - set(ordered)))
    return ordered


def _order_key(graph: DependencyGraph, key_id: str) -> tuple[int, str]:
    return _KIND_RANK[graph.records[key_id].kind], key_id


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
    graph = DependencyGraph.from_vault(vault)
    return plan_from_graph(graph, key_ids, rotators=rotators, incident_id=incident_id)


def plan_from_graph(
    graph: DependencyGraph,
    key_ids: str | Sequence[str],
    *,
    rotators: Mapping[KeyKind, str] | None = None,
    incident_id: str | None = None,
) -> ResponsePlan:
    """Build the response plan from a built dependency graph, as `build_plan`."""
    table = ROTATORS if rotators is None else rotators
    impact = impact_from_graph(graph, key_ids)
    ordered = order_keys(graph, impact.key_ids)
    to_rotate = [k for k in ordered if needs_rotation(graph, k, impact.leaked)]

    kinds = [graph.records[k].kind for k in to_rotate]
    for kind, target in missing_rotators(kinds, table).items():
        affected = [k for k in to_rotate if graph.records[k].kind is kind]
        raise RotatorMissingError(kind.value, target, affected)

    rotate_set = set(to_rotate)
    signed_by: dict[str, list[str]] = {}
    for signature in impact.signatures:
        signed_by.setdefault(signature.signer, []).append(signature.ref)

    steps: list[PlanStep] = []
    for key_id in ordered:
        record = graph.records[key_id]
        if key_id in rotate_set:
            actions = [Action(text, role) for text, role in KIND_ACTIONS[record.kind]]
            rotator = table[record.kind]
        elif record.state is KeyState.DEACTIVATED:
            actions = [Action("mark the key compromised; it is no longer used", ISM)]
            rotator = ""
        else:
            continue
        if key_id in signed_by:
            untrusted = ", ".join(signed_by[key_id])
            actions.append(
                Action(f"treat as untrusted until replaced: {untrusted}", ISM)
            )
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

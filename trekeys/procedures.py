"""The approved scripts of the key ceremonies: roles required and planned steps.

A ceremony follows one of these scripts. Each names the roles that must be
present for the whole ceremony and the steps in the order they must be
performed. The key management policy gives the Information Security Manager
the compromise and recovery plan, and custodians holding shares open the
vault, so those roles appear here. A state-changing step needs a witness in
another role.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trekeys.errors import CeremonyError

ISM = "Information Security Manager"
OPERATIONS_MANAGER = "Operations Manager"
SYSTEM_ADMINISTRATOR = "TRE System Administrator"
# Not a job title: any participant who holds a custody share or key file.
CUSTODIAN = "Custodian"

POLICY_ROLES = (ISM, OPERATIONS_MANAGER, SYSTEM_ADMINISTRATOR)


@dataclass(frozen=True)
class PlannedStep:
    """One step of an approved script.

    Attributes:
        id: a short, stable step id such as ``generate-key``.
        title: what the step does, in one line.
        roles: the roles that may act in this step; empty means any role present.
        state_changing: whether the step changes a key, file or record, and so
            needs a witness.
    """

    id: str
    title: str
    roles: tuple[str, ...] = ()
    state_changing: bool = True


@dataclass(frozen=True)
class Procedure:
    """An approved ceremony script.

    Attributes:
        name: the procedure's id, such as ``custody-resplit``.
        title: a one-line title.
        policy: the policy clauses that the procedure carries out.
        required_roles: the minimum number of participants per role; the
            ``Custodian`` entry counts participants who hold a share.
        steps: the planned steps, in order.
    """

    name: str
    title: str
    policy: str
    required_roles: Mapping[str, int]
    steps: tuple[PlannedStep, ...] = field(default_factory=tuple)

    def step(self, step_id: str) -> PlannedStep | None:
        """Return the planned step with id `step_id`, or None."""
        for planned in self.steps:
            if planned.id == step_id:
                return planned
        return None


_CHECK = PlannedStep(
    "check-participants-and-tools",
    "Confirm identities and roles, and record the tool versions",
    state_changing=False,
)
_READ_ALOUD = PlannedStep(
    "read-fingerprints-aloud",
    "Read the fingerprints of every file produced aloud and compare them",
    state_changing=False,
)

PROCEDURES: dict[str, Procedure] = {
    procedure.name: procedure
    for procedure in (
        Procedure(
            "vault-creation",
            "Create the key vault and split its master secret",
            "4.3",
            {SYSTEM_ADMINISTRATOR: 1, ISM: 1, CUSTODIAN: 2},
            (
                _CHECK,
                PlannedStep(
                    "create-vault", "Create the vault", (SYSTEM_ADMINISTRATOR,)
                ),
                PlannedStep("split-master-secret", "Split the master secret"),
                PlannedStep("hand-over-shares", "Hand each custodian their share"),
                _READ_ALOUD,
            ),
        ),
        Procedure(
            "custody-resplit",
            "Re-split the vault master secret among the custodians",
            "4.3",
            {CUSTODIAN: 2, ISM: 1},
            (
                _CHECK,
                PlannedStep("open-vault-with-shares", "Open the vault with the shares"),
                PlannedStep("rekey-and-split", "Re-key the vault and split anew"),
                PlannedStep("hand-over-shares", "Hand each custodian their new share"),
                PlannedStep("retire-old-shares", "Destroy the shares of the old split"),
                _READ_ALOUD,
            ),
        ),
        Procedure(
            "ca-creation",
            "Create an internal certificate authority key",
            "4.1.3, 4.3",
            {SYSTEM_ADMINISTRATOR: 1, ISM: 1},
            (
                _CHECK,
                PlannedStep(
                    "generate-key",
                    "Generate the CA key and its self-signed certificate in the vault",
                    (SYSTEM_ADMINISTRATOR,),
                ),
                PlannedStep("export-certificate", "Export the CA certificate"),
                PlannedStep(
                    "backup-to-offline-media", "Copy the CA key to the offline media"
                ),
                _READ_ALOUD,
            ),
        ),
        Procedure(
            "offline-key-use",
            "Use the offline TRE admin key",
            "4.1.4",
            {SYSTEM_ADMINISTRATOR: 1, ISM: 1},
            (
                _CHECK,
                PlannedStep("retrieve-offline-media", "Take the offline media out"),
                PlannedStep("use-offline-key", "Use the offline key", (ISM,)),
                PlannedStep("return-offline-media", "Return the offline media"),
                _READ_ALOUD,
            ),
        ),
        Procedure(
            "key-destruction",
            "Destroy a key and keep its tombstone",
            "2, 4.3",
            {SYSTEM_ADMINISTRATOR: 1, ISM: 1},
            (
                _CHECK,
                PlannedStep(
                    "confirm-key-unused", "Confirm nothing still needs the key"
                ),
                PlannedStep("destroy-key", "Destroy the key material"),
                PlannedStep("verify-tombstone", "Check the tombstone record"),
            ),
        ),
        Procedure(
            "compromise-response",
            "Respond to a key compromise",
            "3, 4.4",
            {ISM: 1, OPERATIONS_MANAGER: 1, SYSTEM_ADMINISTRATOR: 1},
            (
                _CHECK,
                PlannedStep("mark-compromised", "Mark the key compromised", (ISM,)),
                PlannedStep(
                    "assess-impact", "List data exposed and signatures invalid"
                ),
                PlannedStep("replace-key", "Issue a replacement key"),
                PlannedStep("notify-stakeholders", "Notify the stakeholders"),
            ),
        ),
    )
}


@dataclass(frozen=True)
class Participant:
    """A person present at a ceremony, in one policy role.

    Attributes:
        role: a policy role, such as ``Information Security Manager``.
        name: the person's name, as they sign the paper log.
        custodian: whether the person holds a custody share or key file.
    """

    role: str
    name: str
    custodian: bool = False

    def __post_init__(self) -> None:
        # A misspelt role would silently fail to count towards the script's
        # required roles, so only the policy's roles are accepted.
        if self.role not in POLICY_ROLES:
            raise CeremonyError(
                f"{self.name} has the unknown role {self.role!r}; use one of "
                f"{', '.join(POLICY_ROLES)} and mark share holders as custodians."
            )

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "name": self.name, "custodian": self.custodian}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Participant:
        """Build a participant from a mapping with role, name and custodian.

        Raises:
            CeremonyError: the role or name is missing.
        """
        role = str(data.get("role", "")).strip()
        name = str(data.get("name", "")).strip()
        if not role or not name:
            raise CeremonyError(
                f"participant {dict(data)!r} needs both a role and a name; add the "
                "missing one to the participants file."
            )
        return cls(role, name, bool(data.get("custodian", False)))


def missing_roles(
    procedure: Procedure, participants: Iterable[Participant]
) -> dict[str, int]:
    """Return, per role, how many more participants the procedure needs."""
    present = list(participants)
    missing = {}
    for role, needed in procedure.required_roles.items():
        if role == CUSTODIAN:
            count = sum(1 for p in present if p.custodian)
        else:
            count = sum(1 for p in present if p.role == role)
        if count < needed:
            missing[role] = needed - count
    return missing


def describe_missing(missing: Mapping[str, int]) -> str:
    """Return the missing roles as text, such as "1 more Operations Manager"."""
    return ", ".join(f"{count} more {role}" for role, count in missing.items())


def get_procedure(name: str) -> Procedure:
    """Return the approved script called `name`.

    Raises:
        CeremonyError: no script has that name; the message lists the known ones.
    """
    if name not in PROCEDURES:
        raise CeremonyError(
            f"unknown ceremony procedure {name!r}; choose one of "
            f"{', '.join(PROCEDURES)}."
        )
    return PROCEDURES[name]

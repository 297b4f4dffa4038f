"""The trekeys exception hierarchy.

Every failure that trekeys detects is raised as a subclass of `TrekeysError`.
Each message names the object that failed (a path, key id, fingerprint or UUID)
and the next step. Messages about credentials never say which part was wrong.

    TrekeysError
    ├── ToolError                 an external tool is missing or failed
    │   └── ToolMissingError
    ├── CredentialError           wrong passphrase, share, key file or key
    │   └── ShareError            a custody share is malformed or mismatched
    ├── VaultError
    │   ├── VaultCorruptError     truncated, tampered or not KDBX4
    │   ├── VaultLockedError      another writer holds the lock
    │   ├── VaultReadOnlyError    a foreign vault was opened read-only
    │   └── RecordNotFoundError
    ├── RecordError               an invalid or ambiguous key record
    │   └── StateTransitionError  a transition that NIST SP 800-57 forbids
    ├── AuditError                the audit chain is broken
    ├── IntegrityError            a ciphertext, header, manifest or backup fails
    │                             verification
    ├── PolicyError               an action the key management policy forbids
    ├── LabError                  a demo TRE folder is missing or invalid
    ├── DrillError                a drill failed or could not run
    ├── IncidentError             a compromise analysis or response failed
    │   ├── KeyDestroyedError     the key is already a tombstone
    │   ├── DependencyCycleError  key protection records form a cycle
    │   ├── RotatorMissingError   no rotator is installed for a kind of key
    │   └── ResponseStepError     a response step failed; the plan stopped
    └── DestinationExistsError    an output would overwrite existing data
"""

from __future__ import annotations

from pathlib import Path


class TrekeysError(Exception):
    """Root of every error that trekeys raises on purpose."""


class ToolError(TrekeysError):
    """An external tool failed.

    Attributes:
        tool: the program name, for example ``cryptsetup``.
        returncode: its exit status, or None when it did not run.
        stderr_tail: the last lines of its standard error, with secrets removed.
    """

    def __init__(
        self,
        message: str,
        *,
        tool: str,
        returncode: int | None = None,
        stderr_tail: str = "",
    ) -> None:
        super().__init__(message)
        self.tool = tool
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class ToolMissingError(ToolError):
    """A program that trekeys drives is not installed."""

    def __init__(self, tool: str, package: str) -> None:
        super().__init__(
            f"{tool} is not installed; install the Debian package {package} "
            f"(apt-get install {package}) and try again.",
            tool=tool,
        )
        self.package = package


class CredentialError(TrekeysError):
    """A credential was rejected; the message never says which part was wrong."""


class ShareError(CredentialError):
    """A custody share is malformed, has a bad checksum or comes from another split."""


class VaultError(TrekeysError):
    """The key vault could not be used."""


class VaultCorruptError(VaultError):
    """The vault file is truncated, tampered with or not a KDBX4 file."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


class VaultLockedError(VaultError):
    """Another process holds the vault's write lock."""


class VaultReadOnlyError(VaultError):
    """A change was attempted on a vault opened read-only."""


class RecordNotFoundError(VaultError):
    """No key record has the requested id."""

    def __init__(self, key_id: str) -> None:
        super().__init__(
            f"no key record with id {key_id!r} in the vault; "
            "run 'trekeys inventory' to list the key ids."
        )
        self.key_id = key_id


class RecordError(TrekeysError):
    """A key record is invalid, duplicated or ambiguous."""


class StateTransitionError(RecordError):
    """A key state change that NIST SP 800-57 Part 1 does not allow."""

    def __init__(self, key_id: str, current: str, requested: str) -> None:
        super().__init__(
            f"key {key_id} cannot go from {current} to {requested}; "
            "see 'trekeys key show' for its history and the allowed next states."
        )
        self.key_id = key_id
        self.current = current
        self.requested = requested


class AuditError(TrekeysError):
    """The audit log's hash chain does not verify.

    Attributes:
        line: the 1-based number of the first bad line, or None.
    """

    def __init__(self, message: str, *, line: int | None = None) -> None:
        super().__init__(message)
        self.line = line


class IntegrityError(TrekeysError):
    """A ciphertext, header backup, manifest or archive fails verification."""


class PolicyError(TrekeysError):
    """An action that the key management policy forbids."""


class LabError(TrekeysError):
    """A demo TRE folder is missing, incomplete or not a trekeys lab."""


class DrillError(TrekeysError):
    """A drill failed or could not be run."""


class DestinationExistsError(TrekeysError):
    """An output path already exists and trekeys never overwrites it silently."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"{path} already exists; choose a new destination or move it away first."
        )
        self.path = path


class IncidentError(TrekeysError):
    """A compromise impact analysis or response could not be carried out."""


class KeyDestroyedError(IncidentError):
    """The key is a tombstone: its material is gone and it cannot be rotated."""

    def __init__(self, key_id: str, state: str) -> None:
        super().__init__(
            f"key {key_id} is already {state}: its material is gone, so there is "
            "nothing to rotate; analyse the keys that replaced it instead."
        )
        self.key_id = key_id


class DependencyCycleError(IncidentError):
    """Key records protect each other in a cycle, so the impact has no order."""

    def __init__(self, cycle: list[str]) -> None:
        super().__init__(
            f"the key protection records form a cycle: {' -> '.join(cycle)}; "
            "correct the 'protects' list of one of these keys."
        )
        self.cycle = cycle


class RotatorMissingError(IncidentError):
    """No rotator is installed for a kind of key that the response must rotate."""

    def __init__(self, kind: str, target: str, key_ids: list[str]) -> None:
        super().__init__(
            f"no rotator for {kind} keys ({', '.join(key_ids)}): {target} is not "
            "installed; install that trekeys module or rotate these keys by hand."
        )
        self.kind = kind
        self.target = target
        self.key_ids = key_ids


class ResponseStepError(IncidentError):
    """A response step failed; the plan stopped and can be resumed.

    Attributes:
        step: the id of the step that failed.
        done: the ids of the steps finished, in this run or before.
        not_done: the ids of the steps not finished, the failed one first.
    """

    def __init__(
        self, incident_id: str, step: str, done: list[str], not_done: list[str]
    ) -> None:
        super().__init__(
            f"incident {incident_id}: step {step} failed; {len(done)} steps done, "
            f"{len(not_done)} not done; fix the cause and run the response again "
            "to resume from this step."
        )
        self.incident_id = incident_id
        self.step = step
        self.done = done
        self.not_done = not_done

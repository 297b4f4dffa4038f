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
    │   │                         verification
    │   └── TranscriptError       a sealed ceremony transcript fails verification
    ├── PolicyError               an action the key management policy forbids
    │   └── CeremonyError         a ceremony step without the roles it needs
    ├── LabError                  a demo TRE folder is missing or invalid
    ├── DrillError                a drill failed or could not run
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


class TranscriptError(IntegrityError):
    """A sealed ceremony transcript fails verification.

    Attributes:
        entry: the 1-based number of the first bad entry, or None when the
            failure is in the seal rather than in one entry.
    """

    def __init__(self, message: str, *, entry: int | None = None) -> None:
        super().__init__(message)
        self.entry = entry


class CeremonyError(PolicyError):
    """A ceremony cannot start or go on: a role, witness or step is missing."""

"""The trekeys exception hierarchy.

Every failure that trekeys detects is raised as a subclass of `TrekeysError`.
Each message names the object that failed (a path, key id, fingerprint or UUID)
and the next step. Messages about credentials never say which part was wrong.

    TrekeysError
    ├── ToolError                 an external tool is missing or failed
    │   ├── ToolMissingError
    │   └── AgentError            gpg-agent did not start or answer
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
    │   └── RecipientMismatchError  a backup is encrypted to other keys
    ├── RecipientError            a backup recipient key is missing, expired,
    │                             revoked or cannot encrypt
    ├── KeyringMissingError       a GnuPG home folder is missing
    ├── PolicyError               an action the key management policy forbids
    ├── LabError                  a demo TRE folder is missing or invalid
    ├── DrillError                a drill failed or could not run
    ├── DestinationExistsError    an output would overwrite existing data
    └── RestoreWriteError         restored files could not be written
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


class AgentError(ToolError):
    """gpg-agent did not start or did not respond for a GnuPG home folder."""


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


class RecipientMismatchError(IntegrityError):
    """An encrypted backup lists other recipients than the ones it must have."""


class RecipientError(TrekeysError):
    """A recipient key cannot be used for a backup.

    Attributes:
        key_id: the vault key id of the recipient.
        fingerprint: its OpenPGP fingerprint.
        reason: missing, expired, revoked, no encryption subkey, or not active.
    """

    def __init__(self, key_id: str, fingerprint: str, reason: str) -> None:
        super().__init__(
            f"recipient key {key_id} ({fingerprint or 'no fingerprint'}) is "
            f"{reason}; rotate it with 'trekeys backup rotate {key_id}' or repair "
            "the public keyring, then back up again."
        )
        self.key_id = key_id
        self.fingerprint = fingerprint
        self.reason = reason


class KeyringMissingError(TrekeysError):
    """A GnuPG home folder that a key lives in is missing."""

    def __init__(self, path: Path, key_id: str) -> None:
        super().__init__(
            f"GnuPG home {path} of key {key_id} is missing; mount the media that "
            "holds it (for the offline key, the offline media) and try again."
        )
        self.path = path
        self.key_id = key_id


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


class RestoreWriteError(TrekeysError):
    """A restore could not write its files, for example because the disk is full."""

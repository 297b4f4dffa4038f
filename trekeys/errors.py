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
    │   ├── HeaderBackupError     a LUKS header backup is corrupt or of another volume
    │   ├── ManifestMismatchError recovered files differ from their manifest
    │   ├── TransferManifestError files differ from their transfer manifest
    │   ├── RecipientMismatchError  a backup is encrypted to other keys
    │   └── TranscriptError       a sealed ceremony transcript fails verification
    ├── VolumeError               a storage volume cannot be used as asked
    │   ├── NotLuksError          the device has no LUKS header
    │   └── UnsupportedVolumeError  LUKS1, or a layout trekeys cannot recover
    ├── CertificateError          a certificate, its key or its CA cannot be used
    │   ├── CertificateKeyMismatchError  the private key is not the certificate's
    │   ├── CertificateValidityError     a CA is expired or not yet valid
    │   └── HostnameError                not a valid DNS name or IP address
    ├── DeploymentError           a deploy folder is missing or not writable
    ├── EndpointError             a live TLS endpoint refused, timed out or is not TLS
    ├── RecipientError            a backup recipient key is missing, expired,
    │                             revoked or cannot encrypt
    ├── KeyringMissingError       a GnuPG home folder is missing
    ├── PolicyError               an action the key management policy forbids
    │   ├── WeakPassphraseError   a passphrase is too easy to guess
    │   └── CeremonyError         a ceremony step without the roles it needs
    ├── LabError                  a demo TRE folder is missing or invalid
    ├── DrillError                a drill failed or could not run
    ├── IncidentError             a compromise analysis or response failed
    │   ├── KeyDestroyedError     the key is already a tombstone
    │   ├── DependencyCycleError  key protection records form a cycle
    │   ├── RotatorMissingError   no rotator is installed for a kind of key
    │   └── ResponseStepError     a response step failed; the plan stopped
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


class HeaderBackupError(IntegrityError):
    """A LUKS header backup is truncated, corrupt, stale or of another volume."""


class ManifestMismatchError(IntegrityError):
    """Files recovered from a volume differ from the manifest recorded at build time.

    Attributes:
        missing: manifest paths that were not recovered.
        changed: paths whose size or SHA-256 differs.
        unexpected: recovered paths that the manifest does not list.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: list[str],
        changed: list[str],
        unexpected: list[str],
    ) -> None:
        super().__init__(message)
        self.missing = missing
        self.changed = changed
        self.unexpected = unexpected


class VolumeError(TrekeysError):
    """A storage volume cannot be used as asked."""


class NotLuksError(VolumeError):
    """The device or file has no LUKS header."""


class UnsupportedVolumeError(VolumeError):
    """A LUKS1 volume, or a LUKS2 layout that trekeys cannot recover."""


class CertificateError(TrekeysError):
    """A certificate, its private key or its issuing CA cannot be used."""


class CertificateKeyMismatchError(CertificateError):
    """A private key does not belong to the certificate it comes with."""


class CertificateValidityError(CertificateError):
    """A certificate or CA is expired or not yet valid at the time of use."""


class HostnameError(CertificateError):
    """A name for a certificate is neither a valid DNS name nor an IP address."""


class DeploymentError(TrekeysError):
    """Certificate files could not be written where a web server reads them."""


class EndpointError(TrekeysError):
    """A live TLS endpoint refused the connection, timed out or does not speak TLS.

    Attributes:
        endpoint: ``host:port`` of the endpoint.
        reason: one of ``refused``, ``timed out``, ``no TLS`` or ``unreachable``.
    """

    def __init__(self, message: str, *, endpoint: str, reason: str) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.reason = reason


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


class WeakPassphraseError(PolicyError):
    """A passphrase is too easy to guess; the message gives the estimator's advice."""


class TransferManifestError(IntegrityError):
    """Files of a folder do not match its transfer manifest.

    Attributes:
        added: paths in the folder that the manifest does not list.
        removed: paths that the manifest lists and the folder lacks.
        changed: paths whose size or HMAC differs.
    """

    def __init__(
        self, message: str, *, added: list[str], removed: list[str], changed: list[str]
    ) -> None:
        super().__init__(message)
        self.added = added
        self.removed = removed
        self.changed = changed


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


class RestoreWriteError(TrekeysError):
    """A restore could not write its files, for example because the disk is full."""

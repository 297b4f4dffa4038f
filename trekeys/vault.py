"""The key vault: one KeePass (KDBX4) database that holds every key of the TRE.

Each key is one KeePass entry in a group per kind and owner. The entry's
password field holds the key material, its title is the key id unless the
caller names another, and the custom property ``trekeys.record`` holds the key
record as JSON, so KeePassXC shows every key with its metadata. trekeys keeps
its own index from the ``trekeys.id`` property to the entry, built once per
open, because pykeepass finds entries by scanning the whole XML tree.

Writers hold an exclusive lock for the whole session, from open to save, so
two processes cannot interleave or lose an update. A save writes a new file,
fsyncs it and renames it over the old one, and the old file is kept as a
generation.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import logging
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pykeepass import PyKeePass
from pykeepass.entry import Entry
from pykeepass.exceptions import (
    CredentialsError,
    HeaderChecksumError,
    PayloadChecksumError,
)
from pykeepass.group import Group
from pykeepass.kdbx_parsing.kdbx4 import kdf_uuids

from trekeys.audit import Actor, AuditLog, make_entry
from trekeys.errors import (
    AuditError,
    CredentialError,
    RecordError,
    RecordNotFoundError,
    VaultCorruptError,
    VaultError,
    VaultLockedError,
    VaultReadOnlyError,
)
from trekeys.records import KeyRecord, KeyState, utcnow

logger = logging.getLogger(__name__)

RECORD_PROPERTY = "trekeys.record"
ID_PROPERTY = "trekeys.id"
ENCODING_PROPERTY = "trekeys.secret-encoding"
META_PROPERTY = "trekeys.meta"
SCHEMA_VERSION = 1
_INDEXED_PROPERTIES = frozenset({ID_PROPERTY, RECORD_PROPERTY, META_PROPERTY})
DEFAULT_GENERATIONS = 10

EMPTY_TEMPLATE = Path(__file__).parent / "templates" / "empty-vault.kdbx"
EMPTY_TEMPLATE_PASSWORD = "trekeys-empty-template"


@dataclass(frozen=True)
class KdfSettings:
    """Argon2id settings of the vault's key derivation.

    Attributes:
        time_cost: Argon2 iterations.
        memory_kib: memory in KiB.
        parallelism: lanes.
    """

    time_cost: int
    memory_kib: int
    parallelism: int = 2

    @classmethod
    def production(cls) -> KdfSettings:
        """Strong defaults: 256 MiB and 4 passes; `tune` fits them to a machine."""
        return cls(time_cost=4, memory_kib=256 * 1024, parallelism=2)

    @classmethod
    def test(cls) -> KdfSettings:
        """Weak settings for tests and the demo TRE only; reports name them."""
        return cls(time_cost=1, memory_kib=8 * 1024, parallelism=1)

    @classmethod
    def tune(
        cls, target_seconds: float = 1.0, memory_kib: int = 256 * 1024
    ) -> KdfSettings:
        """Return settings whose derivation takes about `target_seconds` here.

        The memory stays fixed and the passes are scaled from one measurement,
        then corrected once, because the first pass also pays for allocation.
        """
        passes = 3
        for _ in range(2):
            trial = cls(time_cost=passes, memory_kib=memory_kib)
            seconds = max(trial.measure_seconds(), 1e-3)
            passes = max(3, round(passes * target_seconds / seconds))
        return cls(time_cost=passes, memory_kib=memory_kib)

    def measure_seconds(self) -> float:
        """Return how long one key derivation with these settings takes here."""
        import argon2

        started = time.perf_counter()
        argon2.low_level.hash_secret_raw(
            b"calibration",
            b"0" * 32,
            time_cost=self.time_cost,
            memory_cost=self.memory_kib,
            parallelism=self.parallelism,
            hash_len=32,
            type=argon2.low_level.Type.ID,
        )
        return time.perf_counter() - started

    def describe(self) -> str:
        """Return a one-line summary for reports."""
        return (
            f"Argon2id, {self.time_cost} iterations, {self.memory_kib // 1024} MiB, "
            f"{self.parallelism} lanes"
        )


@dataclass(frozen=True)
class VaultCredentials:
    """The composite key of the vault: the master secret and an optional key file."""

    master_secret: bytes
    keyfile: Path | None = None

    def __repr__(self) -> str:
        return f"VaultCredentials(master_secret=<hidden>, keyfile={self.keyfile!r})"

    @property
    def password(self) -> str:
        """The KeePass password derived from the master secret (hex)."""
        return self.master_secret.hex()


def _open_keepass(path: Path, credentials: VaultCredentials) -> PyKeePass:
    keyfile = str(credentials.keyfile) if credentials.keyfile else None
    if credentials.keyfile is not None and not credentials.keyfile.is_file():
        raise CredentialError(
            f"the vault key file {credentials.keyfile} is missing; mount the portable "
            "device that holds it and try again."
        )
    if not path.is_file():
        raise VaultError(f"vault file {path} does not exist; check the path.")

    try:
        return PyKeePass(str(path), password=credentials.password, keyfile=keyfile)
    except CredentialsError as exc:
        raise CredentialError(
            f"the credentials do not open vault {path}; check the custody shares "
            "and the key file."
        ) from exc
    except (HeaderChecksumError, PayloadChecksumError) as exc:
        raise VaultCorruptError(_corrupt_message(path), path=path) from exc
    except Exception as exc:  # construct and lxml raise many types on bad bytes
        raise VaultCorruptError(_corrupt_message(path), path=path) from exc


def _corrupt_message(path: Path) -> str:
    return (
        f"vault {path} is truncated or corrupt; open the newest good generation in "
        f"{generations_dir(path)} ('trekeys vault generations') and restore it."
    )


def generations_dir(path: Path) -> Path:
    """Return the folder that keeps earlier generations of the vault at `path`."""
    return path.parent / f"{path.stem}-generations"


def list_generations(path: Path) -> list[Path]:
    """Return the earlier generations of a vault, newest first."""
    folder = generations_dir(path)
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.kdbx"), reverse=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Vault:
    """An open key vault. Use `Vault.create` or `Vault.open`, as a context manager.

    On a normal exit from the ``with`` block pending changes are saved. When the
    block raises, changes are discarded and only the audit entries of the
    session are kept, so a failed operation leaves the vault as it was.
    """

    def __init__(
        self,
        path: Path,
        keepass: PyKeePass,
        *,
        actor: Actor,
        lock_fd: int | None,
        read_only: bool,
    ) -> None:
        self.path = path
        self.actor = actor
        self.read_only = read_only
        self._kp = keepass
        self._lock_fd = lock_fd
        self._entries: dict[str, Entry] = {}
        self._records: dict[str, KeyRecord] = {}
        self._raw_records: dict[str, str] = {}
        self._groups: dict[tuple[str, ...], Group] = {}
        self._pending_audit: list[tuple[str, str, str, str]] = []
        self._dirty = False
        self._purge_generations = False
        self._meta_entry: Entry | None = None
        self._build_index()

    # Opening and closing

    @classmethod
    def create(
        cls,
        path: Path,
        credentials: VaultCredentials,
        *,
        kdf: KdfSettings,
        actor: Actor | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Vault:
        """Create a new, empty vault at `path` and return it open and locked.

        Raises:
            VaultError: `path` already exists.
        """
        path = Path(path)
        if path.exists():
            raise VaultError(
                f"vault {path} already exists; open it instead of creating it."
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = _acquire_lock(path, timeout=0)

        keyfile = str(credentials.keyfile) if credentials.keyfile else None
        tmp = path.with_name(f".{path.name}.creating")
        # Start from an empty template with a 1 MiB Argon2id KDF rather than
        # pykeepass's blank database, whose 64 MiB KDF costs seconds per pass.
        # The template protects nothing: it is re-keyed before anything is added.
        keepass = PyKeePass(str(EMPTY_TEMPLATE), EMPTY_TEMPLATE_PASSWORD)
        keepass.filename = str(tmp)
        keepass.password = credentials.password
        keepass.keyfile = keyfile
        _apply_kdf(keepass, kdf)
        keepass.root_group.name = "TRE keys"
        vault = cls(
            path,
            keepass,
            actor=actor or Actor.from_environment(),
            lock_fd=lock_fd,
            read_only=False,
        )
        vault._write_meta(
            {
                "schema": SCHEMA_VERSION,
                "created": utcnow().isoformat(),
                "kdf": kdf.describe(),
                "audit_head": None,
                **(meta or {}),
            }
        )
        _save_private(keepass, tmp, transformed_key=None)
        keepass.read(str(tmp), password=credentials.password, keyfile=keyfile)
        vault._reindex()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        vault._kp.filename = str(path)
        vault.record_operation("create-vault", "vault", "success", kdf.describe())
        vault.save()
        logger.info("created vault %s (%s)", path, kdf.describe())
        return vault

    @classmethod
    def open(
        cls,
        path: Path,
        credentials: VaultCredentials,
        *,
        actor: Actor | None = None,
        read_only: bool = False,
        lock_timeout: float = 30.0,
    ) -> Vault:
        """Open the vault at `path`, taking the write lock unless `read_only`.

        A vault without trekeys metadata, or in a format other than KDBX4, is
        opened read-only: trekeys never rewrites it into another format or KDF.

        Raises:
            CredentialError: the credentials are wrong.
            VaultCorruptError: the file is truncated or corrupt.
            VaultLockedError: another writer holds the lock after `lock_timeout`.
        """
        path = Path(path)
        lock_fd = None if read_only else _acquire_lock(path, timeout=lock_timeout)
        try:
            keepass = _open_keepass(path, credentials)
        except BaseException:
            _release_lock(lock_fd)
            raise
        if lock_fd is not None:
            _remove_stale_temporaries(path)

        vault = cls(
            path,
            keepass,
            actor=actor or Actor.from_environment(),
            lock_fd=lock_fd,
            read_only=read_only,
        )
        foreign = vault._meta_entry is None or keepass.version < (4, 0)
        if foreign and not read_only:
            logger.warning("vault %s was not made by trekeys; opened read-only", path)
            vault.read_only = True
            _release_lock(lock_fd)
            vault._lock_fd = None
        return vault

    def __enter__(self) -> Vault:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                if self._dirty or self._pending_audit:
                    self.save()
            else:
                self._keep_audit_only()
        finally:
            self.close()

    def close(self) -> None:
        """Release the lock. Unsaved changes are lost."""
        _release_lock(self._lock_fd)
        self._lock_fd = None

    # Records

    def add(
        self,
        record: KeyRecord,
        secret: bytes | str | None = None,
        *,
        attachments: dict[str, bytes] | None = None,
        title: str | None = None,
    ) -> KeyRecord:
        """Add a new key record with its material and attachments.

        The entry's title is the key id unless `title` names it otherwise; titles
        need not be unique, because trekeys finds entries by id.

        Raises:
            RecordError: a record with the same id exists.
        """
        self._require_writable()
        if record.id in self._entries:
            raise RecordError(
                f"a key record with id {record.id!r} already exists; choose a new id "
                "or rotate the existing key."
            )

        entry = Entry(
            title=title or record.id,
            username=record.owner,
            notes=record.purpose,
            kp=self._kp,
        )
        self._group_for(record).append(entry)
        entry.set_custom_property(ID_PROPERTY, record.id)
        self._entries[record.id] = entry
        self._store_record(record)
        if secret is not None:
            self._store_secret(entry, secret)
        for name, data in (attachments or {}).items():
            self.add_attachment(record.id, name, data)

        self.record_operation("create", record.id, "success", record.kind.value)
        logger.info(
            "added key %s (%s, %s)", record.id, record.kind.value, record.state.value
        )
        return record

    def get(self, key_id: str) -> KeyRecord:
        """Return the record of `key_id`.

        Raises:
            RecordNotFoundError: no record has that id.
        """
        if key_id not in self._entries:
            raise RecordNotFoundError(key_id)
        if key_id not in self._records:
            raw = self._raw_records.pop(key_id, None)
            if raw is None:
                raw = self._entries[key_id].get_custom_property(RECORD_PROPERTY)
            self._records[key_id] = _parse_record(key_id, raw or "{}")
        return self._records[key_id]

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._entries

    def ids(self) -> list[str]:
        """Return every key id in the vault."""
        return list(self._entries)

    def find(
        self,
        *,
        kind: str | None = None,
        owner: str | None = None,
        state: str | None = None,
    ) -> list[KeyRecord]:
        """Return the records that match every filter given, sorted by id."""
        found = []
        for key_id in self._entries:
            record = self.get(key_id)
            if kind is not None and record.kind.value != kind:
                continue
            if owner is not None and record.owner != owner:
                continue
            if state is not None and record.state.value != state:
                continue
            found.append(record)
        return sorted(found, key=lambda r: r.id)

    def find_by_title(self, title: str) -> KeyRecord:
        """Return the one record whose entry title is `title`.

        Raises:
            RecordNotFoundError: no entry has that title.
            RecordError: several entries have it; the message lists their ids.
        """
        matches = [
            key_id for key_id, entry in self._entries.items() if entry.title == title
        ]
        if not matches:
            raise RecordNotFoundError(title)
        if len(matches) > 1:
            raise RecordError(
                f"the title {title!r} is ambiguous: it matches "
                f"{', '.join(sorted(matches))}; look the key up by id."
            )
        return self.get(matches[0])

    def update(
        self,
        record: KeyRecord,
        *,
        operation: str = "update",
        detail: str = "",
        keep_history: bool = False,
    ) -> None:
        """Store a changed record and log the change.

        With `keep_history`, the entry as it was is first copied into its
        KeePass history, where KeePassXC shows it.
        """
        self._require_writable()
        self.get(record.id)
        if keep_history:
            self._entries[record.id].save_history()
        self._store_record(record)
        self.record_operation(operation, record.id, "success", detail)

    def transition(self, key_id: str, new_state: KeyState, reason: str) -> KeyRecord:
        """Move a key to `new_state` and log it.

        Raises:
            StateTransitionError: the transition is not allowed.
        """
        self._require_writable()
        record = self.get(key_id)
        old_state = record.state
        record.transition(KeyState(new_state), reason)
        self._store_record(record)
        self.record_operation(
            "state-change",
            key_id,
            "success",
            f"{old_state.value} -> {record.state.value}: {reason}",
        )
        logger.info("key %s: %s -> %s", key_id, old_state.value, record.state.value)
        return record

    def destroy(
        self, key_id: str, reason: str, *, compromised: bool = False
    ) -> KeyRecord:
        """Remove a key's material and attachments; its record stays as a tombstone."""
        self._require_writable()
        record = self.get(key_id)
        target = (
            KeyState.DESTROYED_COMPROMISED
            if (compromised or record.state is KeyState.COMPROMISED)
            else KeyState.DESTROYED
        )
        record.transition(target, reason)

        entry = self._entries[key_id]
        entry.password = ""
        entry.set_custom_property(ENCODING_PROPERTY, "destroyed")
        for attachment in list(entry.attachments):
            self._kp.delete_binary(attachment.id)
        if entry.history:
            entry.delete_history(all=True)
        # Earlier generations still hold the material, so the next save drops
        # them; otherwise restoring a generation would bring the key back.
        self._purge_generations = True
        self._store_record(record)
        self.record_operation("destroy", key_id, "success", reason)
        logger.info("destroyed key %s; its record is kept as a tombstone", key_id)
        return record

    # Material and attachments

    def read_secret(self, key_id: str, reason: str) -> bytes:
        """Return a key's material and log the read.

        Raises:
            RecordError: the key is a tombstone or has no material stored.
            VaultReadOnlyError: the vault is open read-only, so the read could
                not be anchored in the audit log.
        """
        self._require_writable()
        record = self.get(key_id)
        if record.is_tombstone:
            raise RecordError(f"key {key_id} was destroyed; its material is gone.")
        entry = self._entries[key_id]
        encoding = entry.get_custom_property(ENCODING_PROPERTY)
        if encoding is None:
            raise RecordError(f"key {key_id} has no key material in the vault.")

        self.record_operation("read", key_id, "success", reason)
        text = entry.password or ""
        if encoding == "base64":
            return base64.b64decode(text)
        return text.encode("utf-8")

    def put_secret(self, key_id: str, secret: bytes | str, *, reason: str) -> None:
        """Replace a key's material and log the change."""
        self._require_writable()
        record = self.get(key_id)
        if record.is_tombstone:
            raise RecordError(f"key {key_id} was destroyed; add a new key instead.")
        self._store_secret(self._entries[key_id], secret)
        self.record_operation("replace-material", key_id, "success", reason)

    def add_attachment(self, key_id: str, name: str, data: bytes) -> None:
        """Attach `data` to a key's entry under `name`, replacing one of that name."""
        self._require_writable()
        entry = self._entry(key_id)
        for attachment in list(entry.attachments):
            if attachment.filename == name:
                self._kp.delete_binary(attachment.id)
        binary_id = self._kp.add_binary(data, protected=True)
        entry.add_attachment(binary_id, name)
        self._dirty = True

    def read_attachment(self, key_id: str, name: str) -> bytes:
        """Return the attachment `name` of a key.

        Raises:
            RecordError: the key has no such attachment.
        """
        for attachment in self._entry(key_id).attachments:
            if attachment.filename == name:
                return bytes(attachment.data)
        raise RecordError(
            f"key {key_id} has no attachment {name!r}; "
            f"it has {', '.join(self.attachment_names(key_id)) or 'none'}."
        )

    def attachment_names(self, key_id: str) -> list[str]:
        """Return the names of a key's attachments."""
        return [a.filename for a in self._entry(key_id).attachments]

    # Vault-wide metadata, audit and saving

    @property
    def meta(self) -> dict[str, Any]:
        """The trekeys metadata stored in the vault (custody, audit head, KDF)."""
        if self._meta_entry is None:
            return {}
        return dict(
            json.loads(self._meta_entry.get_custom_property(META_PROPERTY) or "{}")
        )

    def update_meta(self, **values: Any) -> None:
        """Merge `values` into the vault's metadata."""
        self._require_writable()
        self._write_meta({**self.meta, **values})

    @property
    def audit_log(self) -> AuditLog:
        """The audit log that belongs to this vault."""
        return AuditLog(audit_log_path(self.path))

    def record_operation(
        self, operation: str, key_id: str, outcome: str, detail: str = ""
    ) -> None:
        """Queue an audit entry; it is written to the log at the next save."""
        self._pending_audit.append((operation, key_id, outcome, detail))

    def save(self) -> None:
        """Write the audit entries, then the vault atomically, keeping a generation.

        Raises:
            VaultReadOnlyError: the vault was opened read-only.
        """
        self._require_writable()
        self._flush_audit()
        self._write_atomically()
        self._dirty = False

    def rekey(
        self,
        credentials: VaultCredentials,
        *,
        kdf: KdfSettings | None = None,
        detail: str = "",
    ) -> None:
        """Change the vault's composite key and save at once, with a new KDF salt.

        Generations saved under the old key would still open with the old
        credentials, so they are removed once the re-keyed file has been read
        back. The re-keyed file becomes the first generation of the new key.

        Raises:
            CredentialError: the new key file is missing.
            VaultReadOnlyError: the vault was opened read-only.
        """
        self._require_writable()
        if credentials.keyfile is not None and not credentials.keyfile.is_file():
            raise CredentialError(
                f"the new vault key file {credentials.keyfile} is missing; write it "
                "to the portable device first."
            )

        old_generations = list_generations(self.path)
        old_password, old_keyfile = self._kp.password, self._kp.keyfile
        self._kp.password = credentials.password
        self._kp.keyfile = str(credentials.keyfile) if credentials.keyfile else None
        if kdf is not None:
            _apply_kdf(self._kp, kdf)
            self._write_meta({**self.meta, "kdf": kdf.describe()})
        self.record_operation("rekey-vault", "vault", "success", detail)
        try:
            self._flush_audit()
            # No transformed key: pykeepass then derives a new one under a new salt.
            self._write_atomically(rotate_salt=True)
        except BaseException:
            # The file on disk still has the old key; the session must match it
            # so that discarding the changes can re-read the file.
            self._kp.password, self._kp.keyfile = old_password, old_keyfile
            raise
        self._dirty = False

        self._kp.read(
            str(self.path), password=self._kp.password, keyfile=self._kp.keyfile
        )
        self._reindex()
        for generation in [*old_generations, *list_generations(self.path)]:
            generation.unlink(missing_ok=True)
        self._keep_generation()
        logger.info("re-keyed vault %s (%s)", self.path, self.kdf_description)

    @classmethod
    def open_generation(
        cls,
        path: Path,
        generation: Path,
        credentials: VaultCredentials,
        *,
        actor: Actor | None = None,
        lock_timeout: float = 30.0,
    ) -> Vault:
        """Open an earlier generation, locked, so that saving it restores it at `path`.

        The live file need not open: this is how a corrupt vault is recovered.
        The next save keeps the live file as a generation before replacing it.

        Raises:
            CredentialError: the credentials do not open the generation.
            VaultCorruptError: the generation itself is corrupt.
        """
        path = Path(path)
        lock_fd = _acquire_lock(path, timeout=lock_timeout)
        try:
            keepass = _open_keepass(Path(generation), credentials)
        except BaseException:
            _release_lock(lock_fd)
            raise
        keepass.filename = str(path)
        vault = cls(
            path,
            keepass,
            actor=actor or Actor.from_environment(),
            lock_fd=lock_fd,
            read_only=False,
        )
        vault._dirty = True
        return vault

    @property
    def cipher_description(self) -> str:
        """The payload cipher of the open vault file, such as ``aes256``."""
        return str(self._kp.encryption_algorithm)

    @property
    def kdf_description(self) -> str:
        """The key derivation settings of the open vault file."""
        header = self._kp.kdbx.header.value.dynamic_header
        if self._kp.version < (4, 0):
            return f"AES-KDF, {header.transform_rounds.data} rounds (KDBX 3.1)"
        params = header.kdf_parameters.data.dict
        uuid = params["$UUID"].value
        if uuid == kdf_uuids["aeskdf"]:
            return f"AES-KDF, {params['R'].value} rounds"
        name = "Argon2id" if uuid == kdf_uuids["argon2id"] else "Argon2d"
        return (
            f"{name}, {params['I'].value} iterations, "
            f"{params['M'].value // 1048576} MiB, {params['P'].value} lanes"
        )

    # Internals

    def _build_index(self) -> None:
        # One pass over the entries of every group (history copies sit under
        # Entry/History, so they are skipped), keeping each record's JSON text
        # so that `get` parses it only when asked, without an XPath query.
        root = self._kp.tree.getroot()
        for element in root.iterfind(".//Group/Entry"):
            strings = _entry_strings(element)
            key_id = strings.get(ID_PROPERTY)
            if key_id:
                self._entries[key_id] = Entry(element=element, kp=self._kp)
                self._raw_records[key_id] = strings.get(RECORD_PROPERTY) or "{}"
            elif META_PROPERTY in strings:
                self._meta_entry = Entry(element=element, kp=self._kp)
        self._index_groups()

    def _index_groups(self) -> None:
        # Maps each group path to its group once per open, so that adding a key
        # to an existing group never lists a parent's subgroups. Of two sibling
        # groups with the same name the first one wins, as in `_group`.
        pending: list[tuple[tuple[str, ...], Any]] = [
            ((), self._kp.root_group._element)
        ]
        while pending:
            path, element = pending.pop()
            for child in element.iterchildren("Group"):
                child_path = (*path, child.findtext("Name") or "")
                if child_path not in self._groups:
                    self._groups[child_path] = Group(element=child, kp=self._kp)
                    pending.append((child_path, child))

    def _reindex(self) -> None:
        self._entries.clear()
        self._records.clear()
        self._raw_records.clear()
        self._groups.clear()
        self._meta_entry = None
        self._build_index()

    def _entry(self, key_id: str) -> Entry:
        if key_id not in self._entries:
            raise RecordNotFoundError(key_id)
        return self._entries[key_id]

    def _group_for(self, record: KeyRecord) -> Group:
        owner = re.sub(r"[^A-Za-z0-9._@-]+", "-", record.owner) or "tre"
        return self._group((record.kind.value, owner))

    def _group(self, path: tuple[str, ...]) -> Group:
        if path in self._groups:
            return self._groups[path]
        parent = self._kp.root_group if len(path) == 1 else self._group(path[:-1])
        existing = [g for g in parent.subgroups if g.name == path[-1]]
        group = existing[0] if existing else self._kp.add_group(parent, path[-1])
        self._groups[path] = group
        return group

    def _store_record(self, record: KeyRecord) -> None:
        entry = self._entries[record.id]
        entry.set_custom_property(
            RECORD_PROPERTY, json.dumps(record.to_dict(), sort_keys=True)
        )
        entry.expiry_time = record.expires if record.expires else entry.expiry_time
        entry.expires = record.expires is not None
        self._records[record.id] = record
        self._dirty = True

    def _store_secret(self, entry: Entry, secret: bytes | str) -> None:
        if isinstance(secret, bytes):
            entry.password = base64.b64encode(secret).decode("ascii")
            entry.set_custom_property(ENCODING_PROPERTY, "base64")
        else:
            entry.password = secret
            entry.set_custom_property(ENCODING_PROPERTY, "text")
        self._dirty = True

    def _write_meta(self, meta: dict[str, Any]) -> None:
        if self._meta_entry is None:
            group = self._group(("trekeys",))
            self._meta_entry = Entry(title="trekeys metadata", kp=self._kp)
            group.append(self._meta_entry)
        self._meta_entry.set_custom_property(
            META_PROPERTY, json.dumps(meta, sort_keys=True)
        )
        self._dirty = True

    def _flush_audit(self) -> None:
        if not self._pending_audit:
            return
        log = self.audit_log
        sequence, previous = log.tail()
        unsaved = self._check_log_reaches_head(log, previous)
        if unsaved:
            self._pending_audit.insert(
                0, ("unsaved-entries", "vault", "warning", unsaved)
            )
        entries = []
        for operation, key_id, outcome, detail in self._pending_audit:
            sequence += 1
            entry = make_entry(
                previous, sequence, self.actor, operation, key_id, outcome, detail
            )
            previous = entry["hash"]
            entries.append(entry)
        log.append(entries)
        self._pending_audit.clear()
        self._write_meta({**self.meta, "audit_head": previous})

    def _check_log_reaches_head(self, log: AuditLog, tail: str) -> str:
        """Return a note on entries logged after the vault's head, or raise.

        Appending to a log that no longer contains the head stored in the
        vault would re-anchor a deleted or truncated log and hide the gap.
        Entries after the head come from a session whose vault save did not
        finish. They are kept, and the returned note is added to the log.
        """
        head = self.meta.get("audit_head")
        if not head or head == tail:
            return ""
        entries = log.entries()
        for entry in entries:
            if entry.get("hash") == head:
                first, last = int(entry["seq"]) + 1, int(entries[-1]["seq"])
                return (
                    f"entries {first} to {last} were logged but the vault save that "
                    "followed did not finish; the changes they describe may not "
                    "have happened"
                )
        raise AuditError(
            f"audit log {log.path} does not contain the last entry recorded in "
            f"vault {self.path}: it was deleted, truncated or replaced. Restore it "
            "from a backup and run 'trekeys audit verify' before changing keys.",
            line=None,
        )

    def _keep_audit_only(self) -> None:
        if self.read_only or not self._pending_audit or self._lock_fd is None:
            return
        pending = self._pending_audit
        self._kp.read(
            self._kp.filename,
            password=self._kp.password,
            keyfile=self._kp.keyfile,
            transformed_key=self._kp.transformed_key,
        )
        self._reindex()
        self._pending_audit = pending
        self.save()

    def _write_atomically(self, *, rotate_salt: bool = False) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        transformed_key = None if rotate_salt else self._kp.transformed_key
        try:
            _save_private(self._kp, tmp, transformed_key=transformed_key)
            if self._purge_generations:
                self._drop_generations()
            elif self.path.exists():
                self._keep_generation()
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        finally:
            tmp.unlink(missing_ok=True)
        self._purge_generations = False
        logger.debug("saved vault %s", self.path)

    def _drop_generations(self) -> None:
        for generation in list_generations(self.path):
            generation.unlink()
        logger.info(
            "removed the earlier generations of vault %s because they hold "
            "destroyed key material",
            self.path,
        )

    def _keep_generation(self) -> None:
        folder = generations_dir(self.path)
        folder.mkdir(mode=0o700, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = folder / f"{self.path.stem}-{stamp}-{time.time_ns() % 10**9:09d}.kdbx"
        os.link(self.path, target)
        for old in list_generations(self.path)[DEFAULT_GENERATIONS:]:
            old.unlink()

    def _require_writable(self) -> None:
        if self.read_only:
            raise VaultReadOnlyError(
                f"vault {self.path} is open read-only; it was not made by trekeys, is "
                "not KDBX4, or was opened read-only, so trekeys will not change it."
            )


def _save_private(
    keepass: PyKeePass, target: Path, *, transformed_key: bytes | None
) -> None:
    """Write the database to a new 0600 file and fsync it.

    pykeepass writes files through its own temporary file with the process
    umask, so trekeys serialises to memory and writes the file itself.
    """
    buffer = io.BytesIO()
    keepass.save(buffer, transformed_key=transformed_key)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(buffer.getbuffer())
        handle.flush()
        os.fsync(handle.fileno())


def audit_log_path(vault_path: Path) -> Path:
    """Return where the audit log of the vault at `vault_path` lives."""
    return vault_path.with_name(f"{vault_path.stem}-audit.jsonl")


def _parse_record(key_id: str, raw: str) -> KeyRecord:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RecordError(
            f"the record of key {key_id} is not valid JSON (property "
            f"{RECORD_PROPERTY}); it was edited outside trekeys, restore it from a "
            "generation with 'trekeys vault restore'."
        ) from exc
    if not isinstance(data, dict) or data.get("id") != key_id:
        raise RecordError(
            f"the record of key {key_id} does not describe that key; it was edited "
            "outside trekeys, restore it from a generation with 'trekeys vault "
            "restore'."
        )
    return KeyRecord.from_dict(data)


def _entry_strings(element: Any) -> dict[str, str]:
    # Reads the trekeys String fields of an entry element. Each String holds a
    # Key and a Value child, in that order, in every KDBX file.
    found = {}
    for child in element.iterchildren("String"):
        if len(child) < 2:
            continue
        key = child[0].text
        if key in _INDEXED_PROPERTIES:
            found[key] = child[1].text or ""
    return found


def _remove_stale_temporaries(path: Path) -> None:
    # A save killed before its rename leaves its temporary file behind. The
    # caller holds the write lock, so no other save is using one now.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        logger.warning("removing %s, left by an interrupted save", stale)
        stale.unlink(missing_ok=True)


def _apply_kdf(keepass: PyKeePass, kdf: KdfSettings) -> None:
    params = keepass.kdbx.header.value.dynamic_header.kdf_parameters.data.dict
    params["$UUID"].value = kdf_uuids["argon2id"]
    params["I"].value = kdf.time_cost
    params["M"].value = kdf.memory_kib * 1024
    params["P"].value = kdf.parallelism


def _acquire_lock(path: Path, *, timeout: float) -> int:
    lock_path = path.with_name(f"{path.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise VaultLockedError(
                    f"vault {path} is locked by another trekeys process; wait for it "
                    "to finish, then try again."
                ) from None
            time.sleep(0.05)


def _release_lock(fd: int | None) -> None:
    if fd is None:
        return
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def strength_bits_of(records: Iterable[KeyRecord]) -> int:
    """Return the highest security strength among `records` that are not tombstones."""
    return max((r.strength_bits for r in records if not r.is_tombstone), default=0)

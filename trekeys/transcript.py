"""Sealed ceremony transcripts: a hash-chained JSON Lines file with a signed seal.

Each line is one entry in canonical JSON (sorted keys, no spaces). Its
``hash`` is the SHA-256 of the previous entry's hash and the entry's own
canonical JSON, so an edited, removed or reordered entry breaks the chain
there. The verifier also requires every line to be exactly the canonical
form, so that no byte of a line can change without being noticed.

The last line is the seal. It signs a short statement (entry count, last
hash, SHA-256 of all entry lines) with the Ed25519 ceremony-signing key from
the vault and, when the offline media is present, with the offline admin
OpenPGP key. Verification needs only the public keys, so it works offline.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PublicKey,
)

from trekeys.errors import IntegrityError, TranscriptError
from trekeys.evidence import group_hex
from trekeys.offline_signature import OfflineSigner, gpg_verify_detached
from trekeys.records import utcnow
from trekeys.signing_key import SIGNING_KEY_ID, signing_public_key, vault_private_key
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

GENESIS = "0" * 64
FORMAT = "trekeys-ceremony-transcript/1"


def canonical(value: dict[str, Any]) -> str:
    """Return the canonical JSON text of an entry or seal, as hashed and stored."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _entry_hash(previous: str, body: dict[str, Any]) -> str:
    return hashlib.sha256((previous + canonical(body)).encode("ascii")).hexdigest()


class TranscriptJournal:
    """The entries of one ceremony, appended to disk as they happen.

    Each entry is written and fsynced before the call returns, so a crash
    mid-ceremony keeps every step already recorded.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: list[dict[str, Any]] = []
        self.sealed = False
        self.size = 0

    @property
    def head(self) -> str:
        """The hash of the last entry, or the genesis value when empty."""
        return self.entries[-1]["hash"] if self.entries else GENESIS

    def append(self, entry_type: str, body: dict[str, Any]) -> dict[str, Any]:
        """Chain and write one entry, and return it."""
        if self.sealed:
            raise TranscriptError(
                f"transcript {self.path} is sealed; start a new ceremony to record "
                "more."
            )
        entry = {
            **body,
            "seq": len(self.entries) + 1,
            "type": entry_type,
            "time": utcnow().isoformat(),
            "prev": self.head,
        }
        entry["hash"] = _entry_hash(self.head, entry)
        self._write_line(canonical(entry))
        self.entries.append(entry)
        return entry

    def _write_line(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="ascii") as handle:
            # Two processes recording into one ceremony would fork the chain,
            # so the file must still end where this journal last wrote.
            fcntl.flock(handle, fcntl.LOCK_EX)
            if os.fstat(handle.fileno()).st_size != self.size:
                raise TranscriptError(
                    f"transcript {self.path} was changed by another process; "
                    "resume the ceremony to see its latest entries."
                )
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.size += len(line) + 1

    def statement(self) -> bytes:
        """Return the statement that the offline key signs and the seal carries."""
        return seal_statement(
            len(self.entries),
            self.head,
            _lines_digest(canonical(e) for e in self.entries),
        )

    def seal(
        self, vault: Vault, *, offline_signer: OfflineSigner | None = None
    ) -> dict[str, Any]:
        """Sign the transcript and write the seal line, then log the seal.

        The vault's ceremony-signing key always signs. The offline key signs too
        when `offline_signer` is given.

        Raises:
            RecordNotFoundError: the vault has no ceremony-signing key.
        """
        statement = self.statement()
        private_key = vault_private_key(vault, f"seal transcript {self.path.name}")
        public_raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        seal: dict[str, Any] = {
            "type": "seal",
            "format": FORMAT,
            "entries": len(self.entries),
            "head": self.head,
            "statement": statement.decode("ascii"),
            "offline_signature": None,
            "vault_signature": {
                "key_id": SIGNING_KEY_ID,
                "algorithm": "ed25519",
                "public_key": base64.b64encode(public_raw).decode("ascii"),
            },
        }
        # The offline key signs the statement first, so that the vault key's
        # signature covers every other byte of the seal, the offline one too.
        if offline_signer is not None:
            signed = offline_signer(statement)
            seal["offline_signature"] = {
                "fingerprint": signed.fingerprint,
                "armored": signed.armored,
            }
        signature = private_key.sign(_signed_part(seal))
        seal["vault_signature"]["signature"] = base64.b64encode(signature).decode()
        self._write_line(canonical(seal))
        self.sealed = True

        detail = "with the offline key too" if offline_signer else "vault key only"
        vault.record_operation(
            "seal-transcript", transcript_ref(self.path), "success", detail
        )
        logger.info("sealed transcript %s (%s)", self.path, detail)
        return seal


def _signed_part(seal: dict[str, Any]) -> bytes:
    """Return the bytes the vault key signs: the seal without its own signature."""
    unsigned = dict(seal)
    unsigned["vault_signature"] = {
        k: v for k, v in (seal.get("vault_signature") or {}).items() if k != "signature"
    }
    return canonical(unsigned).encode("ascii")


def seal_statement(count: int, head: str, lines_sha256: str) -> bytes:
    """Return the statement a seal signs: entry count, last hash, digest of lines."""
    return (
        f"{FORMAT}\nentries: {count}\nhead: {head}\nlines-sha256: {lines_sha256}\n"
    ).encode("ascii")


def _lines_digest(lines: Iterator[str] | list[str]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("ascii") + b"\n")
    return digest.hexdigest()


@dataclass
class Verification:
    """The facts that a successful verification established.

    Attributes:
        entries: the number of chained entries.
        head: the hash of the last entry.
        signer: the SHA-256 of the vault key that signed, grouped for reading aloud.
        offline: "verified", "absent" (the seal has none) or "not checked"
            (no GNUPGHOME was given).
        offline_status: gpg's status lines when the offline signature was checked.
    """

    entries: int
    head: str
    signer: str
    offline: str
    offline_status: str = ""


def load_journal(path: Path) -> TranscriptJournal:
    """Reopen the journal of an unsealed ceremony, checking its chain first.

    Raises:
        TranscriptError: the journal is damaged, or already sealed.
    """
    journal = TranscriptJournal(path)
    lines = _read_lines(path)
    entries = [_parse_entry(path, number, line) for number, line in enumerate(lines, 1)]
    if entries and entries[-1].get("type") == "seal":
        raise TranscriptError(
            f"transcript {path} is sealed; start a new ceremony to record more."
        )
    _check_chain(path, entries)
    journal.entries = entries
    journal.size = Path(path).stat().st_size
    return journal


def _read_lines(path: Path) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="ascii").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise TranscriptError(
            f"transcript {path} cannot be read as ASCII JSON Lines; it was damaged "
            "or is not a transcript."
        ) from exc
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise TranscriptError(f"transcript {path} is empty.")
    return lines


def parse_lines(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read a transcript, check its chain, and return its entries and seal.

    Raises:
        TranscriptError: naming the first entry that is malformed, not in
            canonical form, or breaks the chain, or saying the seal is missing.
    """
    lines = _read_lines(path)
    entries = [_parse_entry(path, number, line) for number, line in enumerate(lines, 1)]
    seal = entries.pop()
    if seal.get("type") != "seal":
        raise TranscriptError(
            f"transcript {path} is not sealed: its last line is entry "
            f"{len(entries) + 1}, not a seal; seal the ceremony before relying on it."
        )
    _check_chain(path, entries)
    return entries, seal


def _parse_entry(path: Path, number: int, line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TranscriptError(
            f"transcript {path} entry {number} is not valid JSON: it was edited.",
            entry=number,
        ) from exc
    if not isinstance(value, dict) or canonical(value) != line:
        raise TranscriptError(
            f"transcript {path} entry {number} is not in canonical form: it was "
            "edited.",
            entry=number,
        )
    return value


def _check_chain(path: Path, entries: list[dict[str, Any]]) -> None:
    previous = GENESIS
    for number, entry in enumerate(entries, 1):
        body = {k: v for k, v in entry.items() if k != "hash"}
        label = _entry_label(entry)
        if entry.get("seq") != number or entry.get("prev") != previous:
            raise TranscriptError(
                f"transcript {path} entry {number} ({label}) does not follow entry "
                f"{number - 1}: an entry was removed, inserted or reordered.",
                entry=number,
            )
        if _entry_hash(previous, body) != entry.get("hash"):
            raise TranscriptError(
                f"transcript {path} entry {number} ({label}) was edited: its hash "
                "does not match its content.",
                entry=number,
            )
        previous = entry["hash"]


def _entry_label(entry: dict[str, Any]) -> str:
    kind = str(entry.get("type", "unknown"))
    step = entry.get("step_id")
    return f"{kind} {step}" if step else kind


def verify_transcript(
    path: Path,
    public_key: bytes,
    *,
    gnupghome: Path | None = None,
    offline_fingerprint: str | None = None,
) -> Verification:
    """Check a sealed transcript's chain, its vault signature and its offline one.

    Args:
        path: the transcript file.
        public_key: the trusted raw Ed25519 public key of the signing key.
        gnupghome: a GNUPGHOME holding the offline admin public key; without
            it the offline signature is reported as "not checked".
        offline_fingerprint: the expected offline key; the seal's own is used
            only when this is None.

    Raises:
        TranscriptError: the chain, the seal or a signature does not verify.
    """
    entries, seal = parse_lines(path)
    head = entries[-1]["hash"] if entries else GENESIS
    statement = seal_statement(
        len(entries), head, _lines_digest(canonical(e) for e in entries)
    )
    if seal.get("statement") != statement.decode("ascii"):
        raise TranscriptError(
            f"transcript {path}: the seal covers a different transcript (entry count, "
            "last hash or lines); entries were added, removed or changed after sealing."
        )

    _verify_vault_signature(path, seal, public_key)
    offline, status = _verify_offline(
        path, seal, statement, gnupghome, offline_fingerprint
    )
    return Verification(
        entries=len(entries),
        head=head,
        signer=group_hex(hashlib.sha256(public_key).hexdigest()),
        offline=offline,
        offline_status=status,
    )


def _verify_vault_signature(
    path: Path, seal: dict[str, Any], public_key: bytes
) -> None:
    signed = seal.get("vault_signature") or {}
    try:
        signature = base64.b64decode(signed.get("signature", ""), validate=True)
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            signature, _signed_part(seal)
        )
    except (InvalidSignature, ValueError) as exc:
        raise TranscriptError(
            f"transcript {path}: the vault signature does not verify with the trusted "
            f"key {group_hex(hashlib.sha256(public_key).hexdigest())[:19]}...; the "
            "seal was changed or another key signed it."
        ) from exc


def _verify_offline(
    path: Path,
    seal: dict[str, Any],
    statement: bytes,
    gnupghome: Path | None,
    expected: str | None,
) -> tuple[str, str]:
    signed = seal.get("offline_signature")
    if not signed:
        return "absent", ""
    if gnupghome is None:
        return "not checked", ""
    fingerprint = expected or str(signed.get("fingerprint", ""))
    try:
        status = gpg_verify_detached(
            gnupghome, fingerprint, statement, str(signed.get("armored", ""))
        )
    except IntegrityError as exc:
        raise TranscriptError(f"transcript {path}: {exc}") from exc
    return "verified", status


def read_transcript(
    path: Path, vault: Vault, reason: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Return a sealed transcript's entries and seal, and log the access.

    The access is queued in the vault's audit log even when the transcript
    fails its chain check, since a failed read is also an access.
    """
    try:
        entries, seal = parse_lines(path)
    except TranscriptError as exc:
        vault.record_operation(
            "read-transcript", transcript_ref(path), "failure", str(exc)
        )
        raise
    vault.record_operation("read-transcript", transcript_ref(path), "success", reason)
    return entries, seal


def transcript_ref(path: Path) -> str:
    """Return how the audit log names a transcript: its folder and file name."""
    path = Path(path).resolve()
    return f"transcript:{path.parent.name}/{path.name}"


def verify_with_vault(
    path: Path,
    vault: Vault,
    *,
    gnupghome: Path | None = None,
    offline_fingerprint: str | None = None,
) -> Verification:
    """Verify a transcript against the vault's signing key and log the access.

    Raises:
        TranscriptError: the transcript fails verification; the failure is
            logged in the audit log too.
    """
    target = transcript_ref(path)
    try:
        result = verify_transcript(
            path,
            signing_public_key(vault),
            gnupghome=gnupghome,
            offline_fingerprint=offline_fingerprint,
        )
    except TranscriptError as exc:
        vault.record_operation("verify-transcript", target, "failure", str(exc))
        raise
    vault.record_operation(
        "verify-transcript", target, "success", f"{result.entries} entries"
    )
    return result

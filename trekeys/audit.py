"""The append-only, hash-chained audit log of key operations.

Each line is one JSON object. Its ``hash`` is the SHA-256 of the previous
line's hash and the line's own canonical JSON, so editing, deleting or
reordering a line breaks the chain from that line on. The hash of the last
line is also stored in the vault (the head), which detects a truncated log.
No line ever holds key material: only ids, fingerprints and outcomes.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trekeys.errors import AuditError
from trekeys.records import utcnow

logger = logging.getLogger(__name__)

GENESIS = "0" * 64


@dataclass(frozen=True)
class Actor:
    """Who performs an operation: a role from the policy and a named person."""

    role: str
    name: str

    @classmethod
    def from_environment(cls) -> Actor:
        """Read the actor from TREKEYS_ROLE and TREKEYS_ACTOR, or the login name."""
        role = os.environ.get("TREKEYS_ROLE", "TRE System Administrators")
        name = (
            os.environ.get("TREKEYS_ACTOR")
            or f"{getpass.getuser()}@{socket.gethostname()}"
        )
        return cls(role=role, name=name)


def _line_hash(previous: str, body: dict[str, Any]) -> str:
    canonical = json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256((previous + canonical).encode("utf-8")).hexdigest()


def make_entry(
    previous: str,
    sequence: int,
    actor: Actor,
    operation: str,
    key_id: str,
    outcome: str,
    detail: str = "",
) -> dict[str, Any]:
    """Return a chained audit entry that follows the entry whose hash is `previous`."""
    body = {
        "seq": sequence,
        "time": utcnow().isoformat(),
        "role": actor.role,
        "actor": actor.name,
        "operation": operation,
        "key_id": key_id,
        "outcome": outcome,
        "detail": detail,
        "prev": previous,
    }
    return {**body, "hash": _line_hash(previous, body)}


class AuditLog:
    """An audit log file that trekeys appends to."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def tail(self) -> tuple[int, str]:
        """Return the last sequence number and hash, or (0, GENESIS) when empty."""
        last: dict[str, Any] | None = None
        for _, entry in self._read():
            last = entry
        if last is None:
            return 0, GENESIS
        return int(last["seq"]), str(last["hash"])

    def append(self, entries: list[dict[str, Any]]) -> None:
        """Append already chained entries and fsync the file."""
        if not entries:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            for entry in entries:
                handle.write(
                    json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n"
                )
            handle.flush()
            os.fsync(handle.fileno())

    def entries(self) -> list[dict[str, Any]]:
        """Return every entry, without verifying the chain."""
        return [entry for _, entry in self._read()]

    def verify(self, head: str | None = None) -> int:
        """Check the chain and, when `head` is given, that the log ends there.

        Returns:
            The number of entries checked.

        Raises:
            AuditError: naming the first line that breaks the chain.
        """
        previous = GENESIS
        count = 0
        for number, entry in self._read():
            body = {k: v for k, v in entry.items() if k != "hash"}
            if entry.get("prev") != previous or entry.get("seq") != count + 1:
                raise AuditError(
                    f"audit log {self.path} line {number} does not follow line "
                    f"{number - 1}: a line was deleted, inserted or reordered.",
                    line=number,
                )
            if _line_hash(previous, body) != entry.get("hash"):
                raise AuditError(
                    f"audit log {self.path} line {number} was edited: its hash "
                    "does not match its content.",
                    line=number,
                )
            previous = entry["hash"]
            count += 1

        if head is not None and head != previous:
            raise AuditError(
                f"audit log {self.path} ends at entry {count}, but the vault records "
                "a different last entry: the log was truncated, or lines were added "
                "outside a vault save.",
                line=count + 1,
            )
        return count

    def _read(self) -> Iterator[tuple[int, dict[str, Any]]]:
        if not self.path.exists():
            return
        if not self.path.is_file():
            raise AuditError(
                f"audit log {self.path} is not a regular file; restore the log file "
                "from a backup."
            )
        with self.path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    entry = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise AuditError(
                        f"audit log {self.path} line {number} is not valid JSON.",
                        line=number,
                    ) from exc
                if not isinstance(entry, dict):
                    raise AuditError(
                        f"audit log {self.path} line {number} is not an object.",
                        line=number,
                    )
                yield number, entry

"""The dependency graph of keys, built from the key records alone.

Three kinds of edge come from a record:

- ``protects: key:<id>``: the key protects or wraps another key, so whoever
  holds it can recover that key. ``key:*`` means every other key in the vault
  (the vault's master secret). Compromise spreads along these edges.
- ``protects`` with any other reference (``volume:``, ``files:``,
  ``backup:``, ``service:``, ``manifest:``, ``account:``): data that the key
  protects. Whoever holds the key may read it.
- ``signs``: certificates, CRLs and report manifests that the key signed. A
  compromised signer makes them untrustworthy, but it does not expose a key.

`find_impact` walks the key edges transitively from the leaked keys and
collects what each reached key protects and signed.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from trekeys.errors import (
    DependencyCycleError,
    KeyDestroyedError,
    RecordNotFoundError,
)
from trekeys.records import KeyKind, KeyRecord, KeyState
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

KEY_PREFIX = "key:"
EVERY_KEY = "key:*"

# Descriptions of data references, for the "where it lives" column of an impact.
_DATA_DESCRIPTIONS = {
    "volume": "LUKS volume of project instance {name}",
    "files": "files that user {name} encrypted with their file key",
    "backup": "encrypted home-directory backup {name} on the backup media",
    "service": "TLS web service {name}",
    "manifest": "transfer manifest {name}",
    "account": "account {name}",
}

# Record attributes that name a place where protected data lives.
_LOCATION_ATTRIBUTES = ("image", "device", "path", "deploy_path", "store", "archive")


@dataclass(frozen=True)
class CompromisedKey:
    """A key to be considered compromised.

    Attributes:
        key_id: the key's id.
        kind: its kind.
        state: its state before the incident.
        path: the chain of keys from a leaked key to this one.
        since: when the key was activated, or created when never activated.
    """

    key_id: str
    kind: str
    state: str
    path: tuple[str, ...]
    since: str


@dataclass(frozen=True)
class ExposedData:
    """Data that may have been read by whoever holds a compromised key."""

    ref: str
    protected_by: str
    where: str
    since: str


@dataclass(frozen=True)
class SuspectSignature:
    """A certificate, CRL or report manifest that may no longer be trusted."""

    ref: str
    signer: str
    reason: str


@dataclass(frozen=True)
class BackupExposure:
    """A backup that depends on a compromised key.

    Attributes:
        ref: the backup reference, such as ``backup:alpha/2026-12-01``.
        recipients: every GPG key the backup is encrypted to.
        still_open_with: the recipients that are not compromised, not
            destroyed and so can still decrypt it.
    """

    ref: str
    recipients: tuple[str, ...]
    still_open_with: tuple[str, ...]


@dataclass
class Impact:
    """The exposure caused by the compromise of one or more keys."""

    leaked: tuple[str, ...]
    keys: list[CompromisedKey] = field(default_factory=list)
    data: list[ExposedData] = field(default_factory=list)
    signatures: list[SuspectSignature] = field(default_factory=list)
    backups: list[BackupExposure] = field(default_factory=list)
    unknown_refs: list[str] = field(default_factory=list)

    @property
    def key_ids(self) -> list[str]:
        """The ids of every compromised key, the leaked ones first."""
        return [k.key_id for k in self.keys]

    def to_dict(self) -> dict[str, Any]:
        """Return the impact as JSON-ready values."""
        return asdict(self)


class DependencyGraph:
    """The key-to-key protection edges of a vault, with the records they join."""

    def __init__(self, records: Iterable[KeyRecord]) -> None:
        self.records = {record.id: record for record in records}
        self.edges: dict[str, list[str]] = {}
        self.unknown_refs: dict[str, list[str]] = {}
        self._holders: dict[str, list[str]] = {}
        self._signers: dict[str, list[str]] = {}
        for record in self.records.values():
            self.edges[record.id] = self._protected_keys(record)
            for ref in record.protects:
                self._holders.setdefault(ref, []).append(record.id)
            for ref in record.signs:
                self._signers.setdefault(ref, []).append(record.id)

    @classmethod
    def from_vault(cls, vault: Vault) -> DependencyGraph:
        """Build the graph from every record in `vault`."""
        return cls(vault.get(key_id) for key_id in vault.ids())

    def _protected_keys(self, record: KeyRecord) -> list[str]:
        targets: list[str] = []
        for ref in record.protects:
            if ref == EVERY_KEY:
                targets.extend(k for k in sorted(self.records) if k != record.id)
            elif ref.startswith(KEY_PREFIX):
                target = ref[len(KEY_PREFIX) :]
                if target in self.records:
                    targets.append(target)
                else:
                    self.unknown_refs.setdefault(record.id, []).append(ref)
        return list(dict.fromkeys(targets))

    def require_usable(self, key_id: str) -> KeyRecord:
        """Return the record of a key that an impact may start from.

        Raises:
            RecordNotFoundError: no record has that id.
            KeyDestroyedError: the key is a tombstone.
        """
        if key_id not in self.records:
            raise RecordNotFoundError(key_id)
        record = self.records[key_id]
        if record.is_tombstone:
            raise KeyDestroyedError(key_id, record.state.value)
        return record

    def find_cycle(self, start: Sequence[str] | None = None) -> list[str] | None:
        """Return a cycle of key-protection edges as a closed path, or None.

        Only the keys reachable from `start` are searched (every key when None).
        """
        state: dict[str, int] = {}  # 1: on the current path, 2: finished
        path: list[str] = []

        def visit(key_id: str) -> list[str] | None:
            state[key_id] = 1
            path.append(key_id)
            for target in self.edges.get(key_id, []):
                if state.get(target) == 1:
                    return path[path.index(target) :] + [target]
                if target not in state:
                    found = visit(target)
                    if found:
                        return found
            path.pop()
            state[key_id] = 2
            return None

        for key_id in start if start is not None else sorted(self.records):
            if key_id not in state:
                found = visit(key_id)
                if found:
                    return found
        return None

    def require_acyclic(self, start: Sequence[str] | None = None) -> None:
        """Raise `DependencyCycleError` naming the cycle, if there is one."""
        cycle = self.find_cycle(start)
        if cycle:
            raise DependencyCycleError(cycle)

    def reachable(self, start: Sequence[str]) -> dict[str, tuple[str, ...]]:
        """Return every key reachable from `start`, each with the path that reaches it.

        Tombstones are neither returned nor walked through, because their
        material is gone from the vault.
        """
        paths: dict[str, tuple[str, ...]] = {}
        queue: deque[tuple[str, tuple[str, ...]]] = deque((k, (k,)) for k in start)
        while queue:
            key_id, route = queue.popleft()
            if key_id in paths or self.records[key_id].is_tombstone:
                continue
            paths[key_id] = route
            queue.extend((t, (*route, t)) for t in self.edges.get(key_id, []))
        return paths

    def signers_of(self, ref: str) -> list[str]:
        """Return the ids of the keys whose `signs` contains `ref`."""
        return sorted(self._signers.get(ref, []))

    def holders_of(self, ref: str, kind: KeyKind | None = None) -> list[str]:
        """Return the ids of the keys whose `protects` contains `ref`."""
        holders = self._holders.get(ref, [])
        return sorted(
            k for k in holders if kind is None or self.records[k].kind is kind
        )


def find_impact(vault: Vault, key_ids: str | Sequence[str]) -> Impact:
    """Work out what the compromise of `key_ids` exposes.

    Args:
        vault: the open vault.
        key_ids: one leaked key id, or several.

    Raises:
        RecordNotFoundError: a key id is unknown.
        KeyDestroyedError: a key is already destroyed.
        DependencyCycleError: the protection records form a cycle.
    """
    return impact_from_graph(DependencyGraph.from_vault(vault), key_ids)


def impact_from_graph(graph: DependencyGraph, key_ids: str | Sequence[str]) -> Impact:
    """Work out what the compromise of `key_ids` exposes, from a built graph.

    Raises:
        RecordNotFoundError, KeyDestroyedError, DependencyCycleError: as
            `find_impact`.
    """
    leaked = [key_ids] if isinstance(key_ids, str) else list(key_ids)
    for key_id in leaked:
        graph.require_usable(key_id)
    graph.require_acyclic(leaked)

    reached = graph.reachable(leaked)
    impact = Impact(leaked=tuple(leaked))
    for key_id, route in reached.items():
        record = graph.records[key_id]
        impact.keys.append(
            CompromisedKey(
                key_id, record.kind.value, record.state.value, route, _since(record)
            )
        )
        impact.data.extend(_exposed_data(record))
        impact.signatures.extend(
            SuspectSignature(ref, key_id, "signed by a compromised key")
            for ref in record.signs
        )
        impact.unknown_refs.extend(graph.unknown_refs.get(key_id, []))

    impact.signatures.extend(_certificates_of(graph, reached))
    impact.backups = _backup_exposures(graph, impact.data, set(reached))
    logger.info(
        "impact of %s: %d keys, %d data, %d signatures",
        ", ".join(leaked),
        len(impact.keys),
        len(impact.data),
        len(impact.signatures),
    )
    return impact


def _since(record: KeyRecord) -> str:
    return (record.activated or record.created).isoformat()


def _exposed_data(record: KeyRecord) -> list[ExposedData]:
    found = []
    for ref in record.protects:
        if ref.startswith(KEY_PREFIX):
            continue
        found.append(
            ExposedData(ref, record.id, describe_location(ref, record), _since(record))
        )
    return found


def describe_location(ref: str, record: KeyRecord) -> str:
    """Describe where the data behind `ref` lives, from the reference and the record."""
    prefix, _, name = ref.partition(":")
    template = _DATA_DESCRIPTIONS.get(prefix, "{prefix} {name}")
    text = template.format(prefix=prefix, name=name)
    places = [
        record.attributes[a] for a in _LOCATION_ATTRIBUTES if a in record.attributes
    ]
    return f"{text} ({', '.join(places)})" if places else text


def _certificates_of(
    graph: DependencyGraph, reached: dict[str, tuple[str, ...]]
) -> list[SuspectSignature]:
    """Return the certificates issued for compromised keys by keys not compromised."""
    found = []
    for key_id in reached:
        for signer in graph.signers_of(f"cert:{key_id}"):
            if signer not in reached:
                found.append(
                    SuspectSignature(
                        f"cert:{key_id}", signer, "certifies a compromised key"
                    )
                )
    return found


def _backup_exposures(
    graph: DependencyGraph, data: list[ExposedData], compromised: set[str]
) -> list[BackupExposure]:
    exposures = []
    for ref in sorted({d.ref for d in data if d.ref.startswith("backup:")}):
        recipients = graph.holders_of(ref, KeyKind.GPG)
        still_open = [
            r
            for r in recipients
            if r not in compromised
            and not graph.records[r].is_tombstone
            and graph.records[r].state is not KeyState.COMPROMISED
        ]
        exposures.append(BackupExposure(ref, tuple(recipients), tuple(still_open)))
    return exposures

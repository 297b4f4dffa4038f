"""MAC keys for data in transit, and signed folder manifests (policy 4.2).

Each transfer channel, such as the data import into project ``alpha``, has a
256-bit MAC key (``mac/alpha-import``). The sender lists a folder in a
*manifest*: a JSON file with each regular file's path, size and
HMAC-SHA-256, plus an HMAC-SHA-256 over the manifest itself. The receiver
checks the manifest's MAC first, then every file, and names each file that
was added, removed or changed.

Two keys are derived from the channel key with HMAC-SHA-256 over fixed
labels, one for files and one for the manifest, so that a file whose bytes
happen to equal a manifest can never yield a valid manifest MAC.

Rotation adds a new key for the channel and deactivates the old one, which
still verifies the manifests made with it. A compromised key verifies
nothing: anyone may have forged its manifests.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trekeys.errors import (
    CredentialError,
    IntegrityError,
    PolicyError,
    RecordError,
    TransferManifestError,
)
from trekeys.lab import Lab
from trekeys.outputs import staged_output
from trekeys.records import KeyKind, KeyRecord, KeyState, utcnow
from trekeys.succession import next_key_id, retire_key
from trekeys.vault import Vault
from trekeys.wrap import key_check_value

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "trekeys-manifest/1"
MAC_KEY_BYTES = 32
MAC_CRYPTOPERIOD_DAYS = 365
CHUNK_BYTES = 1 << 20
_FILE_LABEL = b"trekeys manifest file mac"
_MANIFEST_LABEL = b"trekeys manifest mac"
# Deactivated keys still verify the manifests they made (NIST SP 800-57 Part 1).
_VERIFYING_STATES = frozenset({KeyState.ACTIVE, KeyState.DEACTIVATED})


@dataclass
class ManifestReport:
    """The outcome of checking a folder against its manifest."""

    manifest: str
    key_id: str
    files: int
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.added or self.removed or self.changed)

    def describe(self) -> str:
        """Return one line naming every difference, or that the folder matches."""
        if self.ok:
            return f"all {self.files} files match, manifest MAC by {self.key_id} valid"
        parts = [
            f"{label}: {', '.join(names)}"
            for label, names in (
                ("added", self.added),
                ("removed", self.removed),
                ("changed", self.changed),
            )
            if names
        ]
        return "; ".join(parts)


def create_channel_key(
    vault: Vault, channel: str, *, owner: str = "tre", key_id: str | None = None
) -> KeyRecord:
    """Create the MAC key of a transfer channel in the vault."""
    material = secrets.token_bytes(MAC_KEY_BYTES)
    record = KeyRecord(
        id=key_id or f"mac/{channel}",
        kind=KeyKind.MAC,
        purpose=f"Protects the integrity of data on transfer channel {channel}.",
        owner=owner,
        state=KeyState.ACTIVE,
        cryptoperiod_days=MAC_CRYPTOPERIOD_DAYS,
        fingerprint=key_check_value(material),
        algorithm="HMAC-SHA-256",
        strength_bits=256,
        locations=["vault"],
        attributes={"channel": channel},
    )
    record.activated = record.created
    vault.add(record, material)
    return record


def find_channel_key(vault: Vault, channel: str) -> KeyRecord:
    """Return the active MAC key of `channel`.

    Raises:
        RecordError: the channel has no active key.
    """
    for record in vault.find(kind=KeyKind.MAC.value, state=KeyState.ACTIVE.value):
        if record.attributes.get("channel") == channel:
            return record
    raise RecordError(
        f"transfer channel {channel} has no active MAC key; create one with "
        f"'trekeys transfer create-key {channel}'."
    )


def create_manifest(
    vault: Vault,
    channel: str,
    folder: Path,
    dest: Path | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """List a folder's files with their HMACs and write the MACed manifest.

    Args:
        channel: the transfer channel whose active key signs.
        folder: the folder to send.
        dest: the manifest; ``<folder>.manifest.json`` beside it by default.
        overwrite: replace `dest` if it exists.

    Raises:
        PolicyError: the folder contains a symbolic link or a special file.
        DestinationExistsError: `dest` exists and `overwrite` is false.
    """
    folder = Path(folder)
    dest = Path(dest) if dest else folder.with_name(f"{folder.name}.manifest.json")
    record = find_channel_key(vault, channel)
    file_key, manifest_key = _derived_keys(
        vault.read_secret(record.id, f"manifest of {folder.name}")
    )

    entries = [
        {"path": name, "size": size, "hmac": _file_mac(file_key, path)}
        for name, path, size in _walk(folder, skip=dest)
    ]
    body: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "channel": channel,
        "name": folder.name,
        "key_id": record.id,
        "key_kcv": record.fingerprint,
        "created": utcnow().isoformat(),
        "files": entries,
    }
    body["mac"] = _manifest_mac(manifest_key, body)
    with staged_output(dest, overwrite=overwrite) as out:
        out.write(json.dumps(body, indent=2).encode("utf-8") + b"\n")

    reference = f"manifest:{channel}/{folder.name}"
    if reference not in record.protects:
        record.protects.append(reference)
    vault.update(record, operation="sign-manifest", detail=f"{reference}: {dest.name}")
    logger.info("wrote manifest %s of %d files with %s", dest, len(entries), record.id)
    return dest


def read_manifest(path: Path) -> dict[str, Any]:
    """Return a manifest's content, unchecked.

    Raises:
        IntegrityError: the file is not a trekeys manifest.
    """
    try:
        body = json.loads(Path(path).read_text(encoding="utf-8"))
        if body.get("format") != MANIFEST_FORMAT:
            raise ValueError(body.get("format"))
        if not {"files", "mac", "key_id"} <= set(body):
            raise KeyError("files, mac or key_id")
        if not all({"path", "size", "hmac"} <= set(e) for e in body["files"]):
            raise KeyError("path, size or hmac of a file")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(
            f"{path} is not a trekeys manifest ({MANIFEST_FORMAT}); ask the sender "
            "for the manifest of this transfer."
        ) from exc
    return dict(body)


def compare_manifest(vault: Vault, manifest: Path, folder: Path) -> ManifestReport:
    """Check a manifest's MAC, then compare the folder with it, file by file.

    Returns:
        The files added, removed or changed, empty when the folder matches.

    Raises:
        IntegrityError: the manifest's MAC is invalid.
        CredentialError: the manifest was made with a compromised or destroyed key.
    """
    body = read_manifest(manifest)
    record = _verifying_key(vault, body, manifest)
    file_key, manifest_key = _derived_keys(
        vault.read_secret(record.id, f"verify manifest {Path(manifest).name}")
    )
    claimed = str(body.pop("mac"))
    if not hmac.compare_digest(claimed, _manifest_mac(manifest_key, body)):
        raise IntegrityError(
            f"the MAC of manifest {manifest} is invalid: the manifest was changed or "
            f"not made with {record.id}; do not import the data, ask the sender to "
            "send it again."
        )

    listed = {e["path"]: e for e in body["files"]}
    present = {name: (path, size) for name, path, size in _walk(Path(folder), manifest)}
    report = ManifestReport(str(manifest), record.id, len(listed))
    report.added = sorted(set(present) - set(listed))
    report.removed = sorted(set(listed) - set(present))
    for name in sorted(set(listed) & set(present)):
        path, size = present[name]
        entry = listed[name]
        if size != entry["size"] or not hmac.compare_digest(
            _file_mac(file_key, path), str(entry["hmac"])
        ):
            report.changed.append(name)
    return report


def verify_manifest(vault: Vault, manifest: Path, folder: Path) -> ManifestReport:
    """Check a folder against its manifest and raise on any difference.

    Raises:
        TransferManifestError: a file was added, removed or changed; the
            message names every one.
        IntegrityError: the manifest's MAC is invalid.
    """
    report = compare_manifest(vault, manifest, folder)
    if not report.ok:
        raise TransferManifestError(
            f"folder {folder} does not match manifest {Path(manifest).name} "
            f"({report.describe()}); do not import it, ask the sender to send it "
            "again.",
            added=report.added,
            removed=report.removed,
            changed=report.changed,
        )
    logger.info("folder %s matches manifest %s", folder, manifest)
    return report


def rotate_key(
    lab: Lab, vault: Vault, key_id: str, *, reason: str, compromised: bool
) -> list[str]:
    """Give a channel a new MAC key; the old one only verifies, unless compromised.

    Returns:
        The id of the new MAC key.
    """
    old = vault.get(key_id)
    if old.kind is not KeyKind.MAC:
        raise RecordError(f"key {key_id} is a {old.kind.value} key, not a MAC key.")
    new = create_channel_key(
        vault,
        old.attributes["channel"],
        owner=old.owner,
        key_id=next_key_id(vault, key_id),
    )
    retire_key(vault, key_id, reason=reason, compromised=compromised)
    logger.info("rotated MAC key %s to %s", key_id, new.id)
    return [new.id]


def transfers_dir(lab: Lab, instance: str) -> Path:
    """Return the folder of an instance's demo transfers."""
    return lab.instance_dir(instance) / "transfers"


def build_lab(lab: Lab, vault: Vault) -> None:
    """Give each instance an import channel and a demo transfer with its manifest."""
    for instance in lab.instances:
        channel = f"{instance}-import"
        create_channel_key(vault, channel, owner=f"instance:{instance}")
        folder = transfers_dir(lab, instance) / "import-cohort-2026-12"
        (folder / "linked").mkdir(parents=True)
        for number in range(1, 4):
            rows = [f"{number},{n},{(n * 7919) % 1000}" for n in range(1, 2001)]
            (folder / f"extract-{number}.csv").write_text(
                "batch,row,value\n" + "\n".join(rows) + "\n", encoding="utf-8"
            )
        (folder / "linked" / "lookup.json").write_text(
            json.dumps({"instance": instance, "codes": list(range(50))}),
            encoding="utf-8",
        )
        create_manifest(vault, channel, folder)


def _verifying_key(vault: Vault, body: dict[str, Any], manifest: Path) -> KeyRecord:
    record = vault.get(str(body["key_id"]))
    if record.kind is not KeyKind.MAC:
        raise IntegrityError(
            f"manifest {manifest} names {record.id}, which is not a MAC key."
        )
    if record.state not in _VERIFYING_STATES:
        raise CredentialError(
            f"manifest {manifest} was made with {record.id}, which is "
            f"{record.state.value}; its MAC proves nothing, so ask the sender to "
            "send the data again under the channel's current key."
        )
    return record


def _derived_keys(material: bytes) -> tuple[bytes, bytes]:
    file_key = hmac.new(material, _FILE_LABEL, hashlib.sha256).digest()
    manifest_key = hmac.new(material, _MANIFEST_LABEL, hashlib.sha256).digest()
    return file_key, manifest_key


def _manifest_mac(key: bytes, body: dict[str, Any]) -> str:
    canonical = json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    return hmac.new(key, canonical, hashlib.sha256).hexdigest()


def _file_mac(key: bytes, path: Path) -> str:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(CHUNK_BYTES)
        view = memoryview(buffer)
        while count := handle.readinto(buffer):
            mac.update(view[:count])
    return mac.hexdigest()


def _walk(folder: Path, skip: Path | None = None) -> list[tuple[str, Path, int]]:
    """Return (relative POSIX path, path, size) of every regular file, sorted."""
    if not folder.is_dir():
        raise IntegrityError(
            f"transfer folder {folder} does not exist or is not a folder."
        )
    skipped = skip.resolve() if skip else None
    found = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        for name in [*names, *dirs]:
            path = Path(root) / name
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise PolicyError(
                    f"{path} is a symbolic link or special file; manifests cover "
                    "regular files only, so replace it with a copy or remove it."
                )
        for name in sorted(names):
            path = Path(root) / name
            if skipped is not None and path.resolve() == skipped:
                continue
            relative = path.relative_to(folder).as_posix()
            found.append((relative, path, path.stat().st_size))
    return sorted(found)

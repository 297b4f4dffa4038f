"""Signed manifests of drill reports, so that an auditor can detect an edited report.

After a run, every file of the run folder is hashed (SHA-256) into
``manifest.json``, and the exact bytes of that file are signed with the
report-signing key ``tre/report-signing`` (Ed25519) from the vault. The
signature goes to ``manifest.json.sig`` in base64. The manifest carries the
public key and its fingerprint. Anyone could sign a manifest with a key of their
own, so verification also needs a trusted fingerprint: the one of the signing
key that lists the run in the vault, or one an auditor copied earlier.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from trekeys.errors import IntegrityError, PolicyError
from trekeys.records import KeyKind, KeyRecord, KeyState, utcnow
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

SIGNING_KEY_ID = "tre/report-signing"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"
MANIFEST_FORMAT = "trekeys-report-manifest/1"
SIGNING_CRYPTOPERIOD_DAYS = 730


def build_lab(lab: Any, vault: Vault) -> None:
    """Lab build step: create the report-signing key in the demo TRE's vault."""
    ensure_signing_key(vault)


def ensure_signing_key(vault: Vault) -> KeyRecord:
    """Return the report-signing key's record, creating the key if it is missing."""
    if SIGNING_KEY_ID in vault:
        return vault.get(SIGNING_KEY_ID)

    private = Ed25519PrivateKey.generate()
    public = _public_bytes(private.public_key())
    record = KeyRecord(
        id=SIGNING_KEY_ID,
        kind=KeyKind.SIGNING,
        purpose="Signs the manifests of drill reports so that edits can be detected.",
        owner="tre",
        custodian="Information Security Manager",
        algorithm="ed25519",
        strength_bits=128,
        cryptoperiod_days=SIGNING_CRYPTOPERIOD_DAYS,
        fingerprint=hashlib.sha256(public).hexdigest(),
        locations=["vault"],
        attributes={"public_key": base64.b64encode(public).decode("ascii")},
    )
    vault.add(record, private.private_bytes_raw())
    vault.transition(SIGNING_KEY_ID, KeyState.ACTIVE, "report signing in service")
    return vault.get(SIGNING_KEY_ID)


def _public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def hash_files(folder: Path) -> list[dict[str, Any]]:
    """Return path, size and SHA-256 of each file under `folder` but the manifest."""
    rows = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name in (MANIFEST, SIGNATURE):
            continue
        data = path.read_bytes()
        rows.append(
            {
                "path": path.relative_to(folder).as_posix(),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    return rows


def sign_run_folder(folder: Path, vault: Vault) -> dict[str, Any]:
    """Hash every report in `folder` into a manifest and sign it with the vault's key.

    The signing key's record gets ``report:<run folder>`` in its `signs` list,
    so that a compromise of the key shows which reports it vouched for.

    Returns:
        The manifest.
    """
    record = ensure_signing_key(vault)
    private = Ed25519PrivateKey.from_private_bytes(
        vault.read_secret(SIGNING_KEY_ID, f"sign the manifest of run {folder.name}")
    )
    manifest = {
        "format": MANIFEST_FORMAT,
        "run": folder.name,
        "created": utcnow().isoformat(),
        "signing_key": {
            "id": SIGNING_KEY_ID,
            "algorithm": "ed25519",
            "fingerprint": record.fingerprint,
            "public_key": record.attributes["public_key"],
        },
        "files": hash_files(folder),
    }
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    signature = private.sign(data)

    _write_new(folder / MANIFEST, data)
    _write_new(folder / SIGNATURE, base64.b64encode(signature) + b"\n")
    record.signs.append(f"report:{folder.name}")
    vault.update(record, operation="sign", detail=f"report:{folder.name}")
    logger.info(
        "signed the manifest of run %s with %s (%s)",
        folder.name,
        SIGNING_KEY_ID,
        record.fingerprint[:16],
    )
    return manifest


def _write_new(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.rename(path)


@dataclass
class Verification:
    """The result of checking a run folder against its signed manifest."""

    folder: Path
    fingerprint: str
    files_checked: int
    problems: list[str] = field(default_factory=list)


def verify_run_folder(folder: Path, *, fingerprint: str | None = None) -> Verification:
    """Check the manifest's signature and every file's hash in a run folder.

    Args:
        folder: the run folder.
        fingerprint: the report-signing key's fingerprint that the auditor
            trusts; when given, a manifest signed by another key is rejected.

    Raises:
        IntegrityError: the manifest or its signature is missing, invalid or
            signed by another key, or a file was edited, removed or added; the
            message names the file.
    """
    manifest_path, signature_path = folder / MANIFEST, folder / SIGNATURE
    if not manifest_path.is_file() or not signature_path.is_file():
        raise IntegrityError(
            f"run folder {folder} has no signed manifest ({MANIFEST} and "
            f"{SIGNATURE}); it cannot be verified."
        )
    data = manifest_path.read_bytes()
    manifest = _load_manifest(manifest_path, data)
    key = manifest["signing_key"]
    _check_signature(folder, data, signature_path, key, fingerprint)

    listed = {row["path"]: row for row in manifest["files"]}
    present = {row["path"]: row for row in hash_files(folder)}
    problems = []
    for path, row in listed.items():
        if path not in present:
            problems.append(f"{path} is missing")
        elif present[path]["sha256"] != row["sha256"]:
            problems.append(f"{path} was edited: its SHA-256 does not match")
    problems.extend(
        f"{path} is not in the manifest" for path in present.keys() - listed.keys()
    )
    if problems:
        raise IntegrityError(
            f"run folder {folder} fails verification: {'; '.join(sorted(problems))}."
        )
    return Verification(folder, key["fingerprint"], len(listed))


def _load_manifest(path: Path, data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(manifest.get("format"))
        manifest["signing_key"]["public_key"]  # noqa: B018  (presence check)
        return dict(manifest)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IntegrityError(
            f"{path} is not a trekeys report manifest; it cannot be verified."
        ) from exc


def _check_signature(
    folder: Path,
    data: bytes,
    signature_path: Path,
    key: dict[str, str],
    fingerprint: str | None,
) -> None:
    public = base64.b64decode(key["public_key"])
    actual = hashlib.sha256(public).hexdigest()
    if actual != key["fingerprint"] or (
        fingerprint is not None and actual != fingerprint.lower()
    ):
        raise IntegrityError(
            f"the manifest of {folder} is signed by key {actual[:16]}..., not the "
            "trusted report-signing key; treat the reports as unverified."
        )
    try:
        signature = base64.b64decode(signature_path.read_bytes().strip(), validate=True)
        Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
    except (InvalidSignature, ValueError) as exc:
        raise IntegrityError(
            f"{MANIFEST} of {folder} fails its signature check: the manifest "
            "or its signature was edited; treat the reports as unverified."
        ) from exc


def rotate_key(
    lab: Any, vault: Vault, key_id: str, *, reason: str, compromised: bool
) -> list[str]:
    """Replace an Ed25519 signing key (reports or ceremony transcripts).

    The key keeps its id, because the runner and the ceremonies find it by
    id. The old key's record is kept as ``<id>/retired-<n>`` with its public key
    and the list of what it signed, so that earlier reports still verify and a
    compromise shows which ones it vouched for. Its private key is not kept.

    Returns:
        ``[key_id]``: the same id, now for the new key.

    Raises:
        PolicyError: `key_id` is not a signing key.
    """
    old = vault.get(key_id)
    if old.kind is not KeyKind.SIGNING or "public_key" not in old.attributes:
        raise PolicyError(
            f"key {key_id} is not an Ed25519 signing key; rotate it with the "
            "rotator of its own kind."
        )

    retired_id = _retired_id(vault, key_id)
    retired = KeyRecord.from_dict({**old.to_dict(), "id": retired_id})
    retired.purpose = f"Earlier {key_id}; verifies what it signed before {utcnow()}."
    vault.add(retired)
    state = KeyState.COMPROMISED if compromised else KeyState.DEACTIVATED
    vault.transition(retired_id, state, reason)

    private = Ed25519PrivateKey.generate()
    public = _public_bytes(private.public_key())
    vault.put_secret(key_id, private.private_bytes_raw(), reason=f"rotation: {reason}")
    current = vault.get(key_id)
    current.fingerprint = hashlib.sha256(public).hexdigest()
    current.attributes = {
        **current.attributes,
        "public_key": base64.b64encode(public).decode("ascii"),
        "replaces": retired_id,
    }
    current.signs = []
    current.activated = utcnow()
    vault.update(current, operation="rotate", detail=f"old key is {retired_id}")
    logger.info("rotated signing key %s; the old key is %s", key_id, retired_id)
    return [key_id]


def _retired_id(vault: Vault, key_id: str) -> str:
    number = 1
    while f"{key_id}/retired-{number}" in vault:
        number += 1
    return f"{key_id}/retired-{number}"


def signer_of_run(vault: Vault, run_name: str) -> KeyRecord:
    """Return the signing key record that lists `run_name` among what it signed.

    Raises:
        IntegrityError: no signing key signed that run, or the one that did
            has been compromised since, so its signature proves nothing.
    """
    reference = f"report:{run_name}"
    for key_id in vault.ids():
        record = vault.get(key_id)
        if record.kind is KeyKind.SIGNING and reference in record.signs:
            if record.state in (KeyState.COMPROMISED, KeyState.DESTROYED_COMPROMISED):
                raise IntegrityError(
                    f"run {run_name} was signed by {record.id}, which is marked "
                    "compromised; treat its reports as unverified."
                )
            return record
    raise IntegrityError(
        f"no signing key in the vault lists run {run_name}; it was not signed by "
        "this TRE's report-signing key."
    )

"""Key-wrapping keys that carry keys to TRE users (policy 4.2).

Each user has a 256-bit wrapping key (``wrap/<user>``), handed over once at
enrolment. A key that a user needs, such as the MAC key of a transfer
channel, is sent as a *package*: a JSON file that contains the key wrapped with
AES key wrap with padding (RFC 5649, through the cryptography package), the
ids of the key and of the wrapping key, and key check values of both.

The key check value (KCV) is the first 8 bytes of HMAC-SHA-256 keyed with
the key over a fixed label, in hex. It identifies a key without revealing
it, so the user's side can tell "wrong wrapping key" apart from "damaged
package" before unwrapping.

Each distribution is recorded in the wrapping key's record (to whom, when,
which key, under which wrapping key, which package) and in the audit log,
and the wrapping key's ``protects`` list names every key it wrapped.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from trekeys.errors import CredentialError, IntegrityError, RecordError
from trekeys.lab import Lab
from trekeys.outputs import staged_output
from trekeys.records import KeyKind, KeyRecord, KeyState, utcnow
from trekeys.succession import next_key_id, retire_key
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

PACKAGE_FORMAT = "trekeys-wrapped-key/1"
ALGORITHM = "AES-256 key wrap with padding (RFC 5649)"
WRAPPING_KEY_BYTES = 32
WRAPPING_CRYPTOPERIOD_DAYS = 365
_KCV_LABEL = b"trekeys key check value"


def key_check_value(material: bytes) -> str:
    """Return a 16-hex-digit identifier of a symmetric key that does not reveal it."""
    return hmac.new(material, _KCV_LABEL, hashlib.sha256).hexdigest()[:16]


def distribution_dir(lab: Lab, user: str) -> Path:
    """Return the folder where the lab keeps the packages sent to `user`."""
    return lab.root / "distribution" / user


def create_wrapping_key(
    vault: Vault, user: str, *, key_id: str | None = None
) -> KeyRecord:
    """Create a user's 256-bit wrapping key in the vault."""
    material = secrets.token_bytes(WRAPPING_KEY_BYTES)
    record = KeyRecord(
        id=key_id or f"wrap/{user}",
        kind=KeyKind.WRAPPING,
        purpose=f"Wraps keys distributed to {user} (policy 4.2).",
        owner=f"user:{user}",
        state=KeyState.ACTIVE,
        cryptoperiod_days=WRAPPING_CRYPTOPERIOD_DAYS,
        fingerprint=key_check_value(material),
        algorithm=ALGORITHM,
        strength_bits=256,
        locations=["vault", f"key store of {user}"],
        attributes={"user": user, "distributions": "[]"},
    )
    record.activated = record.created
    vault.add(record, material)
    return record


def find_wrapping_key(vault: Vault, user: str) -> KeyRecord:
    """Return the active wrapping key of `user`.

    Raises:
        RecordError: the user has none.
    """
    for record in vault.find(kind=KeyKind.WRAPPING.value, owner=f"user:{user}"):
        if record.state is KeyState.ACTIVE:
            return record
    raise RecordError(
        f"user {user} has no active wrapping key; create one with "
        f"'trekeys wrap create-key {user}'."
    )


def wrap_key(
    lab: Lab,
    vault: Vault,
    key_id: str,
    user: str,
    dest: Path | None = None,
    *,
    wrapping_key_id: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Wrap the key `key_id` for `user`, write the package and record the distribution.

    Args:
        key_id: the key to send.
        user: the recipient.
        dest: the package file to write (mode 0600); by default a file in the
            user's folder of `distribution_dir`.
        wrapping_key_id: the wrapping key; the user's active one by default.
        overwrite: replace `dest` if it exists.

    Raises:
        RecordError: the key is a tombstone or the user has no wrapping key.
        DestinationExistsError: `dest` exists and `overwrite` is false.
    """
    wrapping = (
        vault.get(wrapping_key_id)
        if wrapping_key_id
        else find_wrapping_key(vault, user)
    )
    if wrapping.state is not KeyState.ACTIVE:
        raise RecordError(
            f"wrapping key {wrapping.id} is {wrapping.state.value}; wrap with the "
            f"user's active wrapping key instead."
        )
    reason = f"wrap for user:{user} under {wrapping.id}"
    material = vault.read_secret(key_id, reason)
    kek = vault.read_secret(wrapping.id, reason)

    package = {
        "format": PACKAGE_FORMAT,
        "algorithm": ALGORITHM,
        "key_id": key_id,
        "key_kcv": key_check_value(material),
        "user": user,
        "wrapping_key_id": wrapping.id,
        "wrapping_kcv": key_check_value(kek),
        "created": utcnow().isoformat(),
        "wrapped": base64.b64encode(aes_key_wrap_with_padding(kek, material)).decode(),
    }
    dest = Path(dest) if dest else package_path(lab, key_id, wrapping.id, user)
    with staged_output(dest, overwrite=overwrite) as out:
        out.write(json.dumps(package, indent=2).encode("utf-8") + b"\n")

    _record_distribution(vault, wrapping, package, _reference(lab, dest))
    logger.info("wrapped key %s for %s under %s", key_id, user, wrapping.id)
    return dest


def read_package(path: Path) -> dict[str, Any]:
    """Return a wrapped-key package.

    Raises:
        IntegrityError: the file is not a trekeys package.
    """
    try:
        package = json.loads(Path(path).read_text(encoding="utf-8"))
        if package.get("format") != PACKAGE_FORMAT:
            raise ValueError(package.get("format"))
        base64.b64decode(package["wrapped"], validate=True)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise IntegrityError(
            f"{path} is not a trekeys wrapped-key package ({PACKAGE_FORMAT}); "
            "ask the key manager to send it again."
        ) from exc
    return dict(package)


def unwrap_package(path: Path, wrapping_key: bytes) -> bytes:
    """Unwrap a package with the user's wrapping key, as the user's side does.

    Raises:
        CredentialError: `wrapping_key` is not the key the package was wrapped with.
        IntegrityError: the package was changed after wrapping.
    """
    package = read_package(path)
    if key_check_value(wrapping_key) != package["wrapping_kcv"]:
        raise CredentialError(
            f"the wrapping key does not unwrap {path}; it was wrapped under "
            f"{package['wrapping_key_id']}, so use that wrapping key."
        )
    try:
        material = aes_key_unwrap_with_padding(
            wrapping_key, base64.b64decode(package["wrapped"])
        )
    except (InvalidUnwrap, ValueError) as exc:
        raise IntegrityError(
            f"{path} fails the RFC 5649 integrity check: the package was changed "
            "after wrapping; ask the key manager to send it again."
        ) from exc
    if key_check_value(material) != package["key_kcv"]:
        raise IntegrityError(
            f"{path} unwraps to a key whose check value differs from "
            f"{package['key_id']}; ask the key manager to send it again."
        )
    return material


def unwrap_to_file(
    package_path: Path, wrapping_key_file: Path, dest: Path, *, overwrite: bool = False
) -> Path:
    """Unwrap a package on the user's side into a new 0600 key file."""
    material = unwrap_package(package_path, Path(wrapping_key_file).read_bytes())
    with staged_output(Path(dest), overwrite=overwrite) as out:
        out.write(material)
    return Path(dest)


def export_wrapping_key(
    vault: Vault, user: str, dest: Path, *, overwrite: bool = False
) -> Path:
    """Write a user's wrapping key to a new 0600 file, for the handover at enrolment."""
    record = find_wrapping_key(vault, user)
    material = vault.read_secret(record.id, f"handover to user:{user}")
    with staged_output(Path(dest), overwrite=overwrite) as out:
        out.write(material)
    vault.record_operation("export", record.id, "success", f"handover to user:{user}")
    return Path(dest)


def verify_package(vault: Vault, path: Path) -> dict[str, Any]:
    """Check on the key manager's side that a package unwraps to the vault's key.

    Returns:
        A row naming the package, the key, the user and the wrapping key.

    Raises:
        CredentialError: the package names a wrapping key that does not open it.
        IntegrityError: the package was changed, or unwraps to another key.
    """
    package = read_package(path)
    reason = f"verify package {Path(path).name}"
    kek = vault.read_secret(package["wrapping_key_id"], reason)
    material = unwrap_package(path, kek)
    expected = vault.read_secret(package["key_id"], reason)
    if not hmac.compare_digest(material, expected):
        raise IntegrityError(
            f"{path} unwraps to a key other than {package['key_id']} in the vault; "
            "the key was replaced since: send a new package."
        )
    return {
        "package": Path(path).name,
        "key": package["key_id"],
        "user": package["user"],
        "wrapping key": package["wrapping_key_id"],
        "unwraps": True,
    }


def list_distributions(vault: Vault, user: str | None = None) -> list[dict[str, str]]:
    """Return every recorded distribution, oldest first, optionally for one user."""
    rows = []
    for record in vault.find(kind=KeyKind.WRAPPING.value):
        for row in json.loads(record.attributes.get("distributions", "[]")):
            if user is None or row["to"] == f"user:{user}":
                rows.append({**row, "wrapping key state": record.state.value})
    return sorted(rows, key=lambda r: r["at"])


def rotate_key(
    lab: Lab, vault: Vault, key_id: str, *, reason: str, compromised: bool
) -> list[str]:
    """Replace a wrapping key and send every key it carried again under the new one.

    Each new package is written beside the old one. Keys destroyed since are
    not sent again.

    Returns:
        The id of the new wrapping key.
    """
    old = vault.get(key_id)
    if old.kind is not KeyKind.WRAPPING:
        raise RecordError(
            f"key {key_id} is a {old.kind.value} key, not a wrapping key."
        )
    user = old.attributes["user"]
    new = create_wrapping_key(vault, user, key_id=next_key_id(vault, key_id))

    latest: dict[str, dict[str, str]] = {}
    for row in json.loads(old.attributes.get("distributions", "[]")):
        latest[row["key"]] = row
    for sent_key, row in latest.items():
        if sent_key not in vault or vault.get(sent_key).is_tombstone:
            continue
        old_package = _resolve(lab, row["package"])
        dest = old_package.with_name(f"{_slug(sent_key)}.{_slug(new.id)}.json")
        wrap_key(lab, vault, sent_key, user, dest, wrapping_key_id=new.id)

    retire_key(vault, key_id, reason=reason, compromised=compromised)
    logger.info("rotated wrapping key %s to %s", key_id, new.id)
    return [new.id]


def package_path(lab: Lab, key_id: str, wrapping_key_id: str, user: str) -> Path:
    """Return the lab's path for the package of `key_id` under a wrapping key."""
    return (
        distribution_dir(lab, user) / f"{_slug(key_id)}.{_slug(wrapping_key_id)}.json"
    )


def build_lab(lab: Lab, vault: Vault) -> None:
    """Give every demo user a wrapping key and send them their instance's import key."""
    for instance, users in lab.instances.items():
        for user in users:
            wrapping = create_wrapping_key(vault, user)
            channel_key = f"mac/{instance}-import"
            if channel_key in vault:
                wrap_key(lab, vault, channel_key, user, wrapping_key_id=wrapping.id)


def _record_distribution(
    vault: Vault, wrapping: KeyRecord, package: dict[str, Any], reference: str
) -> None:
    rows = json.loads(wrapping.attributes.get("distributions", "[]"))
    rows.append(
        {
            "to": f"user:{package['user']}",
            "at": package["created"],
            "key": package["key_id"],
            "wrapping_key": wrapping.id,
            "package": reference,
        }
    )
    wrapping.attributes["distributions"] = json.dumps(rows)
    protected = f"key:{package['key_id']}"
    if protected not in wrapping.protects:
        wrapping.protects.append(protected)
    vault.update(
        wrapping,
        operation="distribute",
        detail=f"{package['key_id']} to user:{package['user']} under {wrapping.id}",
    )


def _slug(key_id: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", key_id.lower()).strip("-")


def _reference(lab: Lab, path: Path) -> str:
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(lab.root))
    except ValueError:
        return str(resolved)


def _resolve(lab: Lab, reference: str) -> Path:
    path = Path(reference)
    return path if path.is_absolute() else lab.root / path

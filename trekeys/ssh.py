"""SSH key pairs of TRE users and hosts, their inventory and revocation.

Key pairs are Ed25519 in OpenSSH format, made with pyca/cryptography so that
no passphrase or private key passes through argv. The vault stores each
private key as the key's material and the public key as an attachment; the
record's fingerprint is the one ``ssh-keygen -l`` prints (SHA256, base64).

User public keys are backed up with the home folders (policy 4.4), so the
inventory reads ``.ssh/authorized_keys`` from the newest backup of each
instance: which key grants access to which account on which instance.
A revoked key is listed in an OpenSSH key revocation list (KRL) made with
``ssh-keygen -k``, marked in the vault, and dropped from authorized_keys
when a backup is restored.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trekeys import backup as backups
from trekeys import gpgkeys
from trekeys.errors import PolicyError, ToolError, ToolMissingError
from trekeys.lab import Lab
from trekeys.records import KeyKind, KeyRecord, KeyState, utcnow
from trekeys.restore import AuthorizedKeysFilter, read_backup_members
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

PUBLIC_KEY_ATTACHMENT = "id_ed25519.pub"
DEFAULT_CRYPTOPERIOD_DAYS = 365
AUTHORIZED_KEYS = ".ssh/authorized_keys"


@dataclass(frozen=True)
class AuthorizedKey:
    """One line of an authorized_keys file."""

    key_type: str
    blob: str
    comment: str
    options: str
    fingerprint: str

    @property
    def public_line(self) -> str:
        return f"{self.key_type} {self.blob} {self.comment}".strip()


def krl_path(lab: Lab) -> Path:
    """Return the TRE's OpenSSH key revocation list (sshd RevokedKeys)."""
    return lab.root / "ssh" / "revoked-keys.krl"


def ssh_keygen() -> str:
    """Return the path of ssh-keygen, or raise ToolMissingError."""
    found = shutil.which("ssh-keygen")
    if found is None:
        raise ToolMissingError("ssh-keygen", "openssh-client")
    return found


def fingerprint_of(key_type: str, blob_b64: str) -> str:
    """Return the SHA256 fingerprint of a public key, as ``ssh-keygen -l`` prints it."""
    blob = base64.b64decode(blob_b64)
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


# Creating key pairs


def create_ssh_key(
    vault: Vault,
    key_id: str,
    *,
    owner: str,
    protects: list[str],
    purpose: str,
    comment: str,
    role: str,
    attributes: dict[str, str] | None = None,
) -> KeyRecord:
    """Generate an Ed25519 key pair and store it in the vault, active.

    Returns:
        The record; its ``public_key`` attribute is the OpenSSH public line.
    """
    private = Ed25519PrivateKey.generate()
    private_text = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode("ascii")
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    key_type, blob = public.decode("ascii").split()
    public_line = f"{key_type} {blob} {comment}"

    record = KeyRecord(
        id=key_id,
        kind=KeyKind.SSH,
        purpose=purpose,
        owner=owner,
        cryptoperiod_days=DEFAULT_CRYPTOPERIOD_DAYS,
        fingerprint=fingerprint_of(key_type, blob),
        algorithm="ed25519",
        strength_bits=128,
        protects=protects,
        locations=["vault (private key)"],
        attributes={"ssh_role": role, "public_key": public_line, **(attributes or {})},
    )
    vault.add(
        record,
        private_text,
        attachments={PUBLIC_KEY_ATTACHMENT: (public_line + "\n").encode()},
    )
    vault.transition(key_id, KeyState.ACTIVE, f"SSH {role} key created")
    logger.info("created SSH key %s (%s)", key_id, record.fingerprint)
    return vault.get(key_id)


def create_user_key(
    lab: Lab, vault: Vault, instance: str, user: str, *, key_id: str | None = None
) -> KeyRecord:
    """Create a user's key pair and add its public key to their authorized_keys."""
    record = create_ssh_key(
        vault,
        key_id or f"ssh/{instance}/{user}",
        owner=f"user:{user}",
        protects=[f"account:{instance}/{user}"],
        purpose=f"SSH login of {user} to project instance {instance}.",
        comment=f"{user}@{instance}",
        role="user",
        attributes={"instance": instance, "user": user},
    )
    path = backups.home_dir(lab, instance) / user / AUTHORIZED_KEYS
    _rewrite_authorized_keys(path, add=record.attributes["public_key"])
    record.locations.append(f"authorized_keys of {user} on {instance} (public key)")
    vault.update(record, operation="deploy", detail=str(path))
    return record


def create_host_key(
    lab: Lab, vault: Vault, instance: str, *, key_id: str | None = None
) -> KeyRecord:
    """Create an instance's host key pair and install it in its ``etc/ssh``."""
    record = create_ssh_key(
        vault,
        key_id or f"ssh/{instance}/host",
        owner=f"instance:{instance}",
        protects=[f"host:{instance}"],
        purpose=f"SSH host key that proves project instance {instance} to users.",
        comment=f"root@{instance}",
        role="host",
        attributes={"instance": instance},
    )
    folder = lab.instance_dir(instance) / "etc" / "ssh"
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    secret = vault.read_secret(record.id, "install the host key on its instance")
    _write_private(folder / "ssh_host_ed25519_key", secret)
    (folder / "ssh_host_ed25519_key.pub").write_text(
        record.attributes["public_key"] + "\n", encoding="ascii"
    )
    record.locations.append(f"{folder.relative_to(lab.root)} on {instance}")
    vault.update(record, operation="deploy", detail=str(folder))
    return record


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _rewrite_authorized_keys(
    path: Path, *, add: str | None = None, remove: str | None = None
) -> None:
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    if remove is not None:
        lines = [line for line in lines if _fingerprint_of_line(line) != remove]
    if add is not None:
        lines.append(add)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
    os.replace(tmp, path)


# authorized_keys


def parse_authorized_keys(data: bytes) -> list[AuthorizedKey]:
    """Parse authorized_keys lines, skipping comments, blanks and bad lines."""
    keys = []
    for raw in data.decode("utf-8", errors="replace").splitlines():
        key = _parse_line(raw)
        if key is not None:
            keys.append(key)
    return keys


def _parse_line(raw: str) -> AuthorizedKey | None:
    line = raw.strip()
    if not line or line.startswith("#"):
        return None
    fields = line.split()
    # A line may start with options (sshd(8) AUTHORIZED_KEYS FILE FORMAT); the
    # key type is the first field that looks like one.
    for index, value in enumerate(fields[:-1]):
        if value.startswith(("ssh-", "ecdsa-", "sk-")):
            blob = fields[index + 1]
            try:
                fingerprint = fingerprint_of(value, blob)
            except (binascii.Error, ValueError):
                return None
            return AuthorizedKey(
                value,
                blob,
                " ".join(fields[index + 2 :]),
                " ".join(fields[:index]),
                fingerprint,
            )
    return None


def _fingerprint_of_line(line: str) -> str | None:
    key = _parse_line(line)
    return key.fingerprint if key else None


# Revocation


def revoked_fingerprints(lab: Lab) -> set[str]:
    """Return the fingerprints of the keys listed in the TRE's KRL."""
    krl = krl_path(lab)
    if not krl.exists():
        return set()
    result = _run_keygen(["-Q", "-l", "-f", str(krl)], "list the KRL")
    revoked = set()
    for line in result.splitlines():
        fields = line.split("#")[0].split()
        if len(fields) >= 2 and fields[0] == "hash:":
            revoked.add(fields[1])
        elif len(fields) >= 3 and fields[0] == "key:":
            revoked.add(fingerprint_of(fields[1], fields[2]))
    return revoked


def _run_keygen(arguments: list[str], action: str) -> str:
    result = subprocess.run(
        [ssh_keygen(), *arguments], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise ToolError(
            f"ssh-keygen failed to {action} (exit status {result.returncode}); see "
            "the error output attached to this exception.",
            tool="ssh-keygen",
            returncode=result.returncode,
            stderr_tail=result.stderr[-500:],
        )
    return result.stdout


def add_to_krl(lab: Lab, public_line: str) -> None:
    """List a public key in the TRE's KRL, writing a new file and renaming it."""
    krl = krl_path(lab)
    krl.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=krl.parent) as scratch:
        public = Path(scratch) / "revoked.pub"
        public.write_text(public_line + "\n", encoding="ascii")
        new = Path(scratch) / "new.krl"
        update = []
        if krl.exists():
            shutil.copy2(krl, new)
            update = ["-u"]
        _run_keygen(["-k", *update, "-f", str(new), str(public)], "update the KRL")
        os.replace(new, krl)


def revoke_ssh_key(
    lab: Lab, vault: Vault, key_id: str, *, reason: str, compromised: bool
) -> KeyRecord:
    """Revoke an SSH key: list it in the KRL and mark it in the vault.

    The key also leaves the live authorized_keys of its account, and every
    later restore drops it from the restored authorized_keys.
    """
    record = vault.get(key_id)
    if record.kind is not KeyKind.SSH:
        raise PolicyError(f"key {key_id} is a {record.kind.value} key, not SSH.")

    add_to_krl(lab, record.attributes["public_key"])
    record.attributes["revoked"] = utcnow().isoformat()
    record.attributes["revocation_reason"] = reason
    vault.update(record, operation="revoke", detail=f"listed in {krl_path(lab).name}")
    new_state = KeyState.COMPROMISED if compromised else KeyState.DEACTIVATED
    if record.state is not new_state:
        vault.transition(key_id, new_state, reason)

    instance, user = record.attributes.get("instance"), record.attributes.get("user")
    if instance and user:
        path = backups.home_dir(lab, instance) / user / AUTHORIZED_KEYS
        if path.exists():
            _rewrite_authorized_keys(path, remove=record.fingerprint)
    logger.info("revoked SSH key %s (%s)", key_id, record.fingerprint)
    return vault.get(key_id)


def revoked_keys_filter(lab: Lab) -> AuthorizedKeysFilter:
    """Return a restore filter that drops the keys in the KRL from authorized_keys."""
    revoked = revoked_fingerprints(lab)

    def drop(data: bytes) -> tuple[bytes, list[str]]:
        kept, removed = [], []
        for line in data.decode("utf-8", errors="replace").splitlines():
            fingerprint = _fingerprint_of_line(line)
            if fingerprint in revoked:
                removed.append(f"{fingerprint} ({line.split()[-1]})")
            else:
                kept.append(line)
        return "".join(line + "\n" for line in kept).encode(), removed

    return drop


def rotate_ssh_key(
    lab: Lab, vault: Vault, key_id: str, *, reason: str, compromised: bool
) -> list[str]:
    """Revoke an SSH key and replace it with a new one for the same account or host.

    Returns:
        The id of the new key.
    """
    record = revoke_ssh_key(lab, vault, key_id, reason=reason, compromised=compromised)
    new_id = next_key_id(vault, key_id)
    instance = record.attributes["instance"]
    if record.attributes.get("ssh_role") == "host":
        new = create_host_key(lab, vault, instance, key_id=new_id)
    else:
        user = record.attributes["user"]
        new = create_user_key(lab, vault, instance, user, key_id=new_id)
    new.attributes["replaces"] = key_id
    vault.update(new, operation="rotate", detail=f"replaces {key_id}: {reason}")
    record = vault.get(key_id)
    record.attributes["replaced_by"] = new_id
    vault.update(record, operation="rotate", detail=f"replaced by {new_id}")
    return [new_id]


def next_key_id(vault: Vault, key_id: str) -> str:
    """Return the id for the successor of `key_id`: ``<base>.2``, ``<base>.3``, ..."""
    base, _, suffix = key_id.rpartition(".")
    if not base or not suffix.isdigit():
        base = key_id
    number = 2
    while f"{base}.{number}" in vault:
        number += 1
    return f"{base}.{number}"


# Inventory


@dataclass
class AccessEntry:
    """One key that grants access to one account, as found in a backup."""

    instance: str
    account: str
    fingerprint: str
    comment: str
    key_id: str
    state: str
    revoked: bool
    backup: str


def build_access_inventory(
    lab: Lab, vault: Vault, *, key_id: str = gpgkeys.ADMIN_KEY_ID
) -> list[AccessEntry]:
    """List the keys in authorized_keys of the newest backup of every instance.

    The backups are decrypted with `key_id` (the admin key by default) and
    only the authorized_keys members are read. A key that no vault record
    describes has the key id "unknown".
    """
    by_fingerprint = {r.fingerprint: r for r in vault.find(kind="ssh")}
    revoked = revoked_fingerprints(lab)
    entries = []
    for instance in lab.instances:
        if not backups.list_backups(lab, instance):
            continue
        latest = backups.find_backup(lab, instance)
        members = read_backup_members(
            lab,
            vault,
            latest,
            key_id=key_id,
            wanted=lambda name: name.endswith("/" + AUTHORIZED_KEYS),
        )
        for name, data in sorted(members.items()):
            account = PurePosixPath(name).parts[0]
            for key in parse_authorized_keys(data):
                record = by_fingerprint.get(key.fingerprint)
                entries.append(
                    AccessEntry(
                        instance=instance,
                        account=account,
                        fingerprint=key.fingerprint,
                        comment=key.comment,
                        key_id=record.id if record else "unknown",
                        state=record.state.value if record else "",
                        revoked=key.fingerprint in revoked,
                        backup=latest.name,
                    )
                )
    return entries


# The demo TRE


def build_lab(lab: Lab, vault: Vault) -> None:
    """Give every instance a host key and every user a home folder and SSH key.

    The first user also gets an old-laptop key, which `trekeys.backup:build_lab`
    revokes between the two backups of that instance.
    """
    from trekeys.ssh_revocation import create_demo_key

    for instance, users in lab.instances.items():
        create_host_key(lab, vault, instance)
        for user in users:
            backups.create_demo_home(lab, instance, user)
            create_user_key(lab, vault, instance, user)
    create_demo_key(lab, vault)

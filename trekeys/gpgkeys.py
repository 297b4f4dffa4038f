"""GnuPG keys of the home-directory backups and the keyrings that hold them.

Every backup is encrypted to three keys (policy 4.1.4): the project instance's
key, the TRE admin key and the TRE admin offline key. Each secret key lives in
its own GnuPG home: ``keyrings/admin`` and ``keyrings/instance-<name>`` under
the lab root, and ``offline-media/gnupg`` for the offline key, which stands for
a machine that is never networked. Only public keys reach the networked
keyring ``keyrings/public`` that backups are encrypted with. The vault keeps
each key's passphrase as its material and its passphrase-protected secret key
export, public key and revocation certificate as attachments.

Every passphrase reaches gpg through python-gnupg's stdin or a pipe file
descriptor (`passphrase_fd`), never through argv.
"""

from __future__ import annotations

import logging
import secrets
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import gnupg

from trekeys.errors import RecordError
from trekeys.gpgtool import (
    gpg_binary,
    gpg_command,
    gpg_for,
    open_home,
    passphrase_fd,
    raise_for_gpg,
    stop_agent,
)
from trekeys.gpgtool import widen_pipe as widen_pipe
from trekeys.lab import Lab
from trekeys.records import KeyKind, KeyRecord, KeyState, utcnow
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

ROLE_ADMIN = "admin"
ROLE_OFFLINE = "admin-offline"
ROLE_INSTANCE = "instance"

ADMIN_KEY_ID = "gpg/admin"
OFFLINE_KEY_ID = "gpg/admin-offline"

PUBLIC_KEY_ATTACHMENT = "public-key.asc"
SECRET_KEY_ATTACHMENT = "secret-key.asc"
REVOCATION_ATTACHMENT = "revocation-certificate.asc"
ISSUED_REVOCATION_ATTACHMENT = "revocation-issued.asc"

DEFAULT_EXPIRE_DAYS = 730
FAST_S2K_COUNT = 65536


@dataclass(frozen=True)
class KeyAlgorithm:
    """A primary key and encryption subkey type that GnuPG can generate."""

    name: str
    key_type: str
    key_param: str
    subkey_type: str
    subkey_param: str
    strength_bits: int


# Ed25519 with a Curve25519 encryption subkey is fast to generate (tests and the
# demo TRE) and gives 128-bit strength (NIST SP 800-57 Table 2), as RSA-3072 does.
ALGORITHMS = {
    "ed25519": KeyAlgorithm(
        "ed25519/cv25519", "EDDSA", "ed25519", "ECDH", "cv25519", 128
    ),
    "rsa3072": KeyAlgorithm("rsa3072/rsa3072", "RSA", "3072", "RSA", "3072", 128),
}
DEFAULT_ALGORITHM = "ed25519"


# Where keyrings live


def public_home(lab: Lab) -> Path:
    """Return the networked keyring that contains the public keys of all recipients."""
    return lab.root / "keyrings" / "public"


def admin_home(lab: Lab) -> Path:
    """Return the GnuPG home of the TRE admin key."""
    return lab.root / "keyrings" / "admin"


def instance_home(lab: Lab, instance: str) -> Path:
    """Return the GnuPG home of a project instance's key."""
    return lab.root / "keyrings" / f"instance-{instance}"


def offline_home(lab: Lab) -> Path:
    """Return the GnuPG home on the offline media, which is the offline machine."""
    return lab.offline_media / "gnupg"


def home_of(lab: Lab, record: KeyRecord) -> Path:
    """Return the GnuPG home that contains the secret key of `record`."""
    relative = record.attributes.get("gnupghome")
    if not relative:
        raise RecordError(f"key {record.id} names no GnuPG home; it is not a GPG key.")
    return lab.root / relative


# Creating keys


def create_gpg_key(
    lab: Lab,
    vault: Vault,
    key_id: str,
    *,
    role: str,
    home: Path,
    owner: str,
    purpose: str,
    custodian: str = "TRE System Administrators",
    instance: str = "",
    expire_days: int = DEFAULT_EXPIRE_DAYS,
    algorithm: str = DEFAULT_ALGORITHM,
) -> KeyRecord:
    """Create a GPG key in `home`, publish its public key and record it in the vault.

    Args:
        role: ``admin``, ``admin-offline`` or ``instance``.
        home: the GnuPG home that keeps the secret key; created when missing.
        owner: the record owner, such as ``instance:alpha`` or ``tre``.
        expire_days: validity of the key; also its cryptoperiod.
        algorithm: a name in `ALGORITHMS`.

    Returns:
        The new record, active.

    Raises:
        RecordError: `key_id` exists or `algorithm` is unknown.
        AgentError, ToolError: gpg failed.
    """
    if key_id in vault:
        raise RecordError(f"key {key_id} already exists; rotate it instead.")
    if algorithm not in ALGORITHMS:
        raise RecordError(
            f"unknown GPG key algorithm {algorithm!r}; use one of "
            f"{', '.join(ALGORITHMS)}."
        )
    spec = ALGORITHMS[algorithm]
    home = open_home(home, key_id=key_id, create=True)
    protection = _configure_protection(home, fast=lab.fast_kdf)

    passphrase = secrets.token_urlsafe(32)
    fingerprint = _generate(home, key_id, spec, passphrase, expire_days)
    gpg = gpg_for(home, key_id=key_id)
    public = gpg.export_keys(fingerprint, armor=True)
    secret = gpg.export_keys(
        fingerprint, secret=True, armor=True, passphrase=passphrase
    )
    if not secret:
        raise_for_gpg(f"export the secret key of {key_id}", "", None, home)
    revocation = _premade_revocation(home, fingerprint)
    import_public_key(public_home(lab), public, key_id=key_id)

    record = KeyRecord(
        id=key_id,
        kind=KeyKind.GPG,
        purpose=purpose,
        owner=owner,
        custodian=custodian,
        expires=utcnow() + timedelta(days=expire_days),
        cryptoperiod_days=expire_days,
        fingerprint=fingerprint,
        algorithm=spec.name,
        strength_bits=spec.strength_bits,
        locations=[
            f"GnuPG home {home.relative_to(lab.root)} (secret key)",
            "vault (passphrase-protected secret key export)",
            f"GnuPG home {public_home(lab).relative_to(lab.root)} (public key)",
        ],
        attributes={
            "gpg_role": role,
            "gnupghome": str(home.relative_to(lab.root)),
            "instance": instance,
            "secret_key_protection": protection,
        },
    )
    vault.add(
        record,
        passphrase,
        attachments={
            PUBLIC_KEY_ATTACHMENT: public.encode("ascii"),
            SECRET_KEY_ATTACHMENT: secret.encode("ascii"),
            REVOCATION_ATTACHMENT: revocation,
        },
    )
    vault.transition(key_id, KeyState.ACTIVE, "created for home-directory backups")
    logger.info("created GPG key %s (%s, %s)", key_id, fingerprint, spec.name)
    return vault.get(key_id)


def _configure_protection(home: Path, *, fast: bool) -> str:
    # gpg-agent calibrates the S2K iteration count of protected secret keys,
    # which took 2 to 4 seconds per key on a loaded 2-core test machine. The demo
    # TRE and tests use the lowest count that OpenPGP allows instead.
    config = home / "gpg-agent.conf"
    if fast and not config.exists():
        config.write_text(f"s2k-count {FAST_S2K_COUNT}\n", encoding="utf-8")
    if fast or "s2k-count" in (config.read_text() if config.exists() else ""):
        return f"test-strength S2K, {FAST_S2K_COUNT} iterations (demo only)"
    return "gpg-agent default S2K, calibrated to about 100 ms"


def _generate(
    home: Path, key_id: str, spec: KeyAlgorithm, passphrase: str, expire_days: int
) -> str:
    gpg = gpg_for(home, key_id=key_id)
    primary = "Key-Curve" if spec.key_type == "EDDSA" else "Key-Length"
    sub = "Subkey-Curve" if spec.subkey_type == "ECDH" else "Subkey-Length"
    batch = "\n".join(
        [
            f"Key-Type: {spec.key_type}",
            f"{primary}: {spec.key_param}",
            "Key-Usage: sign",
            f"Subkey-Type: {spec.subkey_type}",
            f"{sub}: {spec.subkey_param}",
            "Subkey-Usage: encrypt",
            f"Name-Real: trekeys {key_id}",
            "Name-Email: " + key_id.replace("/", "-") + "@tre.internal",
            f"Expire-Date: {expire_days}d",
            f"Passphrase: {passphrase}",
            "%commit",
            "",
        ]
    )
    result = gpg.gen_key(batch)
    if not result.fingerprint:
        raise_for_gpg(f"create key {key_id}", result.stderr or "", None, home)
    return str(result.fingerprint)


def _premade_revocation(home: Path, fingerprint: str) -> bytes:
    # gpg writes a revocation certificate at key creation, with a ':' before
    # the armor line so that an accidental import does not revoke the key.
    path = home / "openpgp-revocs.d" / f"{fingerprint}.rev"
    text = path.read_text(encoding="ascii")
    return text.replace(
        ":-----BEGIN PGP PUBLIC KEY BLOCK", "-----BEGIN PGP PUBLIC KEY BLOCK"
    ).encode("ascii")


def import_public_key(home: Path, armored: str | bytes, *, key_id: str = "") -> None:
    """Import a public key or revocation certificate into `home`, creating it.

    Raises:
        ToolError: gpg imported nothing.
    """
    home = open_home(home, key_id=key_id, create=True)
    gpg = gnupg.GPG(gnupghome=str(home), gpgbinary=gpg_binary())
    data = armored.decode("ascii") if isinstance(armored, bytes) else armored
    result = gpg.import_keys(data)
    stop_agent(home)
    if result.returncode != 0 or not result.count or result.not_imported:
        raise_for_gpg(f"import a key for {key_id}", result.stderr or "", None, home)


# Inspecting recipients


@dataclass(frozen=True)
class KeyStatus:
    """The state of one key in the public keyring.

    Attributes:
        fingerprint: the primary key fingerprint.
        problem: why the key cannot encrypt, or "" when it can.
        encryption_subkey: fingerprint of the newest usable encryption subkey.
        expires: the primary key's expiry, or None.
    """

    fingerprint: str
    problem: str
    encryption_subkey: str
    expires: datetime | None


def inspect_public_key(home: Path, fingerprint: str) -> KeyStatus:
    """Check that a key in `home` can be a recipient: present, valid, can encrypt."""
    gpg = gpg_for(home)
    listed = [
        k for k in gpg.list_keys(keys=[fingerprint]) if k["fingerprint"] == fingerprint
    ]
    if not listed:
        return KeyStatus(fingerprint, "missing from the public keyring", "", None)
    key = listed[0]
    now = datetime.now(UTC)
    expires = _timestamp(key.get("expires", ""))
    if key.get("trust") == "r":
        return KeyStatus(fingerprint, "revoked", "", expires)
    if key.get("trust") == "e" or (expires is not None and expires <= now):
        return KeyStatus(fingerprint, "expired", "", expires)

    usable = []
    for info in key.get("subkey_info", {}).values():
        sub_expires = _timestamp(info.get("expires", ""))
        if "e" not in info.get("cap", "") or info.get("trust") in ("r", "e", "i", "d"):
            continue
        if sub_expires is not None and sub_expires <= now:
            continue
        usable.append((int(info.get("date") or 0), info["fingerprint"]))
    if not usable:
        return KeyStatus(fingerprint, "without a usable encryption subkey", "", expires)
    return KeyStatus(fingerprint, "", max(usable)[1], expires)


def _timestamp(value: str) -> datetime | None:
    return datetime.fromtimestamp(int(value), UTC) if value else None


def read_passphrase(vault: Vault, key_id: str, reason: str) -> str:
    """Return the passphrase of a GPG key from the vault, logging the read."""
    return vault.read_secret(key_id, reason).decode("utf-8")


# Revocation


def issue_revocation(
    lab: Lab, vault: Vault, key_id: str, reason: str, *, compromised: bool
) -> bytes:
    """Generate a revocation certificate, import it and store it in the vault.

    The certificate is made in the key's own GnuPG home with the reason code
    "key has been compromised" or "key is no longer used" (RFC 4880 5.2.3.23).
    When that home is gone, the certificate made at key creation is used. Both
    the public keyring and the key's home import it, so gpg refuses the key
    as a recipient from then on.

    Returns:
        The armored certificate.
    """
    record = vault.get(key_id)
    home = home_of(lab, record)
    if home.is_dir():
        certificate = _generate_revocation(vault, record, home, reason, compromised)
    else:
        logger.warning("GnuPG home %s is missing; using the premade certificate", home)
        certificate = vault.read_attachment(key_id, REVOCATION_ATTACHMENT)

    import_public_key(public_home(lab), certificate, key_id=key_id)
    if home.is_dir():
        import_public_key(home, certificate, key_id=key_id)
    vault.add_attachment(key_id, ISSUED_REVOCATION_ATTACHMENT, certificate)
    vault.record_operation("revoke", key_id, "success", reason)
    logger.info("revoked GPG key %s (%s)", key_id, record.fingerprint)
    return certificate


def _generate_revocation(
    vault: Vault, record: KeyRecord, home: Path, reason: str, compromised: bool
) -> bytes:
    open_home(home, key_id=record.id)
    code = "1" if compromised else "3"
    # Answers to gpg's prompts: confirm, reason code, one text line, an empty
    # line that ends the text, confirm again.
    text = " ".join(reason.split())[:200]
    answers = f"y\n{code}\n{text}\n\ny\n".encode()
    passphrase = read_passphrase(vault, record.id, "issue a revocation certificate")
    with passphrase_fd(passphrase) as fd:
        command = gpg_command(
            home,
            "--command-fd",
            "0",
            "--pinentry-mode",
            "loopback",
            "--passphrase-fd",
            str(fd),
            "--armor",
            "--output",
            "-",
            "--gen-revoke",
            record.fingerprint,
        )
        # --gen-revoke refuses --batch, so the prompts are answered on stdin.
        command.remove("--batch")
        result = subprocess.run(
            command, input=answers, capture_output=True, pass_fds=(fd,), check=False
        )
    if result.returncode != 0 or b"BEGIN PGP" not in result.stdout:
        raise_for_gpg(
            f"revoke key {record.id}",
            result.stderr.decode(errors="replace"),
            result.returncode,
            home,
        )
    return result.stdout


# The demo TRE's keys


def create_backup_keys(
    lab: Lab, vault: Vault, *, algorithm: str = DEFAULT_ALGORITHM
) -> list[str]:
    """Create the admin key, the offline admin key and one key per instance.

    Returns:
        The new key ids.
    """
    created = [
        create_gpg_key(
            lab,
            vault,
            ADMIN_KEY_ID,
            role=ROLE_ADMIN,
            home=admin_home(lab),
            owner="tre",
            purpose="TRE admin key: one of three recipients of every home backup.",
            algorithm=algorithm,
        ).id,
        create_gpg_key(
            lab,
            vault,
            OFFLINE_KEY_ID,
            role=ROLE_OFFLINE,
            home=offline_home(lab),
            owner="tre",
            custodian="Information Security Manager",
            purpose="TRE admin offline key, never on a networked machine: the "
            "recipient of every home backup that cannot have been compromised.",
            algorithm=algorithm,
        ).id,
    ]
    for instance in lab.instances:
        created.append(
            create_instance_key(lab, vault, instance, algorithm=algorithm).id
        )
    for home in [admin_home(lab), offline_home(lab), public_home(lab)]:
        stop_agent(home)
    return created


def create_instance_key(
    lab: Lab,
    vault: Vault,
    instance: str,
    *,
    key_id: str | None = None,
    algorithm: str = DEFAULT_ALGORITHM,
) -> KeyRecord:
    """Create the backup key of a project instance in its own GnuPG home."""
    record = create_gpg_key(
        lab,
        vault,
        key_id or f"gpg/instance-{instance}",
        role=ROLE_INSTANCE,
        home=instance_home(lab, instance),
        owner=f"instance:{instance}",
        instance=instance,
        purpose=f"Backup key of project instance {instance}: one of three "
        "recipients of its home backups.",
        algorithm=algorithm,
    )
    stop_agent(instance_home(lab, instance))
    return record

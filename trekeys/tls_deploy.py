"""Writing a certificate chain and its private key where a web server reads them.

A deployment is two files: the chain (service certificate first, then the CA
certificate, as nginx's ``ssl_certificate`` and Apache's ``SSLCertificateFile``
expect) and the private key, mode 0600. Both are written to temporary names
in their target folders, flushed to disk, and only then renamed into place.
When either rename fails, the files that were there before are put back, so
a web server never reads a new chain with an old key or a half-written file.

Every deployment is recorded on the key's record (paths and the certificate's
fingerprint) and in its locations, because the deployed key file is a copy of
the key material outside the vault.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from trekeys.errors import DeploymentError, DestinationExistsError, PolicyError
from trekeys.records import KeyKind, KeyRecord, KeyState, utcnow
from trekeys.tls_records import (
    SELF_SIGNED,
    json_attribute,
    load_record_certificate,
    path_for_record,
    path_from_record,
    require_tls_record,
    set_json_attribute,
)
from trekeys.tls_x509 import certificate_pem, check_key_matches, load_private_key
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

CHAIN_FILE = "fullchain.pem"
KEY_FILE = "privkey.pem"
CHAIN_MODE = 0o644
KEY_MODE = 0o600


@dataclass(frozen=True)
class DeployTarget:
    """The two paths of one deployment."""

    chain_path: Path
    key_path: Path

    @classmethod
    def in_folder(cls, folder: Path) -> DeployTarget:
        """Return the usual file names inside `folder`."""
        return cls(Path(folder) / CHAIN_FILE, Path(folder) / KEY_FILE)


def write_deployment(
    target: DeployTarget,
    chain_pem: bytes,
    key_pem: bytes,
    *,
    replace: bool,
) -> None:
    """Write the chain and key to `target` atomically, the key with mode 0600.

    Args:
        target: the chain and key paths.
        chain_pem: the PEM chain, service certificate first.
        key_pem: the PEM private key.
        replace: whether existing files at the paths may be replaced.

    Raises:
        DeploymentError: a folder does not exist or is not writable.
        DestinationExistsError: a file exists and `replace` is False.
    """
    files = [
        (target.chain_path, chain_pem, CHAIN_MODE),
        (target.key_path, key_pem, KEY_MODE),
    ]
    for path, _, _ in files:
        _check_folder(path.parent)
        if path.exists() and not replace:
            raise DestinationExistsError(path)

    with _staged(files) as staged:
        _swap_in(staged)
    for folder in {path.parent for path, _, _ in files}:
        _fsync_dir(folder)
    logger.info("deployed %s and %s", target.chain_path, target.key_path)


def check_targets(targets: Sequence[DeployTarget]) -> None:
    """Check that every folder of `targets` exists, before a renewal changes keys.

    Raises:
        DeploymentError: a folder does not exist.
    """
    for target in targets:
        _check_folder(target.chain_path.parent)
        _check_folder(target.key_path.parent)


def remove_deployment(target: DeployTarget) -> list[Path]:
    """Remove the files of a deployment that still exist and return their paths."""
    removed = []
    for path in (target.chain_path, target.key_path):
        if path.exists():
            path.unlink()
            removed.append(path)
    logger.info("removed deployment files %s", ", ".join(map(str, removed)) or "none")
    return removed


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise DeploymentError(
            f"deploy folder {folder} does not exist or is not a folder; create it "
            "(the web server must be able to read it) and deploy again."
        )


@contextlib.contextmanager
def _staged(
    files: list[tuple[Path, bytes, int]],
) -> Iterator[list[tuple[Path, Path]]]:
    """Write every file to a temporary name beside its target; remove leftovers."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            _write_new_file(tmp, data, mode, folder=path.parent)
            staged.append((tmp, path))
        yield staged
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def _write_new_file(tmp: Path, data: bytes, mode: int, *, folder: Path) -> None:
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:
        raise DeploymentError(
            f"deploy folder {folder} is not writable ({exc.strerror}); fix its "
            "permissions or choose another folder, then deploy again."
        ) from exc
    try:
        # The process umask may have masked bits; set the exact mode.
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DeploymentError(
            f"writing to deploy folder {folder} failed ({exc.strerror}); check free "
            "space and permissions, then deploy again."
        ) from exc
    finally:
        os.close(fd)


def _swap_in(staged: list[tuple[Path, Path]]) -> None:
    """Rename each staged file over its target, undoing all of them on failure."""
    backups: dict[Path, Path | None] = {}
    try:
        for tmp, path in staged:
            backups[path] = _keep_old(path)
            os.replace(tmp, path)
    except OSError as exc:
        for path, backup in backups.items():
            _restore(path, backup)
        raise DeploymentError(
            f"replacing {path} failed ({exc.strerror}); the earlier files were put "
            "back, fix the folder's permissions and deploy again."
        ) from exc
    finally:
        for backup in backups.values():
            if backup is not None:
                backup.unlink(missing_ok=True)


def _keep_old(path: Path) -> Path | None:
    if not path.exists():
        return None
    backup = path.with_name(f".{path.name}.{os.getpid()}.old")
    backup.unlink(missing_ok=True)
    os.link(path, backup)
    return backup


def _restore(path: Path, backup: Path | None) -> None:
    if backup is None:
        path.unlink(missing_ok=True)
    else:
        os.replace(backup, path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def chain_pem(vault: Vault, key_id: str) -> bytes:
    """Return the PEM chain of a key: its certificate, then its CA's, if any."""
    record = vault.get(key_id)
    chain = certificate_pem(load_record_certificate(vault, key_id))
    issuer_id = record.attributes.get("issuer", SELF_SIGNED)
    if issuer_id != SELF_SIGNED:
        chain += certificate_pem(load_record_certificate(vault, issuer_id))
    return chain


def deploy_certificate(
    vault: Vault,
    key_id: str,
    destination: DeployTarget | Path,
    *,
    replace: bool = False,
) -> DeployTarget:
    """Write a key's chain and private key where a web server reads them.

    Args:
        vault: the open vault.
        key_id: an active tls-cert key.
        destination: a folder (``fullchain.pem`` and ``privkey.pem`` in it) or
            explicit paths.
        replace: replace files that are not an earlier deployment of this key.

    Raises:
        PolicyError: the key is not active, so its certificate must not be used.
        DeploymentError: a folder does not exist or is not writable.
        DestinationExistsError: a file exists there and `replace` is False.
    """
    record = require_tls_record(vault, key_id)
    if record.kind is not KeyKind.TLS_CERT or record.state is not KeyState.ACTIVE:
        raise PolicyError(
            f"{key_id} is a {record.state.value} {record.kind.value} key and may not "
            "be deployed; deploy the service's active key."
        )
    target = (
        destination
        if isinstance(destination, DeployTarget)
        else DeployTarget.in_folder(Path(destination))
    )
    target = DeployTarget(target.chain_path.resolve(), target.key_path.resolve())
    deployments = json_attribute(record, "deployments")
    stored = path_for_record(vault, target.chain_path)
    known = any(d["chain"] == stored for d in deployments)

    certificate = load_record_certificate(vault, key_id)
    key_pem = vault.read_secret(key_id, f"deploy to {target.key_path}")
    check_key_matches(
        certificate, load_private_key(key_pem, source=key_id), source=key_id
    )
    write_deployment(
        target, chain_pem(vault, key_id), key_pem, replace=replace or known
    )

    _record_deployment(vault, record, target, deployments)
    vault.update(record, operation="deploy", detail=str(target.chain_path))
    return target


def _record_deployment(
    vault: Vault,
    record: KeyRecord,
    target: DeployTarget,
    deployments: list[dict[str, str]],
) -> None:
    chain = path_for_record(vault, target.chain_path)
    key = path_for_record(vault, target.key_path)
    others = [d for d in deployments if d["chain"] != chain]
    others.append(
        {
            "chain": chain,
            "key": key,
            "fingerprint": record.fingerprint,
            "at": utcnow().isoformat(),
        }
    )
    set_json_attribute(record, "deployments", others)
    location = f"deployed: {key}"
    if location not in record.locations:
        record.locations.append(location)


def deployment_targets(vault: Vault, record: KeyRecord) -> list[DeployTarget]:
    """Return where a key's certificate is recorded as deployed."""
    return [
        DeployTarget(
            path_from_record(vault, d["chain"]), path_from_record(vault, d["key"])
        )
        for d in json_attribute(record, "deployments")
    ]


def undeploy_certificate(vault: Vault, key_id: str) -> list[Path]:
    """Remove every recorded deployment of a key's files; return what was removed."""
    record = require_tls_record(vault, key_id)
    removed: list[Path] = []
    for target in deployment_targets(vault, record):
        removed += remove_deployment(target)
    record.locations = [
        loc for loc in record.locations if not loc.startswith("deployed: ")
    ]
    set_json_attribute(record, "deployments", [])
    vault.update(record, operation="undeploy", detail=f"{len(removed)} files removed")
    return removed


def write_public_file(path: Path, data: bytes) -> None:
    """Write a public file (certificate or CRL) atomically, mode 0644."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.chmod(0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

"""Helpers for the TLS tests: loopback servers, clients and file snapshots."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from trekeys.tls_endpoints import Endpoint
from trekeys.vault import KdfSettings, Vault, VaultCredentials

CREDENTIALS = VaultCredentials(bytes(range(32)))


def create_template_vault(folder: Path) -> Path:
    """Create an empty vault once, so that tests can copy it instead of paying
    for a new KeePass file each time."""
    path = folder / "device" / "vault.kdbx"
    Vault.create(path, CREDENTIALS, kdf=KdfSettings.test()).close()
    return path


@contextlib.contextmanager
def copied_vault(template: Path, tmp_path: Path) -> Iterator[Vault]:
    """Open a private copy of the template vault and its audit log."""
    target = tmp_path / "device"
    shutil.copytree(template.parent, target)
    with Vault.open(target / template.name, CREDENTIALS) as vault:
        yield vault


def handshake(endpoint: Endpoint, cafile: Path, server_name: str) -> str:
    """Connect trusting only `cafile`, verify `server_name`, return the TLS version.

    Raises ssl.SSLCertVerificationError when the chain or the name fails.
    """
    context = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection((endpoint.host, endpoint.port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.recv(64)
            return str(tls.version())


@contextlib.contextmanager
def silent_server() -> Iterator[Endpoint]:
    """Listen on 127.0.0.1 and accept connections but never answer them."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            accepted.append(connection)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield Endpoint("127.0.0.1", listener.getsockname()[1], "silent.tre.internal")
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        listener.close()


@contextlib.contextmanager
def plain_text_server() -> Iterator[Endpoint]:
    """Listen on 127.0.0.1 and answer every connection with plain HTTP, no TLS."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\nplain text\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield Endpoint("127.0.0.1", listener.getsockname()[1], "plain.tre.internal")
    finally:
        stop.set()
        thread.join()
        listener.close()


def closed_port() -> Endpoint:
    """Return a 127.0.0.1 endpoint where nothing listens."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    return Endpoint("127.0.0.1", port, "closed.tre.internal")


@contextlib.contextmanager
def unwritable(folder: Path) -> Iterator[None]:
    """Make `folder` refuse new files, even for root (immutable attribute)."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o500)
        try:
            yield
        finally:
            folder.chmod(0o700)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Return every file under `folder` with its bytes, to prove nothing changed."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def vault_state(vault: Vault) -> dict[str, dict]:
    """Return every record with its attachment names, to prove nothing changed."""
    return {
        key_id: {
            **vault.get(key_id).to_dict(),
            "attachments": vault.attachment_names(key_id),
        }
        for key_id in vault.ids()
    }


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    """Run openssl with `args` and return the result without raising."""
    return subprocess.run(
        ["openssl", *args], capture_output=True, text=True, check=False
    )

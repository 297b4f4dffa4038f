"""Live TLS endpoints: fetch a server's certificate, verify it as a workstation
would, and serve a deployed certificate on the loopback interface for drills.

`fetch_certificate` connects without verification, only to read the leaf the
server presents, so the audit can report on a certificate that fails. The
verdict comes from `verify_endpoint`, a second handshake with Python's ssl
module that trusts only the given roots and checks the host name, as a TRE
workstation's browser does.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from trekeys.errors import CertificateError, EndpointError, PolicyError
from trekeys.records import KeyKind, KeyState
from trekeys.tls_deploy import deployment_targets
from trekeys.tls_records import service_of
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 3.0


@dataclass(frozen=True)
class Endpoint:
    """A live TLS endpoint and the service name it should present.

    Attributes:
        host: the address to connect to.
        port: the TCP port.
        service: the DNS name to send as SNI and to verify; the host by default.
    """

    host: str
    port: int
    service: str = ""

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse ``host:port`` or ``service@host:port`` (IPv6 hosts in brackets).

        Raises:
            EndpointError: the text has no valid port.
        """
        service, _, address = text.rpartition("@")
        host, _, port_text = address.rpartition(":")
        host = host.strip("[]")
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise EndpointError(
                f"endpoint {text!r} is not host:port or service@host:port; give it "
                "as portal.tre.internal@10.0.0.5:443.",
                endpoint=text,
                reason="invalid",
            )
        return cls(host, int(port_text), service or host)

    @property
    def address(self) -> str:
        """The endpoint as ``host:port``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def server_name(self) -> str:
        """The name sent as SNI and checked against the certificate."""
        return self.service or self.host


def fetch_certificate(
    endpoint: Endpoint, *, timeout: float = DEFAULT_TIMEOUT_SECONDS
) -> x509.Certificate:
    """Return the certificate that the endpoint presents, without verifying it.

    Raises:
        EndpointError: the connection is refused, times out, or the peer does
            not complete a TLS handshake.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with _connect(endpoint, context, timeout) as tls:
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise EndpointError(
            f"{endpoint.address} sent no certificate; check the server's TLS setup.",
            endpoint=endpoint.address,
            reason="no certificate",
        )
    return x509.load_der_x509_certificate(der)


def verify_endpoint(
    endpoint: Endpoint,
    trusted_roots_pem: bytes,
    *,
    server_name: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> tuple[bool, str]:
    """Handshake trusting only `trusted_roots_pem` and check the host name.

    Returns:
        Whether the chain and host name verified, and the TLS version or the
        verification error.

    Raises:
        EndpointError: the connection failed before verification.
    """
    context = ssl.create_default_context(cadata=trusted_roots_pem.decode("ascii"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    name = server_name or endpoint.server_name
    try:
        with _connect(endpoint, context, timeout, server_name=name) as tls:
            return True, str(tls.version())
    except EndpointError as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            return False, str(cause.verify_message)
        raise


@contextlib.contextmanager
def _connect(
    endpoint: Endpoint,
    context: ssl.SSLContext,
    timeout: float,
    *,
    server_name: str | None = None,
) -> Iterator[ssl.SSLSocket]:
    address = endpoint.address
    try:
        raw = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    except ConnectionRefusedError as exc:
        raise EndpointError(
            f"{address} refused the connection; check that the service runs.",
            endpoint=address,
            reason="refused",
        ) from exc
    except TimeoutError as exc:
        raise EndpointError(
            f"connecting to {address} timed out after {timeout:g} s; check the host "
            "and firewall.",
            endpoint=address,
            reason="timed out",
        ) from exc
    except OSError as exc:
        raise EndpointError(
            f"{address} is unreachable ({exc.strerror}); check the host name and "
            "network.",
            endpoint=address,
            reason="unreachable",
        ) from exc

    with raw:
        try:
            tls = context.wrap_socket(
                raw, server_hostname=server_name or endpoint.server_name
            )
        except TimeoutError as exc:
            raise EndpointError(
                f"the TLS handshake with {address} timed out after {timeout:g} s; "
                "check that the port serves TLS.",
                endpoint=address,
                reason="timed out",
            ) from exc
        except ssl.SSLCertVerificationError as exc:
            raise EndpointError(
                f"{address} presented a certificate that does not verify: "
                f"{exc.verify_message}.",
                endpoint=address,
                reason="not verified",
            ) from exc
        except (ssl.SSLError, ConnectionError) as exc:
            raise EndpointError(
                f"{address} does not speak TLS ({type(exc).__name__}); check the "
                "port number.",
                endpoint=address,
                reason="no TLS",
            ) from exc
        with tls:
            yield tls


@contextlib.contextmanager
def serve_tls(
    chain_path: Path, key_path: Path, *, host: str = "127.0.0.1", port: int = 0
) -> Iterator[Endpoint]:
    """Serve a deployed chain and key over TLS on a loopback address.

    The server sends a short HTTP response after every handshake, in a
    background thread, until the ``with`` block ends. It exists for drills and
    tests, so it refuses to listen on anything but a loopback address.

    Yields:
        The endpoint, with the port chosen by the kernel when `port` is 0.

    Raises:
        PolicyError: `host` is not a loopback address.
        CertificateError: the chain or key file cannot be read, or the key
            does not match the certificate.
    """
    if not ipaddress.ip_address(host).is_loopback:
        raise PolicyError(
            f"the drill server listens only on loopback addresses, not {host}; use "
            "127.0.0.1."
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(chain_path), str(key_path))
    except ssl.SSLError as exc:
        # OpenSSL reports a swapped certificate as KEY_VALUES_MISMATCH.
        problem = (
            f"{key_path.name} does not match it"
            if exc.reason == "KEY_VALUES_MISMATCH"
            else f"OpenSSL reports {exc.reason}"
        )
        raise CertificateError(
            f"cannot serve {chain_path}: {problem}; redeploy the service with "
            "trekeys tls deploy."
        ) from exc
    except OSError as exc:
        raise CertificateError(
            f"cannot serve {chain_path} with {key_path.name}: {exc.strerror}; "
            "redeploy the service with trekeys tls deploy."
        ) from exc

    listener = socket.create_server((host, port))
    listener.settimeout(0.2)
    stop = threading.Event()
    thread = threading.Thread(
        target=_accept_loop, args=(listener, context, stop), daemon=True
    )
    thread.start()
    endpoint = Endpoint(host, listener.getsockname()[1])
    logger.info("serving %s on %s", chain_path, endpoint.address)
    try:
        yield endpoint
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def _accept_loop(
    listener: socket.socket, context: ssl.SSLContext, stop: threading.Event
) -> None:
    while not stop.is_set():
        try:
            connection, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        with connection:
            connection.settimeout(2.0)
            try:
                with context.wrap_socket(connection, server_side=True) as tls:
                    tls.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
            except (ssl.SSLError, OSError) as exc:
                # A client that rejects the certificate aborts the handshake;
                # that is an expected outcome of a drill, not a server fault.
                logger.debug("drill server handshake ended: %s", exc)


@contextlib.contextmanager
def serve_deployments(vault: Vault) -> Iterator[list[Endpoint]]:
    """Serve each active service key's deployed files on 127.0.0.1 for a drill.

    A demo TRE has no running web servers, so the audit drill starts one
    loopback server per deployment and audits it as a live endpoint.

    A deployment whose key file does not match its chain file is left out
    and logged, because no server can start with it; the file audit reports
    that mismatch as a failure.

    Yields:
        One endpoint per deployment that could be served, named by its service.
    """
    with contextlib.ExitStack() as stack:
        endpoints = []
        records = vault.find(kind=KeyKind.TLS_CERT.value, state=KeyState.ACTIVE.value)
        for record in records:
            for target in deployment_targets(vault, record):
                if not (target.chain_path.exists() and target.key_path.exists()):
                    continue
                try:
                    served = stack.enter_context(
                        serve_tls(target.chain_path, target.key_path)
                    )
                except CertificateError as exc:
                    logger.warning("not serving %s: %s", record.id, exc)
                    continue
                endpoints.append(Endpoint(served.host, served.port, service_of(record)))
        yield endpoints

"""Certificate issuance speed: trekeys against `openssl req -x509`.

Both sides generate a new ECDSA P-256 key and a self-signed server certificate
with a subjectAltName, and write the key and certificate as PEM. openssl runs
once per certificate, as a shell script would call it, so its figure includes
process start-up. The vault is left out on both sides because its save time
does not depend on the certificate code.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.common import Ratio
from trekeys.records import utcnow
from trekeys.tls_names import parse_subject_names
from trekeys.tls_x509 import (
    build_service_certificate,
    certificate_pem,
    generate_private_key,
    private_key_pem,
)

QUICK_COUNT = 20
FULL_COUNT = 200
TARGET_RATIO = 0.5


def _issue_with_trekeys(folder: Path, count: int) -> float:
    names = parse_subject_names(["bench.tre.internal", "127.0.0.1"])
    started = time.perf_counter()
    for number in range(count):
        key = generate_private_key("ecdsa-p256")
        certificate = build_service_certificate(key, names, utcnow(), 365)
        (folder / f"t{number}.key").write_text(private_key_pem(key))
        (folder / f"t{number}.pem").write_bytes(certificate_pem(certificate))
    return count / (time.perf_counter() - started)


def _issue_with_openssl(folder: Path, count: int) -> float:
    started = time.perf_counter()
    for number in range(count):
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "365",
                "-subj",
                "/CN=bench.tre.internal",
                "-addext",
                "subjectAltName=DNS:bench.tre.internal,IP:127.0.0.1",
                "-keyout",
                str(folder / f"o{number}.key"),
                "-out",
                str(folder / f"o{number}.pem"),
            ],
            check=True,
            capture_output=True,
        )
    return count / (time.perf_counter() - started)


def measure(quick: bool) -> list[Ratio]:
    """Measure certificates issued per second by trekeys and by openssl."""
    count = int(os.environ.get("TREKEYS_BENCH_TLS_COUNT", 0)) or (
        QUICK_COUNT if quick else FULL_COUNT
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ours = _issue_with_trekeys(folder, count)
        theirs = _issue_with_openssl(folder, count)
    ratio = ours / theirs
    return [
        Ratio(
            name=f"self-signed P-256 certificates per second ({count})",
            measured=ours,
            reference=theirs,
            unit="cert/s",
            ratio=ratio,
            target=f"ratio >= {TARGET_RATIO}",
            passed=ratio >= TARGET_RATIO,
        )
    ]

"""The scan of reports for secrets, in every encoded form."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import nbformat
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)

from trekeys.lab import Lab
from trekeys.secretscan import Secret, collect_secrets, encoded_forms, scan_folder
from trekeys.signing import ensure_signing_key

MATERIAL = bytes(range(100, 132))


def notebook_printing(text: str, path: Path) -> None:
    cell = nbformat.v4.new_code_cell("print(value)")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text)]
    other = nbformat.v4.new_code_cell("x = 1")
    nbformat.write(nbformat.v4.new_notebook(cells=[other, cell]), path)


@pytest.mark.parametrize(
    ("form", "text"),
    [
        ("hex", MATERIAL.hex()),
        ("HEX", MATERIAL.hex().upper()),
        ("base64", base64.b64encode(MATERIAL).decode()),
        ("base64url unpadded", base64.urlsafe_b64encode(MATERIAL).decode().rstrip("=")),
        ("hex split over lines", MATERIAL.hex()[:30] + "\n" + MATERIAL.hex()[30:]),
    ],
)
def test_scan_finds_encoded_material(tmp_path: Path, form: str, text: str):
    notebook_printing(f"the key is {text}\n", tmp_path / "drill.ipynb")

    findings = scan_folder(tmp_path, [Secret("key test/k", encoded_forms(MATERIAL))])

    assert len(findings) == 1
    assert findings[0].file == "drill.ipynb"
    assert findings[0].location == "cell 1"
    assert findings[0].secret == "key test/k"
    assert text not in json.dumps([f.describe() for f in findings])


def test_scan_finds_pem_body_in_html(tmp_path: Path):
    pem = Ed25519PrivateKey.generate().private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
    )
    body = b"".join(pem.splitlines()[1:-1]).decode()
    (tmp_path / "drill.html").write_text(
        f'<div class="jp-Cell x"></div><div class="jp-Cell y"><pre>{body[:20]}<br>'
        f"{body[20:]}</pre></div>"
    )

    findings = scan_folder(tmp_path, [Secret("key tls/x", encoded_forms(pem))])

    assert [(f.file, f.location) for f in findings] == [("drill.html", "cell 1")]
    assert findings[0].form.startswith("PEM body")


def test_scan_ignores_clean_reports(tmp_path: Path):
    notebook_printing("fingerprint 3f2a, no material\n", tmp_path / "drill.ipynb")
    (tmp_path / "summary.json").write_text(json.dumps({"ok": True}))
    assert scan_folder(tmp_path, [Secret("key a", encoded_forms(MATERIAL))]) == []


def test_short_needles_skipped():
    assert encoded_forms(b"abc") == {}


def test_collect_secrets_covers_vault_and_custody(bare_lab: Lab):
    with bare_lab.open_vault() as vault:
        ensure_signing_key(vault)
        secrets = collect_secrets(bare_lab, vault)

    labels = {s.label for s in secrets}
    assert "key tre/report-signing" in labels
    assert "vault master secret" in labels
    assert "vault key file key" in labels
    shares = [label for label in labels if label.startswith("custody share")]
    assert len(shares) == 3

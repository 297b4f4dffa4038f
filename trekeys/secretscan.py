"""Scan drill reports for every secret the TRE holds.

No report may contain key material. After each run, every report file is
searched for the material of every key in the vault, the custodians' share
words, the vault key file and the vault's master secret, each in the forms a
careless cell could print them: raw, hex (lower and upper case), base64
(standard and URL-safe, with and without padding) and, for PEM material, the
base64 body of each block. Whitespace, JSON escapes and HTML entities are
removed from a second view of each file so that a secret split over lines is
still found. A finding names the file, the cell and which secret leaked,
never the secret itself.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from trekeys.custody import read_share_file
from trekeys.errors import RecordError, ShareError
from trekeys.lab import Lab
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

SCAN_REASON = "scan of the drill reports for leaked key material"

# Needles shorter than this would match ordinary report text by chance.
MIN_NEEDLE_LENGTH = 12

_PEM_BLOCK = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]+)-----(.+?)-----END \1-----", re.DOTALL
)
_WHITESPACE = re.compile(rb"\s+|\\[nrt]")
_KEYFILE_DATA = re.compile(r"<Data[^>]*>([0-9A-Fa-f\s]+)</Data>")


@dataclass
class Secret:
    """One secret to look for, with every form it is searched in.

    Attributes:
        label: what the secret is, such as ``key alpha/luks-volume``; never its value.
        needles: the search bytes by form name (raw, hex, base64, ...).
    """

    label: str
    needles: dict[str, bytes] = field(default_factory=dict, repr=False)

    @cached_property
    def compact_needles(self) -> dict[str, bytes]:
        """The needles without whitespace, to match against a file's compact text."""
        return {form: _WHITESPACE.sub(b"", n) for form, n in self.needles.items()}


@dataclass
class Finding:
    """A secret found in a report file."""

    file: str
    location: str
    secret: str
    form: str

    def describe(self) -> str:
        return f"{self.secret} ({self.form}) in {self.file} {self.location}"


def encoded_forms(material: bytes) -> dict[str, bytes]:
    """Return the forms of `material` that a report could contain."""
    forms = {
        "raw": material,
        "hex": material.hex().encode(),
        "HEX": material.hex().upper().encode(),
        "base64": base64.b64encode(material),
        "base64url": base64.urlsafe_b64encode(material),
    }
    forms["base64 unpadded"] = forms["base64"].rstrip(b"=")
    forms["base64url unpadded"] = forms["base64url"].rstrip(b"=")
    for number, match in enumerate(_PEM_BLOCK.finditer(material), start=1):
        forms[f"PEM body {number}"] = _WHITESPACE.sub(b"", match.group(2))
    return {
        form: needle
        for form, needle in forms.items()
        if len(_WHITESPACE.sub(b"", needle)) >= MIN_NEEDLE_LENGTH
    }


def collect_secrets(lab: Lab, vault: Vault) -> list[Secret]:
    """Read every secret of the lab and its vault; each vault read is audited."""
    secrets: list[Secret] = []
    for key_id in sorted(vault.ids()):
        if vault.get(key_id).is_tombstone:
            continue
        try:
            material = vault.read_secret(key_id, SCAN_REASON)
        except RecordError:
            continue  # a record without material, such as a public certificate
        secrets.append(Secret(f"key {key_id}", encoded_forms(material)))

    for path in lab.share_files():
        try:
            words = read_share_file(path).encode()
        except ShareError:
            continue
        secrets.append(Secret(f"custody share {path.stem}", encoded_forms(words)))

    master = lab.credentials().master_secret
    secrets.append(Secret("vault master secret", encoded_forms(master)))
    secrets.extend(_keyfile_secrets(lab.keyfile_path))
    return secrets


def _keyfile_secrets(path: Path) -> list[Secret]:
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    found = [Secret("vault key file", encoded_forms(text.encode()))]
    match = _KEYFILE_DATA.search(text)
    if match:
        key = bytes.fromhex("".join(match.group(1).split()))
        found.append(Secret("vault key file key", encoded_forms(key)))
    return found


def scan_folder(folder: Path, secrets: list[Secret]) -> list[Finding]:
    """Search every .ipynb, .html and .json file under `folder` for `secrets`."""
    findings: list[Finding] = []
    for path in sorted(folder.rglob("*")):
        if path.suffix in (".ipynb", ".html", ".json") and path.is_file():
            findings.extend(scan_file(path, secrets, folder))
    for finding in findings:
        logger.error("secret found in a report: %s", finding.describe())
    return findings


def scan_file(path: Path, secrets: list[Secret], root: Path) -> list[Finding]:
    """Return where in `path` any of `secrets` occurs, one finding per secret."""
    data = path.read_bytes()
    compact = _compact(path, data)
    hits = [
        (secret, form, needle)
        for secret in secrets
        for form, needle in secret.needles.items()
        if needle in data or secret.compact_needles[form] in compact
    ]

    findings = []
    reported: set[str] = set()
    for secret, form, needle in hits:
        if secret.label in reported:
            continue
        reported.add(secret.label)
        location = _locate(path, data, needle)
        relative = str(path.relative_to(root))
        findings.append(Finding(relative, location, secret.label, form))
    return findings


def _compact(path: Path, data: bytes) -> bytes:
    """Return the file's text without whitespace, JSON escapes or HTML entities."""
    text = data.decode("utf-8", errors="replace")
    if path.suffix == ".html":
        text = html.unescape(re.sub(r"<[^>]+>", "", text))
    elif path.suffix in (".ipynb", ".json"):
        try:
            text = "\n".join(_strings(json.loads(text)))
        except json.JSONDecodeError:
            pass
    return _WHITESPACE.sub(b"", text.encode("utf-8"))


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _locate(path: Path, data: bytes, needle: bytes) -> str:
    """Name the notebook cell (or JSON entry) that holds `needle`."""
    compact_needle = _WHITESPACE.sub(b"", needle)
    if path.suffix == ".ipynb":
        try:
            cells = json.loads(data).get("cells", [])
        except (json.JSONDecodeError, AttributeError):
            return "(not valid JSON)"
        for index, cell in enumerate(cells):
            if _contains(json.dumps(cell), needle, compact_needle):
                count = cell.get("execution_count")
                return f"cell {index}" + (f" (In [{count}])" if count else "")
        return "(notebook metadata)"
    if path.suffix == ".html":
        parts = data.split(b'<div class="jp-Cell ')
        for index, part in enumerate(parts[1:]):
            text = html.unescape(re.sub(r"<[^>]+>", "", part.decode(errors="replace")))
            if _contains(text, needle, compact_needle) or needle in part:
                return f"cell {index}"
        return "(page outside the cells)"
    return "(file)"


def _contains(text: str, needle: bytes, compact_needle: bytes) -> bool:
    encoded = text.encode("utf-8")
    if needle in encoded:
        return True
    strings = encoded
    try:
        strings = "\n".join(_strings(json.loads(text))).encode("utf-8")
    except json.JSONDecodeError:
        pass
    return compact_needle in _WHITESPACE.sub(b"", strings)


def secrets_in_text(text: str, secrets: list[Secret]) -> list[str]:
    """Return the labels of the secrets that occur in `text`, in any form."""
    data = text.encode("utf-8")
    compact = _WHITESPACE.sub(b"", data)
    return [
        secret.label
        for secret in secrets
        if any(
            needle in data or _WHITESPACE.sub(b"", needle) in compact
            for needle in secret.needles.values()
        )
    ]


def withhold_file(path: Path, reason: str) -> None:
    """Replace a report file that contains key material with a notice.

    The notice keeps the file's name and format, so the index and the signed
    manifest still list it, but none of its content survives.
    """
    notice = f"This report was withheld by trekeys: {reason}"
    if path.suffix == ".ipynb":
        body = json.dumps(
            {
                "cells": [{"cell_type": "markdown", "metadata": {}, "source": notice}],
                "metadata": {},
                "nbformat": 4,
                "nbformat_minor": 5,
            }
        )
    elif path.suffix == ".html":
        body = f"<!doctype html><html><body><p>{html.escape(notice)}</p></body></html>"
    else:
        body = json.dumps({"withheld": notice})
    tmp = path.with_name(f".{path.name}.withheld")
    tmp.write_text(body + "\n", encoding="utf-8")
    tmp.replace(path)
    logger.error("withheld report file %s: %s", path, reason)


def findings_as_dicts(findings: list[Finding]) -> list[dict[str, str]]:
    """Return findings as JSON-ready dictionaries."""
    return [asdict(f) for f in findings]

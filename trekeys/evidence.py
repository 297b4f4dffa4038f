"""Machine evidence for ceremony steps: tool output, file manifests, fingerprints.

A witness reads the narrative, but an auditor wants the tools' own words. This
module runs a tool and keeps its output verbatim, except that every secret
given to `redact` is replaced first. Redaction covers the encodings a tool or
a log may print a secret in: raw text, hex in either case, standard and
URL-safe base64, and each line of a PEM body. The module also hashes the
files a run produced and groups hex digests into blocks of four so that two
people can read them aloud.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trekeys.errors import ToolError, ToolMissingError
from trekeys.inventory import DEFAULT_WARNING_DAYS, build_row
from trekeys.records import utcnow
from trekeys.vault import Vault

logger = logging.getLogger(__name__)

REDACTED = "[REDACTED]"

# The Debian package that provides each tool a ceremony may capture.
_PACKAGES = {
    "cryptsetup": "cryptsetup-bin",
    "gpg": "gnupg",
    "openssl": "openssl",
    "keepassxc-cli": "keepassxc",
    "ssh-keygen": "openssh-client",
}

# Shorter fragments match too much ordinary text to be worth removing.
_MIN_SECRET_LENGTH = 6


def secret_forms(secret: bytes | str) -> set[str]:
    """Return the printable forms of a secret that redaction removes."""
    raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    forms = {
        raw.hex(),
        raw.hex().upper(),
        base64.b64encode(raw).decode("ascii"),
        base64.b64encode(raw).decode("ascii").rstrip("="),
        base64.urlsafe_b64encode(raw).decode("ascii").rstrip("="),
    }
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = ""
    if text:
        forms.add(text)
        # A PEM secret is printed line by line, so each body line is a secret too.
        forms.update(
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.startswith("-----")
        )
    return {form for form in forms if len(form) >= _MIN_SECRET_LENGTH}


def redact(text: str, secrets: Iterable[bytes | str]) -> str:
    """Return `text` with every form of every secret replaced by ``[REDACTED]``.

    Longer forms are replaced first, so that a secret that contains another
    one leaves no fragment behind.
    """
    secret_list = list(secrets)
    forms: set[str] = set()
    for secret in secret_list:
        forms |= secret_forms(secret)
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, REDACTED)

    for secret in secret_list:
        raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if len(raw) >= _MIN_SECRET_LENGTH:
            text = _separated_hex_pattern(raw).sub(REDACTED, text)
    return text


def _separated_hex_pattern(raw: bytes) -> re.Pattern[str]:
    """Return a pattern for `raw` as hex bytes split by spaces, colons or line
    breaks, the way ``cryptsetup luksDump --dump-volume-key`` prints a key."""
    pairs = [re.escape(f"{byte:02x}") for byte in raw]
    return re.compile(r"[\s:]*".join(pairs), re.IGNORECASE)


def _decode_redacted(data: bytes, secrets: list[bytes | str]) -> str:
    # Binary secrets are removed from the raw bytes first: once decoded with
    # replacement characters they could no longer be found.
    for secret in secrets:
        raw = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if len(raw) >= _MIN_SECRET_LENGTH:
            data = data.replace(raw, REDACTED.encode("ascii"))
    return redact(data.decode("utf-8", "replace"), secrets)


@dataclass(frozen=True)
class ToolOutput:
    """The verbatim, redacted output of one tool run.

    Attributes:
        command: the argv, which never holds a secret.
        returncode: the tool's exit status.
        stdout: standard output with secrets removed.
        stderr: standard error with secrets removed.
    """

    command: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def to_dict(self) -> dict[str, Any]:
        """Return the output as JSON-ready values for a transcript."""
        return {
            "kind": "tool-output",
            "command": list(self.command),
            "returncode": self.returncode,
            "stdout": self.stdout,
            "stderr": self.stderr,
        }


def capture_tool_output(
    command: Sequence[str],
    *,
    secrets: Iterable[bytes | str] = (),
    stdin: bytes | None = None,
    check: bool = True,
    timeout: float = 120.0,
) -> ToolOutput:
    """Run a tool and return its output with `secrets` removed.

    Secrets the tool needs go through `stdin`, never through `command`.

    Raises:
        ToolMissingError: the program is not installed.
        ToolError: the tool failed and `check` is true.
    """
    program = command[0]
    if shutil.which(program) is None:
        raise ToolMissingError(program, _PACKAGES.get(program, program))

    secret_list = list(secrets)
    result = subprocess.run(
        list(command), input=stdin, capture_output=True, check=False, timeout=timeout
    )
    output = ToolOutput(
        command=tuple(command),
        returncode=result.returncode,
        stdout=_decode_redacted(result.stdout, secret_list),
        stderr=_decode_redacted(result.stderr, secret_list),
    )
    if check and result.returncode != 0:
        raise ToolError(
            f"{program} failed with status {result.returncode} while capturing "
            "evidence; read the tool's error output and fix the cause.",
            tool=program,
            returncode=result.returncode,
            stderr_tail="\n".join(output.stderr.splitlines()[-5:]),
        )
    logger.debug("captured %s (status %d)", " ".join(command), result.returncode)
    return output


def text_evidence(
    label: str, text: str, secrets: Iterable[bytes | str] = ()
) -> dict[str, Any]:
    """Return a piece of verbatim text evidence, such as gpg status lines, redacted."""
    return {"kind": "text", "label": label, "text": redact(text, secrets)}


def inventory_evidence(
    label: str, before: list[dict[str, Any]], after: list[dict[str, Any]]
) -> dict[str, Any]:
    """Return the inventory rows that a step changed, before and after it."""
    return {"kind": "inventory", "label": label, "before": before, "after": after}


def sha256_file(path: Path) -> str:
    """Return the SHA-256 of a file's content, in lower-case hex."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def group_hex(digest: str, size: int = 4) -> str:
    """Return a hex digest in upper-case blocks, such as ``3F2A 9C01 ...``.

    Blocks of four hex digits are what people reading a fingerprint aloud
    can keep in mind and compare.
    """
    text = digest.replace(":", "").replace(" ", "").upper()
    return " ".join(text[i : i + size] for i in range(0, len(text), size))


def file_manifest(
    paths: Iterable[Path], base: Path | None = None
) -> list[dict[str, Any]]:
    """Return path, size, SHA-256 and the grouped fingerprint of each file.

    Folders are walked; paths are shown relative to `base` when they are under it.
    """
    files: list[Path] = []
    for path in paths:
        path = Path(path)
        files.extend(
            sorted(p for p in path.rglob("*") if p.is_file())
            if path.is_dir()
            else [path]
        )

    rows = []
    for path in files:
        digest = sha256_file(path)
        shown = path
        if base is not None and path.resolve().is_relative_to(Path(base).resolve()):
            shown = path.resolve().relative_to(Path(base).resolve())
        rows.append(
            {
                "path": str(shown),
                "bytes": path.stat().st_size,
                "sha256": digest,
                "read_aloud": group_hex(digest),
            }
        )
    return rows


def capture_for_keys(
    command: Sequence[str], vault: Vault, key_ids: Iterable[str], reason: str
) -> ToolOutput:
    """Run a tool and remove the material of `key_ids` from its output.

    The caller names keys, never handles their bytes; each read is audited.
    """
    secrets = [vault.read_secret(key_id, reason) for key_id in key_ids]
    return capture_tool_output(command, secrets=secrets)


def inventory_rows(vault: Vault, key_ids: Iterable[str]) -> list[dict[str, Any]]:
    """Return the inventory rows of the keys that exist, as evidence of a change."""
    now = utcnow()
    return [
        asdict(build_row(vault.get(key_id), now, DEFAULT_WARNING_DAYS))
        for key_id in key_ids
        if key_id in vault
    ]

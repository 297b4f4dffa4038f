"""Helpers that runbook notebooks call: credentials, checks and evidence.

A notebook never handles key material. It opens the vault through
`open_vault`, which reads the custodians' shares from files in headless runs
and from a prompt that does not echo in interactive runs. It records each
outcome with `Checklist.check`, which stops the run with a clear message on
failure.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from trekeys import __version__, coverage
from trekeys.audit import Actor
from trekeys.custody import combine_shares, prompt_shares
from trekeys.errors import DrillError, RecordError
from trekeys.lab import Lab
from trekeys.records import utcnow
from trekeys.vault import Vault, VaultCredentials

logger = logging.getLogger(__name__)

# The drill runner sets this to a file where each check is appended as a JSON line.
CHECKS_FILE_ENV = "TREKEYS_CHECKS_FILE"

# The drill runner sets this to a file where each recovery proof a runbook
# claims is queued as a JSON line, to be written only if the drill passes.
PROOFS_FILE_ENV = "TREKEYS_PROOFS_FILE"

# Key record attributes of the last recovery proof; the inventory flags a
# proof older than a year.
PROOF_ATTRIBUTE = coverage.PROOF_ATTRIBUTE
PROOF_REPORT_ATTRIBUTE = coverage.REPORT_ATTRIBUTE

# Columns of the table of keys a runbook touched.
KEY_COLUMNS = ["key", "fingerprint", "algorithm", "state", "operations"]


class CheckFailed(DrillError):
    """A runbook check did not pass."""


@dataclass
class Check:
    """The outcome of one runbook check."""

    name: str
    passed: bool
    detail: str = ""
    policy: str = ""


@dataclass
class Checklist:
    """The checks of one runbook run, in order."""

    procedure: str
    checks: list[Check] = field(default_factory=list)

    def check(
        self, name: str, passed: bool, detail: str = "", *, policy: str = ""
    ) -> None:
        """Record a check; raise `CheckFailed` when it did not pass."""
        result = Check(name, bool(passed), detail, policy)
        self.checks.append(result)
        _append_check_line(self.procedure, result)
        if not result.passed:
            raise CheckFailed(
                f"check failed: {name}" + (f" ({detail})" if detail else "")
            )

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def summary_markdown(self) -> str:
        """Return the checks as a Markdown table for the end of a runbook."""
        rows = ["| # | check | policy | result | detail |", "|---|---|---|---|---|"]
        for number, c in enumerate(self.checks, start=1):
            outcome = "PASS" if c.passed else "FAIL"
            detail = c.detail.replace("|", "\\|").replace("\n", " ")
            rows.append(f"| {number} | {c.name} | {c.policy} | {outcome} | {detail} |")
        return "\n".join(rows)

    def show_summary(self) -> None:
        """Display the summary table in the notebook."""
        from IPython.display import Markdown, display

        verdict = "**All checks passed.**" if self.passed else "**Some checks failed.**"
        display(Markdown(f"{self.summary_markdown()}\n\n{verdict}"))


def _append_check_line(procedure: str, check: Check) -> None:
    target = os.environ.get(CHECKS_FILE_ENV)
    if not target:
        return
    line = {
        "procedure": procedure,
        "name": check.name,
        "passed": check.passed,
        "detail": check.detail,
        "policy": check.policy,
    }
    with open(target, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


def load_lab(lab_dir: str | Path) -> Lab:
    """Load the lab that a runbook works on, or raise LabError naming the fix."""
    return Lab.load(Path(lab_dir))


def credentials_for(
    lab: Lab,
    *,
    share_files: list[str] | None = None,
    shares_env: str = "TREKEYS_SHARE_FILES",
    interactive: bool = False,
) -> VaultCredentials:
    """Rebuild the vault credentials for a runbook.

    The shares come, in this order, from the file paths in `share_files`, from
    the environment variable named by `shares_env` (paths separated by ':'),
    from a prompt that does not echo when `interactive`, or from the lab's own
    custodian folder. Paths are not secrets, so they may be parameters.
    Relative paths in `share_files` are taken from the lab folder, because a
    runbook runs in its report folder. Relative paths in the environment
    variable are taken from the current folder, as a shell user expects.
    """
    paths = [
        p if p.is_absolute() else lab.root / p for p in map(Path, share_files or [])
    ]
    if not paths and os.environ.get(shares_env):
        paths = [Path(p).resolve() for p in os.environ[shares_env].split(":") if p]
    if paths:
        return lab.credentials(paths)
    if interactive:
        master = combine_shares(prompt_shares(lab.threshold))
        return VaultCredentials(master, lab.keyfile_path)
    return lab.credentials()


def open_vault(
    lab: Lab,
    *,
    share_files: list[str] | None = None,
    shares_env: str = "TREKEYS_SHARE_FILES",
    interactive: bool = False,
    role: str = "TRE System Administrators",
) -> Vault:
    """Open the lab's vault for a runbook, naming the acting role in the audit log."""
    credentials = credentials_for(
        lab, share_files=share_files, shares_env=shares_env, interactive=interactive
    )
    actor = Actor(
        role=role,
        name=os.environ.get("TREKEYS_ACTOR")
        or f"{getpass.getuser()}@{socket.gethostname()}",
    )
    return lab.open_vault_with(credentials, actor=actor)


def read_secret_input(
    prompt: str, *, env: str | None = None, file: str | None = None
) -> str:
    """Read a secret from a file, an environment variable or a silent prompt."""
    if file:
        return Path(file).read_text(encoding="utf-8").rstrip("\n")
    if env and os.environ.get(env):
        return os.environ[env]
    return getpass.getpass(prompt)


def tool_version(command: list[str]) -> str:
    """Return the first line that `command` prints, or 'not installed'."""
    if shutil.which(command[0]) is None:
        return "not installed"
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def evidence_header(lab: Lab, vault: Vault | None = None) -> dict[str, Any]:
    """Return who runs the procedure, where, with which tool versions and settings."""
    header = {
        "run by": os.environ.get("TREKEYS_ACTOR") or getpass.getuser(),
        "user": getpass.getuser(),
        "host": socket.gethostname(),
        "lab": str(lab.root),
        "trekeys": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cryptsetup": tool_version(["cryptsetup", "--version"]),
        "gpg": tool_version(["gpg", "--version"]),
        "openssl": tool_version(["openssl", "version"]),
        "KDF settings": ("test-strength (demo only) " if lab.fast_kdf else "")
        + lab.kdf.describe(),
    }
    if vault is not None:
        header["vault KDF"] = vault.kdf_description
        header["vault cipher"] = vault_cipher(vault)
    header["recorded at"] = utcnow().isoformat()
    return header


def vault_cipher(vault: Vault) -> str:
    """Return the payload cipher of the open KDBX file, such as ``chacha20``."""
    # Vault exposes no public accessor for the cipher; pykeepass names it.
    keepass = getattr(vault, "_kp", None)
    return str(getattr(keepass, "encryption_algorithm", "unknown"))


def keys_touched(
    vault: Vault, first_seq: int, last_seq: int | None = None
) -> list[dict[str, Any]]:
    """Return the keys that audit entries `first_seq` to `last_seq` name.

    Each row has the key id, its fingerprint, algorithm and state, and the
    operations logged on it; never its material.
    """
    operations: dict[str, list[str]] = {}
    for entry in vault.audit_log.entries():
        seq = int(entry.get("seq", 0))
        if seq < first_seq or (last_seq is not None and seq > last_seq):
            continue
        key_id = str(entry.get("key_id", ""))
        if key_id and key_id != "vault":
            names = operations.setdefault(key_id, [])
            if entry.get("operation") not in names:
                names.append(str(entry.get("operation")))

    rows = []
    for key_id, names in sorted(operations.items()):
        row: dict[str, Any] = {"key": key_id, "operations": ", ".join(names)}
        if key_id in vault:
            record = vault.get(key_id)
            row.update(
                fingerprint=record.fingerprint,
                algorithm=record.algorithm,
                state=record.state.value,
            )
        rows.append(row)
    return rows


@dataclass
class EvidenceRecorder:
    """Evidence a runbook shows at its start and end: who, where, which keys.

    Create it with `start_evidence` right after opening the vault, and call
    `show_keys_touched` after the vault was saved at the end of the runbook.
    """

    lab: Lab
    first_seq: int
    header: dict[str, Any]

    def show_keys_touched(self, vault: Vault) -> list[dict[str, Any]]:
        """Display and return the keys this runbook used, from the audit log."""
        rows = keys_touched(vault, self.first_seq)
        show_table(rows, KEY_COLUMNS)
        return rows


def start_evidence(lab: Lab, vault: Vault) -> EvidenceRecorder:
    """Display the evidence header and remember where the audit log stood."""
    header = evidence_header(lab, vault)
    show_table([{"item": k, "value": v} for k, v in header.items()])
    first_seq = vault.audit_log.tail()[0] + 1
    return EvidenceRecorder(lab, first_seq, header)


def show_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """Display rows as a Markdown table in the notebook."""
    from IPython.display import Markdown, display

    if not rows:
        display(Markdown("_(none)_"))
        return
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [
            str(row.get(c, "")).replace("|", "\\|").replace("\n", " ") for c in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    display(Markdown("\n".join(lines)))


def record_recovery_proof(vault: Vault, key_id: str, detail: str = "") -> str:
    """Record that this runbook proved `key_id` recoverable.

    Under the drill runner the proof is queued and written to the key record
    only if the whole drill passes, naming the report; in an interactive run
    it is written at once, naming the person who ran it.

    Returns:
        A sentence on where the proof went, for the runbook to show.

    Raises:
        RecordNotFoundError: no key has that id.
        RecordError: the key was destroyed.
    """
    record = vault.get(key_id)
    if record.is_tombstone:
        raise RecordError(
            f"key {key_id} was destroyed, so it cannot be proven recoverable; "
            "check the key id."
        )

    now = utcnow().isoformat()
    target = os.environ.get(PROOFS_FILE_ENV)
    if target:
        line = {"key_id": key_id, "at": now, "detail": detail}
        with open(target, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
        return f"recovery proof of {key_id} queued; it is recorded if the drill passes"

    report = f"interactive run by {vault.actor.name} ({vault.actor.role})"
    write_recovery_proof(vault, key_id, report, now, detail)
    return f"recovery proof of {key_id} recorded: {report}"


def write_recovery_proof(
    vault: Vault, key_id: str, report: str, at: str, detail: str = ""
) -> None:
    """Store a recovery proof in the key record and the audit log."""
    coverage.record_recovery_proof(
        vault, key_id, report, at=datetime.fromisoformat(at), detail=detail
    )

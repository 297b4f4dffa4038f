"""Earlier generations of the vault file: listing them and restoring one.

Every save hard-links the file it replaces into ``<vault>-generations/``,
keeping the newest few. A restore opens the chosen generation with the
custodians' credentials, so a corrupt or foreign file is rejected before
anything changes, and saves it as the live vault. That save keeps the live
file as a generation in turn, so a restore can itself be undone.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from trekeys.audit import Actor
from trekeys.errors import VaultError
from trekeys.vault import Vault, VaultCredentials, list_generations

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    """One earlier vault file: where it is, when it was saved and its size."""

    path: Path
    saved: str
    size: int


def describe_generations(vault_path: Path) -> list[Generation]:
    """Return the generations of the vault at `vault_path`, newest first."""
    rows = []
    for path in list_generations(Path(vault_path)):
        stat = path.stat()
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stat.st_mtime))
        rows.append(Generation(path, saved, stat.st_size))
    return rows


def find_generation(vault_path: Path, choice: str) -> Path:
    """Return the generation named by `choice`: a 1-based number or a file name.

    Raises:
        VaultError: no generation matches.
    """
    generations = list_generations(Path(vault_path))
    if choice.isdigit() and 1 <= int(choice) <= len(generations):
        return generations[int(choice) - 1]
    for path in generations:
        if choice in (path.name, str(path)):
            return path
    raise VaultError(
        f"no generation {choice!r} of vault {vault_path}; list them with "
        "'trekeys vault generations'."
    )


def restore_generation(
    vault_path: Path,
    choice: str,
    credentials: VaultCredentials,
    *,
    actor: Actor | None = None,
) -> Path:
    """Make an earlier generation the live vault, keeping the live file as one.

    Returns:
        The generation that was restored.

    Raises:
        VaultError: no generation matches `choice`.
        CredentialError: the credentials do not open the generation.
        VaultCorruptError: the generation is corrupt; choose an older one.
    """
    vault_path = Path(vault_path)
    generation = find_generation(vault_path, choice)

    restored = Vault.open_generation(vault_path, generation, credentials, actor=actor)
    with restored:
        restored.record_operation(
            "restore-generation", "vault", "success", generation.name
        )
    logger.info("restored vault %s from generation %s", vault_path, generation.name)
    return generation

"""Custody of the vault's master secret: Shamir shares held by named custodians.

The master secret is 32 random bytes (256 bits of strength). It is split with
SLIP-39 (the shamir-mnemonic package) so that each custodian holds a list of
words that can be written on paper, and any `threshold` of them rebuild it.
A new split uses a new master secret, so shares of an old split stop working
once the vault has been re-keyed.
"""

from __future__ import annotations

import getpass
import hashlib
import itertools
import logging
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import shamir_mnemonic
from shamir_mnemonic import MnemonicError

from trekeys.errors import CredentialError, ShareError

logger = logging.getLogger(__name__)

MASTER_SECRET_BYTES = 32

# The roles that the key management policy names as key holders.
DEFAULT_CUSTODIAN_ROLES = (
    "TRE System Administrator",
    "Information Security Manager",
    "Operations Manager",
)

_SHARE_HEADER = "# trekeys custody share"


@dataclass(frozen=True)
class Custodian:
    """A person who holds one share of the vault's master secret."""

    role: str
    name: str

    @property
    def slug(self) -> str:
        """The role as a file-name-safe word, such as ``operations-manager``."""
        return re.sub(r"[^a-z0-9]+", "-", self.role.lower()).strip("-")


@dataclass
class Split:
    """The shares of one split of a master secret, keyed by custodian."""

    threshold: int
    identifier: str
    shares: dict[Custodian, str] = field(repr=False)


def generate_master_secret() -> bytes:
    """Return a new 256-bit master secret from the operating system's CSPRNG."""
    return secrets.token_bytes(MASTER_SECRET_BYTES)


def split_master_secret(
    master_secret: bytes, custodians: Sequence[Custodian], threshold: int
) -> Split:
    """Split `master_secret` into one SLIP-39 share per custodian.

    Raises:
        ShareError: the threshold is not between 1 and the number of custodians.
    """
    if len(custodians) < 1 or not 1 <= threshold <= len(custodians):
        raise ShareError(
            f"a threshold of {threshold} is invalid for {len(custodians)} "
            "custodians; choose a threshold between 1 and the number of custodians."
        )
    if len(set(custodians)) != len(custodians):
        raise ShareError("each custodian may appear once; remove the duplicate.")

    # SLIP-39 forbids a 1-of-n member group with n > 1, so a threshold of 1
    # becomes n groups of one share each, any one group rebuilding the secret.
    if threshold == 1:
        layout = [(1, 1)] * len(custodians)
    else:
        layout = [(threshold, len(custodians))]
    groups = shamir_mnemonic.generate_mnemonics(
        group_threshold=1,
        groups=layout,
        master_secret=master_secret,
        iteration_exponent=0,
    )
    mnemonics = [share for group in groups for share in group]
    identifier = _split_identifier(mnemonics[0])
    logger.info(
        "split the master secret %s into %d shares, threshold %d",
        identifier,
        len(custodians),
        threshold,
    )
    return Split(threshold, identifier, dict(zip(custodians, mnemonics, strict=True)))


def combine_shares(mnemonics: Iterable[str]) -> bytes:
    """Rebuild the master secret from at least `threshold` shares.

    Raises:
        ShareError: a share has a bad checksum, the shares come from different
            splits, or there are too few of them.
        CredentialError: the shares are well formed but do not rebuild a secret.
    """
    words = [" ".join(m.split()) for m in mnemonics]
    if not words:
        raise ShareError(
            "no custody shares were given; provide the threshold of shares."
        )

    identifiers = {_split_identifier(m) for m in words}
    if len(identifiers) > 1:
        raise ShareError(
            "the shares come from different splits of the master secret; "
            "use shares from the current split only."
        )

    try:
        return shamir_mnemonic.combine_mnemonics(_one_group(words))
    except MnemonicError as exc:
        raise _share_error(str(exc)) from exc


def _one_group(words: list[str]) -> list[str]:
    # With a threshold of 1 every share is its own group and any one suffices;
    # SLIP-39 rejects more groups than its group threshold, so keep the first.
    shares = [shamir_mnemonic.share.Share.from_mnemonic(m) for m in words]
    if shares[0].group_threshold != 1 or shares[0].group_count == 1:
        return words
    first_group = shares[0].group_index
    return [
        m for m, s in zip(words, shares, strict=True) if s.group_index == first_group
    ]


def _share_error(detail: str) -> CredentialError:
    lowered = detail.lower()
    if "checksum" in lowered or "invalid mnemonic word" in lowered:
        return ShareError(
            "a custody share has a bad checksum; check each word against the "
            "custodian's paper copy."
        )
    if "insufficient" in lowered or "wrong number" in lowered:
        return ShareError(
            "too few custody shares were given; provide the threshold of shares."
        )
    if "digest" in lowered:
        return CredentialError("the custody shares do not rebuild the master secret.")
    # Some library messages quote the share words, so the detail is not shown.
    return ShareError(
        "the custody shares are invalid; check each share file against its "
        "custodian's paper copy."
    )


def _split_identifier(mnemonic: str) -> str:
    try:
        share = shamir_mnemonic.share.Share.from_mnemonic(mnemonic)
    except MnemonicError as exc:
        raise _share_error(str(exc)) from exc
    return f"{share.identifier:04x}"


def write_share_file(path: Path, custodian: Custodian, mnemonic: str) -> None:
    """Write one custodian's share to a new 0600 file.

    Raises:
        FileExistsError: the file already exists.
    """
    text = (
        f"{_SHARE_HEADER}\n"
        f"# custodian: {custodian.role} ({custodian.name})\n"
        f"# split: {_split_identifier(mnemonic)}\n"
        f"{mnemonic}\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def read_share_file(path: Path) -> str:
    """Return the share words from a share file.

    Raises:
        ShareError: the file is missing, unreadable, contains no share, or its
            share has a bad checksum.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise ShareError(
            f"custody share file {path} is missing; ask its custodian for the share."
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ShareError(
            f"custody share file {path} cannot be read as text; check that it is "
            "the custodian's share file."
        ) from exc
    words = " ".join(line.strip() for line in lines if not line.startswith("#")).strip()
    if not words:
        raise ShareError(f"custody share file {path} contains no share words.")

    try:
        shamir_mnemonic.share.Share.from_mnemonic(words)
    except MnemonicError as exc:
        # The library's message quotes the words, so it is not passed on.
        raise ShareError(
            f"custody share file {path} has a bad checksum or an unknown word; "
            "check each word against the custodian's paper copy."
        ) from exc
    return words


def prompt_shares(count: int) -> list[str]:
    """Ask for `count` shares on the terminal without echoing them."""
    return [
        getpass.getpass(f"Custody share {index + 1} of {count} (words, not echoed): ")
        for index in range(count)
    ]


def master_fingerprint(master_secret: bytes) -> str:
    """Return a public fingerprint of a master secret, to compare splits without it."""
    return hashlib.sha256(b"trekeys-vault-master" + master_secret).hexdigest()[:16]


def check_each_share(
    share_files: Sequence[Path], threshold: int, fingerprint: str
) -> list[dict[str, Any]]:
    """Check each share file on its own against the master secret's fingerprint.

    Each share is tried with every group of `threshold - 1` other readable
    shares until one group rebuilds the master secret. A share is valid only
    if such a group exists, so a bad share fails even when the others still
    make a threshold, and a good share passes despite a bad neighbour.

    Returns:
        One row per share file: custodian, file, valid, proven_with, detail.
    """
    words: dict[Path, str] = {}
    errors: dict[Path, str] = {}
    for path in share_files:
        try:
            words[Path(path)] = read_share_file(Path(path))
        except ShareError as exc:
            errors[Path(path)] = str(exc)

    rows = []
    for path in map(Path, share_files):
        row: dict[str, Any] = {
            "custodian": path.stem,
            "file": path.name,
            "valid": False,
            "proven_with": "",
            "detail": errors.get(path, ""),
        }
        if path in words:
            partners = _find_partners(path, words, threshold, fingerprint)
            row["valid"] = partners is not None
            row["proven_with"] = ", ".join(p.stem for p in partners or [])
            row["detail"] = (
                "rebuilds the master secret with other shares"
                if partners is not None
                else "rebuilds the master secret with no group of the other shares: "
                "the share is damaged or from another split"
            )
        rows.append(row)
        if not row["valid"]:
            logger.warning("custody share %s failed its own check", path)
    return rows


def _find_partners(
    own: Path, words: dict[Path, str], threshold: int, fingerprint: str
) -> list[Path] | None:
    others = [p for p in words if p != own]
    for group in itertools.combinations(others, threshold - 1):
        try:
            secret = combine_shares([words[own], *(words[p] for p in group)])
        except CredentialError:
            continue
        if master_fingerprint(secret) == fingerprint:
            return list(group)
    return None

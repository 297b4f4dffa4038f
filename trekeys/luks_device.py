"""LUKS2 operations on one device or image file, through cryptsetup.

These functions take key material as arguments and pass it to cryptsetup on
standard input or in a removed 0600 file (see `trekeys.cryptsetup`). They
know nothing about the vault; `trekeys.luks` decides which keys to use.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

from trekeys.cryptsetup import KdfSettings, run_tool, secret_file
from trekeys.errors import DestinationExistsError, IntegrityError, ToolError
from trekeys.luks2meta import LuksHeader, read_header

logger = logging.getLogger(__name__)

CIPHER = "aes-xts-plain64"
KEY_BITS = 512
DEFAULT_SECTOR_SIZE = 4096
# cryptsetup's default 16 MiB header has room for the LUKS2 maximum of 32
# keyslots of 512-bit keys (258048 bytes each). The demo TRE's 2 MiB header
# has room for 8.
SMALL_KEYSLOTS_BYTES = 2016 * 1024
DEFAULT_KEYSLOTS_BYTES = 16 * 1024 * 1024 - 32 * 1024


def reduce_size(keyslots_bytes: int) -> int:
    """Return the room that in-place encryption needs at the end of the data.

    cryptsetup moves the data by half of ``--reduce-device-size`` to make room
    for the header (metadata plus keyslot area).
    """
    return 2 * (keyslots_bytes + 32 * 1024)


def _layout_args(keyslots_bytes: int) -> list[str]:
    return ["--luks2-keyslots-size", f"{keyslots_bytes // 1024}k"]


def format_volume(
    device: Path,
    first_key: bytes,
    *,
    kdf: KdfSettings,
    sector_size: int,
    keyslots_bytes: int = DEFAULT_KEYSLOTS_BYTES,
) -> LuksHeader:
    """Format `device` as an empty LUKS2 volume with `first_key` in keyslot 0."""
    run_tool(
        "cryptsetup",
        [
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--cipher",
            CIPHER,
            "--key-size",
            str(KEY_BITS),
            "--sector-size",
            str(sector_size),
            "--key-slot",
            "0",
            *_layout_args(keyslots_bytes),
            *kdf.arguments(),
            "--key-file=-",
            str(device),
        ],
        stdin=first_key,
        device=device,
    )
    return read_header(device)


def encrypt_in_place(
    image: Path,
    first_key: bytes,
    *,
    kdf: KdfSettings,
    sector_size: int,
    keyslots_bytes: int = DEFAULT_KEYSLOTS_BYTES,
) -> LuksHeader:
    """Encrypt the file system in `image` in place as LUKS2, keeping its data.

    The file system must leave the last `reduce_size(keyslots_bytes)` bytes
    of the image unused.
    """
    run_tool(
        "cryptsetup",
        [
            "reencrypt",
            "--encrypt",
            "--batch-mode",
            "--type",
            "luks2",
            "--cipher",
            CIPHER,
            "--key-size",
            str(KEY_BITS),
            "--sector-size",
            str(sector_size),
            "--reduce-device-size",
            f"{reduce_size(keyslots_bytes) // 1024}k",
            *_layout_args(keyslots_bytes),
            *kdf.arguments(),
            "--key-file=-",
            str(image),
        ],
        stdin=first_key,
        device=image,
    )
    return read_header(image)


def add_keyslot(
    device: Path, existing_key: bytes, new_key: bytes, *, kdf: KdfSettings
) -> int:
    """Add a keyslot for `new_key`, unlocking with `existing_key`; return its number."""
    before = set(read_header(device).keyslots)
    with secret_file(new_key) as new_key_file:
        run_tool(
            "cryptsetup",
            [
                "luksAddKey",
                "--batch-mode",
                *kdf.arguments(),
                "--key-file=-",
                f"--new-keyfile={new_key_file}",
                str(device),
            ],
            stdin=existing_key,
            device=device,
        )
    return _new_slot(device, before)


def add_keyslot_from_volume_key(
    device: Path, volume_key: bytes, new_key: bytes, *, kdf: KdfSettings
) -> int:
    """Add a keyslot for `new_key` using the volume key itself; return its number."""
    before = set(read_header(device).keyslots)
    with secret_file(volume_key) as volume_key_file:
        run_tool(
            "cryptsetup",
            [
                "luksAddKey",
                "--batch-mode",
                "--key-size",
                str(len(volume_key) * 8),
                *kdf.arguments(),
                f"--volume-key-file={volume_key_file}",
                "--new-keyfile=-",
                str(device),
            ],
            stdin=new_key,
            device=device,
        )
    return _new_slot(device, before)


def _new_slot(device: Path, before: set[str]) -> int:
    added = set(read_header(device).keyslots) - before
    if len(added) != 1:
        raise ToolError(
            f"cryptsetup luksAddKey on {device} left {len(added)} new keyslots "
            "instead of one; inspect it with 'cryptsetup luksDump'.",
            tool="cryptsetup",
        )
    return int(added.pop())


def kill_keyslot(device: Path, slot: int, remaining_key: bytes) -> None:
    """Remove keyslot `slot`, proving access with the key of another keyslot."""
    run_tool(
        "cryptsetup",
        ["luksKillSlot", "--key-file=-", str(device), str(slot)],
        stdin=remaining_key,
        device=device,
    )


def verify_key(device: Path, key: bytes, *, slot: int | None = None) -> None:
    """Check that `key` opens `device` (``open --test-passphrase``).

    Raises:
        CredentialError: it opens no keyslot (or not keyslot `slot`).
        NotLuksError: the device has no LUKS header.
    """
    args = ["open", "--test-passphrase", "--key-file=-"]
    if slot is not None:
        args += ["--key-slot", str(slot)]
    run_tool("cryptsetup", [*args, str(device)], stdin=key, device=device)


def dump_volume_key(device: Path, key: bytes) -> bytes:
    """Return the volume key, unlocked from a keyslot with `key`."""
    result = run_tool(
        "cryptsetup",
        ["luksDump", "--dump-volume-key", "--batch-mode", "--key-file=-", str(device)],
        stdin=key,
        device=device,
    )
    text = result.stdout.decode("ascii", "replace")
    match = re.search(r"MK dump:\s*((?:[0-9a-f]{2}\s*)+)", text)
    if match is None:
        raise ToolError(
            f"cryptsetup printed no volume key for {device}; check its version.",
            tool="cryptsetup",
        )
    return bytes.fromhex("".join(match.group(1).split()))


def backup_header(device: Path, target: Path) -> None:
    """Write a header backup of `device` to the new file `target`."""
    if target.exists():
        raise DestinationExistsError(target)
    run_tool(
        "cryptsetup",
        ["luksHeaderBackup", "--header-backup-file", str(target), str(device)],
        device=device,
    )
    target.chmod(0o600)


def restore_header(device: Path, backup: Path) -> None:
    """Write the header in `backup` over the header of `device`."""
    run_tool(
        "cryptsetup",
        [
            "luksHeaderRestore",
            "--batch-mode",
            "--header-backup-file",
            str(backup),
            str(device),
        ],
        device=device,
    )


def erase_keyslots(device: Path) -> None:
    """Erase every keyslot of `device` (``luksErase``)."""
    run_tool("cryptsetup", ["luksErase", "--batch-mode", str(device)], device=device)


def reencrypt(device: Path, key: bytes, slot: int, *, kdf: KdfSettings) -> LuksHeader:
    """Re-encrypt `device` under a new volume key, offline.

    Only keyslot `slot`, unlocked by `key`, is carried over to the new volume
    key; cryptsetup drops the other keyslots.
    """
    run_tool(
        "cryptsetup",
        [
            "reencrypt",
            "--batch-mode",
            "--force-offline-reencrypt",
            "--key-slot",
            str(slot),
            *kdf.arguments(),
            "--key-file=-",
            str(device),
        ],
        stdin=key,
        device=device,
    )
    return read_header(device)


def build_ext4_image(
    source_dir: Path, image: Path, fs_bytes: int, spare_bytes: int
) -> None:
    """Create `image` holding an ext4 file system of `source_dir`'s files.

    The image has `spare_bytes` after the file system, so that it can be
    encrypted in place.
    """
    if image.exists():
        raise DestinationExistsError(image)
    blocks = fs_bytes // 4096
    with image.open("wb") as handle:
        handle.truncate(fs_bytes + spare_bytes)
    run_tool(
        "mke2fs",
        [
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-d",
            str(source_dir),
            str(image),
            str(blocks),
        ],
        device=image,
    )


def extract_ext4(image: Path, target: Path) -> None:
    """Copy every file of the ext4 file system in `image` into `target`.

    ``debugfs rdump`` gives the copies the modes stored in the file system
    (often 755 and 644), so the extracted tree is then made private.
    """
    target.mkdir(mode=0o700, parents=True)
    result = run_tool("debugfs", ["-R", f"rdump / {target}", str(image)], device=image)
    make_private(target)

    # debugfs exits 0 even when it cannot open the file system.
    stderr = result.stderr.decode("utf-8", "replace")
    if "Bad magic" in stderr or "not open" in stderr or "rdump:" in stderr:
        raise IntegrityError(
            f"the decrypted image {image} contains no readable ext4 file system; the "
            "volume key or the segment metadata is wrong."
        )


def make_private(root: Path) -> None:
    """Remove the group and other permission bits from `root` and everything in it.

    Recovered research data must be readable by its owner only. Symbolic links
    are left alone because their own mode is not used.
    """
    paths = [root]
    for folder, dirs, files in os.walk(root):
        paths.extend(Path(folder, name) for name in dirs + files)
    for path in paths:
        info = path.lstat()
        if not stat.S_ISLNK(info.st_mode):
            path.chmod(stat.S_IMODE(info.st_mode) & 0o700)

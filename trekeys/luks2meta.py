"""Read LUKS2 headers (from a volume or a header backup) without cryptsetup.

A LUKS2 header starts with a 4096-byte binary header followed by the JSON
metadata area; a second copy of both follows at offset ``hdr_size``. The
binary header contains the magic, version, header size, sequence id, label,
UUID and a SHA-256 checksum over the binary header and JSON area with the
checksum field zeroed. Parsing it ourselves lets trekeys check a header
backup (checksum, UUID, keyslots) before ``cryptsetup luksHeaderRestore``
touches a device, and read the data segment (offset, sector size, cipher)
for user-space decryption.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trekeys.errors import (
    HeaderBackupError,
    IntegrityError,
    NotLuksError,
    UnsupportedVolumeError,
)

PRIMARY_MAGIC = b"LUKS\xba\xbe"
SECONDARY_MAGIC = b"SKUL\xba\xbe"
BINARY_HEADER_SIZE = 4096
_FIELDS = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")
_CSUM_OFFSET = 448
_VALID_HEADER_SIZES = {2**n * 1024 for n in range(4, 13)}  # 16 KiB to 4 MiB


@dataclass(frozen=True)
class Segment:
    """A LUKS2 crypt segment: where the encrypted data is and how it is encrypted.

    Attributes:
        offset: byte offset of the segment from the start of the device.
        size: byte length, or None when it runs to the end of the device.
        cipher: the dm-crypt cipher spec, such as ``aes-xts-plain64``.
        sector_size: the encryption sector size in bytes.
        iv_tweak: added to the sector number before it becomes the IV.
    """

    offset: int
    size: int | None
    cipher: str
    sector_size: int
    iv_tweak: int

    @property
    def iv_scheme(self) -> str:
        """The IV generator, the last part of the cipher spec (``plain64``)."""
        return self.cipher.rsplit("-", 1)[-1]

    @property
    def mode(self) -> str:
        """The cipher and mode without the IV generator, such as ``aes-xts``."""
        return self.cipher.rsplit("-", 1)[0]


@dataclass(frozen=True)
class LuksHeader:
    """A parsed, checksum-verified LUKS2 header.

    Attributes:
        source: the file or device it was read from.
        uuid: the LUKS UUID.
        label: the LUKS2 label, or an empty string.
        seqid: the metadata sequence number; cryptsetup increments it on every
            metadata change.
        hdr_size: size of one binary header plus JSON area, in bytes.
        metadata: the JSON metadata.
    """

    source: Path
    uuid: str
    label: str
    seqid: int
    hdr_size: int
    metadata: dict[str, Any]

    @property
    def keyslots(self) -> dict[str, Any]:
        return dict(self.metadata.get("keyslots", {}))

    @property
    def digests(self) -> dict[str, Any]:
        return dict(self.metadata.get("digests", {}))

    @property
    def metadata_end(self) -> int:
        """The end of the header and keyslot areas: what a header backup covers."""
        keyslots_size = int(self.metadata.get("config", {}).get("keyslots_size", 0))
        return 2 * self.hdr_size + keyslots_size

    def segments(self) -> list[Segment]:
        """Return the crypt segments in id order."""
        found = []
        for key in sorted(self.metadata.get("segments", {}), key=int):
            raw = self.metadata["segments"][key]
            if raw.get("type") != "crypt":
                continue
            size = raw.get("size", "dynamic")
            found.append(
                Segment(
                    offset=int(raw["offset"]),
                    size=None if size == "dynamic" else int(size),
                    cipher=str(raw["encryption"]),
                    sector_size=int(raw.get("sector_size", 512)),
                    iv_tweak=int(raw.get("iv_tweak", "0")),
                )
            )
        return found

    def data_segment(self) -> Segment:
        """Return the one data segment of a volume that is not being re-encrypted.

        Raises:
            UnsupportedVolumeError: there are several segments or none, as while
                ``cryptsetup reencrypt`` is unfinished.
        """
        segments = self.segments()
        if len(segments) != 1 or self.metadata.get("segments", {}).keys() - {"0"}:
            raise UnsupportedVolumeError(
                f"LUKS volume {self.uuid} has {len(segments)} crypt segments, so a "
                "re-encryption is unfinished; resume it with 'cryptsetup reencrypt "
                "--resume-only' before recovering."
            )
        return segments[0]

    def fingerprint(self) -> str:
        """Return a SHA-256 over the UUID, keyslots, digests and segments.

        Two headers with the same fingerprint unlock the same keys in the same
        way; adding, removing or changing a keyslot changes it. The sequence id
        is left out because cryptsetup also bumps it for harmless changes.
        """
        subset = {
            "uuid": self.uuid,
            "keyslots": self.keyslots,
            "digests": self.digests,
            "segments": self.metadata.get("segments", {}),
        }
        canonical = json.dumps(subset, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def check_volume_key(self, volume_key: bytes) -> bool:
        """Return whether `volume_key` matches the digest of the data segment."""
        for digest in self.digests.values():
            if "0" not in digest.get("segments", []):
                continue
            if digest.get("type") != "pbkdf2":
                raise UnsupportedVolumeError(
                    f"LUKS volume {self.uuid} uses a {digest.get('type')} digest; "
                    "only pbkdf2 digests can be checked in user space."
                )
            expected = base64.b64decode(digest["digest"])
            derived = hashlib.pbkdf2_hmac(
                str(digest["hash"]),
                volume_key,
                base64.b64decode(digest["salt"]),
                int(digest["iterations"]),
                dklen=len(expected),
            )
            return hmac.compare_digest(derived, expected)
        raise IntegrityError(
            f"LUKS volume {self.uuid} has no digest for its data segment; the "
            "header is damaged, restore it from a header backup."
        )


def read_header(path: Path, *, both_copies: bool = False) -> LuksHeader:
    """Read and verify the LUKS2 header at the start of `path`.

    The primary header is used when its checksum verifies, else the secondary
    copy, as cryptsetup does. With `both_copies`, as for a header backup that
    is about to be restored, both copies must verify and agree.

    Raises:
        NotLuksError: the file does not start with a LUKS header.
        UnsupportedVolumeError: the header is LUKS1 or a later version.
        HeaderBackupError: both copies are truncated or fail their checksum.
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            start = handle.read(BINARY_HEADER_SIZE)
            _check_magic(path, start)
            hdr_size = struct.unpack_from(">Q", start, 8)[0]
            if hdr_size not in _VALID_HEADER_SIZES:
                raise HeaderBackupError(
                    f"{path} has an invalid LUKS2 header size {hdr_size}; the header "
                    "is corrupt, restore it from a header backup."
                )
            handle.seek(0)
            primary = handle.read(hdr_size)
            secondary = handle.read(hdr_size)
    except OSError as exc:
        raise NotLuksError(
            f"cannot read {path} ({exc.strerror}); check the device path."
        ) from exc

    copies = [
        _parse_area(path, primary, PRIMARY_MAGIC, hdr_size),
        _parse_area(path, secondary, SECONDARY_MAGIC, hdr_size),
    ]
    if both_copies:
        first, second = copies
        if first is None or second is None or first.metadata != second.metadata:
            raise HeaderBackupError(
                f"one of the two LUKS2 header copies in {path} is truncated, fails "
                "its checksum or differs from the other; use another header backup."
            )
    for header in copies:
        if header is not None:
            return header
    raise HeaderBackupError(
        f"the LUKS2 header of {path} is truncated or fails its checksum in both "
        "copies; restore it from a verified header backup."
    )


def _check_magic(path: Path, start: bytes) -> None:
    if len(start) < 8 or start[:6] != PRIMARY_MAGIC:
        raise NotLuksError(
            f"{path} is not a LUKS volume or header backup (no LUKS magic); check "
            "the path, or restore its header from a backup."
        )
    version = struct.unpack_from(">H", start, 6)[0]
    if version == 1:
        raise UnsupportedVolumeError(
            f"{path} is a LUKS1 volume; trekeys handles LUKS2 only, so convert it "
            "first with 'cryptsetup convert --type luks2' after a header backup."
        )
    if version != 2:
        raise UnsupportedVolumeError(
            f"{path} has LUKS version {version}; trekeys handles LUKS2 only."
        )


def _parse_area(
    path: Path, area: bytes, magic: bytes, hdr_size: int
) -> LuksHeader | None:
    if len(area) != hdr_size or area[:6] != magic:
        return None
    fields = _FIELDS.unpack_from(area)
    algorithm = fields[5].rstrip(b"\0").decode("ascii", "replace").lower()
    if algorithm != "sha256":
        return None
    stored = fields[11][:32]
    zeroed = area[:_CSUM_OFFSET] + bytes(64) + area[_CSUM_OFFSET + 64 :]
    if not hmac.compare_digest(hashlib.sha256(zeroed).digest(), stored):
        return None

    text = area[BINARY_HEADER_SIZE:].split(b"\0", 1)[0]
    try:
        metadata = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return LuksHeader(
        source=path,
        uuid=fields[7].rstrip(b"\0").decode("ascii"),
        label=fields[4].rstrip(b"\0").decode("utf-8", "replace"),
        seqid=fields[3],
        hdr_size=hdr_size,
        metadata=metadata,
    )

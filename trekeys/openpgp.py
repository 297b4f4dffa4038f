"""Read the recipients of an OpenPGP message from its packet headers.

An encrypted message starts with one Public-Key Encrypted Session Key packet
(tag 1) per recipient, each naming the 8-byte key id of the encryption subkey,
and then the encrypted data (RFC 4880 sections 4.2, 5.1 and 5.13). Reading
only these first packets shows who can decrypt a backup without a secret key
and without reading the whole file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from trekeys.errors import IntegrityError

TAG_PKESK = 1
TAG_SKESK = 3
TAG_SYMMETRIC_NO_MDC = 9
TAG_SEIPD = 18
TAG_AEAD = 20


@dataclass(frozen=True)
class MessageHeader:
    """The session-key packets of an encrypted OpenPGP message.

    Attributes:
        key_ids: upper-case hex key ids of the public-key recipients, in order.
        passphrase_packets: how many passphrase (symmetric) session keys it has.
        data_tag: the packet tag of the encrypted data that follows.
    """

    key_ids: list[str]
    passphrase_packets: int
    data_tag: int

    @property
    def integrity_protected(self) -> bool:
        """Whether the data packet detects modification (SEIPD or AEAD)."""
        return self.data_tag in (TAG_SEIPD, TAG_AEAD)


def read_message_header(path: Path) -> MessageHeader:
    """Read the session-key packets at the start of the encrypted file `path`.

    Raises:
        IntegrityError: the file is not an OpenPGP encrypted message.
    """
    key_ids: list[str] = []
    passphrases = 0
    with open(path, "rb") as handle:
        while True:
            tag, length = _read_packet_header(handle, path)
            if tag not in (TAG_PKESK, TAG_SKESK):
                return MessageHeader(key_ids, passphrases, tag)
            body = handle.read(length)
            if len(body) != length:
                raise _not_encrypted(path, "a session-key packet is cut short")
            if tag == TAG_SKESK:
                passphrases += 1
            elif body[0] == 3:
                key_ids.append(body[1:9].hex().upper())
            else:
                raise _not_encrypted(path, f"PKESK version {body[0]} is unknown")


def _read_packet_header(handle: BinaryIO, path: Path) -> tuple[int, int]:
    first = handle.read(1)
    if not first:
        raise _not_encrypted(path, "it ends before any encrypted data")
    octet = first[0]
    if not octet & 0x80:
        raise _not_encrypted(path, "it does not start with an OpenPGP packet")

    if octet & 0x40:
        tag = octet & 0x3F
        return tag, _new_length(handle, path)
    tag = (octet >> 2) & 0x0F
    size = {0: 1, 1: 2, 2: 4}.get(octet & 0x03)
    if size is None:
        return tag, -1
    raw = handle.read(size)
    if len(raw) != size:
        raise _not_encrypted(path, "a packet header is cut short")
    return tag, int.from_bytes(raw, "big")


def _new_length(handle: BinaryIO, path: Path) -> int:
    raw = handle.read(1)
    if not raw:
        raise _not_encrypted(path, "a packet header is cut short")
    first = raw[0]
    if first < 192:
        return first
    if first < 224:
        second = handle.read(1)
        if not second:
            raise _not_encrypted(path, "a packet header is cut short")
        return ((first - 192) << 8) + second[0] + 192
    if first == 255:
        raw = handle.read(4)
        if len(raw) != 4:
            raise _not_encrypted(path, "a packet header is cut short")
        return int.from_bytes(raw, "big")
    # A partial body length is only allowed for data packets, which end the scan.
    return -1


def _not_encrypted(path: Path, detail: str) -> IntegrityError:
    return IntegrityError(
        f"{path} is not a readable OpenPGP encrypted message ({detail}); it may be "
        "truncated or replaced, so restore from another backup."
    )

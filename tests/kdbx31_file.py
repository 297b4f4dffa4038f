"""Write a minimal KeePass KDBX 3.1 file, to test how trekeys treats old vaults.

pykeepass cannot create KDBX 3.1 files, and the format that keepassxc-cli
db-create writes depends on its version (2.7.4 writes 3.1), so this helper
builds one from the format's parts: an outer header of type-length-value
fields, AES-KDF, and an AES-256-CBC payload that starts with the stream start
bytes and holds the XML in SHA-256 hashed blocks.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import uuid
from pathlib import Path

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

AES_CIPHER_ID = bytes.fromhex("31c1f2e6bf714350be5805216afc5aff")
SIGNATURES = struct.pack("<II", 0x9AA2D903, 0xB54BFB67)
TRANSFORM_ROUNDS = 1000


def _field(field_id: int, data: bytes) -> bytes:
    return struct.pack("<BH", field_id, len(data)) + data


def _xml(entry_title: str) -> bytes:
    def new_uuid() -> str:
        return base64.b64encode(uuid.uuid4().bytes).decode()

    return (
        '<?xml version="1.0" encoding="utf-8" standalone="yes"?>'
        "<KeePassFile><Meta><Generator>trekeys test</Generator></Meta><Root>"
        f"<Group><UUID>{new_uuid()}</UUID><Name>Root</Name>"
        f"<Entry><UUID>{new_uuid()}</UUID>"
        f"<String><Key>Title</Key><Value>{entry_title}</Value></String>"
        "<String><Key>Password</Key><Value>not secret</Value></String>"
        "</Entry></Group></Root></KeePassFile>"
    ).encode()


def _hashed_blocks(data: bytes) -> bytes:
    block = struct.pack("<I", 0) + hashlib.sha256(data).digest()
    block += struct.pack("<I", len(data)) + data
    return block + struct.pack("<I", 1) + bytes(32) + struct.pack("<I", 0)


def _transformed_key(password: str, transform_seed: bytes) -> bytes:
    key = hashlib.sha256(hashlib.sha256(password.encode()).digest()).digest()
    encryptor = Cipher(algorithms.AES(transform_seed), modes.ECB()).encryptor()
    for _ in range(TRANSFORM_ROUNDS):
        key = encryptor.update(key)
    return hashlib.sha256(key).digest()


def write_kdbx31(path: Path, password: str, entry_title: str = "legacy") -> None:
    """Write a KDBX 3.1 database with one entry, opened by `password` alone."""
    master_seed, transform_seed = os.urandom(32), os.urandom(32)
    iv, stream_start = os.urandom(16), os.urandom(32)
    header = SIGNATURES + struct.pack("<HH", 1, 3)
    header += _field(2, AES_CIPHER_ID)
    header += _field(3, struct.pack("<I", 0))
    header += _field(4, master_seed)
    header += _field(5, transform_seed)
    header += _field(6, struct.pack("<Q", TRANSFORM_ROUNDS))
    header += _field(7, iv)
    header += _field(8, os.urandom(32))
    header += _field(9, stream_start)
    header += _field(10, struct.pack("<I", 2))
    header += _field(0, b"\r\n\r\n")

    key = hashlib.sha256(
        master_seed + _transformed_key(password, transform_seed)
    ).digest()
    padder = padding.PKCS7(128).padder()
    plain = padder.update(stream_start + _hashed_blocks(_xml(entry_title)))
    plain += padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    path.write_bytes(header + encryptor.update(plain) + encryptor.finalize())

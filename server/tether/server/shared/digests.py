"""Keyed digests: how Tether looks things up without storing them.

Raw IMEIs, phone numbers and e-mail addresses never reach the database; we
store HMAC-SHA256(key, kind + ":" + normalized value) and the id of the key.
Keys rotate by adding a new one in front: lookups try every configured key,
new rows use the first.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass
from functools import cache
from pathlib import Path

MIN_KEY_BYTES = 32
_SHA256_BLOCK = 64


@dataclass(frozen=True)
class DigestKey:
    key_id: str
    secret: bytes

    def digest(self, kind: str, normalized: str) -> bytes:
        inner, outer = _hmac_states(self.secret)
        message = inner.copy()
        message.update(f"{kind}:{normalized}".encode())
        result = outer.copy()
        result.update(message.digest())
        return result.digest()


@cache
def _hmac_states(secret: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    """HMAC-SHA256 (RFC 2104) with the keyed pads already hashed, once per key.

    Copying these states is less than half the work of hmac.digest, which
    pads and hashes the key again for every message: it counts in bulk
    imports, which digest every account. The result is the same HMAC
    (tests/test_binding_keys.py checks it against the hmac module).
    """
    key = hashlib.sha256(secret).digest() if len(secret) > _SHA256_BLOCK else secret
    key = key.ljust(_SHA256_BLOCK, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
    return inner, outer


class Digester:
    def __init__(self, keys: list[DigestKey]) -> None:
        if not keys:
            raise ValueError("at least one digest key is required")
        self.keys = keys
        self.current = keys[0]

    def digest(self, kind: str, normalized: str) -> bytes:
        """The digest new rows store, under the current key."""
        return self.current.digest(kind, normalized)

    def candidates(self, kind: str, normalized: str) -> list[bytes]:
        """The digests a stored row may carry, one per configured key."""
        return [key.digest(kind, normalized) for key in self.keys]


def parse_keys(spec: str) -> list[DigestKey]:
    """'id:base64,id:base64' -> keys, the current one first."""
    keys = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key_id, sep, encoded = part.partition(":")
        if not sep or not key_id:
            raise ValueError("TETHER_DIGEST_KEYS entries look like 'k1:<base64 secret>'")
        secret = base64.b64decode(encoded, validate=True)
        if len(secret) < MIN_KEY_BYTES:
            raise ValueError(f"digest key {key_id!r} is shorter than {MIN_KEY_BYTES} bytes")
        keys.append(DigestKey(key_id, secret))
    return keys


def new_key_spec(key_id: str = "k1") -> str:
    return f"{key_id}:{base64.b64encode(secrets.token_bytes(MIN_KEY_BYTES)).decode()}"


def load_or_create_embedded(path: Path) -> list[DigestKey]:
    """Embedded mode keeps its key in data_dir, so digests survive restarts."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_key_spec() + "\n")
    return parse_keys(path.read_text().strip())

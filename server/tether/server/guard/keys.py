"""The guard's Redis key formats.

Hashes per (service, bucket, action[, room]). A bucket is the first bits of
the fingerprint identity (TETHER_GUARD_BUCKET_BITS), so many fingerprints
share one key and its fixed cost (~150 bytes); each (identity, account)
entry is one field: 16-byte identity + 8-byte account digest -> expiry in
Unix ms. The hash tag is the bucket, so every key of one fingerprint (all
actions and rooms of a service) lives in one Redis Cluster slot.
"""

from __future__ import annotations

from tether.server.counters.connection import KEY_PREFIX as PREFIX


def bucket(identity: str, bits: int) -> str:
    """The bucket of an identity (32 hex characters): its first `bits` bits, in hex."""
    return format(int(identity[:8], 16) >> (32 - bits), "x")


def registered(service_id: str, bucket: str) -> str:
    """Registrations of the fingerprints of one bucket."""
    return f"{PREFIX}:g:{service_id}:{{{bucket}}}:r"


def logged_in(service_id: str, bucket: str) -> str:
    """Live login sessions of the fingerprints of one bucket."""
    return f"{PREFIX}:g:{service_id}:{{{bucket}}}:l"


def room(service_id: str, room_id: str, bucket: str) -> str:
    """Members of one collaborative room, from the fingerprints of one bucket."""
    return f"{PREFIX}:g:{service_id}:{{{bucket}}}:c:{room_id}"

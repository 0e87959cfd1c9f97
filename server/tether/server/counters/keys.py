"""Every Redis key format, in one place.

Keys start with one prefix and carry a hash tag {...} wherever several keys
of one script must share a Redis Cluster slot. Deployments that share a Redis
server use separate Redis databases.
"""

from __future__ import annotations

PREFIX = "tether"


# --- binding -------------------------------------------------------------
def report_rate(credential_id: str, device_digest_hex: str, window: int) -> str:
    """Fixed-window counter of ReportAccountUse calls of one device."""
    return f"{PREFIX}:rate:report:{{{credential_id}:{device_digest_hex}}}:{window}"


# --- fingerprint guard (owned by tether.server.guard) ---------------------
# One sorted set per (service, fingerprint identity, action[, room]): members
# are 8-byte account digests, scores the entry's expiry in Unix ms. The hash
# tag is the identity, so every key of one fingerprint (all services, all
# actions, all rooms) shares a Cluster slot; each script touches one key.
def guard_registered(service_id: str, identity: str) -> str:
    """Accounts registered from one fingerprint."""
    return f"{PREFIX}:g:{service_id}:{{{identity}}}:r"


def guard_logged_in(service_id: str, identity: str) -> str:
    """Accounts logged in from one fingerprint, scored by session expiry."""
    return f"{PREFIX}:g:{service_id}:{{{identity}}}:l"


def guard_room(service_id: str, room_id: str, identity: str) -> str:
    """Accounts of one fingerprint in one collaborative room."""
    return f"{PREFIX}:g:{service_id}:{{{identity}}}:c:{room_id}"

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

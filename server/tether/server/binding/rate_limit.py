"""Rate limit of ReportAccountUse per (credential, device): one Lua call.

Without it, a caller could try account after account from one device and
learn which accounts are on a partner's list. A fixed one-minute window is
enough for that purpose and costs one round trip.

If Redis does not answer, reports go through (fail open) and a warning is
logged: binding is the device's first contact with Tether and must not
depend on the counter store being up.
"""

from __future__ import annotations

import asyncio
import time

from redis.exceptions import RedisClusterException, RedisError

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server import logs
from tether.server.counters.connection import KEY_PREFIX, Client
from tether.server.errors import ResourceExhausted
from tether.server.observability import metrics, probes

log = logs.get(__name__)

WINDOW_MS = 60_000

# KEYS[1]: window counter. ARGV[1]: limit, ARGV[2]: window length in ms.
# Returns {allowed (1/0), count, ms until the window ends}.
RATE_LIMIT_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local ttl = redis.call('PTTL', KEYS[1])
if count > tonumber(ARGV[1]) then
  return {0, count, ttl}
end
return {1, count, ttl}
"""


def window_key(credential_id: str, device_digest_hex: str, window: int) -> str:
    """Fixed-window counter of ReportAccountUse calls of one device; the hash
    tag keeps a device's windows in one Redis Cluster slot."""
    return f"{KEY_PREFIX}:rate:report:{{{credential_id}:{device_digest_hex}}}:{window}"


class ReportRateLimiter:
    def __init__(self, client: Client, per_minute: int, bound_seconds: float) -> None:
        self._script = client.register_script(RATE_LIMIT_SCRIPT)
        self._limit = per_minute
        self._bound = bound_seconds
        self._probe = probes.redis("binding.rate_limit")

    async def check(self, credential_id: str, device_digest: bytes) -> None:
        """Counts one report; RESOURCE_EXHAUSTED once the device is over its limit."""
        if self._limit <= 0:
            return
        window = int(time.time() * 1000) // WINDOW_MS
        key = window_key(credential_id, device_digest.hex(), window)
        try:
            async with asyncio.timeout(self._bound):
                if self._probe is None:
                    allowed, _count, ttl_ms = await self._script(
                        keys=[key], args=[self._limit, WINDOW_MS]
                    )
                else:
                    with self._probe.timing():
                        allowed, _count, ttl_ms = await self._script(
                            keys=[key], args=[self._limit, WINDOW_MS]
                        )
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            metrics.BINDING_RATE_LIMIT_FAIL_OPEN.inc()
            log.warning("report rate limit skipped: Redis failed", error=str(exc))
            return
        if not allowed:
            raise ResourceExhausted(
                ErrorReason.ERROR_REASON_RATE_LIMITED,
                f"at most {self._limit} reports per device per minute; retry later",
                metadata={"limit_per_minute": str(self._limit)},
                retry_after_seconds=max(int(ttl_ms), 1) / 1000,
            )

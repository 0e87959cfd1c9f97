"""The Redis client: a real server in production, fakeredis (running the same
Lua scripts) in embedded mode."""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

# Every key starts with this. Each area keeps its own key formats and Lua
# scripts beside its code (binding/rate_limit.py, guard/keys.py and
# guard/scripts.py); keys that one script touches together share a hash tag
# {...}, so they live in one Redis Cluster slot. Deployments that share a
# Redis server use separate Redis databases.
KEY_PREFIX = "tether"

# Pool size of both clients. The pool refuses ("Too many connections")
# rather than queues calls beyond it, so busy callers queue their own below it.
MAX_CONNECTIONS = 256


def connect(url: str, timeout_seconds: float) -> redis.Redis:
    """No socket_timeout (redis-py's default is 5 s, so it is turned off by
    name): with one, redis-py wraps every send in asyncio.wait_for (a task per
    command) and every read in a timeout. Each caller bounds its whole call
    with asyncio.timeout and settings.redis_timeout_seconds instead, which
    cancels the command and makes redis-py drop the connection."""
    if not url:
        import fakeredis

        client: Any = fakeredis.FakeAsyncRedis(max_connections=MAX_CONNECTIONS)
        return client  # type: ignore[no-any-return]
    return redis.Redis.from_url(
        url,
        # A pooled connection that Redis closed (a restart) fails its next
        # command: that one command is retried once, on a fresh connection.
        retry=Retry(NoBackoff(), retries=1),
        retry_on_error=[redis_errors.ConnectionError],
        socket_timeout=None,
        socket_connect_timeout=timeout_seconds,
        health_check_interval=30,
        max_connections=MAX_CONNECTIONS,
    )

"""The Redis client: a real server in production, fakeredis (running the same
Lua scripts) in embedded mode."""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis


def connect(url: str, timeout_seconds: float, *, per_command_timeout: bool = True) -> redis.Redis:
    """per_command_timeout=False: no socket_timeout (redis-py would wrap every
    send in asyncio.wait_for, a task per command); the caller must then bound
    each call itself, e.g. with asyncio.timeout, which cancels the command and
    makes redis-py drop the connection."""
    if not url:
        import fakeredis

        client: Any = fakeredis.FakeAsyncRedis()
        return client  # type: ignore[no-any-return]
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_seconds if per_command_timeout else None,
        socket_connect_timeout=timeout_seconds,
        health_check_interval=30,
        max_connections=256,
    )

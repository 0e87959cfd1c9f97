"""The Redis client: a real server in production, fakeredis (running the same
Lua scripts) in embedded mode."""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis


def connect(url: str, timeout_seconds: float) -> redis.Redis:
    if not url:
        import fakeredis

        client: Any = fakeredis.FakeAsyncRedis()
        return client  # type: ignore[no-any-return]
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_seconds,
        socket_connect_timeout=timeout_seconds,
        health_check_interval=30,
        max_connections=256,
    )

"""The guard's Redis side: one script call per check, bounded in time.

Every call either answers within the bound or raises CountersDown, which the
service turns into the policy's fail mode. Only Redis trouble (refused or
lost connections, timeouts, a loading replica) counts as down; a script
error is a bug and propagates as one.
"""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple

import redis.asyncio as redis
from redis import exceptions as redis_errors

from tether.server.counters.connection import MAX_CONNECTIONS
from tether.server.counters.pipelined import PipelinedConnection, Script
from tether.server.guard import scripts

FOREVER_MS = 9007199254740991
# The shared pool refuses calls beyond its size: the guard queues its own
# below it, leaving room for the other callers.
MAX_CONCURRENT = MAX_CONNECTIONS // 2
_DOWN = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    OSError,
    TimeoutError,
)


class CountersDown(Exception):
    """Redis did not answer within the bound."""


class Count(NamedTuple):
    allowed: bool
    already_counted: bool
    # Accounts counted for the identity (NamedTuple keeps `count` for tuple.count).
    counted: int
    # Unix ms; FOREVER_MS for no expiry; 0 when nothing was recorded.
    expire_ms: int


class GuardCounters:
    def __init__(
        self, client: redis.Redis, timeout_seconds: float, pipelined: PipelinedConnection | None
    ) -> None:
        """pipelined: the evaluate script's connection; None: through client."""
        self._client = client
        self._timeout = timeout_seconds
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        self.pipelined = pipelined
        self._evaluate_script = Script(scripts.EVALUATE)
        self._evaluate = client.register_script(scripts.EVALUATE)
        self._renew = client.register_script(scripts.RENEW)
        self._restore = client.register_script(scripts.RESTORE)

    async def _call(self, call: Any) -> Any:
        async with self._slots:
            try:
                # asyncio.timeout, unlike wait_for, starts no task per call.
                async with asyncio.timeout(self._timeout):
                    return await call
            except _DOWN as exc:
                raise CountersDown(str(exc) or type(exc).__name__) from exc

    async def _call_pipelined(self, keys: list[str], args: list[bytes | int]) -> Any:
        assert self.pipelined is not None
        try:
            # Bounded by the connection itself (one timer for all calls; a
            # call past its bound drops the connection, which is in doubt).
            # One connection, no pool: no slots to queue for.
            return await self.pipelined.run_script(self._evaluate_script, keys, args)
        except _DOWN as exc:
            raise CountersDown(str(exc) or type(exc).__name__) from exc

    async def evaluate(
        self, key: str, field: bytes, limit: int, life_ms: int, *, record_over: bool, extend: bool
    ) -> Count:
        """field: 16-byte identity followed by the 8-byte account member."""
        keys = [key]
        args: list[bytes | int] = [
            field[:16],
            field[16:],
            limit,
            life_ms,
            int(record_over),
            int(extend),
        ]
        if self.pipelined is not None:
            reply = await self._call_pipelined(keys, args)
        else:
            reply = await self._call(self._evaluate(keys=keys, args=args))
        allowed, already, count, expire_ms = reply
        return Count(allowed == 1, already == 1, int(count), int(expire_ms))

    def close(self) -> None:
        if self.pipelined is not None:
            self.pipelined.close()

    async def remove(self, key: str, field: bytes) -> bool:
        return bool(await self._call(self._client.hdel(key, field)))

    async def renew(self, key: str, field: bytes, life_ms: int) -> int:
        """The new expiry in Unix ms, or 0 when the entry is gone."""
        return int(await self._call(self._renew(keys=[key], args=[field, life_ms])))

    async def restore(self, key: str, entries: list[tuple[bytes, int]]) -> int:
        args: list[bytes | int] = []
        for field, expire_ms in entries:
            args += [field, expire_ms]
        return int(await self._call(self._restore(keys=[key], args=args)))

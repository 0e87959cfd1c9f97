"""The guard's Redis side: one script call per check, bounded in time.

Every call either answers within the bound or raises CountersDown, which the
service turns into the policy's fail mode. Any Redis error counts as down:
refused or lost connections, timeouts, a loading replica, and a cluster's
trouble (CLUSTERDOWN, TRYAGAIN, a slot with no master, redirections that
did not settle); an answer never becomes INTERNAL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from redis import exceptions as redis_errors

from tether.server.counters.cluster import ClusterConnection
from tether.server.counters.connection import MAX_CONNECTIONS, Client
from tether.server.counters.pipelined import PipelinedConnection, Script
from tether.server.guard import scripts
from tether.server.guard.keys import is_registrations, spills
from tether.server.guard.rules import Inputs
from tether.server.observability import probes
from tether.server.observability.probes import Probe

FOREVER_MS = 9007199254740991
# FOREVER_MS in a record's 6 bytes.
NEVER_48 = 2**48 - 1
# A script's reply asking to be run again with the spilled identity's keys.
SPILLED = -1
# An account digest's bytes: its field in a spilled identity's hash.
MEMBER = 8
# The shared pool refuses calls beyond its size: the guard queues its own
# below it, leaving room for the other callers.
MAX_CONCURRENT = MAX_CONNECTIONS // 2
DOWN = (
    redis_errors.RedisError,
    # redis-py's cluster client raises some of its own outside RedisError.
    redis_errors.RedisClusterException,
    OSError,
    TimeoutError,
)


class CountersDown(Exception):
    """Redis did not answer within the bound."""


class Count(NamedTuple):
    allowed: bool
    already_counted: bool
    # The deciding scope's count before this call (Scope below), and its
    # threshold (NamedTuple keeps `count` for tuple.count).
    counted: int
    # Unix ms; FOREVER_MS for no expiry; 0 when nothing was recorded.
    expire_ms: int
    scope: int
    threshold: int
    # A limit was exceeded (denied, or recorded anyway in shadow mode).
    over: bool


class Scope:
    """What EVALUATE's scope numbers mean."""

    NONE = 0
    BROWSER = 1
    NETWORK = 2
    # 3-6: the velocity windows, shortest first.
    VELOCITY = 3
    # Every network's accounts, for a farmed identity in its burst.
    FARM_BURST = 7


class Entry(NamedTuple):
    """One counted account as stored in an identity's record."""

    member: bytes
    admitted_ms: int
    expire_ms: int
    network: str


class Record(NamedTuple):
    """An identity's packed record (guard/scripts.py describes the bytes)."""

    farmed: bool
    expire_ms: int
    entries: list[Entry]
    # When the day's registrations were admitted, ms.
    registration_ms: list[int]


def _ms(raw: bytes) -> int:
    value = int.from_bytes(raw, "big")
    return FOREVER_MS if value == NEVER_48 else value


def is_spilled(value: bytes) -> bool:
    """Whether a record is a spilled identity's marker (its accounts are in
    keys.spills)."""
    return value[:1] in (b"+", b"F")


def decode(value: bytes) -> Record:
    count = int.from_bytes(value[7 : scripts.HEAD], "big")
    entries = []
    at = scripts.HEAD
    for _ in range(count):
        entries.append(
            Entry(
                value[at : at + 8],
                _ms(value[at + 8 : at + 14]),
                _ms(value[at + 14 : at + 20]),
                value[at + 20 : at + 28].hex(),
            )
        )
        at += scripts.ENTRY
    times = [_ms(value[i : i + 6]) for i in range(at, len(value) - 5, 6)]
    return Record(value[:1] in (b"f", b"F"), _ms(value[1:7]), entries, times)


class Evaluation(NamedTuple):
    """One call of the EVALUATE script: its bucket key and arguments."""

    key: str
    field: bytes
    args: list[bytes | int | str]


class Sent(NamedTuple):
    """An evaluation sent without awaiting its reply (send_evaluate)."""

    reply: asyncio.Future[Any]
    evaluation: Evaluation


def evaluation(
    key: str,
    field: bytes,
    member: bytes,
    limit: int,
    life_ms: int,
    *,
    record_over: bool,
    extend: bool,
    now_ms: int,
    network: str,
    inputs: Inputs,
) -> Evaluation:
    """A counting call. now_ms: the call's time (a backtest's event time);
    0: Redis's."""
    args: list[bytes | int | str] = [
        field,
        member,
        limit,
        life_ms,
        int(record_over),
        int(extend),
        now_ms,
        bytes.fromhex(network),
        # '1' rare, '2' rare with a fingerprint strangers share, '0' popular.
        2 if inputs.shared else int(inputs.rare),
        inputs.rotation_ms,
        int(inputs.crowd),
        inputs.crowd_window_ms,
        inputs.crowd_threshold,
        *inputs.velocity,
        inputs.farm_burst,
    ]
    return Evaluation(key, field, args)


def _count_of(reply: Any) -> Count:
    allowed, already, count, expire_ms, scope, threshold, over = reply
    return Count(
        allowed == 1,
        already == 1,
        int(count),
        int(expire_ms),
        int(scope),
        int(threshold),
        over == 1,
    )


class GuardCounters:
    def __init__(
        self,
        client: Client,
        timeout_seconds: float,
        pipelined: PipelinedConnection | ClusterConnection | None,
    ) -> None:
        """pipelined: the evaluate script's connection; None: through client."""
        self._client = client
        self._timeout = timeout_seconds
        self._slots = asyncio.Semaphore(MAX_CONCURRENT)
        self.pipelined = pipelined
        self._evaluate_script = Script(scripts.EVALUATE)
        self._evaluate = client.register_script(scripts.EVALUATE)
        self._remove = client.register_script(scripts.REMOVE)
        self._renew = client.register_script(scripts.RENEW)
        self._restore = client.register_script(scripts.RESTORE)
        # None unless metrics or tracing is on.
        self._evaluate_probe = probes.redis("guard.evaluate")
        self._command_probe = probes.redis("guard.command")

    async def _call(self, call: Any, probe: Probe | None = None) -> Any:
        probe = probe or self._command_probe
        async with self._slots:
            try:
                # asyncio.timeout, unlike wait_for, starts no task per call.
                async with asyncio.timeout(self._timeout):
                    if probe is None:
                        return await call
                    with probe.timing():
                        return await call
            except DOWN as exc:
                raise CountersDown(str(exc) or type(exc).__name__) from exc

    async def _call_pipelined(self, keys: list[str], args: list[bytes | int | str]) -> Any:
        assert self.pipelined is not None
        probe = self._evaluate_probe
        try:
            # Bounded by the connection itself (one timer for all calls; a
            # call past its bound drops the connection, which is in doubt).
            # One connection, no pool: no slots to queue for.
            if probe is None:
                return await self.pipelined.run_script(self._evaluate_script, keys, args)
            with probe.timing():
                return await self.pipelined.run_script(self._evaluate_script, keys, args)
        except DOWN as exc:
            raise CountersDown(str(exc) or type(exc).__name__) from exc

    def evaluate(self, call: Evaluation) -> Awaitable[Count]:
        """The call's Count. A call names only the bucket's key (a key that
        does not exist would make every call of its slot TRYAGAIN while the
        slot migrates): the script asks for the spilled identity's own keys
        (SPILLED) when it needs them, and the call runs again with them."""
        # Sent now on the pipelined connection, its reply awaited directly:
        # two coroutines to Redis instead of the general way's five, on the
        # path of every Evaluate. Timed calls (metrics or tracing on), a
        # connection not yet open and a cluster take the general way.
        sent = self.send_evaluate(call) if self._evaluate_probe is None else None
        return self._evaluate_general(call) if sent is None else self.evaluated(sent)

    async def _evaluate_general(self, call: Evaluation) -> Count:
        reply = await self._evaluate_with([call.key], call.args)
        if reply[0] == SPILLED:
            reply = await self._evaluate_spilled(call)
        return _count_of(reply)

    def send_evaluate(self, call: Evaluation) -> Sent | None:
        """evaluate's script sent at once, for `evaluated` to read its reply
        later: a backtest keeps a window of calls in flight without a task
        each. None when it cannot be sent so (no single pipelined connection
        open): then evaluate."""
        pipelined = self.pipelined
        if not isinstance(pipelined, PipelinedConnection):
            return None
        reply = pipelined.send_script(self._evaluate_script, [call.key], call.args)
        return None if reply is None else Sent(reply, call)

    async def evaluated(self, sent: Sent) -> Count:
        """The Count of a call send_evaluate sent."""
        try:
            reply = await sent.reply
        except DOWN as exc:
            raise CountersDown(str(exc) or type(exc).__name__) from exc
        if isinstance(reply, redis_errors.ResponseError):
            if not str(reply).startswith("NOSCRIPT"):
                raise CountersDown(str(reply))
            # Not run (Redis lost its scripts): the general way loads it.
            return await self._evaluate_general(sent.evaluation)
        if reply[0] == SPILLED:
            reply = await self._evaluate_spilled(sent.evaluation)
        return _count_of(reply)

    async def _evaluate_spilled(self, call: Evaluation) -> Any:
        """The call run again naming the spilled identity's own keys."""
        return await self._evaluate_with([call.key, *spills(call.key, call.field)], call.args)

    async def _evaluate_with(self, keys: list[str], args: list[bytes | int | str]) -> Any:
        if self.pipelined is not None:
            return await self._call_pipelined(keys, args)
        return await self._call(self._evaluate(keys=keys, args=args), self._evaluate_probe)

    async def _run(self, script: Any, key: str, field: bytes, args: list[Any]) -> int:
        """A script's reply, run again with the spilled identity's keys when
        it asks for them (see evaluate)."""
        reply = int(await self._call(script(keys=[key], args=args)))
        if reply == SPILLED:
            reply = int(await self._call(script(keys=[key, *spills(key, field)], args=args)))
        return reply

    def close(self) -> None:
        if self.pipelined is not None:
            self.pipelined.close()

    async def remove(self, key: str, field: bytes, member: bytes) -> bool:
        return bool(await self._run(self._remove, key, field, [field, member]))

    async def renew(self, key: str, field: bytes, member: bytes, life_ms: int) -> int:
        """The new expiry in Unix ms, or 0 when the entry is gone."""
        return await self._run(self._renew, key, field, [field, member, life_ms])

    async def restore(
        self, key: str, field: bytes, entries: list[Entry], *, farmed: bool = False, now_ms: int = 0
    ) -> int:
        """now_ms: a replay's time (0: Redis's own)."""
        args: list[bytes | int | str] = [field, int(farmed), now_ms, int(is_registrations(key))]
        for entry in entries:
            args += [entry.member, entry.admitted_ms, entry.expire_ms, bytes.fromhex(entry.network)]
        return await self._run(self._restore, key, field, args)

    async def entries(self, key: str, field: bytes) -> tuple[list[Entry], bool]:
        """An identity's counted accounts, and whether it is marked farmed
        (expired ones included: restore() skips them)."""
        value: bytes | None = await self._call(self._client.hget(key, field))
        if value is None:
            return [], False
        record = decode(value)
        if not is_spilled(value):
            return record.entries, record.farmed
        spilled: dict[bytes, bytes] = await self._call(self._client.hgetall(spills(key, field)[0]))
        entries = [
            Entry(name, _ms(v[:6]), _ms(v[6:12]), v[12:20].hex())
            for name, v in spilled.items()
            if len(name) == MEMBER
        ]
        return entries, record.farmed

    async def farmed(self, places: list[tuple[str, bytes]]) -> list[bool]:
        """Whether each identity (its key and field) is marked farmed: one
        round trip for all (a pipeline; on a Cluster, one per node)."""
        if not places:
            return []
        pipeline = self._client.pipeline(transaction=False)
        for key, field in places:
            pipeline.hget(key, field)
        values: list[bytes | None] = await self._call(pipeline.execute())
        return [value is not None and decode(value).farmed for value in values]

    async def remove_fields(self, places: list[tuple[str, bytes]]) -> None:
        """Deletes identities' records: (key, field) pairs, one HDEL per key
        (a key's fields share its slot)."""
        by_key: dict[str, list[bytes]] = {}
        for key, field in places:
            by_key.setdefault(key, []).append(field)
        for key, fields in by_key.items():
            await self._call(self._client.hdel(key, *fields))
            # A spilled identity's own keys go with it.
            await self.delete(*(name for field in fields for name in spills(key, field)))

    async def exists(self, key: str) -> bool:
        return bool(await self._call(self._client.exists(key)))

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self._call(self._client.get(key))
        return value

    async def mark(self, key: str, value: bytes = b"1", life_ms: int | None = None) -> None:
        await self._call(self._client.set(key, value, px=life_ms))

    async def claim(self, key: str, holder: str, life_ms: int) -> bool:
        """Sets key to holder for life_ms unless it is set; True when it was not."""
        return bool(await self._call(self._client.set(key, holder, nx=True, px=life_ms)))

    async def extend(self, key: str, life_ms: int) -> None:
        await self._call(self._client.pexpire(key, life_ms))

    async def delete(self, *keys: str) -> None:
        for start in range(0, len(keys), 500):
            await self._call(self._client.delete(*keys[start : start + 500]))

    async def delete_matching(
        self, pattern: str, keep: Callable[[str], bool] | None = None
    ) -> None:
        """Deletes every key matching a glob pattern (a scope's leftovers),
        but those keep(key) says to keep."""
        batch: list[str] = []
        try:
            async for found in self._client.scan_iter(match=pattern, count=1000):
                key = found.decode() if isinstance(found, bytes) else found
                if keep is not None and keep(key):
                    continue
                batch.append(key)
                if len(batch) >= 500:
                    await self.delete(*batch)
                    batch = []
        except DOWN as exc:
            raise CountersDown(str(exc) or type(exc).__name__) from exc
        await self.delete(*batch)

    async def matching(self, pattern: str) -> list[str]:
        """The keys matching a glob pattern (SCAN: a small scope's only)."""
        try:
            return [
                key.decode() if isinstance(key, bytes) else key
                async for key in self._client.scan_iter(match=pattern, count=1000)
            ]
        except DOWN as exc:
            raise CountersDown(str(exc) or type(exc).__name__) from exc

    async def load_scripts(self) -> None:
        """Makes sure Redis knows the evaluate script (and, on the pipelined
        connection, that it is open), so calls sent together never need a
        NOSCRIPT retry."""
        if self.pipelined is None:
            await self._call(self._client.script_load(scripts.EVALUATE))
            return
        try:
            await self.pipelined.command("SCRIPT", "LOAD", scripts.EVALUATE)
        except DOWN as exc:
            raise CountersDown(str(exc) or type(exc).__name__) from exc

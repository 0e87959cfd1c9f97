"""A Redis Cluster on the hot path: one pipelined connection per master,
each script call sent to the master of its keys' slot.

The slot map comes from CLUSTER SLOTS, asked of any node that answers (the
known masters first, then the configured ones). A call goes to its slot's
master, and every attempt of one call shares the call's deadline:
- MOVED (the slot has a new owner: a failover or a resharding): the slot
  goes to the named master at once, the whole map is refreshed, and the
  call is sent there;
- ASK (the slot is being migrated and this key has moved already): the
  call is sent once to the target, after ASKING; the map stays;
- a lost or refused connection, CLUSTERDOWN, TRYAGAIN: the call fails (its
  caller's fail mode applies) and the map is refreshed behind it, so the
  next calls find the replica that took over.

A master's connection is new whenever the master is (a replica that took
over has another address), so on_open sees every new master before any
call reaches it: the guard's restorer checks there whether the master's
counters need restoring (guard/restorer.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis import exceptions as redis_errors
from redis.crc import REDIS_CLUSTER_HASH_SLOTS as SLOTS
from redis.crc import key_slot

from tether.server.counters.pipelined import PipelinedConnection, Script

Address = tuple[str, int]
Send = Callable[..., Awaitable[Any]]

# Redirections and retries of one call, all within its deadline.
MAX_ATTEMPTS = 4
# Background refreshes start at most this often (seconds).
REFRESH_PAUSE = 0.05
_DOWN = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError, TimeoutError)


@dataclass(frozen=True)
class Master:
    """A master and the slot ranges (inclusive) it serves."""

    id: str
    address: Address
    ranges: tuple[tuple[int, int], ...]

    @property
    def first_slot(self) -> int:
        return min(start for start, _ in self.ranges)

    def slots(self) -> set[int]:
        return {slot for start, end in self.ranges for slot in range(start, end + 1)}


def masters_of(reply: Sequence[Any], asked: Address) -> list[Master]:
    """The masters a CLUSTER SLOTS reply names (asked: the node that
    answered, whose address an empty host stands for)."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    addresses: dict[str, Address] = {}
    for row in reply:
        start, end, primary = int(row[0]), int(row[1]), row[2]
        host = _text(primary[0])
        if host == "?":
            continue  # a node whose address is unknown yet
        node_id = _text(primary[2])
        addresses[node_id] = (host or asked[0], int(primary[1]))
        ranges.setdefault(node_id, []).append((start, end))
    return [Master(node_id, addresses[node_id], tuple(sorted(r))) for node_id, r in ranges.items()]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_tags: dict[int, str] = {}


def tag_for_slot(slot: int) -> str:
    """A short hash tag whose keys live in `slot` (e.g. a marker per master)."""
    tag = _tags.get(slot)
    if tag is None:
        n = 0
        # About 16,384 CRC16s of short strings on average: done once per slot.
        while key_slot(str(n).encode()) != slot:
            n += 1
        tag = _tags[slot] = str(n)
    return tag


def _redirect(error: redis_errors.ResponseError) -> tuple[str, Address] | None:
    """("MOVED" or "ASK", the node named) for a redirection, else None."""
    parts = str(error).split()
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK"):
        return None
    host, _, port = parts[2].rpartition(":")
    return parts[0], (host, int(port))


class ClusterConnection:
    def __init__(
        self,
        seeds: Sequence[Address],
        timeout_seconds: float,
        *,
        username: str = "",
        password: str = "",
    ) -> None:
        """timeout_seconds bounds every call, its redirections included."""
        self._seeds = list(seeds)
        self._timeout = timeout_seconds
        self._username = username
        self._password = password
        self._owners: list[Master | None] = [None] * SLOTS
        self._masters: dict[Address, Master] = {}
        self._connections: dict[Address, PipelinedConnection] = {}
        # Asks for the slot map; no on_open (it sends no counting call).
        self._control: PipelinedConnection | None = None
        self._control_address: Address = ("", 0)
        self._refreshing: asyncio.Task[None] | None = None
        self._refresh_started = float("-inf")
        # Run on every new connection to a master before any call goes
        # through it, with a way to send on it; raising fails the calls
        # that waited for it (see PipelinedConnection.on_open).
        self.on_open: Callable[[Send, Master], Awaitable[None]] | None = None
        # Told when a refresh finds another map than the one before.
        self.on_change: Callable[[], None] | None = None

    async def run_script(
        self, script: Script, keys: Sequence[str], args: Sequence[bytes | int | str]
    ) -> Any:
        """The script's reply from the master of its keys' slot (keys share
        one slot). Raises ConnectionError (or TimeoutError) when the cluster
        does not answer within the time bound."""
        deadline = asyncio.get_running_loop().time() + self._timeout
        slot = key_slot(keys[0].encode())
        ask: Address | None = None
        for _ in range(MAX_ATTEMPTS):
            if ask is not None:
                connection = await self._connection_at(ask, deadline)
            else:
                master = self._owners[slot]
                if master is None:
                    await self._refresh_by(deadline)
                    master = self._owners[slot]
                    if master is None:
                        raise redis_errors.ConnectionError(f"no master serves slot {slot}")
                connection = self._connection(master)
            try:
                return await connection.run_script(
                    script, keys, args, deadline=deadline, asking=ask is not None
                )
            except redis_errors.ResponseError as error:
                redirect = _redirect(error)
                if redirect is None:
                    # CLUSTERDOWN, TRYAGAIN or a script's error: no retry.
                    self.refresh_soon()
                    raise
                kind, target = redirect
                if kind == "ASK":
                    ask = target
                    continue
                ask = None
                known = self._masters.get(target)
                if known is not None:
                    self._owners[slot] = known
                    self.refresh_soon()
                else:
                    await self._refresh_by(deadline)
            except _DOWN:
                self.refresh_soon()
                raise
        raise redis_errors.ConnectionError(f"slot {slot}: still redirected after {MAX_ATTEMPTS}")

    async def command(self, *args: str | bytes | int) -> Any:
        """A command on every master (e.g. SCRIPT LOAD before scripts are sent
        many at a time); the first master's reply."""
        masters = await self.masters()
        replies = [await self._connection(master).command(*args) for master in masters]
        return replies[0] if replies else None

    async def masters(self) -> list[Master]:
        """The masters as the cluster says now (the map is refreshed)."""
        await self._refresh_by(asyncio.get_running_loop().time() + self._timeout)
        return list(self._masters.values())

    def master_of(self, key: str) -> Master | None:
        """The master that serves key's slot, as the map says."""
        return self._owners[key_slot(key.encode())]

    @property
    def waiting(self) -> int:
        """Calls sent and not yet answered (or given up), on every master."""
        return sum(connection.waiting for connection in self._connections.values())

    def close(self) -> None:
        """Closes every connection; a later call opens new ones."""
        if self._refreshing is not None:
            self._refreshing.cancel()
            self._refreshing = None
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()
        if self._control is not None:
            self._control.close()
            self._control = None

    # --- connections -----------------------------------------------------
    def _connection(self, master: Master) -> PipelinedConnection:
        connection = self._connections.get(master.address)
        if connection is None:
            host, port = master.address
            connection = PipelinedConnection(
                host, port, self._timeout, username=self._username, password=self._password
            )
            address = master.address

            async def opened(send: Send) -> None:
                # The master as the map says when the connection opens.
                current = self._masters.get(address)
                if current is None:
                    raise redis_errors.ConnectionError(f"{host}:{port} is no longer a master")
                if self.on_open is not None:
                    await self.on_open(send, current)

            connection.on_open = opened
            self._connections[address] = connection
        return connection

    async def _connection_at(self, address: Address, deadline: float) -> PipelinedConnection:
        master = self._masters.get(address)
        if master is None:
            await self._refresh_by(deadline)
            master = self._masters.get(address)
            if master is None:
                raise redis_errors.ConnectionError(f"{address[0]}:{address[1]} is not a master")
        return self._connection(master)

    # --- the slot map ----------------------------------------------------
    def refresh_soon(self) -> None:
        """Refreshes the map behind the current calls: one refresh at a time,
        and none within REFRESH_PAUSE of the last one's start (while a dead
        master's replica has not taken over yet, every call to its slots fails)."""
        running = self._refreshing is not None and not self._refreshing.done()
        if (
            not running
            and asyncio.get_running_loop().time() >= self._refresh_started + REFRESH_PAUSE
        ):
            self._refresh_task()

    def _refresh_task(self) -> asyncio.Task[None]:
        if self._refreshing is None or self._refreshing.done():
            self._refresh_started = asyncio.get_running_loop().time()
            self._refreshing = asyncio.create_task(self._refresh(), name="redis-cluster-map")
            # A failed background refresh is retried by the next call's trouble.
            self._refreshing.add_done_callback(_consume)
        return self._refreshing

    async def _refresh_by(self, deadline: float) -> None:
        async with asyncio.timeout_at(deadline):
            await asyncio.shield(self._refresh_task())

    async def _refresh(self) -> None:
        candidates: list[Address] = []
        if self._control is not None:
            candidates.append(self._control_address)
        for address in [*self._masters, *self._seeds]:
            if address not in candidates:
                candidates.append(address)
        failures = []
        for address in candidates:
            try:
                reply = await self._ask_map(address)
            except (*_DOWN, redis_errors.RedisError) as error:
                failures.append(f"{address[0]}:{address[1]}: {error}")
                continue
            masters = masters_of(reply, address)
            if masters:
                self._install(masters)
                return
        raise redis_errors.ConnectionError(
            "no node of the cluster told its slots: " + "; ".join(failures)
        )

    async def _ask_map(self, address: Address) -> Any:
        if self._control is None or self._control_address != address:
            if self._control is not None:
                self._control.close()
            self._control = PipelinedConnection(
                *address, self._timeout, username=self._username, password=self._password
            )
            self._control_address = address
        try:
            return await self._control.command("CLUSTER", "SLOTS")
        except BaseException:
            self._control.close()
            self._control = None
            raise

    def _install(self, masters: list[Master]) -> None:
        owners: list[Master | None] = [None] * SLOTS
        for master in masters:
            for start, end in master.ranges:
                owners[start : end + 1] = [master] * (end - start + 1)
        before = set(self._masters.values())
        self._owners = owners
        self._masters = {master.address: master for master in masters}
        # A node that is no longer a master gets no more calls.
        for address in [a for a in self._connections if a not in self._masters]:
            self._connections.pop(address).close()
        if before and before != set(masters) and self.on_change is not None:
            self.on_change()


def _consume(task: asyncio.Task[None]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        task.exception()

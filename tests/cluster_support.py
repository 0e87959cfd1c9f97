"""Helpers of the Redis Cluster tests: a private cluster a test may break
(scripts/redis-cluster on ports of its own), and who serves which key."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as redis
from redis.crc import key_slot

from tests.support import RunningServer
from tether.server.counters.cluster import Master, masters_of
from tether.server.counters.connection import cluster_address
from tether.server.counters.pipelined import PipelinedConnection
from tether.server.guard import keys

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "redis-cluster"


@dataclass(frozen=True)
class Node:
    port: int
    id: str
    role: str  # "master" or "slave"
    master_id: str  # a replica's master; "" for a master


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_base() -> int:
    """A first port whose six ports and their bus ports (+10000) are free;
    below the ephemeral range, so no outgoing connection takes one meanwhile."""
    for _ in range(100):
        base = random.randrange(15000, 22000)
        if all(_free(base + i) and _free(base + 10000 + i) for i in range(6)):
            return base
    raise RuntimeError("no six free ports for a private Redis Cluster")


@dataclass
class PrivateCluster:
    """scripts/redis-cluster on ports and a directory of the test's own."""

    directory: Path
    node_timeout_ms: int = 1500
    base: int = 0

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.base}"

    def _run(self, command: str) -> None:
        environment = {
            **os.environ,
            "TETHER_REDIS_CLUSTER_PORT": str(self.base),
            "TETHER_REDIS_CLUSTER_DIR": str(self.directory),
            "TETHER_REDIS_CLUSTER_NODE_TIMEOUT_MS": str(self.node_timeout_ms),
        }
        done = subprocess.run(
            [str(SCRIPT), command], env=environment, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, f"redis-cluster {command}: {done.stderr}"

    async def start(self) -> None:
        """Starts every node that is down and waits until the cluster is
        whole (cluster_state:ok everywhere, 3 masters with a replica each)."""
        if not self.base:
            self.base = _free_base()
        await asyncio.to_thread(self._run, "start")

    async def stop(self) -> None:
        await asyncio.to_thread(self._run, "stop")


async def nodes(port: int) -> list[Node]:
    """The cluster's nodes as one node sees them (failed ones left out)."""
    connection = PipelinedConnection("127.0.0.1", port, 5.0)
    try:
        text = await connection.command("CLUSTER", "NODES")
    finally:
        connection.close()
    out = []
    for line in (text.decode() if isinstance(text, bytes) else text).splitlines():
        fields = line.split()
        flags = fields[2].split(",")
        if "fail" in flags or "noaddr" in flags:
            continue
        role = "master" if "master" in flags else "slave"
        port_of = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        out.append(Node(port_of, fields[0], role, "" if fields[3] == "-" else fields[3]))
    return out


async def masters(port: int) -> list[Master]:
    """The masters and their slots as one node sees them."""
    connection = PipelinedConnection("127.0.0.1", port, 5.0)
    try:
        reply = await connection.command("CLUSTER", "SLOTS")
    finally:
        connection.close()
    return masters_of(reply, ("127.0.0.1", port))


def seed_port(url: str) -> int:
    """The port of a cluster URL's first node."""
    address = cluster_address(url)
    assert address is not None
    return address.nodes[0][1]


def master_of_slot(all_masters: list[Master], slot: int) -> Master:
    for master in all_masters:
        if any(start <= slot <= end for start, end in master.ranges):
            return master
    raise AssertionError(f"no master serves slot {slot}")


def guard_key(server: RunningServer, service: str, action: str, identity: str) -> str:
    return keys.counted(service, action, "", identity, bits=server.app.settings.guard_bucket_bits)


def slot_of(key: str) -> int:
    return key_slot(key.encode())


async def process_id(port: int) -> int:
    client = redis.Redis(port=port)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    return int(info["process_id"])


async def node_command(port: int, *args: str | int | bytes) -> object:
    """A command on one node (not routed: CLUSTER SETSLOT, MIGRATE, ...)."""
    connection = PipelinedConnection("127.0.0.1", port, 10.0)
    try:
        return await connection.command(*args)
    finally:
        connection.close()

"""The Redis client: a real server or a Redis Cluster in production,
fakeredis (running the same Lua scripts) in embedded mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tether.server.counters.cluster import ClusterConnection
from tether.server.counters.pipelined import PipelinedConnection

# Every key starts with this. Each area keeps its own key formats and Lua
# scripts beside its code (binding/rate_limit.py, guard/keys.py and
# guard/scripts.py); keys that one script touches together share a hash tag
# {...}, so they live in one Redis Cluster slot, and a script touches no key
# it was not passed. Deployments that share a Redis server use separate
# Redis databases (a cluster has none: one cluster per deployment).
KEY_PREFIX = "tether"

CLUSTER_SCHEME = "redis+cluster"

# What the areas are given: a single Redis or a cluster (redis-py routes a
# cluster's commands by their keys' slot, and splits multi-key ones per slot).
Client = redis.Redis | RedisCluster


@dataclass(frozen=True)
class ClusterAddress:
    """Where a Redis Cluster is: some of its nodes (any one will do to find
    the others), and the credentials every node takes."""

    nodes: tuple[tuple[str, int], ...]
    username: str = ""
    password: str = ""


def cluster_address(url: str, cluster: bool = False) -> ClusterAddress | None:
    """The cluster a URL names: redis+cluster://[user:password@]host:port[,host:port...],
    or any redis:// URL when `cluster` (TETHER_REDIS_CLUSTER) is set. None
    for a single Redis. Raises ValueError for a cluster URL it cannot use."""
    scheme, separator, rest = url.partition("://")
    if scheme == "rediss+cluster" or (cluster and scheme == "rediss"):
        raise ValueError("a Redis Cluster over TLS is not supported yet")
    if not separator or not (scheme == CLUSTER_SCHEME or (cluster and scheme == "redis")):
        return None
    rest = rest.split("/", 1)[0].split("?", 1)[0]
    credentials, _, hosts = rest.rpartition("@")
    username, _, password = credentials.rpartition(":")
    nodes = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise ValueError(f"{item!r} is not host:port (in {CLUSTER_SCHEME}://host:port,...)")
        nodes.append((host, int(port)))
    return ClusterAddress(tuple(nodes), username, password)


# Pool size of both clients. The pool refuses ("Too many connections")
# rather than queues calls beyond it, so busy callers queue their own below it.
MAX_CONNECTIONS = 256


def connect(url: str, timeout_seconds: float, *, cluster: bool = False) -> Client:
    """A cluster client when the URL names a cluster (cluster_address).

    No socket_timeout (redis-py's default is 5 s, so it is turned off by
    name): with one, redis-py wraps every send in asyncio.wait_for (a task per
    command) and every read in a timeout. Each caller bounds its whole call
    with asyncio.timeout and settings.redis_timeout_seconds instead, which
    cancels the command and makes redis-py drop the connection."""
    if not url:
        import fakeredis

        client: Any = fakeredis.FakeAsyncRedis(max_connections=MAX_CONNECTIONS)
        return client  # type: ignore[no-any-return]
    address = cluster_address(url, cluster)
    if address is not None:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in address.nodes],
            username=address.username or None,
            password=address.password or None,
            # Slots whose master is down fail alone; the others keep answering.
            require_full_coverage=False,
            socket_timeout=None,
            socket_connect_timeout=timeout_seconds,
            # Per node.
            max_connections=MAX_CONNECTIONS,
        )
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


def connect_pipelined(
    url: str, timeout_seconds: float, *, cluster: bool = False
) -> PipelinedConnection | ClusterConnection | None:
    """The hot path's connection: one pipelined connection, or one per
    master of a cluster. None where only redis-py speaks (TLS, Unix sockets,
    embedded mode's fakeredis)."""
    address = cluster_address(url, cluster)
    if address is not None:
        return ClusterConnection(
            address.nodes,
            timeout_seconds,
            username=address.username,
            password=address.password,
        )
    return PipelinedConnection.from_url(url, timeout_seconds)

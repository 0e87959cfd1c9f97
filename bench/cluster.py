"""FingerprintGuard.Evaluate through a Redis Cluster against the same
through a single Redis, measured in the same run.

    python -m bench.cluster

Two Tether servers, each in its own process with a PostgreSQL database of
its own: one on a private redis-server with one replica, one on a private
3-master, 3-replica cluster (scripts/redis-cluster on free ports and a
temporary directory). The workloads are bench.guard's: "repeat" (logins of accounts
already counted, from returning browsers: one script call) and "new" (a
first visit each call), at 1 and 32 calls in flight, in alternating
slices. Target: the cluster at 0.9x the single Redis or better.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg

from bench.guard import CALLS, POSTGRES_DSN, SERVICE, WARMUP, Result, Server, Target, compare
from bench.guard import _request as request
from bench.guard import _row as row
from tether.guard.v1 import messages_pb2 as pb

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "redis-cluster"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_environment(directory: str) -> dict[str, str]:
    """scripts/redis-cluster's settings for six free ports (and their bus
    ports, 10000 higher) below the ephemeral range."""
    for _ in range(100):
        base = random.randrange(15000, 22000)
        if all(_free(base + i) and _free(base + 10000 + i) for i in range(6)):
            return {
                **os.environ,
                "TETHER_REDIS_CLUSTER_PORT": str(base),
                "TETHER_REDIS_CLUSTER_DIR": directory,
            }
    raise RuntimeError("no six free ports for a Redis Cluster")


def _start_redis(directory: str, replica_of: int = 0) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is required"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    os.makedirs(directory, exist_ok=True)
    replica = ["--replicaof", "127.0.0.1", str(replica_of)] if replica_of else []
    process = subprocess.Popen(
        [
            binary,
            *("--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"),
            *("--dir", directory),
            *("--repl-diskless-sync-delay", "0", *replica),
        ],
        stdout=subprocess.DEVNULL,
    )
    return process, port


async def _wait_for_redis(port: int, *, replica: bool = False) -> None:
    """Until it answers (and, for a replica, is in sync with its master)."""
    import redis.asyncio as redis

    client = redis.Redis(port=port)
    try:
        for _ in range(200):
            try:
                info = await client.info("replication")
                if not replica or info.get("master_link_status") == "up":
                    break
            except (redis.ConnectionError, OSError):
                pass
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"redis-server on {port} did not start")
    finally:
        await client.aclose()


def main() -> None:
    work = tempfile.mkdtemp(prefix="bench-cluster-")
    environment = _cluster_environment(f"{work}/cluster")
    try:
        started = subprocess.run([str(SCRIPT), "start"], env=environment, check=False)
        assert started.returncode == 0, "scripts/redis-cluster did not start"
        cluster_url = f"redis+cluster://127.0.0.1:{environment['TETHER_REDIS_CLUSTER_PORT']}"
        # The single Redis has a replica too, as it would in production:
        # both sides pay for replication, and the ratio is the routing's.
        master, port = _start_redis(f"{work}/single")
        replica, replica_port = _start_redis(f"{work}/replica", replica_of=port)
        try:
            asyncio.run(_main(work, port, replica_port, cluster_url))
        finally:
            for process in (replica, master):
                process.terminate()
                process.wait(10)
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=environment, check=False)
        shutil.rmtree(work, ignore_errors=True)


async def _main(work: str, port: int, replica_port: int, cluster_url: str) -> None:
    await _wait_for_redis(port)
    await _wait_for_redis(replica_port, replica=True)
    redis_url = f"redis://127.0.0.1:{port}/0"
    databases = [f"tether_bench_cluster_{secrets.token_hex(4)}" for _ in range(2)]
    admin = await asyncpg.connect(POSTGRES_DSN)
    base = POSTGRES_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    servers: dict[str, Server] = {}
    try:
        for database in databases:
            await admin.execute(f'CREATE DATABASE "{database}"')
        servers["single"] = Server("tether", redis_url, work, f"{base}/{databases[0]}")
        servers["cluster"] = Server("tether", cluster_url, work, f"{base}/{databases[1]}")
        await _run(servers)
    finally:
        for server in servers.values():
            await server.close()
        for database in databases:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


async def _run(servers: dict[str, Server]) -> None:
    for server in servers.values():
        await server.stub.SetPolicy(
            pb.SetPolicyRequest(
                policy=pb.Policy(service_id=SERVICE, login_limit=10_000, login_session_seconds=3600)
            )
        )
    pool = [request(f"repeat-{i % 256}", f"user{i % 256}") for i in range(256)]
    run = secrets.token_hex(3)
    fresh: dict[int, pb.EvaluateRequest] = {}

    def prepare_new(first: int, count: int) -> None:
        fresh.clear()
        for i in range(first, first + count):
            fresh[i] = request(f"{run}-{i}", f"new{i}")

    def repeat(server: Server) -> Callable[[int], Any]:
        return lambda i: server.stub.Evaluate(pool[i % 256])

    def new(server: Server) -> Callable[[int], Any]:
        return lambda i: server.stub.Evaluate(fresh[i])

    targets = [
        Target("single repeat", repeat(servers["single"])),
        Target("cluster repeat", repeat(servers["cluster"])),
        Target("single new", new(servers["single"]), prepare_new),
        Target("cluster new", new(servers["cluster"]), prepare_new),
    ]
    results: dict[tuple[str, int], Result] = {}
    offset = 0
    for in_flight, calls in CALLS.items():
        for result in await compare(targets, in_flight, calls, offset):
            results[(result.name, in_flight)] = result
            print(row(result), file=sys.stderr, flush=True)
        offset += (WARMUP + calls) * len(targets)

    print(
        "\nEvaluate through a single Redis (one replica) and a 3-master, 3-replica"
        " Redis Cluster (calls/s, ms)"
    )
    print(f"  {'server':<22} {'in flight':>3} {'calls/s':>10} {'p50':>8} {'p99':>8}")
    for result in results.values():
        print(row(result))
    print("\nCluster against single Redis (throughput: higher is better; p99: lower)")
    for in_flight in CALLS:
        for workload in ("repeat", "new"):
            single = results[(f"single {workload}", in_flight)]
            cluster = results[(f"cluster {workload}", in_flight)]
            print(
                f"  {workload:<6} @{in_flight:>2}: throughput "
                f"{cluster.per_second / single.per_second:.2f}x, "
                f"p99 {cluster.p99_ms / single.p99_ms:.2f}x"
            )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()

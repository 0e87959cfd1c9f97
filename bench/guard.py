"""FingerprintGuard.Evaluate against two baselines measured in the same run.

    python -m bench.guard

Baselines: a bare grpc.aio server answering Evaluate with a constant, and a
bare grpc.aio server doing one Redis EVALSHA (a one-line INCR script) per
call. Tether runs with its real interceptor (authentication), validation,
identity hashing and the guard's script; SQL (PostgreSQL, a database of
its own) is off the hot path. Every server runs in its own process; this process only sends calls.
All Redis work happens on a private redis-server the benchmark starts.

Workloads of Tether's Evaluate:
- "repeat": logins of accounts already counted, from a returning browser
  (the common case: pages re-checking a user who is logged in); the
  identity from the process's caches, one script call, no SQL.
- "new": each call a first visit: a new person's browser (its own fonts,
  screen, version, network) and account logging in; the fingerprint
  digested, the drift and profile look-ups of the identity book, one
  script call, and the SQL record written behind in batches.
With TETHER_BENCH_COMPILED set to a tree from scripts/build-compiled (make
bench does), both workloads also run on a second Tether server whose
guard identity core is compiled by mypyc (a database of its own).
Then: Redis bytes per (identity, account) entry (10^6 identities filled in
the layout the guard's scripts write, checked against 20,000 entries
written by real Evaluate calls), and the "repeat" latency with 10^4 and
with 10^6 identities stored.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import asyncpg
import grpc
import redis.asyncio as redis

from tether.clients.connection import open_channel
from tether.clients.guard.client import account, components
from tether.guard.v1 import messages_pb2 as pb
from tether.guard.v1 import service_pb2_grpc
from tether.server.guard import scripts

SERVICE = "bench"
POSTGRES_DSN = os.environ.get(
    "TETHER_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)
WARMUP = 300
# Calls per target and in-flight level, in ROUNDS alternating slices. With
# 2,000 calls (2 s) at 1 in flight in 5 slices, runs spread by about +-5%,
# as much as the margin the 0.9x target leaves; four times the calls in
# twice the slices narrow it, for about a minute more per run.
CALLS = {1: 8000, 32: 12000}
FILL_CHUNK = 20_000
# The fill script's check against real Evaluate calls: 20,000 entries in
# 2^10 buckets, about as many per bucket as 10^6 in 2^16.
CHECK_ENTRIES = 20_000
CHECK_BITS = 10
CHECK_SERVICE = "bench-check"
ROUNDS = 10
# A tree from scripts/build-compiled: Tether with its guard core compiled.
_COMPILED = os.environ.get("TETHER_BENCH_COMPILED", "")
COMPILED_TREE = os.path.abspath(_COMPILED) if _COMPILED else ""

# A one-key script: the least one EVALSHA per call can cost.
BASELINE_SCRIPT = "return redis.call('INCR', KEYS[1])"

# Fills login buckets the way the guard's EVALUATE script writes them, with
# its own record helpers (scripts.COMMON): one record per identity (derived
# from a counter) in its bucket's hash, holding one account, and the
# bucket's expiry (ARGV[7] > 0: every ARGV[7]th identity holds a second
# account). main() checks it against records written by real Evaluate calls.
# Joined to scripts.COMMON where it is loaded: bench.observability's
# "before" server imports this module with an older tether, which has none.
FILL_SCRIPT = """
local prefix, bits, expiry = ARGV[1], tonumber(ARGV[4]), tonumber(ARGV[5])
local now, every = tonumber(ARGV[6]), tonumber(ARGV[7])
local function bytes(hex)
  return (hex:gsub('..', function(cc) return string.char(tonumber(cc, 16)) end))
end
for i = tonumber(ARGV[2]), tonumber(ARGV[3]) do
  local h = redis.sha1hex('identity' .. i)
  local bucket = string.format('%x', math.floor(tonumber(h:sub(1, 8), 16) / 2 ^ (32 - bits)))
  local key = prefix .. '{' .. bucket .. '}:l'
  local r = load(nil)
  add(r, bytes(redis.sha1hex('a' .. i):sub(1, 16)), now, expiry,
    bytes(redis.sha1hex('network' .. i):sub(1, 16)))
  if every > 0 and i % every == 0 then
    add(r, bytes(redis.sha1hex('b' .. i):sub(1, 16)), now, expiry,
      bytes(redis.sha1hex('network' .. i):sub(1, 16)))
  end
  save(key, bytes(h:sub(1, 32)), r, now)
  redis.call('PEXPIREAT', key, expiry)
end
return 0
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def fingerprint_of(seed: str) -> pb.FingerprintComponents:
    """A realistic payload: ~60 fonts (some of them the browser's own), a
    few plugins; each seed another person's desktop."""
    number = int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=4).digest(), "big")
    return components(
        {
            "browser_name": "Chrome",
            "browser_version": f"131.0.6778.{number % 97}",
            "os_name": "Windows",
            "os_version": "10.0",
            "screen_width": 1280 + number % 1280,
            "screen_height": 720 + number % 720,
            "pixel_ratio": 1.25,
            "color_depth": 24,
            "fonts": [f"Font Family {i}" for i in range(50)]
            + [f"Font {seed} {i}" for i in range(10)],
            "plugins": [f"Plugin {i}: Portable Document Format" for i in range(5)],
            "languages": ["de-DE", "de", "en-US", "en"][: 1 + number % 4],
            "timezone": "Europe/Berlin",
            "platform": "Win32",
            "extra": {"canvas": seed, "webgl": "a1b2c3", "hardware_concurrency": "8"},
        }
    )


# --- the servers (child processes) -------------------------------------------
class _Bare(service_pb2_grpc.FingerprintGuardServicer):
    def __init__(self, client: redis.Redis | None) -> None:
        self._script = client.register_script(BASELINE_SCRIPT) if client else None
        self._answer = pb.EvaluateResponse(verdict=pb.VERDICT_ALLOW, identity="0" * 32)

    async def Evaluate(self, request: pb.EvaluateRequest, context: Any) -> pb.EvaluateResponse:
        if self._script is not None:
            await self._script(keys=["bench:baseline"], args=[])
        return self._answer


def _settle() -> None:
    """What `tether-server serve` does once started (see app.serve): moves
    what startup made out of the collector's sight. Without it, Tether's
    full collections walk its whole start-up heap (90+ ms each, one or more
    landing in the measured slices); the baselines get the same, so each
    side runs as it would in production. Then app.settle_collector's
    threshold for young collections."""
    gc.freeze()
    gc.set_threshold(10_000, *gc.get_threshold()[1:])


async def _serve_bare(port: int, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url) if redis_url else None
    server = grpc.aio.server()
    # The baselines implement Evaluate only.
    servicer = _Bare(client)  # type: ignore[abstract]
    service_pb2_grpc.add_FingerprintGuardServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    _settle()
    print("READY -", flush=True)
    await server.wait_for_termination()


async def _serve_tether(port: int, redis_url: str, data_dir: str, database_url: str) -> None:
    from tether.server.app import build
    from tether.server.settings import Settings
    from tether.server.shared import digests
    from tether.server.transport.credentials import mint
    from tether.server.transport.principal import CallerKind

    settings = Settings(
        listen=f"127.0.0.1:{port}",
        database_url=database_url,
        migrate_on_start=True,
        redis_url=redis_url,
        data_dir=Path(data_dir),
        digest_keys=digests.new_key_spec("bench"),
        http_listen="",
        log_level="WARNING",
    )
    app = await build(settings)
    await app.start()
    minted = mint(CallerKind.INTERNAL, None, "bench")
    async with app.runtime.db.transaction() as session:
        session.add(minted.credential)
    _settle()
    print("READY", minted.token, flush=True)
    await app.server.wait_for_termination()


def serve(kind: str, port: int, redis_url: str, data_dir: str, database_url: str) -> None:
    from tether.server import logs

    # To stderr and only errors: stdout is the pipe that carries READY, and
    # per-call logs would fill it and stall the server.
    logs.configure("ERROR")
    if kind == "tether":
        asyncio.run(_serve_tether(port, redis_url, data_dir, database_url))
    else:
        asyncio.run(_serve_bare(port, redis_url if kind == "evalsha" else ""))


# --- the load ------------------------------------------------------------------
@dataclass
class Result:
    name: str
    in_flight: int
    per_second: float
    p50_ms: float
    p99_ms: float


class Target(NamedTuple):
    name: str
    # Sends call number i.
    call: Callable[[int], Any]
    # Builds what calls first .. first + count - 1 send, before they are
    # timed: every target's timed loop then only sends a ready request.
    prepare: Callable[[int, int], None] | None = None


class Sampler:
    """Latencies and busy time of one target, gathered over several slices."""

    def __init__(self, target: Target, in_flight: int) -> None:
        self.name, self.call, self.prepare = target
        self.in_flight = in_flight
        self.latencies: list[float] = []
        self.elapsed = 0.0

    async def run(self, first: int, calls: int, *, record: bool = True) -> None:
        if self.prepare is not None:
            self.prepare(first, calls)
        next_index = first
        latencies: list[float] = []

        async def worker() -> None:
            nonlocal next_index
            while next_index < first + calls:
                i = next_index
                next_index += 1
                start = time.perf_counter()
                await self.call(i)
                latencies.append(time.perf_counter() - start)

        begin = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(self.in_flight)))
        if record:
            self.elapsed += time.perf_counter() - begin
            self.latencies += latencies

    def result(self) -> Result:
        q = statistics.quantiles(self.latencies, n=100)
        return Result(
            self.name, self.in_flight, len(self.latencies) / self.elapsed, q[49] * 1e3, q[98] * 1e3
        )


async def compare(targets: list[Target], in_flight: int, calls: int, offset: int) -> list[Result]:
    """Runs the targets in alternating slices, so that a machine whose load
    changes during the run (other jobs, CPU boost) weighs on each alike."""
    samplers = [Sampler(target, in_flight) for target in targets]
    for sampler in samplers:
        await sampler.run(offset, WARMUP, record=False)
        offset += WARMUP
    slice_calls = calls // ROUNDS
    for round_ in range(ROUNDS):
        for sampler in samplers[round_ % len(samplers) :] + samplers[: round_ % len(samplers)]:
            await sampler.run(offset, slice_calls)
            offset += slice_calls
    return [sampler.result() for sampler in samplers]


class Server:
    def __init__(
        self,
        kind: str,
        redis_url: str,
        data_dir: str,
        database_url: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.guard",
                "serve",
                kind,
                str(self.port),
                redis_url,
                data_dir,
                database_url,
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("READY "):
                self.token = line.split()[1]
                break
        else:
            raise RuntimeError(f"{kind} server did not start")
        self.channel = open_channel(f"127.0.0.1:{self.port}", self.token)
        self.stub = service_pb2_grpc.FingerprintGuardStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()
        self.process.terminate()
        self.process.wait(10)


async def compiled_server(
    admin: asyncpg.Connection, base: str, database: str, redis_url: str, data_dir: str
) -> Server | None:
    """With TETHER_BENCH_COMPILED, a Tether server whose guard core is
    compiled, on the database `<database>_compiled` (its own: servers
    sharing one follow each other's records); else None."""
    if not COMPILED_TREE:
        return None
    await admin.execute(f'CREATE DATABASE "{database}_compiled"')
    return Server(
        "tether", redis_url, data_dir, f"{base}/{database}_compiled", {"PYTHONPATH": COMPILED_TREE}
    )


def _request(seed: str, name: str, service: str = SERVICE) -> pb.EvaluateRequest:
    # Each person on a network of their own, as real visitors are.
    number = int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=3).digest(), "big")
    return pb.EvaluateRequest(
        service_id=service,
        action=pb.ACTION_LOGIN,
        account=account(name),
        components=fingerprint_of(seed),
        client_ip=f"10.{number >> 16}.{(number >> 8) & 255}.{number & 255}",
    )


async def _fill(
    client: redis.Redis,
    start: int,
    stop: int,
    bits: int,
    service: str = SERVICE,
    every: int = 0,
) -> None:
    fill = client.register_script(scripts.COMMON + FILL_SCRIPT)
    expiry = int(time.time() * 1000) + 3_600_000
    for first in range(start, stop, FILL_CHUNK):
        last = min(first + FILL_CHUNK, stop) - 1
        now = int(time.time() * 1000)
        await fill(keys=[], args=[f"tether:g:{service}:", first, last, bits, expiry, now, every])


def _row(r: Result) -> str:
    return (
        f"  {r.name:<22} {r.in_flight:>3} {r.per_second:>10.0f} {r.p50_ms:>8.3f} {r.p99_ms:>8.3f}"
    )


async def main() -> None:
    redis_bin = shutil.which("redis-server")
    assert redis_bin, "redis-server is required"
    redis_port = free_port()
    data_dir = tempfile.mkdtemp(prefix="bench-guard-")
    redis_process = subprocess.Popen(  # noqa: ASYNC220 - a daemon for the whole run
        [
            redis_bin,
            "--port",
            str(redis_port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            data_dir,
        ],
        stdout=subprocess.DEVNULL,
    )
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    client = redis.Redis.from_url(redis_url, socket_timeout=60)
    for _ in range(100):
        try:
            await client.ping()
            break
        except (redis.ConnectionError, OSError):
            await asyncio.sleep(0.05)
    database = f"tether_bench_guard_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(POSTGRES_DSN)
    await admin.execute(f'CREATE DATABASE "{database}"')
    base = POSTGRES_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    servers = {
        "bare": Server("bare", redis_url, data_dir),
        "evalsha": Server("evalsha", redis_url, data_dir),
        "tether": Server("tether", redis_url, data_dir, f"{base}/{database}"),
    }
    compiled = await compiled_server(admin, base, database, redis_url, data_dir)
    if compiled is not None:
        servers["compiled"] = compiled
    try:
        await _run(servers, client, redis_url, f"{base}/{database}")
    finally:
        for server in servers.values():
            await server.close()
        for name in (database, f"{database}_compiled"):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        await client.aclose()
        redis_process.terminate()
        redis_process.wait(10)
        shutil.rmtree(data_dir, ignore_errors=True)


async def _run(
    servers: dict[str, Server], client: redis.Redis, redis_url: str, database_url: str
) -> None:
    tether = servers["tether"]
    for server in (tether, servers.get("compiled")):
        if server is not None:
            await server.stub.SetPolicy(
                pb.SetPolicyRequest(
                    policy=pb.Policy(
                        service_id=SERVICE, login_limit=10_000, login_session_seconds=3600
                    )
                )
            )
    fixed = _request("fixed", "someone")
    pool = [_request(f"repeat-{i % 256}", f"user{i % 256}") for i in range(256)]
    run = secrets.token_hex(3)

    def constant(stub: Any) -> Callable[[int], Any]:
        return lambda i: stub.Evaluate(fixed)

    # Each new call's request (a new browser and account) is built before
    # its slice is timed, as the baselines' and repeat's requests are: built
    # in the timed loop (~240 us of the client's CPU each, json_format), it
    # put the client's work on the 1-in-flight critical path of this target
    # alone, and took CPU from the servers at 32 in flight.
    fresh: dict[int, pb.EvaluateRequest] = {}

    def prepare_new(first: int, count: int) -> None:
        fresh.clear()
        for i in range(first, first + count):
            fresh[i] = _request(f"{run}-{i}", f"new{i}")

    def on(server: Server) -> tuple[Callable[[int], Any], Callable[[int], Any]]:
        """The repeat and new workloads, sent to a Tether server."""
        return (
            lambda i: server.stub.Evaluate(pool[i % 256]),
            lambda i: server.stub.Evaluate(fresh[i]),
        )

    repeat, new = on(tether)

    results: dict[tuple[str, int], Result] = {}
    offset = 0
    targets = [
        Target("bare grpc.aio", constant(servers["bare"].stub)),
        Target("grpc.aio + EVALSHA", constant(servers["evalsha"].stub)),
        Target("tether repeat", repeat),
        Target("tether new", new, prepare_new),
    ]
    names = ["tether repeat", "tether new"]
    if "compiled" in servers:
        compiled_repeat, compiled_new = on(servers["compiled"])
        targets += [
            Target("tether repeat compiled", compiled_repeat),
            Target("tether new compiled", compiled_new, prepare_new),
        ]
        names += ["tether repeat compiled", "tether new compiled"]
    for in_flight, calls in CALLS.items():
        for result in await compare(targets, in_flight, calls, offset):
            results[(result.name, in_flight)] = result
            print(_row(result), file=sys.stderr, flush=True)
        offset += (WARMUP + calls) * len(targets)

    print("\nEvaluate throughput and latency (calls/s, ms)")
    print(f"  {'server':<22} {'in flight':>3} {'calls/s':>10} {'p50':>8} {'p99':>8}")
    for r in results.values():
        print(_row(r))
    print("\nRatios against the EVALSHA baseline (throughput: higher is better; p99: lower)")
    for in_flight in CALLS:
        base = results[("grpc.aio + EVALSHA", in_flight)]
        bare = results[("bare grpc.aio", in_flight)]
        for name in names:
            r = results[(name, in_flight)]
            print(
                f"  {name:<23} @{in_flight:>2}: throughput {r.per_second / base.per_second:.2f}x "
                f"EVALSHA, {r.per_second / bare.per_second:.2f}x bare; "
                f"p99 {r.p99_ms / base.p99_ms:.2f}x EVALSHA"
            )

    # Memory and latency with many fingerprints stored.
    bits = 16
    await client.flushall()
    await tether.stub.SetPolicy(
        pb.SetPolicyRequest(
            policy=pb.Policy(service_id=SERVICE, login_limit=10_000, login_session_seconds=3600)
        )
    )
    before = (await client.info("memory"))["used_memory"]
    await _fill(client, 0, 10_000, bits)
    await asyncio.gather(*(tether.stub.Evaluate(r) for r in pool))  # the 256 repeat logins
    [small] = await compare([Target("tether repeat @1e4", repeat)], 1, CALLS[1], offset)
    offset += WARMUP + CALLS[1]
    await _fill(client, 10_000, 1_000_000, bits)
    entries = 1_000_000
    used = (await client.info("memory"))["used_memory"] - before
    [large] = await compare([Target("tether repeat @1e6", repeat)], 1, CALLS[1], offset)
    entries += 256
    keys_count = await client.dbsize()
    sample = [k async for k in client.scan_iter(f"tether:g:{SERVICE}:*", count=1000)][:200]
    usage = [await client.memory_usage(k, samples=0) or 0 for k in sample]
    fields = [await client.hlen(k) for k in sample]
    real, filled, mixed = await _check_fill(client, run, redis_url, database_url)
    print(f"\nRedis memory ({entries:,} entries in {keys_count:,} bucket keys)")
    print(f"  used_memory delta per (identity, account) entry: {used / entries:.1f} bytes")
    print(f"  MEMORY USAGE per key (200 sampled keys): {sum(usage) / len(usage):.1f} bytes")
    print(f"  identities per sampled key: {sum(fields) / len(fields):.1f}")
    print(
        f"  check, {CHECK_ENTRIES:,} entries at {CHECK_BITS} bucket bits (about as many per"
        " bucket), bytes per entry (used_memory delta; the keys' MEMORY USAGE):"
    )
    for name, stored in (
        ("real Evaluate calls", real),
        ("the fill script", filled),
        ("the fill script, every 16th identity with 2 accounts", mixed),
    ):
        print(
            f"    written by {name}: {stored.used:.1f}; {stored.usage:.1f}"
            f" ({stored.identities:,} identities)"
        )
    print("\nLatency at 1 in flight with stored fingerprints (ms)")
    print(_row(small))
    print(_row(large))
    print(
        f"  p50 ratio 1e6/1e4: {large.p50_ms / small.p50_ms:.2f}x, "
        f"p99 ratio: {large.p99_ms / small.p99_ms:.2f}x"
    )


class Stored(NamedTuple):
    """What a check's entries cost: used_memory's delta and the bucket keys'
    own MEMORY USAGE, per entry, and how many identities hold them."""

    used: float
    usage: float
    identities: int


async def _stored(client: redis.Redis, before: int, entries: int) -> Stored:
    used = (await client.info("memory"))["used_memory"] - before
    usage = identities = 0
    async for key in client.scan_iter(f"tether:g:{CHECK_SERVICE}:*", count=1000):
        usage += await client.memory_usage(key, samples=0) or 0
        identities += await client.hlen(key)
    return Stored(used / entries, usage / entries, identities)


async def _check_fill(
    client: redis.Redis, run: str, redis_url: str, database_url: str
) -> tuple[Stored, Stored, Stored]:
    """What entries written by real Evaluate calls cost (new browsers logging
    in, through a Tether server whose buckets are as full as the 10^6
    fill's), what as many written by the fill script cost, and what they
    cost when every 16th identity holds a second account (a record over 64
    bytes: nearly every bucket leaves Redis's compact encoding)."""
    await client.flushall()
    checker = Server(
        "tether",
        redis_url,
        tempfile.mkdtemp(prefix="bench-guard-check-"),
        database_url,
        {"TETHER_GUARD_BUCKET_BITS": str(CHECK_BITS)},
    )
    try:
        await checker.stub.SetPolicy(
            pb.SetPolicyRequest(
                policy=pb.Policy(
                    service_id=CHECK_SERVICE, login_limit=10_000, login_session_seconds=3600
                )
            )
        )
        requests = [
            _request(f"{run}-check-{i}", f"check{i}", CHECK_SERVICE) for i in range(CHECK_ENTRIES)
        ]
        # After the server's start, which restored the other service's
        # entries from SQL.
        before = (await client.info("memory"))["used_memory"]
        for first in range(0, CHECK_ENTRIES, 64):
            await asyncio.gather(*(checker.stub.Evaluate(r) for r in requests[first : first + 64]))
        real = await _stored(client, before, CHECK_ENTRIES)
    finally:
        await checker.close()
    await client.flushall()
    before = (await client.info("memory"))["used_memory"]
    await _fill(client, 0, CHECK_ENTRIES, CHECK_BITS, CHECK_SERVICE)
    filled = await _stored(client, before, CHECK_ENTRIES)
    await client.flushall()
    before = (await client.info("memory"))["used_memory"]
    await _fill(client, 0, CHECK_ENTRIES, CHECK_BITS, CHECK_SERVICE, every=16)
    mixed = await _stored(client, before, CHECK_ENTRIES + CHECK_ENTRIES // 16)
    return real, filled, mixed


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
    else:
        os.environ.setdefault("PYTHONHASHSEED", "0")
        asyncio.run(main())

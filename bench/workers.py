"""`tether-server serve --workers 2` against `--workers 1`, in one run.

    python -m bench.workers

Two Tether servers run side by side on one PostgreSQL database (made for
the run, then dropped) and one Redis: one with a single process, one with
a supervisor and two workers sharing its port. The same load goes to each
in alternating slices, TETHER_BENCH_CONCURRENCY calls in flight (default
64) spread over CHANNELS connections (the kernel hands each connection to
one worker, so one connection would reach one worker only):

- ReportAccountUse: each call a new device reporting a new account on the
  partner's list, so each binds (the SQL transaction, the outbox rows);
- Evaluate "new": each call a new browser logging in (fingerprint digests,
  the identity book's look-ups, one Redis script, the SQL record behind);
- Evaluate "repeat": logins of 256 known browsers (one Redis script).

The load generator is this one process, on the same machine: on a 2-core
machine it takes a share of the CPU the workers would use, so the ratio is
what a server sharing its host gets, not a ceiling. Environment:
TETHER_BENCH_POSTGRES_DSN (default postgresql://postgres@127.0.0.1:5432/test),
TETHER_BENCH_REDIS_URL (default redis://127.0.0.1:6379/0),
TETHER_BENCH_CONCURRENCY, TETHER_BENCH_CALLS (per target, default 6000),
TETHER_BENCH_ROUNDS (default 6).
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from stdnum import luhn

from bench.guard import Result, Sampler, Target, _request
from tether.admin.v1 import messages_pb2 as admin_pb
from tether.admin.v1.service_pb2_grpc import AdminStub
from tether.binding.v1 import messages_pb2 as binding_pb
from tether.binding.v1.service_pb2_grpc import BindingStub
from tether.clients.connection import open_channel
from tether.common.v1 import types_pb2 as types
from tether.guard.v1 import messages_pb2 as guard_pb
from tether.guard.v1.service_pb2_grpc import FingerprintGuardStub
from tether.server.shared import digests
from tether.server.storage import migrate
from tether.server.storage.database import Database
from tether.server.transport.credentials import create_admin

if TYPE_CHECKING:
    from tether.admin.v1.service_pb2_grpc import AdminAsyncStub

ADMIN_DSN = os.environ.get("TETHER_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TETHER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
CONCURRENCY = int(os.environ.get("TETHER_BENCH_CONCURRENCY", "64"))
CALLS = int(os.environ.get("TETHER_BENCH_CALLS", "6000"))
ROUNDS = int(os.environ.get("TETHER_BENCH_ROUNDS", "6"))
WARMUP = 500
CHANNELS = 8
# Per worker; the two servers' three processes stay well under PostgreSQL's limit.
POOL_SIZE = 6
SERVICE = "bench-workers"
ROOT = Path(__file__).resolve().parents[1]


def _imei() -> str:
    body = "35" + "".join(str(random.randrange(10)) for _ in range(12))
    return body + luhn.calc_check_digit(body)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Server:
    """`tether-server serve --workers N` in its own process group."""

    def __init__(self, workers: int, env: dict[str, str]) -> None:
        self.workers = workers
        self.address = f"127.0.0.1:{_free_port()}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tether.server", "serve", "--workers", str(workers)],
            env={**env, "TETHER_LISTEN": self.address},
            cwd=ROOT,
        )
        self.channels: list[grpc.aio.Channel] = []

    async def serving(self) -> None:
        deadline = time.monotonic() + 60
        async with grpc.aio.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"--workers {self.workers} exited")
                try:
                    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"--workers {self.workers} not serving")
                await asyncio.sleep(0.1)

    def open(self, token: str) -> list[grpc.aio.Channel]:
        """CHANNELS separate connections (no shared subchannel pool)."""
        opened = [
            open_channel(self.address, token, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(CHANNELS)
        ]
        self.channels += opened
        return opened

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
        self.process.terminate()
        self.process.wait(30)


async def compare(targets: list[Target], offset: int) -> list[Result]:
    """The targets in alternating slices after a warm-up (bench.guard's way)."""
    samplers = [Sampler(target, CONCURRENCY) for target in targets]
    for sampler in samplers:
        await sampler.run(offset, WARMUP, record=False)
        offset += WARMUP
    slice_calls = CALLS // ROUNDS
    for round_ in range(ROUNDS):
        for sampler in samplers[round_ % len(samplers) :] + samplers[: round_ % len(samplers)]:
            await sampler.run(offset, slice_calls)
            offset += slice_calls
    return [sampler.result() for sampler in samplers]


async def _setup(admin: AdminAsyncStub) -> dict[str, str]:
    """A partner with one preset service and the credentials; returns tokens."""
    partner_id = f"bench-{secrets.token_hex(3)}"
    await admin.CreatePartner(
        admin_pb.CreatePartnerRequest(
            request_id=secrets.token_hex(8), partner_id=partner_id, display_name="Bench"
        )
    )
    await admin.CreateService(
        admin_pb.CreateServiceRequest(
            request_id=secrets.token_hex(8),
            partner_id=partner_id,
            service_id="free-data",
            display_name="Free data",
        )
    )
    tokens = {}
    for kind, owner in (("partner", partner_id), ("device", ""), ("internal", "")):
        made = await admin.CreateCredential(
            admin_pb.CreateCredentialRequest(
                kind=getattr(admin_pb, f"CREDENTIAL_KIND_{kind.upper()}"),
                partner_id=owner,
                label=f"bench {kind}",
            )
        )
        tokens[kind] = made.token
    return tokens


def _reports(stubs: list[BindingStub], members: list[str]) -> Target:
    prepared: dict[int, binding_pb.ReportAccountUseRequest] = {}

    def prepare(first: int, count: int) -> None:
        prepared.clear()
        for i in range(first, first + count):
            prepared[i] = binding_pb.ReportAccountUseRequest(
                request_id=secrets.token_hex(8),
                device=types.Device(kind=types.TERMINAL_ID_KIND_IMEI, terminal_id=_imei()),
                account=types.Account(kind=types.ACCOUNT_KIND_MEMBER_ID, value=members.pop()),
            )

    def call(i: int) -> Any:
        return stubs[i % len(stubs)].ReportAccountUse(prepared[i])

    return Target("ReportAccountUse", call, prepare)


def _evaluate_new(stubs: list[FingerprintGuardStub], run: str) -> Target:
    prepared: dict[int, guard_pb.EvaluateRequest] = {}

    def prepare(first: int, count: int) -> None:
        prepared.clear()
        for i in range(first, first + count):
            request = _request(f"{run}-{i}", f"new{i}")
            request.service_id = SERVICE
            prepared[i] = request

    def call(i: int) -> Any:
        return stubs[i % len(stubs)].Evaluate(prepared[i])

    return Target("Evaluate new", call, prepare)


def _evaluate_repeat(stubs: list[FingerprintGuardStub], run: str) -> Target:
    pool = [_request(f"{run}-repeat-{i}", f"user{i}") for i in range(256)]
    for request in pool:
        request.service_id = SERVICE

    def call(i: int) -> Any:
        return stubs[i % len(stubs)].Evaluate(pool[i % 256])

    return Target("Evaluate repeat", call)


def _line(workers: int, result: Result) -> str:
    return (
        f"  {result.name:<18} --workers {workers}  {result.per_second:>8.0f}/s"
        f"  p50 {result.p50_ms:>7.2f} ms  p99 {result.p99_ms:>7.2f} ms"
    )


async def main() -> None:
    name = f"tether_bench_workers_{secrets.token_hex(4)}"
    admin_conn = await asyncpg.connect(ADMIN_DSN)
    await admin_conn.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    database_url = f"{base}/{name}"
    servers: list[Server] = []
    try:
        await migrate.upgrade_async(database_url)
        db = Database(database_url, 1)
        admin_token = await create_admin(db, "bench")
        await db.close()
        env = {
            **os.environ,
            "TETHER_DATABASE_URL": database_url,
            "TETHER_REDIS_URL": REDIS_URL,
            "TETHER_DIGEST_KEYS": digests.new_key_spec("bench"),
            "TETHER_DATABASE_POOL_SIZE": str(POOL_SIZE),
            "TETHER_REPORT_RATE_PER_MINUTE": "0",
            "TETHER_HTTP_LISTEN": "",
            "TETHER_LOG_LEVEL": "WARNING",
        }
        servers = [Server(1, env), Server(2, env)]
        await asyncio.gather(*(server.serving() for server in servers))
        one, two = servers
        async with open_channel(one.address, admin_token) as channel:
            admin: AdminAsyncStub = AdminStub(channel)
            tokens = await _setup(admin)
        needed = 2 * (WARMUP + CALLS) + 100
        members = [f"BENCH-{secrets.token_hex(6)}" for _ in range(needed)]
        async with open_channel(one.address, tokens["partner"]) as channel:
            binding = BindingStub(channel)
            for start in range(0, needed, 1000):
                await binding.AddEligibleAccounts(
                    binding_pb.AddEligibleAccountsRequest(
                        entries=[
                            binding_pb.EligibleAccountEntry(
                                account=types.Account(
                                    kind=types.ACCOUNT_KIND_MEMBER_ID, value=member
                                ),
                                partner_reference=member,
                            )
                            for member in members[start : start + 1000]
                        ]
                    )
                )
            async with open_channel(one.address, tokens["internal"]) as internal:
                await FingerprintGuardStub(internal).SetPolicy(
                    guard_pb.SetPolicyRequest(
                        policy=guard_pb.Policy(
                            service_id=SERVICE, login_limit=10_000, login_session_seconds=3600
                        )
                    )
                )
        run = secrets.token_hex(3)
        print(
            f"--workers 2 against --workers 1, {CONCURRENCY} in flight over {CHANNELS} "
            f"connections, {CALLS} calls per target in {ROUNDS} alternating slices, "
            f"{os.cpu_count()} CPUs"
        )
        offset = 0
        kinds: list[Callable[[Server], Target]] = [
            lambda s: _reports([BindingStub(c) for c in s.open(tokens["device"])], members),
            lambda s: _evaluate_new(
                [FingerprintGuardStub(c) for c in s.open(tokens["internal"])], run
            ),
            lambda s: _evaluate_repeat(
                [FingerprintGuardStub(c) for c in s.open(tokens["internal"])], run
            ),
        ]
        for make in kinds:
            results = await compare([make(one), make(two)], offset)
            offset += 10 * (WARMUP + CALLS)
            for server, result in zip(servers, results, strict=True):
                print(_line(server.workers, result))
            ratio = results[1].per_second / results[0].per_second
            print(f"  {results[0].name}: --workers 2 / --workers 1 = {ratio:.2f}x")
        print(f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        for server in servers:
            await server.close()
        await admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin_conn.close()


if __name__ == "__main__":
    asyncio.run(main())

"""Binding benchmark: ReportAccountUse throughput and latency, and bulk import rate.

    python -m bench.binding

Each figure is printed next to a baseline measured in the same run, on the
same machine and the same PostgreSQL:

- ReportAccountUse against a bare grpc.aio server that answers the same RPC
  with one equivalent SQL transaction (look the account up, insert the
  binding, store the answer for retries) through a raw asyncpg pool, with
  no authentication, validation, rate limit or ORM.
- Bulk import against a raw COPY of the same, already digested rows into a
  table shaped like the eligible list.

The servers run in their own processes, so the load generator does not
share their event loop. A throwaway database is created and dropped.
Environment: TETHER_BENCH_POSTGRES_DSN (default
postgresql://postgres@127.0.0.1:5432/test), TETHER_BENCH_REDIS_URL (default
redis://127.0.0.1:6379/0), TETHER_BENCH_SECONDS (default 10),
TETHER_BENCH_CONCURRENCY (default 64), TETHER_BENCH_IMPORT (default 200000).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import secrets
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.synchronize import Event as EventType
from typing import Any

import asyncpg
import grpc
import phonenumbers
from stdnum import luhn

from tether.admin.v1 import messages_pb2 as admin_pb
from tether.admin.v1.service_pb2_grpc import AdminStub
from tether.binding.v1 import messages_pb2 as pb
from tether.binding.v1.service_pb2_grpc import BindingAsyncStub, BindingStub
from tether.clients.connection import open_channel
from tether.clients.partner.binding import PartnerBinding
from tether.common.v1 import types_pb2 as types
from tether.server import digests

ADMIN_DSN = os.environ.get("TETHER_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TETHER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SECONDS = float(os.environ.get("TETHER_BENCH_SECONDS", "10"))
CONCURRENCY = int(os.environ.get("TETHER_BENCH_CONCURRENCY", "64"))
IMPORT_SIZE = int(os.environ.get("TETHER_BENCH_IMPORT", "200000"))
# Shared PostgreSQL: stay well under its connection limit. Tether may overflow to
# twice its pool, so the baseline gets the same ceiling.
POOL_SIZE = 8
IMPORT_WORKERS = int(os.environ.get("TETHER_BENCH_IMPORT_WORKERS", "1"))


# --- the servers, each in its own process ----------------------------------


def _serve(kind: str, database_url: str, keys: str, ready: Any, stop: EventType) -> None:
    asyncio.run(_serve_async(kind, database_url, keys, ready, stop))


async def _serve_async(
    kind: str, database_url: str, keys: str, ready: Any, stop: EventType
) -> None:
    if kind == "tether":
        from tether.server.app import build
        from tether.server.settings import Settings

        settings = Settings(
            listen="127.0.0.1:0",
            database_url=database_url,
            redis_url=REDIS_URL,
            digest_keys=keys,
            database_pool_size=POOL_SIZE,
            report_rate_per_minute=1_000_000,
            import_workers=IMPORT_WORKERS,
            log_level="WARNING",
        )
        app = await build(settings)
        await app.start()
        ready.put(app.port)
        await asyncio.to_thread(stop.wait)
        await app.stop(grace=1)
        return
    server, port, pool = await _baseline_server(database_url, keys)
    await server.start()
    ready.put(port)
    await asyncio.to_thread(stop.wait)
    await server.stop(1)
    await pool.close()


async def _baseline_server(database_url: str, keys: str) -> tuple[grpc.aio.Server, int, Any]:
    """One SQL transaction per ReportAccountUse, nothing else."""
    key = digests.parse_keys(keys)[0]
    pool = await asyncpg.create_pool(
        database_url.replace("+asyncpg", ""), min_size=POOL_SIZE, max_size=2 * POOL_SIZE
    )

    async def report(
        request: pb.ReportAccountUseRequest, context: Any
    ) -> pb.ReportAccountUseResponse:
        account = key.digest("phone_number", request.account.value)
        device = key.digest("imei", request.device.terminal_id)
        outcomes = []
        async with pool.acquire() as conn, conn.transaction():
            # Retry safety, as Tether: has this request been answered before?
            earlier = await conn.fetchval(
                "SELECT response FROM idempotency_records WHERE credential_id = 'baseline' "
                "AND method = 'report' AND request_id = $1",
                request.request_id,
            )
            if earlier is not None:
                return pb.ReportAccountUseResponse.FromString(earlier)
            entry = await conn.fetchrow(
                "SELECT entry_id, partner_id, partner_reference FROM eligible_accounts "
                "WHERE account_digest = $1",
                account,
            )
            if entry is not None:
                row = await conn.fetchrow(
                    "INSERT INTO bindings (binding_id, partner_id, account_kind, account_digest, "
                    "device_digest, key_id, partner_reference, state, create_time) "
                    "VALUES ($1, $2, 'phone_number', $3, $4, $5, $6, 'active', now()) "
                    "ON CONFLICT (partner_id, account_digest) WHERE state = 'active' "
                    "DO NOTHING RETURNING binding_id",
                    uuid.uuid4(),
                    entry["partner_id"],
                    account,
                    device,
                    key.key_id,
                    entry["partner_reference"],
                )
                outcomes.append(
                    pb.PartnerOutcome(
                        partner_id=entry["partner_id"],
                        outcome=pb.REPORT_OUTCOME_BOUND
                        if row
                        else pb.REPORT_OUTCOME_BOUND_TO_OTHER_DEVICE,
                        binding=pb.AccountBinding(binding_id=str(row["binding_id"]))
                        if row
                        else None,
                    )
                )
            response = pb.ReportAccountUseResponse(outcomes=outcomes)
            await conn.execute(
                "INSERT INTO idempotency_records (credential_id, method, request_id, "
                "request_hash, response, create_time) "
                "VALUES ('baseline', 'report', $1, $2, $3, now())",
                request.request_id,
                b"0" * 32,
                response.SerializeToString(),
            )
        return response

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "tether.binding.v1.Binding",
                {
                    "ReportAccountUse": grpc.unary_unary_rpc_method_handler(
                        report,
                        request_deserializer=pb.ReportAccountUseRequest.FromString,
                        response_serializer=pb.ReportAccountUseResponse.SerializeToString,
                    )
                },
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    return server, port, pool


@dataclass
class Served:
    address: str
    stop: EventType
    process: multiprocessing.process.BaseProcess

    def close(self) -> None:
        self.stop.set()
        self.process.join(10)


def start(kind: str, database_url: str, keys: str) -> Served:
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    stop = context.Event()
    process = context.Process(target=_serve, args=(kind, database_url, keys, ready, stop))
    process.start()
    port = ready.get(timeout=60)
    return Served(f"127.0.0.1:{port}", stop, process)


# --- load ----------------------------------------------------------------------


def imei() -> str:
    body = "35" + "".join(str(random.randrange(10)) for _ in range(12))
    return body + luhn.calc_check_digit(body)


def phone_numbers(count: int) -> list[str]:
    """Valid numbers of several regions, in E.164 (validated here, untimed)."""
    templates = []
    for region in ("DE", "US", "GB", "FR", "CN", "IN", "BR", "JP", "IT", "ES"):
        for kind in (phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE):
            example = phonenumbers.example_number_for_type(region, kind)
            if example is not None:
                templates.append(
                    phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
                )
    found: set[str] = set()
    while len(found) < count:
        template = random.choice(templates)
        candidate = template[:-4] + f"{random.randrange(10_000):04d}"
        if phonenumbers.is_valid_number(phonenumbers.parse(candidate)):
            found.add(candidate)
    return list(found)


@dataclass
class LoadResult:
    calls: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    def percentile(self, p: float) -> float:
        return statistics.quantiles(self.latencies, n=100)[int(p) - 1] * 1000


async def load(
    call: Callable[[int], Awaitable[Any]],
    seconds: float,
    concurrency: int,
    counter: Iterator[int],
) -> LoadResult:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call(next(counter))
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return LoadResult(len(latencies), time.perf_counter() - began, latencies)


async def bench_reports(
    tether: Served, baseline: Served, device_token: str, accounts: list[str]
) -> tuple[LoadResult, LoadResult]:
    half = len(accounts) // 2
    results = []
    for served, pool in ((baseline, accounts[:half]), (tether, accounts[half:])):
        channel = open_channel(served.address, device_token)
        stub: BindingAsyncStub = BindingStub(channel)

        async def call(i: int, stub: BindingAsyncStub = stub, pool: list[str] = pool) -> Any:
            return await stub.ReportAccountUse(
                pb.ReportAccountUseRequest(
                    request_id=secrets.token_hex(8),
                    device=types.Device(kind=types.TERMINAL_ID_KIND_IMEI, terminal_id=imei()),
                    account=types.Account(kind=types.ACCOUNT_KIND_PHONE_NUMBER, value=pool[i]),
                )
            )

        # One counter for warm-up and measurement: each call binds a fresh account.
        counter = iter(range(len(pool)))
        await load(call, 1.0, CONCURRENCY, counter)  # warm-up: connections, caches
        results.append(await load(call, SECONDS, CONCURRENCY, counter))
        await channel.close()
    return results[0], results[1]


# --- import ------------------------------------------------------------------


async def bench_import(served: Served, partner_token: str, kind: str, values: list[str]) -> float:
    channel = open_channel(served.address, partner_token)
    entries = [
        pb.EligibleAccountEntry(
            account=types.Account(kind=types.AccountKind.Value(kind), value=v),
            partner_reference=f"r{i}",
        )
        for i, v in enumerate(values)
    ]
    began = time.perf_counter()
    response = await PartnerBinding(channel).import_entries(entries, batch_size=10_000)
    elapsed = time.perf_counter() - began
    await channel.close()
    assert response.imported_count == len(values), response
    return len(values) / elapsed


async def baseline_copy(database_url: str, keys: str, kind: str, values: list[str]) -> float:
    """Raw COPY of already digested rows into a table shaped like the list."""
    key = digests.parse_keys(keys)[0]
    now = datetime.now(UTC)
    rows = [
        ("baseline", kind, key.digest(kind, v), key.key_id, f"r{i}", now)
        for i, v in enumerate(values)
    ]
    conn = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        table = f"baseline_{kind}"
        await conn.execute(f"CREATE TABLE {table} (LIKE eligible_accounts INCLUDING ALL)")
        began = time.perf_counter()
        async with conn.transaction():
            await conn.copy_records_to_table(
                table,
                records=rows,
                columns=[
                    "partner_id",
                    "account_kind",
                    "account_digest",
                    "key_id",
                    "partner_reference",
                    "create_time",
                ],
            )
        return len(values) / (time.perf_counter() - began)
    finally:
        await conn.close()


# --- setup -------------------------------------------------------------------


async def create_database() -> tuple[str, str]:
    name = f"tether_bench_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return name, f"{base}/{name}"


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def setup(database_url: str, served: Served) -> tuple[str, str, str]:
    """A partner with a credential, a device credential; returns (partner_id, tokens)."""
    from tether.server.admin.credentials import create_admin
    from tether.server.storage.database import Database

    db = Database(database_url, 2)
    admin_token = await create_admin(db, "bench")
    await db.close()
    channel = open_channel(served.address, admin_token)
    admin = AdminStub(channel)
    partner_id = f"bench-{secrets.token_hex(3)}"
    await admin.CreatePartner(
        admin_pb.CreatePartnerRequest(
            request_id=secrets.token_hex(8), partner_id=partner_id, display_name="Bench"
        )
    )
    partner = await admin.CreateCredential(
        admin_pb.CreateCredentialRequest(
            kind=admin_pb.CREDENTIAL_KIND_PARTNER, partner_id=partner_id, label="bench"
        )
    )
    device = await admin.CreateCredential(
        admin_pb.CreateCredentialRequest(kind=admin_pb.CREDENTIAL_KIND_DEVICE, label="bench")
    )
    await channel.close()
    return partner_id, partner.token, device.token


async def main() -> None:
    from tether.server.storage import migrate

    name, database_url = await create_database()
    keys = digests.new_key_spec("bench")
    tether = baseline = None
    try:
        await migrate.upgrade_async(database_url)
        tether = start("tether", database_url, keys)
        baseline = start("baseline", database_url, keys)
        _, partner_token, device_token = await setup(database_url, tether)

        print(f"import: {IMPORT_SIZE:,} accounts per kind, batches of 10,000")
        members = [f"member-{i:09d}" for i in range(IMPORT_SIZE)]
        phones = phone_numbers(IMPORT_SIZE)
        for kind, values in (
            ("ACCOUNT_KIND_MEMBER_ID", members),
            ("ACCOUNT_KIND_PHONE_NUMBER", phones),
        ):
            rate = await bench_import(tether, partner_token, kind, values)
            short = kind.removeprefix("ACCOUNT_KIND_").lower()
            floor = await baseline_copy(database_url, keys, short, values)
            print(
                f"  {short:<13} Tether {rate:>9,.0f} accounts/s   raw COPY {floor:>9,.0f} rows/s"
                f"   ratio {rate / floor:.2f}   target >= 50,000/s: "
                f"{'met' if rate >= 50_000 else 'NOT met'}"
            )

        print(
            f"ReportAccountUse: {CONCURRENCY} concurrent calls for {SECONDS:.0f} s each, "
            "every call binds a listed phone number to a new device"
        )
        base, ours = await bench_reports(tether, baseline, device_token, phones)
        for label, result in (("baseline", base), ("Tether", ours)):
            print(
                f"  {label:<9} {result.rate:>8,.0f} calls/s   p50 {result.percentile(50):6.1f} ms"
                f"   p99 {result.percentile(99):6.1f} ms"
            )
        print(
            f"  ratio {ours.rate / base.rate:.2f}x the baseline's throughput "
            f"(target >= 0.8x: {'met' if ours.rate >= 0.8 * base.rate else 'NOT met'})"
        )
    finally:
        for served in (tether, baseline):
            if served is not None:
                served.close()
        await drop_database(name)


if __name__ == "__main__":
    asyncio.run(main())

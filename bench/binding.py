"""Binding benchmark: ReportAccountUse throughput and latency, and bulk import rate.

    python -m bench.binding

Each figure is printed next to a baseline measured in the same run, on the
same machine and the same PostgreSQL:

- ReportAccountUse against bare grpc.aio servers that answer the same RPC
  with one equivalent SQL transaction and nothing else (no authentication,
  validation, rate limit, wake-ups or ORM): one through a raw asyncpg pool,
  one through Tether's own SQLAlchemy engine set-up with plain SQL. The
  transaction writes exactly the rows Tether writes, one plain statement
  per kind of row: look the request id up, look the account up on the
  list, insert the binding, read the partner's preset services, insert
  their open instructions and activating entitlements, bump the device's
  feed counter, insert the feed events, store the answer for retries.
  (Before, the baselines wrote only the binding and the answer, and the
  bench partner had no preset service, so neither side wrote the outbox
  rows that every binding of a real partner causes.) The bench partner has
  TETHER_BENCH_SERVICES preset services (default 1). Every server warms
  up (1 s of load each); then the database is vacuumed, analyzed and
  checkpointed, and the servers are measured in alternating slices.
- Bulk import against a raw COPY of the same, already digested rows into a
  table shaped like the eligible list.

The servers run in their own processes, so the load generator does not
share their event loop. A throwaway database is created and dropped.
Environment: TETHER_BENCH_POSTGRES_DSN (default
postgresql://postgres@127.0.0.1:5432/test), TETHER_BENCH_REDIS_URL (default
redis://127.0.0.1:6379/0), TETHER_BENCH_SECONDS (default 10),
TETHER_BENCH_CONCURRENCY (default 64), TETHER_BENCH_IMPORT (default 200000),
TETHER_BENCH_PARTS (default "import,reports"; "reports" alone still loads the
phone list the reports need, untimed), TETHER_BENCH_SERVICES (default 1),
TETHER_BENCH_ROUNDS (default 5: the alternating slices of the report load).
The Tether server logs at WARNING, as the bench's settings say.
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
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.synchronize import Event as EventType
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import phonenumbers
from stdnum import luhn

from tether.admin.v1 import messages_pb2 as admin_pb
from tether.admin.v1.service_pb2_grpc import AdminStub
from tether.binding.v1 import messages_pb2 as pb
from tether.binding.v1.service_pb2_grpc import BindingStub
from tether.clients.connection import open_channel
from tether.clients.partner.binding import PartnerBinding
from tether.common.v1 import types_pb2 as types
from tether.server.binding.store import LIST_COLUMNS
from tether.server.shared import digests
from tether.server.shared.accounts import normalize_account

if TYPE_CHECKING:
    from tether.binding.v1.service_pb2_grpc import BindingAsyncStub

ADMIN_DSN = os.environ.get("TETHER_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TETHER_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SECONDS = float(os.environ.get("TETHER_BENCH_SECONDS", "10"))
CONCURRENCY = int(os.environ.get("TETHER_BENCH_CONCURRENCY", "64"))
IMPORT_SIZE = int(os.environ.get("TETHER_BENCH_IMPORT", "200000"))
# Shared PostgreSQL: stay well under its connection limit. Tether may overflow to
# twice its pool, so the baseline gets the same ceiling.
POOL_SIZE = 6
IMPORT_WORKERS = int(os.environ.get("TETHER_BENCH_IMPORT_WORKERS", "1"))
SERVICES = int(os.environ.get("TETHER_BENCH_SERVICES", "1"))
ROUNDS = int(os.environ.get("TETHER_BENCH_ROUNDS", "5"))
PARTS = set(os.environ.get("TETHER_BENCH_PARTS", "import,reports").split(","))


# --- the servers, each in its own process ----------------------------------


def _serve(kind: str, database_url: str, keys: str, ready: Any, stop: EventType) -> None:
    asyncio.run(_serve_async(kind, database_url, keys, ready, stop))


async def _serve_async(
    kind: str, database_url: str, keys: str, ready: Any, stop: EventType
) -> None:
    if kind == "tether":
        from tether.server import logs
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
        logs.configure(settings.log_level, settings.log_format)
        app = await build(settings)
        await app.start()
        ready.put(app.port)
        await asyncio.to_thread(stop.wait)
        await app.stop(grace=1)
        return
    server, port, close = await _baseline_server(kind, database_url, keys)
    await server.start()
    ready.put(port)
    await asyncio.to_thread(stop.wait)
    await server.stop(1)
    await close()


# Runs one SQL statement in the open transaction; returns the first row or None.
FetchRow = Callable[..., Awaitable[Sequence[Any] | None]]


async def _report_transaction(
    fetchrow: FetchRow, key: digests.DigestKey, request: pb.ReportAccountUseRequest
) -> pb.ReportAccountUseResponse:
    """What Tether's report writes, one plain statement per kind of row."""
    account = key.digest("phone_number", request.account.value)
    device = key.digest("imei", request.device.terminal_id)
    earlier = await fetchrow(
        "SELECT response FROM idempotency_records WHERE credential_id = 'baseline' "
        "AND method = 'report' AND request_id = $1",
        request.request_id,
    )
    if earlier is not None:
        return pb.ReportAccountUseResponse.FromString(earlier[0])
    outcomes = []
    entry = await fetchrow(
        "SELECT partner_id, partner_reference FROM eligible_accounts WHERE account_digest = $1",
        account,
    )
    if entry is not None:
        partner_id, reference = entry
        row = await fetchrow(
            "INSERT INTO bindings (binding_id, partner_id, account_kind, account_digest, "
            "device_digest, key_id, partner_reference, state, create_time) "
            "VALUES ($1, $2, 'phone_number', $3, $4, $5, $6, 'active', now()) "
            "ON CONFLICT (partner_id, account_digest) WHERE state = 'active' "
            "DO NOTHING RETURNING binding_id",
            uuid.uuid4(),
            partner_id,
            account,
            device,
            key.key_id,
            reference,
        )
        if row is not None:
            await _open_services(fetchrow, partner_id, row[0], reference, account, device)
        outcomes.append(
            pb.PartnerOutcome(
                partner_id=partner_id,
                outcome=pb.REPORT_OUTCOME_BOUND if row else pb.REPORT_OUTCOME_BOUND_TO_OTHER_DEVICE,
                binding=pb.AccountBinding(binding_id=str(row[0])) if row else None,
            )
        )
    response = pb.ReportAccountUseResponse(outcomes=outcomes)
    await fetchrow(
        "INSERT INTO idempotency_records (credential_id, method, request_id, "
        "request_hash, response, create_time) "
        "VALUES ('baseline', 'report', $1, $2, $3, now()) RETURNING 1",
        request.request_id,
        b"0" * 32,
        response.SerializeToString(),
    )
    return response


async def _open_services(
    fetchrow: FetchRow,
    partner_id: str,
    binding_id: uuid.UUID,
    reference: str,
    account: bytes,
    device: bytes,
) -> None:
    """The outbox rows of a new binding: instructions, entitlements, feed events."""
    found = await fetchrow(
        "SELECT array_agg(service_id ORDER BY service_id) FROM preset_services "
        "WHERE partner_id = $1",
        partner_id,
    )
    services = list(found[0] or ()) if found else []
    if not services:
        return
    await fetchrow(
        "INSERT INTO provisioning_instructions (instruction_id, partner_id, service_id, "
        "binding_id, kind, partner_reference, account_kind, account_digest, state, attempts, "
        "due_time, last_error, partner_service_reference, create_time, update_time) "
        "SELECT gen_random_uuid(), $1, s, $2, 'open', $3, 'phone_number', $4, 'pending', 0, "
        "now(), '', '', now(), now() FROM unnest($5::text[]) AS s RETURNING 1",
        partner_id,
        binding_id,
        reference,
        account,
        services,
    )
    await fetchrow(
        "INSERT INTO entitlements (binding_id, service_id, partner_id, account_kind, "
        "account_digest, device_digest, state, reason, update_time) "
        "SELECT $1, s, $2, 'phone_number', $3, $4, 'activating', '', now() "
        "FROM unnest($5::text[]) AS s RETURNING 1",
        binding_id,
        partner_id,
        account,
        device,
        services,
    )
    last = await fetchrow(
        "INSERT INTO entitlement_feeds (device_digest, last_position) VALUES ($1, $2) "
        "ON CONFLICT (device_digest) DO UPDATE "
        "SET last_position = entitlement_feeds.last_position + excluded.last_position "
        "RETURNING last_position",
        device,
        len(services),
    )
    assert last is not None
    await fetchrow(
        "INSERT INTO entitlement_events (device_digest, position, binding_id, partner_id, "
        "service_id, account_kind, account_digest, state, reason, event_time) "
        "SELECT $1, $2::bigint - $3::bigint + n, $4, $5, s, 'phone_number', $6, "
        "'activating', '', now() FROM unnest($7::text[]) WITH ORDINALITY AS t(s, n) RETURNING 1",
        device,
        last[0],
        len(services),
        binding_id,
        partner_id,
        account,
        services,
    )


async def _baseline_server(
    kind: str, database_url: str, keys: str
) -> tuple[grpc.aio.Server, int, Callable[[], Awaitable[None]]]:
    """One SQL transaction per ReportAccountUse, nothing else.

    kind "asyncpg": through a raw asyncpg pool. kind "sqlalchemy": through
    Tether's own engine set-up (tether.server.storage.Database), with plain
    SQL and no ORM: the storage stack Tether must use, without the service.
    """
    key = digests.parse_keys(keys)[0]
    if kind == "asyncpg":
        pool = await asyncpg.create_pool(
            database_url.replace("+asyncpg", ""), min_size=POOL_SIZE, max_size=2 * POOL_SIZE
        )

        async def report(request: pb.ReportAccountUseRequest, context: Any) -> Any:
            async with pool.acquire() as conn, conn.transaction():
                return await _report_transaction(conn.fetchrow, key, request)

        close: Callable[[], Awaitable[None]] = pool.close
    else:
        from tether.server.storage.database import Database

        db = Database(database_url, POOL_SIZE)

        async def report(request: pb.ReportAccountUseRequest, context: Any) -> Any:
            async with db.transaction() as session:
                conn = await session.connection()

                async def fetchrow(sql: str, *args: Any) -> Sequence[Any] | None:
                    result = await conn.exec_driver_sql(sql, args)
                    return result.first()

                return await _report_transaction(fetchrow, key, request)

        close = db.close

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
    return server, port, close


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
        candidate = template[:-6] + f"{random.randrange(1_000_000):06d}"
        try:
            found.add(normalize_account("phone_number", candidate))
        except ValueError:
            continue
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
    servers: Sequence[Served],
    device_token: str,
    accounts: list[str],
    settled: Callable[[], Awaitable[None]],
) -> list[LoadResult]:
    """Each server's calls, measured in ROUNDS alternating slices (the order
    rotating every round), so load that changes during the run weighs on
    every server alike. settled runs between the warm-ups and the slices."""
    share = len(accounts) // len(servers)
    calls: list[Callable[[int], Awaitable[Any]]] = []
    counters: list[Iterator[int]] = []
    channels = []
    for n, served in enumerate(servers):
        pool = accounts[n * share : (n + 1) * share]
        channel = open_channel(served.address, device_token)
        channels.append(channel)
        stub: BindingAsyncStub = BindingStub(channel)

        async def call(i: int, stub: BindingAsyncStub = stub, pool: list[str] = pool) -> Any:
            return await stub.ReportAccountUse(
                pb.ReportAccountUseRequest(
                    request_id=secrets.token_hex(8),
                    device=types.Device(kind=types.TERMINAL_ID_KIND_IMEI, terminal_id=imei()),
                    account=types.Account(kind=types.ACCOUNT_KIND_PHONE_NUMBER, value=pool[i]),
                )
            )

        calls.append(call)
        # One counter per server for warm-up and every slice: each call binds a fresh account.
        counters.append(iter(range(len(pool))))
    for each, counter in zip(calls, counters, strict=True):
        await load(each, 1.0, CONCURRENCY, counter)  # warm-up: connections, caches
    # Statistics taken after every warm-up: a server's cached plans are then
    # made for the tables as they are, not as they were when it warmed up.
    # (Made while the bindings table was still empty, the foreign-key check
    # of the server warmed up first kept a sequential scan of that table,
    # which cost it more with every binding.)
    await settled()
    results = [LoadResult(0, 0.0, []) for _ in servers]
    for round_ in range(ROUNDS):
        for offset in range(len(servers)):
            n = (round_ + offset) % len(servers)
            part = await load(calls[n], SECONDS / ROUNDS, CONCURRENCY, counters[n])
            total = results[n]
            results[n] = LoadResult(
                total.calls + part.calls,
                total.seconds + part.seconds,
                total.latencies + part.latencies,
            )
    for channel in channels:
        await channel.close()
    return results


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
                columns=LIST_COLUMNS,
            )
        return len(values) / (time.perf_counter() - began)
    finally:
        await conn.close()


# --- setup -------------------------------------------------------------------


async def settle(database_url: str) -> None:
    """Statistics and a checkpoint after the bulk loads, so that no server's
    run meets the autovacuum and checkpoint work the import left behind."""
    conn = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


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
    from tether.server.storage.database import Database
    from tether.server.transport.credentials import create_admin

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
    for n in range(SERVICES):
        await admin.CreateService(
            admin_pb.CreateServiceRequest(
                request_id=secrets.token_hex(8),
                partner_id=partner_id,
                service_id=f"service-{n}",
                display_name=f"Service {n}",
            )
        )
    await channel.close()
    return partner_id, partner.token, device.token


async def main() -> None:
    from tether.server.storage import migrate

    name, database_url = await create_database()
    keys = digests.new_key_spec("bench")
    servers: list[Served] = []
    try:
        await migrate.upgrade_async(database_url)
        for kind in ("tether", "asyncpg", "sqlalchemy"):
            servers.append(start(kind, database_url, keys))
        tether = servers[0]
        _, partner_token, device_token = await setup(database_url, tether)

        phones = phone_numbers(IMPORT_SIZE)
        if "import" not in PARTS:
            await bench_import(tether, partner_token, "ACCOUNT_KIND_PHONE_NUMBER", phones)
        else:
            print(f"import: {IMPORT_SIZE:,} accounts per kind, batches of 10,000")
        members = [f"member-{i:09d}" for i in range(IMPORT_SIZE)]
        for kind, values in (
            ("ACCOUNT_KIND_MEMBER_ID", members),
            ("ACCOUNT_KIND_PHONE_NUMBER", phones),
        ):
            if "import" not in PARTS:
                break
            rate = await bench_import(tether, partner_token, kind, values)
            short = kind.removeprefix("ACCOUNT_KIND_").lower()
            floor = await baseline_copy(database_url, keys, short, values)
            print(
                f"  {short:<13} Tether {rate:>9,.0f} accounts/s   raw COPY {floor:>9,.0f} rows/s"
                f"   ratio {rate / floor:.2f}   target >= 50,000/s: "
                f"{'met' if rate >= 50_000 else 'NOT met'}"
            )

        if "reports" not in PARTS:
            return
        print(
            f"ReportAccountUse: {CONCURRENCY} concurrent calls for {SECONDS:.0f} s each "
            f"(in {ROUNDS} alternating slices), "
            "every call binds a listed phone number to a new device, "
            f"opening {SERVICES} preset service(s)"
        )
        ours, raw, core = await bench_reports(
            servers, device_token, phones, lambda: settle(database_url)
        )
        for label, result in (
            ("baseline, raw asyncpg", raw),
            ("baseline, SQLAlchemy Core", core),
            ("Tether", ours),
        ):
            print(
                f"  {label:<26} {result.rate:>7,.0f} calls/s   "
                f"p50 {result.percentile(50):6.1f} ms   p99 {result.percentile(99):6.1f} ms"
            )
        for label, base in (("raw asyncpg", raw), ("SQLAlchemy Core", core)):
            ratio = ours.rate / base.rate
            print(
                f"  Tether / {label} baseline: {ratio:.2f}x "
                f"(target >= 0.8x: {'met' if ratio >= 0.8 else 'NOT met'})"
            )
    finally:
        for served in servers:
            served.close()
        await drop_database(name)


if __name__ == "__main__":
    asyncio.run(main())

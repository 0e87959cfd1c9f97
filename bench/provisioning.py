"""Provisioning benchmark: commit-to-partner latency and delivery throughput.

    python -m bench.provisioning

A Tether server runs in its own process (`python -m tether.server`) on a
throwaway PostgreSQL database. This process plays the binding area and the
partner:

- Latency: a producer process commits bindings at a steady rate (default
  1,000/s), each in its own transaction with exactly the rows the outbox
  listener writes (binding, instruction, entitlement, feed event; checked
  column by column against the listener at start; ids, digests and SQL
  text are made before the paced run), and after the commit
  hands the wake-up topics to a Wakeup's notifier, which sends them as
  coalesced NOTIFYs outside the transaction, as a Tether process does. Partner
  streams (the PartnerWorker client) confirm each instruction at once.
  Figure: time from the start of the binding's committing round trip to
  the partner receiving its instruction, p50/p99.
  Baseline: the same commit rate on a bare table with a bare asyncpg
  LISTEN/NOTIFY round trip (commit with NOTIFY -> a listening connection in
  this process hears it): the floor of any cross-process wake-up.
- Throughput: N instructions are queued while no partner is connected; then
  partner streams connect and the time until all are confirmed is taken.
  Baseline: a bare asyncpg loop doing the same row work (claim a batch with
  FOR UPDATE SKIP LOCKED, then one transaction per confirmation) on a bare
  table, without gRPC.

Every run checks that no instruction was lost and none confirmed twice.
Environment: TETHER_BENCH_POSTGRES_DSN, TETHER_BENCH_RATE (default 1000),
TETHER_BENCH_SECONDS (default 10), TETHER_BENCH_BACKLOG (default 10000),
TETHER_BENCH_STREAMS (default 2).
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import secrets
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from sqlalchemy import func, select

from tests.provisioning_support import ServerProcess
from tether.clients.connection import open_channel
from tether.clients.partner.provisioning import Done, Instruction, PartnerWorker, Result
from tether.server.admin import service as admin
from tether.server.binding.tables import Binding
from tether.server.provisioning.outbox import BindingOutbox
from tether.server.provisioning.store_postgres import PostgresBroadcast
from tether.server.provisioning.tables import Instruction as Row
from tether.server.provisioning.wakeup import Wakeup, feed_topic, instructions_topic
from tether.server.shared import digests
from tether.server.shared.bindings import BindingChange
from tether.server.storage import migrate
from tether.server.storage.base import utcnow
from tether.server.storage.database import Database
from tether.server.transport.principal import CallerKind

ADMIN_DSN = os.environ.get("TETHER_BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
RATE = float(os.environ.get("TETHER_BENCH_RATE", "1000"))
SECONDS = float(os.environ.get("TETHER_BENCH_SECONDS", "10"))
BACKLOG = int(os.environ.get("TETHER_BENCH_BACKLOG", "10000"))
STREAMS = int(os.environ.get("TETHER_BENCH_STREAMS", "2"))
PRODUCERS = int(os.environ.get("TETHER_BENCH_PRODUCERS", "32"))


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _paced(count: int, rate: float, one: Callable[[int], Awaitable[None]]) -> float:
    """Runs one(i) for i < count, started at `rate` per second by PRODUCERS tasks.

    Returns the achieved rate.
    """
    start = time.perf_counter()
    next_index = iter(range(count))

    async def producer() -> None:
        for i in next_index:
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await one(i)

    await asyncio.gather(*(producer() for _ in range(PRODUCERS)))
    return count / (time.perf_counter() - start)


async def _unchanged(_connection: asyncpg.Connection) -> None:
    """Nothing to reset: these connections only run whole transactions."""


async def _pool(dsn: str, size: int) -> asyncpg.Pool:
    """A connection pool that hands a connection back without a reset query
    (asyncpg's default sends one more statement on every release, which
    Tether's pool does not: that would load PostgreSQL with work neither
    side does)."""
    return await asyncpg.create_pool(dsn, min_size=size, max_size=size, reset=_unchanged)


# --- baselines -------------------------------------------------------------


async def baseline_notify_latency(dsn: str, count: int) -> tuple[list[float], float]:
    conn = await asyncpg.connect(dsn)
    await conn.execute(
        "CREATE TABLE bench_outbox (id bigserial PRIMARY KEY, token text NOT NULL, "
        "state text NOT NULL DEFAULT 'pending')"
    )
    listener = await asyncpg.connect(dsn)
    committed: dict[str, float] = {}
    latencies: list[float] = []
    heard_all = asyncio.Event()

    def heard(_c: object, _pid: int, _channel: str, token: str) -> None:
        latencies.append(time.perf_counter() - committed[token])
        if len(latencies) == count:
            heard_all.set()

    await listener.add_listener("bench_outbox", heard)
    pool = await _pool(dsn, PRODUCERS)

    async def one(_i: int) -> None:
        token = secrets.token_hex(8)
        committed[token] = time.perf_counter()
        async with pool.acquire() as c:
            await c.execute(
                f"BEGIN; INSERT INTO bench_outbox (token) VALUES ('{token}'); "
                f"SELECT pg_notify('bench_outbox', '{token}'); COMMIT;"
            )

    rate = await _paced(count, RATE, one)
    await asyncio.wait_for(heard_all.wait(), 30)
    await pool.close()
    await listener.close()
    await conn.close()
    return latencies, rate


async def baseline_throughput(dsn: str, count: int) -> float:
    conn = await asyncpg.connect(dsn)
    await conn.execute("TRUNCATE bench_outbox")
    await conn.executemany(
        "INSERT INTO bench_outbox (token) VALUES ($1)", [(str(i),) for i in range(count)]
    )
    pool = await _pool(dsn, 16)
    confirmed = 0

    async def worker() -> None:
        nonlocal confirmed
        while True:
            async with pool.acquire() as c, c.transaction():
                ids = [
                    r["id"]
                    for r in await c.fetch(
                        "SELECT id FROM bench_outbox WHERE state = 'pending' ORDER BY id "
                        "LIMIT 100 FOR UPDATE SKIP LOCKED"
                    )
                ]
                await c.execute("UPDATE bench_outbox SET state = 'leased' WHERE id = ANY($1)", ids)
            if not ids:
                return

            async def confirm(row_id: int) -> None:
                async with pool.acquire() as c, c.transaction():
                    await c.fetchrow(
                        "SELECT state FROM bench_outbox WHERE id = $1 FOR UPDATE", row_id
                    )
                    await c.execute(
                        "UPDATE bench_outbox SET state = 'confirmed' WHERE id = $1", row_id
                    )

            await asyncio.gather(*(confirm(i) for i in ids))
            confirmed += len(ids)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(STREAMS)))
    elapsed = time.perf_counter() - start
    await pool.close()
    await conn.close()
    assert confirmed == count, (confirmed, count)
    return count / elapsed


# --- Tether ----------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """One binding's transaction, ready to commit."""

    binding_id: uuid.UUID
    sql: str
    topics: set[str]


class Bench:
    def __init__(self, database_url: str, dsn: str, keys: str) -> None:
        self.db = Database(database_url, 4)
        self.dsn = dsn
        self.keys = keys
        self.digester = digests.Digester(digests.parse_keys(keys))
        self.partner_id = "bench-" + secrets.token_hex(3)
        self.pool: asyncpg.Pool | None = None
        # Sends the bindings' wake-ups after their commits, as Tether does.
        self.wakeup = Wakeup(PostgresBroadcast(database_url))
        # Instructions written before the measured phases (the row check).
        self.extra = 0

    async def setup(self) -> str:
        async with self.db.transaction() as session:
            await admin.create_partner(session, self.partner_id, "Bench partner", "refuse")
            await admin.create_service(session, self.partner_id, "free-data", "Free data", "")
            minted = await admin.create_credential(
                session, CallerKind.PARTNER, self.partner_id, "bench"
            )
        await self.open()
        return minted.token

    async def open(self) -> None:
        self.pool = await _pool(self.dsn, PRODUCERS)
        await self.wakeup.start()

    async def check_rows_match_the_outbox(self) -> None:
        """The raw SQL below must write what the outbox listener writes:
        compare one binding written each way, column by column."""
        binding_id = uuid.uuid4()
        async with self.db.transaction() as session:
            binding = Binding(
                binding_id=binding_id,
                partner_id=self.partner_id,
                account_kind="member_id",
                account_digest=self.digester.digest("member_id", binding_id.hex),
                device_digest=self.digester.digest("serial_number", binding_id.hex),
                key_id=self.digester.current.key_id,
                partner_reference=binding_id.hex[:12],
                state="active",
                create_time=utcnow(),
            )
            session.add(binding)
            await session.flush()
            await BindingOutbox(self.wakeup).on_change(session, BindingChange("created", binding))
        raw_id = await self.bind()
        self.extra += 2
        assert self.pool is not None
        for table, key in (
            ("provisioning_instructions", "binding_id"),
            ("entitlements", "binding_id"),
            ("entitlement_events", "binding_id"),
        ):
            ignore = {
                "seq",
                "instruction_id",
                "binding_id",
                "account_digest",
                "device_digest",
                "partner_reference",
                "due_time",
                "create_time",
                "update_time",
                "event_time",
            }
            rows = [
                {
                    k: v
                    for k, v in dict(
                        await self.pool.fetchrow(f"SELECT * FROM {table} WHERE {key} = $1", b)
                    ).items()
                    if k not in ignore
                }
                for b in (binding_id, raw_id)
            ]
            assert rows[0] == rows[1], (table, rows)

    async def bind(self) -> uuid.UUID:
        """One binding and its outbox rows in one transaction and one round
        trip, then its wake-up topics to the notifier (never in the transaction)."""
        prepared = self.prepare()
        await self.commit(prepared)
        return prepared.binding_id

    def prepare(self) -> Prepared:
        """A new binding's transaction as literal SQL: the same rows the
        binding area and the outbox listener write (checked by
        check_rows_match_the_outbox), with its ids and digests computed, so
        that this load generator, not the server, is never the bottleneck."""
        binding_id = uuid.uuid4()
        b = f"'{binding_id}'"
        p = f"'{self.partner_id}'"
        account = "'\\x" + self.digester.digest("member_id", binding_id.hex).hex() + "'"
        device_digest = self.digester.digest("serial_number", binding_id.hex)
        device_hex = device_digest.hex()
        device = "'\\x" + device_hex + "'"
        ref = f"'{binding_id.hex[:12]}'"
        key = f"'{self.digester.current.key_id}'"
        sql = f"""
BEGIN;
INSERT INTO bindings (binding_id, partner_id, account_kind, account_digest, device_digest,
  key_id, partner_reference, state, create_time)
  VALUES ({b}, {p}, 'member_id', {account}, {device}, {key}, {ref}, 'active', now());
INSERT INTO provisioning_instructions (instruction_id, partner_id, service_id, binding_id, kind,
  partner_reference, account_kind, account_digest, state, attempts, due_time, last_error,
  partner_service_reference, create_time, update_time)
  VALUES ('{uuid.uuid4()}', {p}, 'free-data', {b}, 'open', {ref}, 'member_id', {account},
  'pending', 0, now(), '', '', now(), now());
INSERT INTO entitlements (binding_id, service_id, partner_id, account_kind, account_digest,
  device_digest, state, reason, update_time)
  VALUES ({b}, 'free-data', {p}, 'member_id', {account}, {device}, 'activating', '', now());
WITH f AS (INSERT INTO entitlement_feeds (device_digest, last_position) VALUES ({device}, 1)
  ON CONFLICT (device_digest) DO UPDATE
  SET last_position = entitlement_feeds.last_position + 1 RETURNING last_position)
INSERT INTO entitlement_events (device_digest, position, binding_id, partner_id, service_id,
  account_kind, account_digest, state, reason, event_time)
  SELECT {device}, f.last_position, {b}, {p}, 'free-data', 'member_id', {account},
  'activating', '', now() FROM f;
COMMIT;"""
        topics = {feed_topic(device_digest), instructions_topic(self.partner_id)}
        return Prepared(binding_id, sql, topics)

    async def commit(self, prepared: Prepared) -> None:
        """Commits a prepared binding in one round trip, then hands its
        wake-up topics to the notifier, as a Tether process does."""
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            await conn.execute(prepared.sql)
        self.wakeup.notify_later(prepared.topics)

    async def close(self) -> None:
        await self.wakeup.stop()
        if self.pool is not None:
            await self.pool.close()
        await self.db.close()

    async def confirmed_counts(self) -> tuple[int, int]:
        async with self.db.sessions() as session:
            rows = (
                await session.execute(
                    select(Row.state, func.count())
                    .where(Row.partner_id == self.partner_id)
                    .group_by(Row.state)
                )
            ).all()
        counts = {state: int(n) for state, n in rows}
        return counts.get("confirmed", 0), sum(counts.values())


class Recorder:
    """The partner: notes when each instruction arrives and confirms it at once."""

    def __init__(self) -> None:
        self.received: dict[str, float] = {}
        self.deliveries = 0
        self.all_in = asyncio.Event()
        self.expected = 0

    async def on_open(self, instruction: Instruction) -> Result:
        self.deliveries += 1
        self.received.setdefault(instruction.binding_id, time.perf_counter())
        if len(self.received) >= self.expected:
            self.all_in.set()
        return Done("bench")

    async def on_close(self, instruction: Instruction) -> Result:
        return Done()


async def _workers(
    address: str, token: str, recorder: Recorder, streams: int
) -> tuple[list[PartnerWorker], list[asyncio.Task[None]], list[object]]:
    channels = [open_channel(address, token) for _ in range(streams)]
    workers = [
        PartnerWorker(c, on_open=recorder.on_open, on_close=recorder.on_close, max_in_flight=500)
        for c in channels
    ]
    tasks = [asyncio.create_task(w.run()) for w in workers]
    await asyncio.gather(*(asyncio.wait_for(w.connected.wait(), 30) for w in workers))
    return workers, tasks, list(channels)


async def _stop(
    workers: list[PartnerWorker], tasks: list[asyncio.Task[None]], channels: list[object]
) -> None:
    for w in workers:
        w.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    for c in channels:
        await c.close()  # type: ignore[attr-defined]


async def _wait_all_confirmed(bench: Bench, expected: int, within: float = 60) -> None:
    deadline = time.perf_counter() + within
    while True:
        confirmed, total = await bench.confirmed_counts()
        if confirmed == total == expected:
            return
        if time.perf_counter() > deadline:
            raise AssertionError(f"only {confirmed}/{total} of {expected} confirmed")
        await asyncio.sleep(0.05)


def _produce(
    url: str, dsn: str, keys: str, partner_id: str, count: int
) -> tuple[dict[str, float], dict[str, float], float]:
    """Commits `count` bindings at RATE per second; returns when each commit
    began and when it returned."""

    async def run() -> tuple[dict[str, float], dict[str, float], float]:
        producer = Bench(url, dsn, keys)
        producer.partner_id = partner_id
        await producer.open()
        committed: dict[str, float] = {}
        finished: dict[str, float] = {}
        # Ids, digests and SQL text first: during the paced run this
        # process only commits, and leaves the CPU to what is measured.
        bindings = [producer.prepare() for _ in range(count)]
        # They live until the end: no full collection walks them during it.
        gc.freeze()

        async def one(i: int) -> None:
            started = time.perf_counter()
            await producer.commit(bindings[i])
            binding_id = str(bindings[i].binding_id)
            committed[binding_id] = started
            finished[binding_id] = time.perf_counter()

        rate = await _paced(count, RATE, one)
        await producer.close()
        return committed, finished, rate

    return asyncio.run(run())


async def tether_latency(
    bench: Bench, address: str, token: str, count: int
) -> tuple[list[float], list[float], float]:
    recorder = Recorder()
    recorder.expected = count + bench.extra
    workers, tasks, channels = await _workers(address, token, recorder, STREAMS)
    # The bindings come from a process of their own, so that this one (the
    # partner) does not slow the committing down. perf_counter is the
    # system-wide monotonic clock on Linux: both processes read the same one.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        committed, finished, rate = await asyncio.get_running_loop().run_in_executor(
            pool, _produce, bench.db.url, bench.dsn, bench.keys, bench.partner_id, count
        )
    await asyncio.wait_for(recorder.all_in.wait(), 60)
    await _wait_all_confirmed(bench, count + bench.extra)
    await _stop(workers, tasks, channels)
    assert set(committed) <= set(recorder.received), "an instruction was lost"
    assert len(recorder.received) == count + bench.extra
    from_start = [recorder.received[b] - committed[b] for b in committed]
    from_end = [recorder.received[b] - finished[b] for b in committed]
    return from_start, from_end, rate


async def tether_throughput(
    bench: Bench, address: str, token: str, count: int, before: int
) -> tuple[float, int]:
    async def one(_i: int) -> None:
        await bench.bind()

    await _paced(count, 1e9, one)
    recorder = Recorder()
    recorder.expected = count
    start = time.perf_counter()
    workers, tasks, channels = await _workers(address, token, recorder, STREAMS)
    await asyncio.wait_for(recorder.all_in.wait(), 120)
    await _wait_all_confirmed(bench, before + count, 120)
    elapsed = time.perf_counter() - start
    await _stop(workers, tasks, channels)
    return count / elapsed, recorder.deliveries


async def main() -> None:
    name = f"tether_bench_{secrets.token_hex(4)}"
    admin_conn = await asyncpg.connect(ADMIN_DSN)
    await admin_conn.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_DSN.rsplit("/", 1)[0]
    dsn = f"{base}/{name}"
    url = dsn.replace("postgresql://", "postgresql+asyncpg://")
    keys = digests.new_key_spec("bench")
    process: ServerProcess | None = None
    try:
        await migrate.upgrade_async(url)
        count = int(RATE * SECONDS)
        print(f"commit -> partner latency at {RATE:.0f} bindings/s for {SECONDS:.0f} s")
        base_lat, base_rate = await baseline_notify_latency(dsn, count)
        with tempfile.TemporaryDirectory() as data_dir:
            process = ServerProcess(
                database_url=url,
                redis_url="",
                digest_keys=keys,
                data_dir=Path(data_dir),
                env={"TETHER_DATABASE_POOL_SIZE": "40", "TETHER_LOG_LEVEL": "WARNING"},
            )
            await process.start()
            bench = Bench(url, dsn, keys)
            token = await bench.setup()
            await bench.check_rows_match_the_outbox()
            lat, lat_end, rate = await tether_latency(bench, process.address, token, count)
            _report_latency(base_lat, base_rate, lat, rate)
            print(
                "  tether measured from the commit's return instead of its start: "
                f"p50 {_percentile(lat_end, 0.5) * 1000:.2f} ms  "
                f"p99 {_percentile(lat_end, 0.99) * 1000:.2f} ms"
            )

            print(f"\ndelivered + confirmed per second, backlog of {BACKLOG}, {STREAMS} streams")
            base_tp = await baseline_throughput(dsn, BACKLOG)
            tp, deliveries = await tether_throughput(
                bench, process.address, token, BACKLOG, count + bench.extra
            )
            print(f"  baseline (bare asyncpg claim + confirm) {base_tp:9.0f} /s")
            print(
                f"  tether                                  {tp:9.0f} /s   "
                f"ratio {tp / base_tp:.2f}x"
            )
            print(
                f"  deliveries {deliveries} for {BACKLOG} instructions; "
                "every one confirmed exactly once, none lost"
            )
            await bench.close()
    finally:
        if process is not None:
            process.stop()
        await admin_conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin_conn.close()


def _report_latency(base: list[float], base_rate: float, tether: list[float], rate: float) -> None:
    def ms(values: list[float], q: float) -> float:
        return _percentile(values, q) * 1000

    print(
        f"  baseline (bare LISTEN/NOTIFY)  achieved {base_rate:6.0f}/s  "
        f"p50 {ms(base, 0.5):6.2f} ms  p99 {ms(base, 0.99):6.2f} ms"
    )
    print(
        f"  tether (commit -> partner)     achieved {rate:6.0f}/s  "
        f"p50 {ms(tether, 0.5):6.2f} ms  p99 {ms(tether, 0.99):6.2f} ms  "
        f"(mean {statistics.mean(tether) * 1000:.2f} ms)"
    )
    print(
        f"  ratio p50 {ms(tether, 0.5) / ms(base, 0.5):.2f}x  "
        f"p99 {ms(tether, 0.99) / ms(base, 0.99):.2f}x   "
        f"target p99 < 50 ms: {'met' if ms(tether, 0.99) < 50 else 'MISSED'}"
    )
    print(f"  all {len(tether)} instructions received and confirmed, none lost")


if __name__ == "__main__":
    asyncio.run(main())

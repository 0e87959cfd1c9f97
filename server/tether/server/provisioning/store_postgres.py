"""The provisioning store on PostgreSQL.

Deliveries. The partner streams' hot path: leases and confirmations as
fixed, set-based statements on asyncpg connections kept open.

Every delivered instruction costs a lease and a confirmation, so each costs
as few round trips and as little CPU as possible: the SQL is fixed text
(prepared once per connection by asyncpg, arrays instead of one parameter
per row), no SQLAlchemy statement is built, and no pool check-out or ping
stands between a wake-up and the partner. Confirmations of all streams are
applied by one task, everything that arrived meanwhile in one transaction
(group commit). The general path (`leasing`, store_sqlalchemy.py) stays in
use on SQLite and for the unary calls; both make the same decisions
(`confirmations.decide`) and write the same rows.

Broadcast. Committed wake-up topics are handed to a notifier task, which
sends them as NOTIFY on a connection of its own, after the commit and
outside any writing transaction: PostgreSQL serializes the commits of all
transactions that issued NOTIFY (the notify queue lock is held through the
commit's WAL flush), which capped binding commits at ~450/s when each
binding transaction sent its own. Topics that pile up while a send is in
flight go out together in the next one. Each Tether process receives them
on a dedicated LISTEN connection.

Outbox. PostgresBindingOutbox writes what the outbox writes for new
bindings as CTEs of the binding's own INSERT, so a report costs one round
trip (binding/store_postgres.py runs it).

Usage queries between processes: store_postgres_relay.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import CTE, Integer, String, bindparam, cast, func, literal, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server import errors, logs
from tether.server.provisioning import confirmations, leasing
from tether.server.provisioning.leasing import Delivery, Timing
from tether.server.provisioning.outbox import BindingOutbox
from tether.server.provisioning.store import AskHere, Broadcast, DeliveryStore, UsageRelay
from tether.server.provisioning.store_postgres_relay import PostgresUsageRelay
from tether.server.provisioning.tables import (
    ACTIVATING,
    OPEN,
    PENDING,
    DeviceFeed,
    Entitlement,
    EntitlementEvent,
    Instruction,
)
from tether.server.provisioning.wakeup import Wakeup, feed_topic, instructions_topic
from tether.server.shared.bindings import BindingFacts, BindingListener, CreatedWrites
from tether.server.shared.partners import PresetService
from tether.server.shared.tasks import raise_if_cancelled
from tether.server.storage import listener
from tether.server.storage.base import UtcDateTime, utcnow
from tether.server.storage.database import Database

log = logs.get(__name__)

CHANNEL = "tether_provisioning"
MAX_PAYLOAD = 7900
# Topics waiting for the notifier. One per partner or device changed since
# the last send, so this is reached only if PostgreSQL stops answering the
# notifier while commits still succeed; past it the topics are dropped and
# the waiters' slow poll finds the work.
MAX_UNSENT = 100_000
# One statement, one round trip and one (tiny) transaction per send.
_NOTIFY_SQL = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p"

# Most confirmations applied in one transaction.
MAX_CONFIRMATIONS = 1000

# One lease for all of a partner's streams in this process: row n (in seq
# order) goes to owner n of $4, so each stream gets at most its credit. The
# picked rows are an InitPlan array, so the update reaches them by key
# (= ANY(array)), whatever plan is cached. RETURNING lists the fields of
# Delivery in order (a test checks them).
_LEASE_SQL = """
WITH picked AS MATERIALIZED (
    SELECT ARRAY(
        SELECT seq FROM provisioning_instructions
        WHERE partner_id = $1 AND state IN ('pending', 'leased') AND due_time <= $2
        ORDER BY seq LIMIT cardinality($4::text[])
        FOR UPDATE SKIP LOCKED
    ) AS seqs
)
UPDATE provisioning_instructions AS i SET
    state = CASE WHEN i.attempts >= $3 THEN 'dead' ELSE 'leased' END,
    attempts = CASE WHEN i.attempts >= $3 THEN i.attempts ELSE i.attempts + 1 END,
    lease_owner = CASE WHEN i.attempts >= $3 THEN NULL
        ELSE ($4::text[])[array_position((SELECT seqs FROM picked), i.seq)] END,
    due_time = CASE WHEN i.attempts >= $3 THEN i.due_time
                    ELSE ($5::timestamptz[])[i.attempts + 1] END,
    update_time = $2
WHERE i.seq = ANY((SELECT seqs FROM picked)::bigint[])
RETURNING i.seq, i.instruction_id, i.kind, i.service_id, i.binding_id, i.partner_reference,
    i.account_kind, i.account_digest, i.state, i.attempts, i.create_time, i.due_time,
    i.lease_owner, i.trace_parent
"""

_NEXT_DUE_SQL = """
SELECT min(due_time) FROM provisioning_instructions
WHERE partner_id = $1 AND state IN ('pending', 'leased')
"""

# The fields of confirmations.Row in order (a test checks them).
_LOCK_INSTRUCTIONS_SQL = """
SELECT seq, instruction_id, partner_id, kind, binding_id, service_id, state, attempts, due_time,
    lease_owner, last_error, partner_service_reference
FROM provisioning_instructions
WHERE instruction_id = ANY($1::uuid[]) ORDER BY seq FOR UPDATE
"""

_UPDATE_INSTRUCTIONS_SQL = """
UPDATE provisioning_instructions AS i SET
    state = v.state, due_time = v.due_time, lease_owner = v.lease_owner,
    last_error = v.last_error, partner_service_reference = v.reference, update_time = $7
FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::text[])
    AS v(seq, state, due_time, lease_owner, last_error, reference)
WHERE i.seq = ANY($1::bigint[]) AND i.seq = v.seq
"""

# In the order every writer of entitlements locks them.
_LOCK_ENTITLEMENTS_SQL = """
SELECT 1 FROM entitlements WHERE binding_id = ANY($1::uuid[])
ORDER BY binding_id, service_id FOR UPDATE
"""

# The entitlements still being opened move; each change is appended to its
# device's feed at the positions reserved by bumping the feed's counter
# (in digest order, as every feed writer does), in the order given.
_SET_ENTITLEMENTS_SQL = """
WITH changed AS (
    UPDATE entitlements AS e SET state = v.state, reason = v.reason, update_time = $5
    FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[])
        WITH ORDINALITY AS v(binding_id, service_id, state, reason, ord)
    WHERE e.binding_id = v.binding_id AND e.service_id = v.service_id
        AND e.state = 'activating'
    RETURNING e.device_digest, e.binding_id, e.partner_id, e.service_id, e.account_kind,
        e.account_digest, e.state, e.reason, v.ord
), feeds AS (
    INSERT INTO entitlement_feeds AS f (device_digest, last_position)
    SELECT device_digest, count(*) FROM changed GROUP BY device_digest ORDER BY device_digest
    ON CONFLICT (device_digest)
    DO UPDATE SET last_position = f.last_position + excluded.last_position
    RETURNING f.device_digest, f.last_position
)
INSERT INTO entitlement_events (device_digest, position, binding_id, partner_id, service_id,
    account_kind, account_digest, state, reason, event_time)
SELECT c.device_digest,
    feeds.last_position - count(*) OVER w + row_number() OVER (w ORDER BY c.ord),
    c.binding_id, c.partner_id, c.service_id, c.account_kind, c.account_digest, c.state,
    c.reason, $5
FROM changed AS c JOIN feeds USING (device_digest)
WINDOW w AS (PARTITION BY c.device_digest)
RETURNING device_digest
"""

# One confirmation as the applier takes it: partner, instruction, result.
Item = tuple[str, uuid.UUID, confirmations.Result]


def _unavailable(exc: BaseException) -> errors.TetherError:
    return errors.Unavailable(
        ErrorReason.ERROR_REASON_BACKEND_UNAVAILABLE, f"the database did not answer: {exc}"
    )


def _is_outage(exc: BaseException) -> bool:
    return isinstance(exc, OSError | asyncpg.PostgresConnectionError | asyncpg.InterfaceError)


class _KeptConnection:
    """One connection of the engine's pool, held open and used as a bare
    asyncpg connection; replaced after any failure."""

    def __init__(self, db: Database, *, durable: bool) -> None:
        self._db = db
        self._durable = durable
        self._held: AsyncConnection | None = None
        self._raw: Any = None

    async def get(self) -> Any:
        if self._raw is None:
            held = await self._db.engine.connect()
            try:
                fairy = await held.get_raw_connection()
                raw: Any = fairy.driver_connection
                # Every statement here reaches a few rows by key; a plan
                # that scans a whole table (which PostgreSQL picks for
                # cached generic plans of array parameters, and while the
                # tables are small) costs more with every row the outbox
                # keeps. Never returned to the pool, so this stays here.
                await raw.execute("SET enable_seqscan = off")
                if not self._durable:
                    # A lease that a database crash forgets only means the
                    # instruction is delivered again (at least once, and the
                    # partner answers a redelivery from its results); its
                    # commit need not wait for the WAL flush, which is most
                    # of the time between a wake-up and the partner.
                    await raw.execute("SET synchronous_commit = off")
                self._raw = raw
            except BaseException:
                await held.close()
                raise
            self._held = held
        return self._raw

    async def drop(self) -> None:
        """Forgets the connection; it is closed, not returned to the pool
        (it may be mid-transaction or broken)."""
        held, self._held, self._raw = self._held, None, None
        if held is not None:
            with contextlib.suppress(Exception):
                await held.invalidate()
            with contextlib.suppress(Exception):
                await held.close()


class PostgresProvisioningStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def broadcast(self) -> Broadcast:
        return PostgresBroadcast(self._db.url)

    def delivery(self, wakeup: Wakeup, timing: Timing) -> DeliveryStore:
        return PostgresDelivery(self._db, wakeup, timing)

    def usage_relay(self, ask_here: AskHere) -> UsageRelay:
        return PostgresUsageRelay(self._db.url, ask_here)

    def outbox(self, wakeup: Wakeup) -> BindingListener:
        return PostgresBindingOutbox(wakeup)


class PostgresDelivery:
    """Leases and confirmations of this process's partner streams."""

    def __init__(self, db: Database, notify: Wakeup, timing: Timing) -> None:
        self._notify = notify
        self._timing = timing
        self._lease_connection = _KeptConnection(db, durable=False)
        self._lease_lock = asyncio.Lock()
        # Confirmations stay durable: once acknowledged, the partner forgets them.
        self._confirm_connection = _KeptConnection(db, durable=True)
        self._waiting: list[tuple[list[Item], asyncio.Future[list[confirmations.Applied]]]] = []
        self._arrived = asyncio.Event()
        self._applier: asyncio.Task[None] | None = None
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        if self._applier is not None:
            self._applier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._applier
            self._applier = None
        for _, future in self._waiting:
            if not future.done():
                future.set_exception(_unavailable(RuntimeError("the server is stopping")))
        self._waiting.clear()
        await self._lease_connection.drop()
        await self._confirm_connection.drop()

    # --- leases --------------------------------------------------------

    async def lease(
        self, partner_id: str, *, owners: Sequence[str], now: datetime
    ) -> list[Delivery]:
        """As leasing.lease, for several deliverers in one autocommit
        statement (see DeliveryStore.lease)."""
        if not owners:
            return []
        timing = self._timing
        ends = [now + timing.lease_for(n + 1) for n in range(timing.max_attempts)]
        records = await self._on_lease_connection(
            "fetch", _LEASE_SQL, partner_id, now, timing.max_attempts, list(owners), ends
        )
        rows = [Delivery(*r) for r in records]
        leasing.count_leased(rows)
        return sorted((r for r in rows if r.state == "leased"), key=lambda r: r.seq)

    async def next_due(self, partner_id: str) -> datetime | None:
        """The partner's next retry or lease expiry."""
        due: datetime | None
        due = await self._on_lease_connection("fetchval", _NEXT_DUE_SQL, partner_id)
        return due

    async def _on_lease_connection(self, method: str, sql: str, *args: Any) -> Any:
        async with self._lease_lock:
            try:
                conn = await self._lease_connection.get()
                return await getattr(conn, method)(sql, *args)
            except BaseException as exc:
                await self._lease_connection.drop()
                if _is_outage(exc):
                    log.warning("lease failed", error=str(exc))
                    raise _unavailable(exc) from exc
                raise

    # --- confirmations -------------------------------------------------

    async def confirm(
        self, partner_id: str, items: Sequence[tuple[uuid.UUID, confirmations.Result]]
    ) -> list[confirmations.Applied]:
        """Applies the confirmations (with whatever other streams confirmed
        meanwhile) in one transaction; one Applied per item, in order. A
        caller that gives up does not stop the transaction."""
        if self._closed:
            raise _unavailable(RuntimeError("the server is stopping"))
        future: asyncio.Future[list[confirmations.Applied]] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiting.append(([(partner_id, i, r) for i, r in items], future))
        self._arrived.set()
        if self._applier is None or self._applier.done():
            self._applier = asyncio.create_task(self._apply_forever(), name="confirmations")
        return await future

    async def _apply_forever(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._waiting:
                taken: list[tuple[list[Item], asyncio.Future[list[confirmations.Applied]]]] = []
                count = 0
                while self._waiting and (not taken or count < MAX_CONFIRMATIONS):
                    entry = self._waiting.pop(0)
                    taken.append(entry)
                    count += len(entry[0])
                await self._apply_taken(taken)

    async def _apply_taken(
        self, taken: list[tuple[list[Item], asyncio.Future[list[confirmations.Applied]]]]
    ) -> None:
        items = [item for entry, _ in taken for item in entry]
        try:
            applied = await self._apply(items)
        except asyncio.CancelledError:
            for _, future in taken:
                if not future.done():
                    future.set_exception(_unavailable(RuntimeError("the server is stopping")))
            raise
        except Exception as exc:
            failure = _unavailable(exc) if _is_outage(exc) else exc
            log.warning("confirmations failed", error=str(exc), confirmations=len(items))
            for _, future in taken:
                if not future.done():
                    future.set_exception(failure)
            return
        start = 0
        for entry, future in taken:
            if not future.done():
                future.set_result(applied[start : start + len(entry)])
            start += len(entry)

    async def _apply(self, items: list[Item]) -> list[confirmations.Applied]:
        try:
            conn = await self._confirm_connection.get()
            async with conn.transaction():
                applied, topics = await self._apply_in_transaction(conn, items)
        except BaseException:
            await self._confirm_connection.drop()
            raise
        self._notify.wake(*topics)
        self._notify.notify_later(topics)
        return applied

    async def _apply_in_transaction(
        self, conn: Any, items: list[Item]
    ) -> tuple[list[confirmations.Applied], set[str]]:
        ids = sorted({instruction_id for _, instruction_id, _ in items})
        rows = {r[1]: confirmations.Row(*r) for r in await conn.fetch(_LOCK_INSTRUCTIONS_SQL, ids)}
        now = utcnow()
        applied, effects = confirmations.decide(rows, items, self._timing, now)
        topics: set[str] = set()
        changed = [r for r in rows.values() if r.changed]
        if changed:
            await conn.execute(
                _UPDATE_INSTRUCTIONS_SQL,
                [r.seq for r in changed],
                [r.state for r in changed],
                [r.due_time for r in changed],
                [r.lease_owner for r in changed],
                [r.last_error for r in changed],
                [r.partner_service_reference for r in changed],
                now,
            )
        # A retry's dispatchers learn when it is due.
        topics.update(
            instructions_topic(partner_id)
            for (partner_id, _, _), a in zip(items, applied, strict=True)
            if a.outcome is confirmations.Outcome.RETRY_SCHEDULED
        )
        if effects:
            await conn.execute(
                _LOCK_ENTITLEMENTS_SQL, sorted({row.binding_id for row, _, _ in effects})
            )
            devices = await conn.fetch(
                _SET_ENTITLEMENTS_SQL,
                [row.binding_id for row, _, _ in effects],
                [row.service_id for row, _, _ in effects],
                [state for _, state, _ in effects],
                [reason for _, _, reason in effects],
                now,
            )
            topics.update(feed_topic(bytes(d[0])) for d in devices)
        return applied, topics


class PostgresBroadcast:
    """Wake-ups between processes: NOTIFY after commit, heard on LISTEN."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._listening = asyncio.Event()
        self._heard: Callable[[Sequence[str]], None] = lambda _topics: None
        self._reconnected: Callable[[], None] = lambda: None
        self._task: asyncio.Task[None] | None = None
        # Committed topics not yet sent as NOTIFY, and the notifier's state.
        self._unsent: set[str] = set()
        self._unsent_ready = asyncio.Event()
        self._notifier: asyncio.Task[None] | None = None
        self._notify_conn: asyncpg.Connection | None = None

    @property
    def listening(self) -> asyncio.Event:
        return self._listening

    def send(self, topics: set[str]) -> None:
        """Queues committed topics for the notifier; never waits."""
        if not topics:
            return
        if len(self._unsent) + len(topics) > MAX_UNSENT:
            log.warning("NOTIFY backlog full; dropping it", topics=len(self._unsent))
            self._unsent.clear()
        self._unsent.update(topics)
        self._unsent_ready.set()

    async def start(
        self, heard: Callable[[Sequence[str]], None], reconnected: Callable[[], None]
    ) -> None:
        self._heard, self._reconnected = heard, reconnected
        self._task = asyncio.create_task(self._listen_forever(), name="provisioning-listen")
        self._notifier = asyncio.create_task(self._notify_forever(), name="provisioning-notify")

    async def stop(self) -> None:
        await self._stop_notifier()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _send(self, conn: asyncpg.Connection, topics: set[str]) -> None:
        await conn.execute(_NOTIFY_SQL, CHANNEL, _payloads(sorted(topics)))

    async def _notify_forever(self) -> None:
        while True:
            # asyncpg connects through wait_for: see raise_if_cancelled.
            raise_if_cancelled()
            await self._unsent_ready.wait()
            conn = self._notify_conn
            if conn is None or conn.is_closed():
                try:
                    # Losing a NOTIFY costs only a wake-up, so its commit
                    # need not wait for the WAL flush; it is still delivered
                    # at once (visibility does not wait for the flush).
                    conn = await asyncpg.connect(
                        listener.asyncpg_dsn(self._url),
                        server_settings={"synchronous_commit": "off"},
                    )
                except (OSError, asyncpg.PostgresError) as exc:
                    log.warning("NOTIFY connection failed; retrying", error=str(exc))
                    await asyncio.sleep(1.0)
                    continue
                self._notify_conn = conn
            self._unsent_ready.clear()
            topics, self._unsent = self._unsent, set()
            try:
                await self._send(conn, topics)
            except asyncio.CancelledError:
                self._unsent |= topics
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("NOTIFY failed; reconnecting", error=str(exc))
                self.send(topics)
                self._notify_conn = None
                with contextlib.suppress(Exception):
                    await conn.close(timeout=1)
                await asyncio.sleep(1.0)

    async def _stop_notifier(self) -> None:
        """Stops the notifier after one last, bounded, send of what is left."""
        if self._notifier is not None:
            self._notifier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._notifier
            self._notifier = None
        conn, self._notify_conn = self._notify_conn, None
        if conn is None:
            return
        if self._unsent and not conn.is_closed():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._send(conn, self._unsent)
            self._unsent.clear()
        with contextlib.suppress(Exception):
            await conn.close(timeout=1)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self._heard(payload.split())

    async def _listen_forever(self) -> None:
        await listener.listen_forever(
            listener.asyncpg_dsn(self._url),
            CHANNEL,
            self._on_notify,
            connected=self._connected,
            disconnected=self._listening.clear,
            what="LISTEN",
        )

    async def _connected(self, _conn: Any, _lost: asyncio.Event) -> None:
        self._listening.set()
        # Whatever was notified while we were away is found by the waiters'
        # own reads.
        self._reconnected()


class PostgresBindingOutbox(BindingOutbox):
    """The outbox, also as CTEs of a report's one statement (a SqlBindingListener)."""

    def created_writes(self, created: CTE) -> CreatedWrites:
        """What _opened writes, as CTEs of the binding's INSERT (PostgreSQL).

        The same rows in the same order: per binding, one open instruction
        and one activating entitlement per preset service (by service id),
        and their events at the next positions of the device's feed, whose
        counter row stays locked until commit as in entitlement_feed.record.
        """
        now = bindparam("now", type_=UtcDateTime)
        services = (
            select(
                created.c.binding_id,
                created.c.partner_id,
                created.c.partner_reference,
                created.c.account_kind,
                created.c.account_digest,
                created.c.device_digest,
                PresetService.service_id,
            )
            .join(PresetService, PresetService.partner_id == created.c.partner_id)
            .cte("opened_services")
        )
        order = (services.c.partner_id, services.c.service_id)
        instructions = Instruction.__table__
        opened = (
            postgresql.insert(Instruction)
            .from_select(
                [
                    "instruction_id",
                    "partner_id",
                    "service_id",
                    "binding_id",
                    "kind",
                    "partner_reference",
                    "account_kind",
                    "account_digest",
                    "state",
                    "attempts",
                    "due_time",
                    "last_error",
                    "partner_service_reference",
                    "create_time",
                    "update_time",
                    "trace_parent",
                ],
                select(
                    func.gen_random_uuid(),
                    services.c.partner_id,
                    services.c.service_id,
                    services.c.binding_id,
                    literal(OPEN),
                    services.c.partner_reference,
                    services.c.account_kind,
                    services.c.account_digest,
                    literal(PENDING),
                    literal(0),
                    now,
                    literal(""),
                    literal(""),
                    now,
                    now,
                    # The report's own, given by the binding store with `now`.
                    bindparam("trace_parent", type_=String),
                ).order_by(*order),
            )
            .returning(instructions.c.seq)
            .cte("opened_instructions")
        )
        entitled = (
            postgresql.insert(Entitlement)
            .from_select(
                [
                    "binding_id",
                    "service_id",
                    "partner_id",
                    "account_kind",
                    "account_digest",
                    "device_digest",
                    "state",
                    "reason",
                    "update_time",
                ],
                select(
                    services.c.binding_id,
                    services.c.service_id,
                    services.c.partner_id,
                    services.c.account_kind,
                    services.c.account_digest,
                    services.c.device_digest,
                    literal(ACTIVATING),
                    literal(""),
                    now,
                ),
            )
            .returning(Entitlement.__table__.c.binding_id)
            .cte("opened_entitlements")
        )
        feeds = DeviceFeed.__table__
        reserve = postgresql.insert(DeviceFeed).from_select(
            ["device_digest", "last_position"],
            select(services.c.device_digest, func.count())
            .group_by(services.c.device_digest)
            .order_by(services.c.device_digest),
        )
        reserved = reserve.on_conflict_do_update(
            index_elements=[feeds.c.device_digest],
            set_={"last_position": feeds.c.last_position + reserve.excluded.last_position},
        ).returning(feeds.c.device_digest, feeds.c.last_position)
        reserved_cte = reserved.cte("opened_feeds")
        # Positions of one device count up to its reserved last, in service order.
        position = (
            reserved_cte.c.last_position
            - func.count().over(partition_by=services.c.device_digest)
            + func.row_number().over(partition_by=services.c.device_digest, order_by=order)
        )
        events = (
            postgresql.insert(EntitlementEvent)
            .from_select(
                [
                    "device_digest",
                    "position",
                    "binding_id",
                    "partner_id",
                    "service_id",
                    "account_kind",
                    "account_digest",
                    "state",
                    "reason",
                    "event_time",
                ],
                select(
                    services.c.device_digest,
                    cast(position, postgresql.BIGINT),
                    services.c.binding_id,
                    services.c.partner_id,
                    services.c.service_id,
                    services.c.account_kind,
                    services.c.account_digest,
                    literal(ACTIVATING),
                    literal(""),
                    now,
                ).join(reserved_cte, reserved_cte.c.device_digest == services.c.device_digest),
            )
            .returning(EntitlementEvent.__table__.c.position)
            .cte("opened_events")
        )
        written = (
            select(cast(func.count(), Integer))
            .where(services.c.binding_id == created.c.binding_id)
            .scalar_subquery()
        )
        return CreatedWrites([opened, entitled, reserved_cte, events], written)

    async def created_done(self, session: AsyncSession, binding: BindingFacts, marker: Any) -> None:
        """Wakes, on commit, whoever waits for what created_writes wrote."""
        topics = self._created_topics(binding, marker)
        if topics:
            await self._notify.publish(session, *topics)

    def created_committed(self, binding: BindingFacts, marker: Any) -> None:
        """Wakes at once whoever waits for what created_writes wrote and
        what has just committed outside a session."""
        topics = self._created_topics(binding, marker)
        if topics:
            self._notify.committed(*topics)

    @staticmethod
    def _created_topics(binding: BindingFacts, marker: Any) -> tuple[str, ...]:
        if not marker:
            return ()
        return (
            feed_topic(binding.device_digest),
            instructions_topic(binding.partner_id),
        )


def _payloads(topics: list[str]) -> list[str]:
    """Space-separated topics, cut below PostgreSQL's 8000-byte NOTIFY limit."""
    payloads: list[str] = []
    current = ""
    for topic in topics:
        if current and len(current) + 1 + len(topic) > MAX_PAYLOAD:
            payloads.append(current)
            current = ""
        current = f"{current} {topic}" if current else topic
    if current:
        payloads.append(current)
    return payloads

"""The partner streams connected to this process, and what flows on them.

Free of gRPC: a stream is an outgoing queue plus the set of instructions it
holds unconfirmed. The servicer moves queue items to the wire and hands
what the partner sends to `confirm` and `answer_usage`.

Back-pressure: a stream is given at most max_in_flight unconfirmed
instructions, and its outgoing queue is bounded, so a slow partner holds a
bounded amount of the server's memory; everything else waits in the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select

from tether.server import errors, logs
from tether.server.provisioning import confirmations, leasing, postgres, wakeup
from tether.server.provisioning.tables import LEASED, PENDING, Instruction
from tether.server.storage.base import utcnow
from tether.server.storage.database import Database

log = logs.get(__name__)

# Most confirmations of one stream applied in one transaction.
CONFIRM_BATCH = 200


@dataclass(frozen=True)
class ConfirmationReply:
    instruction_id: str
    outcome: confirmations.Outcome | None = None
    error: errors.TetherError | None = None


@dataclass(frozen=True)
class UsageQueryOut:
    query_id: str
    binding_id: uuid.UUID
    service_id: str
    partner_reference: str
    deadline: datetime


@dataclass(frozen=True)
class UsageReply:
    figures: list[tuple[str, int]]
    period: str = ""
    error: str = ""


class StreamClosed(Exception):
    """Put on a stream's queue to end it."""


Outgoing = leasing.Delivery | ConfirmationReply | UsageQueryOut | StreamClosed
# A confirmation as it came off the wire: the raw instruction id and the result.
Incoming = tuple[str, confirmations.Result]


@dataclass(eq=False)
class PartnerStream:
    stream_id: str
    partner_id: str
    max_in_flight: int
    label: str
    outgoing: asyncio.Queue[Outgoing]
    # instruction_id -> end of its lease: what this stream holds unconfirmed.
    in_flight: dict[uuid.UUID, datetime] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Set when the stream ends; its dispatcher stops after its current step.
    closed: bool = False
    dispatcher: asyncio.Task[None] | None = None

    @property
    def owner(self) -> str:
        return f"stream:{self.stream_id}"

    def credit(self, now: datetime) -> int:
        # A lease that ran out is no longer ours to count: it may be on
        # another stream already.
        for instruction_id, until in list(self.in_flight.items()):
            if until <= now:
                del self.in_flight[instruction_id]
        return self.max_in_flight - len(self.in_flight)


class Hub:
    def __init__(
        self, db: Database, notify: wakeup.Wakeup, timing: leasing.Timing, poll_seconds: float
    ) -> None:
        self._db = db
        self._notify = notify
        self._timing = timing
        self._poll = poll_seconds
        self._streams: dict[str, list[PartnerStream]] = {}
        self._holder: dict[uuid.UUID, PartnerStream] = {}
        self._queries: dict[str, tuple[str, asyncio.Future[UsageReply]]] = {}
        self._round_robin = itertools.count()
        self._closing: set[asyncio.Task[None]] = set()
        self._no_streams = asyncio.Event()
        self._no_streams.set()
        # PostgreSQL: the streams' leases and confirmations on kept connections.
        self._postgres = None if db.is_sqlite else postgres.PostgresDelivery(db, notify, timing)

    # --- streams -------------------------------------------------------

    def open(self, partner_id: str, max_in_flight: int, label: str) -> PartnerStream:
        stream = PartnerStream(
            stream_id=secrets.token_hex(8),
            partner_id=partner_id,
            max_in_flight=max_in_flight,
            label=label,
            # Instructions are bounded by credit; the rest (replies, usage
            # queries) by how fast the partner reads them.
            outgoing=asyncio.Queue(maxsize=2 * max_in_flight + 16),
        )
        self._streams.setdefault(partner_id, []).append(stream)
        self._no_streams.clear()
        log.info("partner stream opened", partner_id=partner_id, stream_id=stream.stream_id)
        return stream

    def close(self, stream: PartnerStream) -> None:
        """Forgets the stream and returns its leases to the pool at once.

        The dispatcher is not cancelled (a cancelled lease statement may still
        commit, leaving rows leased to nobody): it is told to stop, and the
        release runs once it has, in its own task, since the stream's handler
        is usually being cancelled when this is called.
        """
        stream.closed = True
        stream.wake.set()
        streams = self._streams.get(stream.partner_id, [])
        if stream in streams:
            streams.remove(stream)
        if not streams:
            self._streams.pop(stream.partner_id, None)
        if not self._streams:
            self._no_streams.set()
        for instruction_id in stream.in_flight:
            if self._holder.get(instruction_id) is stream:
                del self._holder[instruction_id]
        task = asyncio.create_task(self._release(stream))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _release(self, stream: PartnerStream) -> None:
        dispatcher = stream.dispatcher
        while dispatcher is not None and not dispatcher.done():
            # Nobody reads the queue any more: make room for a pending put.
            while not stream.outgoing.empty():
                stream.outgoing.get_nowait()
            await asyncio.wait({dispatcher}, timeout=0.05)
        async with self._db.transaction() as session:
            partners = await leasing.release(session, stream.owner)
            await self._notify.publish(session, *map(wakeup.instructions_topic, partners))
        log.info("partner stream closed", partner_id=stream.partner_id, stream_id=stream.stream_id)

    async def shutdown(self, grace: float = 2.0) -> None:
        """Ends every stream and waits (up to `grace`) for their leases to go
        back to the pool, so another replica delivers them at once."""
        for streams in list(self._streams.values()):
            for stream in streams:
                # Whatever is queued is leased to this stream: released on close.
                while stream.outgoing.full():
                    stream.outgoing.get_nowait()
                stream.outgoing.put_nowait(StreamClosed())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._no_streams.wait()
        if self._closing:
            await asyncio.wait(self._closing, timeout=max(grace, 0.1))
        if self._postgres is not None:
            await self._postgres.close()

    def connected(self) -> dict[str, int]:
        return {partner: len(streams) for partner, streams in self._streams.items()}

    # --- delivery ------------------------------------------------------

    def start_dispatch(self, stream: PartnerStream) -> asyncio.Task[None]:
        stream.dispatcher = asyncio.create_task(self._dispatch(stream))
        return stream.dispatcher

    async def _dispatch(self, stream: PartnerStream) -> None:
        """Leases instructions to the stream while it has credit, until it closes."""
        with self._notify.subscribe(wakeup.instructions_topic(stream.partner_id)) as woken:
            stream.wake = woken
            if stream.closed:
                return
            while not stream.closed:
                woken.clear()
                now = utcnow()
                credit = stream.credit(now)
                wait = self._poll
                if credit > 0:
                    rows = await self._lease(stream, credit, now)
                    for row in rows:
                        stream.in_flight[row.instruction_id] = row.due_time
                        self._holder[row.instruction_id] = stream
                        await stream.outgoing.put(row)
                    if not rows:
                        wait = await self._until_next_due(stream.partner_id, now)
                # close() sets the event: the loop then ends at once.
                # asyncio.timeout, not wait_for: in Python 3.11 wait_for can
                # swallow a cancellation that races with the event.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await woken.wait()

    async def _lease(
        self, stream: PartnerStream, credit: int, now: datetime
    ) -> list[leasing.Delivery]:
        if self._postgres is not None:
            return await self._postgres.lease(
                stream.partner_id, owner=stream.owner, limit=credit, now=now
            )
        async with self._db.transaction() as session:
            return await leasing.lease(
                session,
                stream.partner_id,
                owner=stream.owner,
                limit=credit,
                timing=self._timing,
                now=now,
            )

    async def _until_next_due(self, partner_id: str, now: datetime) -> float:
        """Seconds until the partner's next retry or lease expiry, capped by the poll."""
        if self._postgres is not None:
            due = await self._postgres.next_due(partner_id)
        else:
            async with self._db.sessions() as session:
                due = await session.scalar(
                    select(func.min(Instruction.due_time)).where(
                        Instruction.partner_id == partner_id,
                        Instruction.state.in_((PENDING, LEASED)),
                    )
                )
        if due is None:
            return self._poll
        if due.tzinfo is None:  # SQLite aggregates come back naive
            due = due.replace(tzinfo=now.tzinfo)
        return min(self._poll, max((due - now).total_seconds(), 0.0) + 0.01)

    async def confirm(
        self, partner_id: str, instruction_id: uuid.UUID, result: confirmations.Result
    ) -> tuple[confirmations.Outcome, str]:
        """Applies one confirmation (the unary path); returns the outcome and
        the instruction's new state, or raises what refuses it."""
        (applied,) = await self.confirm_batch(partner_id, [(instruction_id, result)])
        if applied.error is not None:
            raise applied.error
        assert applied.outcome is not None
        return applied.outcome, applied.state

    async def confirm_batch(
        self, partner_id: str, items: list[tuple[uuid.UUID, confirmations.Result]]
    ) -> list[confirmations.Applied]:
        """Applies confirmations in one transaction and frees the streams' credit."""
        if self._postgres is not None:
            applied = await self._postgres.confirm(partner_id, items)
        else:
            async with self._db.transaction() as session:
                applied = await confirmations.confirm_many(
                    session, self._notify, partner_id=partner_id, items=items, timing=self._timing
                )
                if any(a.outcome is confirmations.Outcome.RETRY_SCHEDULED for a in applied):
                    await self._notify.publish(session, wakeup.instructions_topic(partner_id))
        for a in applied:
            holder = self._holder.pop(a.instruction_id, None)
            if holder is not None:
                holder.in_flight.pop(a.instruction_id, None)
                holder.wake.set()
        return applied

    async def run_confirmations(
        self, stream: PartnerStream, incoming: asyncio.Queue[Incoming | None]
    ) -> None:
        """Applies a stream's confirmations in batches of what has arrived
        meanwhile, answering each on the stream; returns at the None marker."""
        ending = False
        while not ending:
            batch = [await incoming.get()]
            while len(batch) < CONFIRM_BATCH and not incoming.empty():
                batch.append(incoming.get_nowait())
            if batch[-1] is None:
                ending = True
            replies: list[ConfirmationReply] = []
            items: list[tuple[uuid.UUID, confirmations.Result]] = []
            raws: list[str] = []
            for entry in batch:
                if entry is None:
                    continue
                raw, result = entry
                violations = errors.Violations()
                instruction_id = confirmations.instruction_id_of(
                    raw, "confirmation.instruction_id", violations
                )
                try:
                    violations.raise_if_any()
                    confirmations.check_result(result, "confirmation")
                except errors.TetherError as exc:
                    replies.append(ConfirmationReply(raw, error=exc))
                    continue
                assert instruction_id is not None
                items.append((instruction_id, result))
                raws.append(raw)
            if items:
                applied = await self.confirm_batch(stream.partner_id, items)
                replies.extend(
                    ConfirmationReply(raw, outcome=a.outcome, error=a.error)
                    for raw, a in zip(raws, applied, strict=True)
                )
            for reply in replies:
                await stream.outgoing.put(reply)

    # --- live usage queries --------------------------------------------

    async def ask_usage(
        self, partner_id: str, query: UsageQueryOut, wait_seconds: float
    ) -> UsageReply:
        """The partner's live answer. Raises LookupError when no stream of the
        partner is connected here, TimeoutError when it does not answer in time."""
        streams = self._streams.get(partner_id)
        if not streams:
            raise LookupError(partner_id)
        stream = streams[next(self._round_robin) % len(streams)]
        answer: asyncio.Future[UsageReply] = asyncio.get_running_loop().create_future()
        self._queries[query.query_id] = (partner_id, answer)
        try:
            async with asyncio.timeout(wait_seconds):
                await stream.outgoing.put(query)
                return await answer
        finally:
            self._queries.pop(query.query_id, None)

    def answer_usage(self, partner_id: str, query_id: str, reply: UsageReply) -> bool:
        """Hands a partner's answer to the waiting query; False if none waits."""
        waiting = self._queries.get(query_id)
        if waiting is None or waiting[0] != partner_id or waiting[1].done():
            return False
        waiting[1].set_result(reply)
        return True

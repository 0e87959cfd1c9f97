"""The partner streams connected to this process, and what flows on them.

Free of gRPC: a stream is an outgoing queue plus the set of instructions it
holds unconfirmed. stream_protocol.py moves queue items to the wire and
hands what the partner sends to `run_confirmations` and `answer_usage`.
Leases and confirmations go through the store's DeliveryStore.

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

from tether.server import errors, logs
from tether.server.observability import metrics, propagation
from tether.server.provisioning import confirmations, leasing
from tether.server.provisioning.store import DeliveryStore
from tether.server.provisioning.usage_queries import UsageQueryOut, UsageReply
from tether.server.provisioning.wakeup import Wakeup, instructions_topic
from tether.server.storage.base import utcnow
from tether.server.storage.database import Database

log = logs.get(__name__)

# Most confirmations of one stream applied in one transaction.
CONFIRM_BATCH = 200
# Most instructions one lease statement claims (the rest wait for the next).
MAX_LEASE = 1000


@dataclass(frozen=True)
class ConfirmationReply:
    instruction_id: str
    outcome: confirmations.Outcome | None = None
    error: errors.TetherError | None = None


@dataclass(frozen=True)
class UsageReportRefused:
    """A usage report sent on the stream that recorded nothing, and why."""

    binding_id: str
    service_id: str
    error: errors.TetherError


class StreamClosed(Exception):
    """Put on a stream's queue to end it."""


# What the partner gets; StreamClosed ends the stream instead.
ToPartner = leasing.Delivery | ConfirmationReply | UsageQueryOut | UsageReportRefused
Outgoing = ToPartner | StreamClosed
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
    # instruction_id -> the traceparent its writer left, for those in
    # flight that have one (tracing on): the confirmation's span links to it.
    traced: dict[uuid.UUID, str] = field(default_factory=dict)
    # Set when the stream ends; no lease names it any more.
    closed: bool = False

    @property
    def owner(self) -> str:
        return f"stream:{self.stream_id}"

    def credit(self, now: datetime) -> int:
        # A lease that ran out is no longer ours to count: it may be on
        # another stream already.
        for instruction_id, until in list(self.in_flight.items()):
            if until <= now:
                del self.in_flight[instruction_id]
                self.traced.pop(instruction_id, None)
        return self.max_in_flight - len(self.in_flight)


@dataclass(eq=False)
class PartnerDispatch:
    """The one task that leases a partner's instructions to all of its
    streams in this process: one lease statement per wake-up, however many
    streams, instead of one per stream (most of which found nothing)."""

    partner_id: str
    woken: asyncio.Event = field(default_factory=asyncio.Event)
    # Held while a lease's rows are being handed to the streams; a closing
    # stream's release waits for it, so no row leased to it is left behind.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # The last lease used all the credit: a confirmation freeing credit is
    # worth a new lease. Otherwise new work comes with its own wake-up.
    starved: bool = False
    task: asyncio.Task[None] | None = None
    # Rotates which stream gets the first of the next lease's rows.
    turn: int = 0


class PartnerStreams:
    def __init__(
        self, db: Database, notify: Wakeup, delivery: DeliveryStore, poll_seconds: float
    ) -> None:
        self._db = db
        self._notify = notify
        self._delivery = delivery
        self._poll = poll_seconds
        self._streams: dict[str, list[PartnerStream]] = {}
        self._holder: dict[uuid.UUID, PartnerStream] = {}
        self._queries: dict[str, tuple[str, asyncio.Future[UsageReply]]] = {}
        self._round_robin = itertools.count()
        self._dispatch: dict[str, PartnerDispatch] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._no_streams = asyncio.Event()
        self._no_streams.set()
        # None unless tracing is on.
        self._confirm_spans = propagation.linked_spans("provisioning.confirm")

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
        metrics.PARTNER_STREAMS.labels(partner_id).inc()
        self._no_streams.clear()
        log.info("partner stream opened", partner_id=partner_id, stream_id=stream.stream_id)
        return stream

    def close(self, stream: PartnerStream) -> None:
        """Forgets the stream and returns its leases to the pool at once.

        The partner's dispatcher is not cancelled (a cancelled lease statement
        may still commit, leaving rows leased to nobody): no later lease names
        the stream, and the release runs once a lease under way has handed
        out its rows, in its own task, since the stream's handler is usually
        being cancelled when this is called.
        """
        stream.closed = True
        self._wake(stream.partner_id)
        streams = self._streams.get(stream.partner_id, [])
        if stream in streams:
            streams.remove(stream)
            metrics.PARTNER_STREAMS.labels(stream.partner_id).dec()
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
        dispatch = self._dispatch.get(stream.partner_id)
        if dispatch is not None:
            # A lease under way may still name this stream: wait for its
            # rows to be handed out (the next one will not name it).
            acquiring = asyncio.ensure_future(dispatch.lock.acquire())
            while not acquiring.done():
                # Nobody reads the queue any more: make room for a pending put.
                while not stream.outgoing.empty():
                    stream.outgoing.get_nowait()
                await asyncio.wait({acquiring}, timeout=0.05)
            dispatch.lock.release()
        async with self._db.transaction() as session:
            partners = await leasing.release(session, stream.owner)
            await self._notify.publish(session, *map(instructions_topic, partners))
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
        await self._delivery.close()

    def connected(self) -> dict[str, int]:
        return {partner: len(streams) for partner, streams in self._streams.items()}

    # --- delivery ------------------------------------------------------

    def start_dispatch(self, stream: PartnerStream) -> asyncio.Task[None]:
        """The task leasing to the stream's partner (shared by its streams
        here); it ends when the partner's last stream has."""
        dispatch = self._dispatch.get(stream.partner_id)
        if dispatch is None or dispatch.task is None or dispatch.task.done():
            dispatch = PartnerDispatch(stream.partner_id)
            self._dispatch[stream.partner_id] = dispatch
            dispatch.task = asyncio.create_task(self._dispatch_forever(dispatch))
        dispatch.woken.set()
        return dispatch.task

    def _wake(self, partner_id: str) -> None:
        dispatch = self._dispatch.get(partner_id)
        if dispatch is not None:
            dispatch.woken.set()

    async def _dispatch_forever(self, dispatch: PartnerDispatch) -> None:
        """Leases instructions to the partner's streams while they have
        credit, until the partner has no stream here."""
        topic = instructions_topic(dispatch.partner_id)
        try:
            with self._notify.subscribe(topic) as woken:
                # From here on, commits and confirmations set this event;
                # the loop's first lease covers anything set before.
                dispatch.woken = woken
                await self._dispatch_loop(dispatch)
        finally:
            if self._dispatch.get(dispatch.partner_id) is dispatch:
                del self._dispatch[dispatch.partner_id]

    async def _dispatch_loop(self, dispatch: PartnerDispatch) -> None:
        woken = dispatch.woken
        while True:
            woken.clear()
            streams = [s for s in self._streams.get(dispatch.partner_id, []) if not s.closed]
            if not streams:
                return
            now = utcnow()
            owners = self._owners(dispatch, streams, now)
            wait = self._poll
            dispatch.starved = not owners
            if owners:
                async with dispatch.lock:
                    rows = await self._delivery.lease(dispatch.partner_id, owners=owners, now=now)
                    await self._hand_out(streams, rows)
                if len(rows) >= len(owners):
                    # All the credit used: there may be more right away.
                    dispatch.starved = True
                    continue
                if not rows:
                    wait = await self._until_next_due(dispatch.partner_id, now)
            # asyncio.timeout, not wait_for: in Python 3.11 wait_for can
            # swallow a cancellation that races with the event.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await woken.wait()

    @staticmethod
    def _owners(
        dispatch: PartnerDispatch, streams: list[PartnerStream], now: datetime
    ) -> list[str]:
        """One lease slot per unit of credit, the streams taking turns, so
        a lease of a few rows spreads them over the streams."""
        credits = {s.owner: s.credit(now) for s in streams}
        order = [s.owner for s in streams]
        dispatch.turn = (dispatch.turn + 1) % len(order)
        order = order[dispatch.turn :] + order[: dispatch.turn]
        owners: list[str] = []
        while len(owners) < MAX_LEASE:
            round_ = [o for o in order if credits[o] > 0]
            if not round_:
                break
            for owner in round_:
                credits[owner] -= 1
            owners.extend(round_)
        return owners[:MAX_LEASE]

    async def _hand_out(self, streams: list[PartnerStream], rows: list[leasing.Delivery]) -> None:
        by_owner = {s.owner: s for s in streams}
        for row in rows:
            stream = by_owner.get(row.lease_owner or "")
            if stream is None or stream.closed:
                # Its stream ended during the lease: its release returns it.
                continue
            stream.in_flight[row.instruction_id] = row.due_time
            if row.trace_parent:
                stream.traced[row.instruction_id] = row.trace_parent
            self._holder[row.instruction_id] = stream
            await stream.outgoing.put(row)

    async def _until_next_due(self, partner_id: str, now: datetime) -> float:
        """Seconds until the partner's next retry or lease expiry, capped by the poll."""
        due = await self._delivery.next_due(partner_id)
        if due is None:
            return self._poll
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
        applied = await self._delivery.confirm(partner_id, items)
        freed: set[str] = set()
        for a in applied:
            holder = self._holder.pop(a.instruction_id, None)
            if holder is not None:
                holder.in_flight.pop(a.instruction_id, None)
                freed.add(holder.partner_id)
        for partner in freed:
            dispatch = self._dispatch.get(partner)
            if dispatch is not None and dispatch.starved:
                dispatch.woken.set()
        return applied

    async def _confirm_traced(
        self, stream: PartnerStream, items: list[tuple[uuid.UUID, confirmations.Result]]
    ) -> list[confirmations.Applied]:
        """confirm_batch, in a span linked to the calls that wrote the
        instructions when tracing is on."""
        spans = self._confirm_spans
        if spans is None:
            return await self.confirm_batch(stream.partner_id, items)
        parents = [stream.traced.pop(instruction_id, "") for instruction_id, _ in items]
        attributes = {
            "tether.partner_id": stream.partner_id,
            "tether.instruction_ids": [str(instruction_id) for instruction_id, _ in items],
        }
        with spans.current(parents, attributes):
            return await self.confirm_batch(stream.partner_id, items)

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
                applied = await self._confirm_traced(stream, items)
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

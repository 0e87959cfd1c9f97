"""The partner stream (Connect): its protocol, free of gRPC.

The partner says hello; the stream is opened, registered with the usage
relay (so other processes can reach it) and answered with Ready. Then
instructions, confirmation results and usage queries go out in batches of
whatever is ready, while confirmations, usage answers and usage reports
come in. The servicer translates both directions (convert.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

from tether.common.v1.errors_pb2 import ErrorReason
from tether.server import errors
from tether.server.observability import propagation
from tether.server.provisioning import confirmations, usage
from tether.server.provisioning.leasing import Delivery
from tether.server.provisioning.store import UsageRelay
from tether.server.provisioning.streams import (
    CONFIRM_BATCH,
    ConfirmationReply,
    Incoming,
    PartnerStream,
    PartnerStreams,
    StreamClosed,
    ToPartner,
    UsageReportRefused,
)
from tether.server.provisioning.usage_queries import UsageReply
from tether.server.shared.bindings import BindingReader
from tether.server.storage.database import Database
from tether.server.transport.principal import Principal

MAX_LABEL = 100
MAX_IN_FLIGHT = 1000
# Most items put into one stream message.
MAX_BATCH = 500


@dataclass(frozen=True)
class Hello:
    # The partner the stream is for ("": the caller's own).
    partner_id: str
    # Unconfirmed instructions the partner takes at once (0: the server's cap).
    max_in_flight: int
    label: str


@dataclass(frozen=True)
class Ready:
    stream_id: str
    max_in_flight: int
    ack_deadline: timedelta


@dataclass(frozen=True)
class ConfirmationIn:
    instruction_id: str
    # None: the message carried neither done nor failed.
    result: confirmations.Result | None


@dataclass(frozen=True)
class UsageAnswerIn:
    query_id: str
    reply: UsageReply


@dataclass(frozen=True)
class UsageReportIn:
    report: usage.Report


@dataclass(frozen=True)
class Refused:
    """A message refused as it came in: the answer goes straight back."""

    answer: ConfirmationReply | UsageReportRefused


class HelloAgain:
    """A second StreamHello: refused, it ends the stream."""


FromPartner = ConfirmationIn | UsageAnswerIn | UsageReportIn | Refused | HelloAgain


def hello_missing() -> errors.TetherError:
    return errors.FailedPrecondition(
        ErrorReason.ERROR_REASON_STREAM_HELLO_MISSING,
        "the first message of a Connect stream must be a StreamHello",
    )


def _hello_again() -> errors.TetherError:
    return errors.FailedPrecondition(
        ErrorReason.ERROR_REASON_STREAM_HELLO_MISSING, "StreamHello may only be the first message"
    )


def _end_on_failure(stream: PartnerStream, task: asyncio.Task[None]) -> None:
    """A dispatcher that failed (say, the database went away) ends its stream
    with the error; the partner reconnects."""
    if task.cancelled() or task.exception() is None or stream.closed:
        return
    while stream.outgoing.full():
        stream.outgoing.get_nowait()
    stream.outgoing.put_nowait(StreamClosed(task.exception()))


class StreamProtocol:
    def __init__(
        self,
        db: Database,
        streams: PartnerStreams,
        relay: UsageRelay,
        bindings: BindingReader,
        *,
        max_in_flight: int,
        ack_deadline: timedelta,
    ) -> None:
        self._db = db
        self._streams = streams
        self._relay = relay
        self._bindings = bindings
        self._cap = max_in_flight
        self._ack_deadline = ack_deadline
        # None unless tracing is on.
        self._delivery_spans = propagation.linked_spans("provisioning.deliver")

    async def run(
        self, caller: Principal, hello: Hello, incoming: AsyncIterator[FromPartner]
    ) -> AsyncIterator[Ready | list[ToPartner]]:
        """Ready, then batches of what goes out, until the stream ends (the
        partner hung up, the server stops, or an error, which is raised)."""
        partner_id = caller.partner_scope(hello.partner_id)
        if not 0 <= hello.max_in_flight <= MAX_IN_FLIGHT:
            raise errors.invalid("hello.max_in_flight", f"0-{MAX_IN_FLIGHT}")
        if len(hello.label) > MAX_LABEL:
            raise errors.invalid("hello.label", f"at most {MAX_LABEL} characters")
        in_flight = min(hello.max_in_flight or self._cap, self._cap)
        stream = self._streams.open(partner_id, in_flight, hello.label)
        tasks: list[asyncio.Task[None]] = []
        try:
            # Other processes can relay usage queries here once it returns.
            await self._relay.stream_opened(partner_id)
            yield Ready(stream.stream_id, in_flight, self._ack_deadline)
            tasks.append(asyncio.create_task(self._read(stream, incoming, caller)))
            dispatcher = self._streams.start_dispatch(stream)
            dispatcher.add_done_callback(lambda task: _end_on_failure(stream, task))
            while True:
                # Whatever is ready goes out together: each stream message
                # costs a round through gRPC's completion queue.
                items = [await stream.outgoing.get()]
                while len(items) < MAX_BATCH and not stream.outgoing.empty():
                    items.append(stream.outgoing.get_nowait())
                closed = next((i for i in items if isinstance(i, StreamClosed)), None)
                ready = [i for i in items if not isinstance(i, StreamClosed)]
                if ready and self._delivery_spans is not None:
                    delivered = [
                        self._delivery_spans.start(
                            [item.trace_parent],
                            {
                                "tether.instruction_id": str(item.instruction_id),
                                "tether.partner_id": partner_id,
                                "tether.service_id": item.service_id,
                                "tether.instruction_kind": item.kind,
                                "tether.attempt": item.attempts,
                            },
                        )
                        for item in ready
                        if isinstance(item, Delivery)
                    ]
                    try:
                        yield ready
                    finally:
                        for span in delivered:
                            span.end()
                elif ready:
                    yield ready
                if closed is not None:
                    if closed.args and isinstance(closed.args[0], BaseException):
                        raise closed.args[0]
                    return
        finally:
            for task in tasks:
                task.cancel()
            self._streams.close(stream)
            self._relay.stream_closed(partner_id)

    async def _record(self, stream: PartnerStream, report: usage.Report, caller: Principal) -> None:
        """Records a usage report; a refused one is answered, and the stream goes on."""
        try:
            async with self._db.transaction() as session:
                await usage.record_report(session, self._bindings, report, caller, [])
        except errors.TetherError as exc:
            binding_id = str(report.binding_id) if report.binding_id else ""
            await stream.outgoing.put(UsageReportRefused(binding_id, report.service_id, exc))

    async def _read(
        self, stream: PartnerStream, incoming: AsyncIterator[FromPartner], caller: Principal
    ) -> None:
        """Takes what the partner sends. Confirmations go to a batching task
        through a bounded queue: a partner confirming faster than they can be
        applied is slowed down by gRPC flow control, not buffered here."""
        confirming_queue: asyncio.Queue[Incoming | None] = asyncio.Queue(maxsize=2 * CONFIRM_BATCH)
        confirming = asyncio.create_task(self._streams.run_confirmations(stream, confirming_queue))
        ending: BaseException | None = None
        try:
            async for item in incoming:
                if isinstance(item, ConfirmationIn):
                    if item.result is None:
                        await stream.outgoing.put(
                            ConfirmationReply(
                                item.instruction_id,
                                error=errors.invalid("confirmation.result", "done or failed"),
                            )
                        )
                    else:
                        await confirming_queue.put((item.instruction_id, item.result))
                elif isinstance(item, UsageAnswerIn):
                    self._streams.answer_usage(stream.partner_id, item.query_id, item.reply)
                elif isinstance(item, UsageReportIn):
                    await self._record(stream, item.report, caller)
                elif isinstance(item, Refused):
                    await stream.outgoing.put(item.answer)
                else:
                    ending = _hello_again()
                    break
        except errors.TetherError as exc:
            ending = exc
        except asyncio.CancelledError:
            confirming.cancel()
            raise
        except Exception as exc:
            ending = exc
        await confirming_queue.put(None)
        try:
            await confirming
        except Exception as exc:
            ending = ending or exc
        await stream.outgoing.put(StreamClosed(ending) if ending else StreamClosed())

"""The partner's side of provisioning: a worker that holds the stream.

Write one async function per instruction kind and hand them to a
PartnerWorker::

    async def open_service(instruction: Instruction) -> Result:
        subscription = await my_backend.open(instruction.partner_reference,
                                             instruction.service_id)
        return Done(subscription.id)

    worker = PartnerWorker(channel, on_open=open_service, on_close=close_service)
    await worker.run()

The worker keeps a stream up (reconnecting with back-off), runs the handler
once per instruction id even when Tether delivers it again, and confirms
what the handler returned. A confirmation is kept until Tether acknowledged
it and is sent again on the next stream if the current one drops, so an
instruction is never dropped on the floor. A handler that raises is
confirmed as a retryable failure: Tether delivers the instruction again
later.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from tether.clients.errors import tls_refused
from tether.provisioning.v1 import messages_pb2 as pb
from tether.provisioning.v1.service_pb2_grpc import ProvisioningStub

log = logging.getLogger(__name__)

Instruction = pb.Instruction
UsageQuery = pb.UsageQuery

# A caller's mistake does not heal by reconnecting.
FATAL = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
}
# Results remembered per instruction id, to answer redeliveries without
# running the handler again.
REMEMBERED = 100_000
# Most confirmations sent in one stream message.
BATCH = 500


@dataclass(frozen=True)
class Done:
    """The service was opened (or closed). The reference is the partner's own."""

    partner_service_reference: str = ""


@dataclass(frozen=True)
class Failed:
    """Not done. retryable=True: Tether delivers it again later."""

    reason: str
    retryable: bool = True


Result = Done | Failed
Handler = Callable[[Instruction], Awaitable[Result]]


@dataclass(frozen=True)
class Usage:
    """The answer to a live usage query: metric -> quantity."""

    figures: dict[str, int]
    period: str = ""
    error: str = ""


UsageHandler = Callable[[UsageQuery], Awaitable[Usage]]


def confirmation_of(instruction_id: str, result: Result) -> pb.Confirmation:
    if isinstance(result, Done):
        return pb.Confirmation(
            instruction_id=instruction_id,
            done=pb.Done(partner_service_reference=result.partner_service_reference),
        )
    return pb.Confirmation(
        instruction_id=instruction_id,
        failed=pb.Failed(retryable=result.retryable, reason=result.reason),
    )


@dataclass
class WorkerStats:
    streams_opened: int = 0
    instructions_received: int = 0
    handled: int = 0
    redeliveries_answered: int = 0
    confirmations_acknowledged: int = 0
    confirmations_refused: int = 0
    refused: list[pb.ConfirmationResult] = field(default_factory=list)


class PartnerWorker:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        on_open: Handler,
        on_close: Handler,
        on_usage_query: UsageHandler | None = None,
        partner_id: str = "",
        max_in_flight: int = 0,
        label: str = "",
        backoff_initial: float = 0.2,
        backoff_max: float = 15.0,
    ) -> None:
        self._stub = ProvisioningStub(channel)
        self._handlers = {pb.INSTRUCTION_KIND_OPEN: on_open, pb.INSTRUCTION_KIND_CLOSE: on_close}
        self._on_usage = on_usage_query
        self._hello = pb.StreamHello(
            partner_id=partner_id, max_in_flight=max_in_flight, label=label
        )
        self._backoff = (backoff_initial, backoff_max)
        # instruction_id -> confirmation not yet acknowledged by Tether.
        self._unacknowledged: dict[str, pb.Confirmation] = {}
        self._results: OrderedDict[str, pb.Confirmation] = OrderedDict()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._outgoing: asyncio.Queue[pb.ConnectRequest | None] | None = None
        self._call: grpc.aio.StreamStreamCall[pb.ConnectRequest, pb.ConnectResponse] | None = None
        self._stopping = False
        self._dropping = False
        self.connected = asyncio.Event()
        self.ready: pb.StreamReady | None = None
        self.stats = WorkerStats()

    # --- life ------------------------------------------------------------

    async def run(self) -> None:
        """Holds a stream until stop(); reconnects with growing back-off."""
        delay = self._backoff[0]
        while not self.stopping():
            try:
                await self._one_stream()
                delay = self._backoff[0]
            except grpc.aio.AioRpcError as error:
                if error.code() in FATAL or tls_refused(error):
                    raise
                if not self.stopping():
                    log.warning("stream lost (%s); reconnecting in %.1fs", error.code().name, delay)
            if self.stopping():
                break
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311 (jitter)
            delay = min(delay * 2, self._backoff[1])
        for task in list(self._running.values()):
            task.cancel()

    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        self._stopping = True
        self.reconnect()

    def reconnect(self) -> None:
        """Drops the current stream; run() opens a new one (its leases go back
        to Tether's pool at once and unconfirmed instructions come again)."""
        if self._call is not None:
            self._dropping = True
            self._call.cancel()

    @property
    def unacknowledged(self) -> int:
        return len(self._unacknowledged)

    # --- one stream ------------------------------------------------------

    async def _requests(
        self, queue: asyncio.Queue[pb.ConnectRequest | None]
    ) -> AsyncIterator[pb.ConnectRequest]:
        while (item := await queue.get()) is not None:
            # Confirmations waiting together go out as one message.
            pending: list[pb.ConnectRequest | None] = [item]
            while not queue.empty() and len(pending) < BATCH:
                pending.append(queue.get_nowait())
            ending = pending[-1] is None
            confirmations = [
                r.confirmation for r in pending if r is not None and r.HasField("confirmation")
            ]
            for request in pending:
                if request is not None and not request.HasField("confirmation"):
                    yield request
            if len(confirmations) == 1:
                yield pb.ConnectRequest(confirmation=confirmations[0])
            elif confirmations:
                yield pb.ConnectRequest(
                    confirmations=pb.ConfirmationBatch(confirmations=confirmations)
                )
            if ending:
                return

    async def _one_stream(self) -> None:
        queue: asyncio.Queue[pb.ConnectRequest | None] = asyncio.Queue()
        queue.put_nowait(pb.ConnectRequest(hello=self._hello))
        # Whatever the last stream could not deliver goes first on this one.
        for confirmation in list(self._unacknowledged.values()):
            queue.put_nowait(pb.ConnectRequest(confirmation=confirmation))
        self._outgoing = queue
        call = self._stub.Connect(self._requests(queue))
        self._call = call
        try:
            async for response in call:
                self._take(response)
        except asyncio.CancelledError:
            if not self._dropping:
                raise  # our task was cancelled
            if not self.stopping():
                # reconnect() cancelled the call: like a lost stream.
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.CANCELLED,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    "stream dropped by reconnect()",
                ) from None
        finally:
            self._dropping = False
            self.connected.clear()
            self._outgoing = None
            self._call = None
            queue.put_nowait(None)

    def _send(self, request: pb.ConnectRequest) -> None:
        if self._outgoing is not None:
            self._outgoing.put_nowait(request)

    def _take(self, response: pb.ConnectResponse) -> None:
        which = response.WhichOneof("message")
        if which == "ready":
            self.ready = response.ready
            self.stats.streams_opened += 1
            self.connected.set()
        elif which == "instruction":
            self._received(response.instruction)
        elif which == "instructions":
            for instruction in response.instructions.instructions:
                self._received(instruction)
        elif which == "confirmation_result":
            self._acknowledged(response.confirmation_result)
        elif which == "confirmation_results":
            for result in response.confirmation_results.results:
                self._acknowledged(result)
        elif which == "usage_query":
            self._spawn(f"usage:{response.usage_query.query_id}", self._usage(response.usage_query))
        elif which == "usage_report_refused":
            refused = response.usage_report_refused
            log.warning(
                "usage report for binding %s, service %s refused: %s %s",
                refused.binding_id,
                refused.service_id,
                refused.error_reason,
                refused.error_message,
            )

    def _acknowledged(self, result: pb.ConfirmationResult) -> None:
        self._unacknowledged.pop(result.instruction_id, None)
        if result.error_reason:
            self.stats.confirmations_refused += 1
            self.stats.refused.append(result)
            log.warning(
                "confirmation of %s refused: %s %s",
                result.instruction_id,
                result.error_reason,
                result.error_message,
            )
        else:
            self.stats.confirmations_acknowledged += 1

    def _received(self, instruction: Instruction) -> None:
        self.stats.instructions_received += 1
        instruction_id = instruction.instruction_id
        earlier = self._results.get(instruction_id)
        if earlier is not None and not (
            earlier.WhichOneof("result") == "failed" and earlier.failed.retryable
        ):
            # Delivered again (our confirmation was lost): answer, do not redo.
            self.stats.redeliveries_answered += 1
            self._confirm(earlier)
            return
        if instruction_id in self._running:
            return
        self._spawn(instruction_id, self._handle(instruction))

    def _spawn(self, key: str, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            finally:
                self._running.pop(key, None)

        self._running[key] = asyncio.create_task(run())

    async def _handle(self, instruction: Instruction) -> None:
        handler = self._handlers.get(instruction.kind)
        result: Result
        if handler is None:
            result = Failed(f"no handler for instruction kind {instruction.kind}", retryable=True)
        else:
            try:
                result = await handler(instruction)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("handler failed for %s", instruction.instruction_id)
                result = Failed(f"handler raised {type(exc).__name__}: {exc}"[:500])
        self.stats.handled += 1
        confirmation = confirmation_of(instruction.instruction_id, result)
        self._results[instruction.instruction_id] = confirmation
        while len(self._results) > REMEMBERED:
            self._results.popitem(last=False)
        self._confirm(confirmation)

    def _confirm(self, confirmation: pb.Confirmation) -> None:
        self._unacknowledged[confirmation.instruction_id] = confirmation
        self._send(pb.ConnectRequest(confirmation=confirmation))

    async def _usage(self, query: UsageQuery) -> None:
        if self._on_usage is None:
            answer = Usage({}, error="this partner does not answer usage queries")
        else:
            try:
                answer = await self._on_usage(query)
            except Exception as exc:
                answer = Usage({}, error=f"{type(exc).__name__}: {exc}"[:500])
        self._send(
            pb.ConnectRequest(
                usage_answer=pb.UsageAnswer(
                    query_id=query.query_id,
                    figures=[
                        pb.UsageFigure(metric=k, quantity=v) for k, v in answer.figures.items()
                    ],
                    period=answer.period,
                    error=answer.error,
                )
            )
        )


class PartnerProvisioning:
    """The unary calls of a partner: pipeline view, fetch and confirm."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = ProvisioningStub(channel)

    async def fetch(self, max_count: int = 10) -> list[Instruction]:
        response = await self.stub.FetchInstructions(
            pb.FetchInstructionsRequest(request_id=secrets.token_hex(8), max_count=max_count)
        )
        return list(response.instructions)

    async def confirm(self, instruction_id: str, result: Result) -> pb.ConfirmInstructionResponse:
        return await self.stub.ConfirmInstruction(
            pb.ConfirmInstructionRequest(
                request_id=secrets.token_hex(8),
                confirmation=confirmation_of(instruction_id, result),
            )
        )

    async def pipeline(self) -> pb.GetPipelineResponse:
        return await self.stub.GetPipeline(pb.GetPipelineRequest())

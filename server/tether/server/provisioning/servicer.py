"""gRPC face of tether.provisioning.v1.Provisioning: messages in, domain
calls, messages out."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterable
from datetime import timedelta
from typing import Any

import grpc

from tether.common.v1.errors_pb2 import ErrorReason
from tether.provisioning.v1 import messages_pb2 as pb
from tether.provisioning.v1 import service_pb2_grpc
from tether.server import errors
from tether.server.binding import messages as bm
from tether.server.shared.subjects import Subject
from tether.server.binding.tables import Binding
from tether.server.components import Component
from tether.server.errors import Violations
from tether.server.provisioning import (
    confirmations,
    entitlements,
    feed,
    hub,
    leasing,
    outbox,
    pipeline,
    relay,
    usage,
    wakeup,
)
from tether.server.provisioning import messages as m
from tether.server.runtime import Runtime
from tether.server.storage.base import utcnow
from tether.server.transport import idempotency, paging
from tether.server.transport.convert import timestamp
from tether.server.transport.principal import CallerKind, Principal, require

Context = grpc.aio.ServicerContext[Any, Any]

MAX_FETCH = 100
DEFAULT_FETCH = 10
MAX_LABEL = 100
# Most items put into one stream message.
MAX_BATCH = 500


def _scoped_binding(binding: Binding, caller: Principal, device: list[bytes]) -> None:
    """A partner sees only its bindings; a device only the ones of the device it names."""
    if caller.kind is CallerKind.PARTNER and binding.partner_id != caller.partner_id:
        raise errors.NotFound(
            ErrorReason.ERROR_REASON_BINDING_NOT_FOUND, f"binding {binding.binding_id} not found"
        )
    if caller.kind is CallerKind.DEVICE and binding.device_digest not in device:
        raise errors.PermissionDenied(
            ErrorReason.ERROR_REASON_BINDING_OF_OTHER_DEVICE,
            "the binding belongs to another device than the one named in the request",
        )


def _result_pb(reply: hub.ConfirmationReply) -> pb.ConfirmationResult:
    result = pb.ConfirmationResult(instruction_id=reply.instruction_id)
    if reply.outcome is not None:
        result.outcome = m.OUTCOMES_PB[reply.outcome]
    if reply.error is not None:
        result.error_reason = ErrorReason.Name(reply.error.reason)
        result.error_message = reply.error.message
    return result


def _batched(items: Iterable[hub.Outgoing]) -> list[pb.ConnectResponse]:
    """Stream messages for what is ready: instructions and results each in
    one message (a batch when there are several), usage queries one by one."""
    instructions: list[pb.Instruction] = []
    results: list[pb.ConfirmationResult] = []
    queries: list[pb.ConnectResponse] = []
    for item in items:
        if isinstance(item, hub.ConfirmationReply):
            results.append(_result_pb(item))
        elif isinstance(item, hub.UsageQueryOut):
            queries.append(
                pb.ConnectResponse(
                    usage_query=pb.UsageQuery(
                        query_id=item.query_id,
                        binding_id=str(item.binding_id),
                        service_id=item.service_id,
                        partner_reference=item.partner_reference,
                        deadline=timestamp(item.deadline),
                    )
                )
            )
        elif not isinstance(item, hub.StreamClosed):
            instructions.append(m.instruction_pb(item))
    messages = []
    if len(instructions) == 1:
        messages.append(pb.ConnectResponse(instruction=instructions[0]))
    elif instructions:
        messages.append(
            pb.ConnectResponse(instructions=pb.InstructionBatch(instructions=instructions))
        )
    if len(results) == 1:
        messages.append(pb.ConnectResponse(confirmation_result=results[0]))
    elif results:
        messages.append(
            pb.ConnectResponse(confirmation_results=pb.ConfirmationResultBatch(results=results))
        )
    return messages + queries


def _end_on_failure(stream: hub.PartnerStream, task: asyncio.Task[None]) -> None:
    """A dispatcher that failed (say, the database went away) ends its stream
    with the error; the partner reconnects."""
    if task.cancelled() or task.exception() is None or stream.closed:
        return
    while stream.outgoing.full():
        stream.outgoing.get_nowait()
    stream.outgoing.put_nowait(hub.StreamClosed(task.exception()))


def _hello_again() -> errors.TetherError:
    return errors.FailedPrecondition(
        ErrorReason.ERROR_REASON_STREAM_HELLO_MISSING, "StreamHello may only be the first message"
    )


class ProvisioningServicer(service_pb2_grpc.ProvisioningServicer):
    def __init__(
        self, runtime: Runtime, notify: wakeup.Wakeup, hub_: hub.Hub, relay_: relay.UsageRelay
    ) -> None:
        self._rt = runtime
        self._db = runtime.db
        self._settings = runtime.settings
        self._notify = notify
        self._hub = hub_
        self._relay = relay_
        self._timing = leasing.Timing.of(runtime.settings)

    def _device(self, message: Any, path: str = "device") -> Subject:
        violations = Violations()
        subject = bm.device(message, path, violations)
        violations.raise_if_any()
        assert subject is not None
        return subject

    # --- partners: the stream ------------------------------------------

    async def Connect(
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: Context
    ) -> AsyncIterator[pb.ConnectResponse]:
        caller = require(CallerKind.PARTNER)
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("message") != "hello":
            raise errors.FailedPrecondition(
                ErrorReason.ERROR_REASON_STREAM_HELLO_MISSING,
                "the first message of a Connect stream must be a StreamHello",
            )
        hello = first.hello
        partner_id = caller.partner_scope(hello.partner_id)
        cap = self._settings.provisioning_max_in_flight
        if not 0 <= hello.max_in_flight <= 1000:
            raise errors.invalid("hello.max_in_flight", "0-1000")
        if len(hello.label) > MAX_LABEL:
            raise errors.invalid("hello.label", f"at most {MAX_LABEL} characters")
        in_flight = min(hello.max_in_flight or cap, cap)
        stream = self._hub.open(partner_id, in_flight, hello.label)
        tasks: list[asyncio.Task[None]] = []
        try:
            # Other processes can relay usage queries here once it returns.
            await self._relay.stream_opened(partner_id)
            yield pb.ConnectResponse(
                ready=pb.StreamReady(
                    stream_id=stream.stream_id,
                    max_in_flight=in_flight,
                    ack_deadline=m.duration(self._timing.lease_for(1)),
                )
            )
            tasks.append(asyncio.create_task(self._read(stream, request_iterator, caller)))
            dispatcher = self._hub.start_dispatch(stream)
            dispatcher.add_done_callback(lambda task: _end_on_failure(stream, task))
            while True:
                # Whatever is ready goes out together: each stream message
                # costs a round through gRPC's completion queue.
                items = [await stream.outgoing.get()]
                while len(items) < MAX_BATCH and not stream.outgoing.empty():
                    items.append(stream.outgoing.get_nowait())
                closed = next((i for i in items if isinstance(i, hub.StreamClosed)), None)
                for message in _batched(i for i in items if not isinstance(i, hub.StreamClosed)):
                    yield message
                if closed is not None:
                    if closed.args and isinstance(closed.args[0], BaseException):
                        raise closed.args[0]
                    return
        finally:
            for task in tasks:
                task.cancel()
            self._hub.close(stream)
            self._relay.stream_closed(partner_id)

    async def _read(
        self,
        stream: hub.PartnerStream,
        requests: AsyncIterator[pb.ConnectRequest],
        caller: Principal,
    ) -> None:
        """Takes what the partner sends. Confirmations go to a batching task
        through a bounded queue: a partner confirming faster than they can be
        applied is slowed down by gRPC flow control, not buffered here."""
        incoming: asyncio.Queue[hub.Incoming | None] = asyncio.Queue(maxsize=2 * hub.CONFIRM_BATCH)
        confirming = asyncio.create_task(self._hub.run_confirmations(stream, incoming))
        ending: BaseException | None = None
        try:
            async for request in requests:
                which = request.WhichOneof("message")
                if which in ("confirmation", "confirmations"):
                    batch = (
                        [request.confirmation]
                        if which == "confirmation"
                        else list(request.confirmations.confirmations)
                    )
                    for c in batch:
                        result = m.result_of(c, "confirmation")
                        if result is None:
                            await stream.outgoing.put(
                                hub.ConfirmationReply(
                                    c.instruction_id,
                                    error=errors.invalid("confirmation.result", "done or failed"),
                                )
                            )
                        else:
                            await incoming.put((c.instruction_id, result))
                elif which == "usage_answer":
                    a = request.usage_answer
                    self._hub.answer_usage(
                        stream.partner_id,
                        a.query_id,
                        hub.UsageReply(
                            [(f.metric, f.quantity) for f in a.figures], a.period, a.error
                        ),
                    )
                elif which == "usage_report":
                    await self._report_usage(caller, [], request.usage_report, None)
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
        await incoming.put(None)
        try:
            await confirming
        except Exception as exc:
            ending = ending or exc
        await stream.outgoing.put(hub.StreamClosed(ending) if ending else hub.StreamClosed())

    # --- partners: the unary path --------------------------------------

    async def FetchInstructions(
        self, request: pb.FetchInstructionsRequest, context: Context
    ) -> pb.FetchInstructionsResponse:
        caller = require(CallerKind.PARTNER)
        violations = Violations()
        idempotency.check_request_id(request.request_id, violations)
        if not 0 <= request.max_count <= MAX_FETCH:
            violations.add("max_count", f"0-{MAX_FETCH}")
        violations.raise_if_any()
        partner_id = caller.partner_scope(request.partner_id)

        async def work(session: Any) -> pb.FetchInstructionsResponse:
            rows = await leasing.lease(
                session,
                partner_id,
                owner=f"fetch:{caller.credential_id}",
                limit=request.max_count or DEFAULT_FETCH,
                timing=self._timing,
            )
            return pb.FetchInstructionsResponse(instructions=[m.instruction_pb(r) for r in rows])

        once = idempotency.Once(
            self._db, caller, "FetchInstructions", request, pb.FetchInstructionsResponse
        )
        return await once.run(work)

    async def ConfirmInstruction(
        self, request: pb.ConfirmInstructionRequest, context: Context
    ) -> pb.ConfirmInstructionResponse:
        caller = require(CallerKind.PARTNER)
        assert caller.partner_id is not None
        violations = Violations()
        idempotency.check_request_id(request.request_id, violations)
        instruction_id = confirmations.instruction_id_of(
            request.confirmation.instruction_id, "confirmation.instruction_id", violations
        )
        result = m.result_of(request.confirmation, "confirmation")
        if result is None:
            violations.add("confirmation.result", "required: done or failed")
        violations.raise_if_any()
        assert instruction_id is not None and result is not None
        confirmations.check_result(result, "confirmation")
        # The confirmation itself is idempotent, so a retry needs no stored
        # answer: it is answered DUPLICATE.
        outcome, state = await self._hub.confirm(caller.partner_id, instruction_id, result)
        return pb.ConfirmInstructionResponse(
            outcome=m.OUTCOMES_PB[outcome], state=m.STATES_PB[state]
        )

    # --- devices -------------------------------------------------------

    async def WatchEntitlements(
        self, request: pb.WatchEntitlementsRequest, context: Context
    ) -> AsyncIterator[pb.WatchEntitlementsResponse]:
        require(CallerKind.DEVICE)
        device = self._device(request.device)
        if request.after_position < 0:
            raise errors.invalid("after_position", "0 or more")
        async for row in feed.follow(
            self._db,
            self._notify,
            device.candidates(self._rt.digester),
            request.after_position,
            self._settings.provisioning_poll_seconds,
        ):
            yield pb.WatchEntitlementsResponse(event=m.event_pb(row))

    async def CheckEntitlement(
        self, request: pb.CheckEntitlementRequest, context: Context
    ) -> pb.CheckEntitlementResponse:
        caller = require(CallerKind.DEVICE, CallerKind.PARTNER, CallerKind.INTERNAL)
        violations = Violations()
        device = bm.device(request.device, "device", violations)
        account = bm.account(request.account, "account", violations)
        if not request.service_id:
            violations.add("service_id", "required")
        partner_id = caller.partner_scope(request.partner_id)
        if not partner_id:
            violations.add("partner_id", "required")
        violations.raise_if_any()
        assert device is not None and account is not None
        async with self._db.sessions() as session:
            found = await entitlements.find(
                session,
                partner_id,
                request.service_id,
                account.candidates(self._rt.digester),
                device.candidates(self._rt.digester),
            )
        if found is None:
            return pb.CheckEntitlementResponse(entitled=False)
        return pb.CheckEntitlementResponse(
            entitled=entitlements.is_usable(found),
            state=m.ENTITLEMENTS_PB[found.state],
            binding_id=str(found.binding_id),
        )

    async def ReportUsage(
        self, request: pb.ReportUsageRequest, context: Context
    ) -> pb.ReportUsageResponse:
        caller = require(CallerKind.DEVICE, CallerKind.PARTNER)
        violations = Violations()
        idempotency.check_request_id(request.request_id, violations)
        violations.raise_if_any()
        device = (
            self._device(request.device).candidates(self._rt.digester)
            if caller.kind is CallerKind.DEVICE
            else []
        )

        async def work(session: Any) -> pb.ReportUsageResponse:
            count = await self._report_usage(caller, device, request.report, session)
            return pb.ReportUsageResponse(recorded_count=count)

        once = idempotency.Once(self._db, caller, "ReportUsage", request, pb.ReportUsageResponse)
        return await once.run(work)

    async def _report_usage(
        self, caller: Principal, device: list[bytes], report: pb.UsageReport, session: Any
    ) -> int:
        violations = Violations()
        binding_id = bm.binding_id(report.binding_id, "report.binding_id", violations)
        if not report.service_id:
            violations.add("report.service_id", "required")
        events = [
            usage.Event(
                e.occur_time.ToDatetime(tzinfo=utcnow().tzinfo),
                e.figure.metric,
                e.figure.quantity,
            )
            for e in report.events
        ]
        usage.check_events(events, "report.events", violations)
        violations.raise_if_any()
        assert binding_id is not None
        source = "device" if caller.kind is CallerKind.DEVICE else "partner"

        async def record(into: Any) -> int:
            binding, _ = await entitlements.of_binding(into, binding_id, report.service_id)
            _scoped_binding(binding, caller, device)
            return await usage.record(into, binding, report.service_id, source, events)

        if session is None:
            async with self._db.transaction() as own:
                return await record(own)
        return await record(session)

    async def QueryDeviceUsage(
        self, request: pb.QueryDeviceUsageRequest, context: Context
    ) -> pb.QueryDeviceUsageResponse:
        caller = require(CallerKind.DEVICE, CallerKind.INTERNAL)
        violations = Violations()
        binding_id = bm.binding_id(request.binding_id, "binding_id", violations)
        if not request.service_id:
            violations.add("service_id", "required")
        violations.raise_if_any()
        assert binding_id is not None
        device = (
            self._device(request.device).candidates(self._rt.digester)
            if caller.kind is CallerKind.DEVICE
            else []
        )
        async with self._db.sessions() as session:
            binding, _ = await entitlements.of_binding(session, binding_id, request.service_id)
            _scoped_binding(binding, caller, device)
        remaining = context.time_remaining()
        timeout = self._settings.provisioning_usage_query_seconds
        if remaining is not None:
            # Leave a little of the caller's deadline to send the answer back.
            timeout = max(remaining * 0.9 - 0.05, 0.0)
        query = hub.UsageQueryOut(
            query_id=secrets.token_hex(12),
            binding_id=binding_id,
            service_id=request.service_id,
            partner_reference=binding.partner_reference,
            deadline=utcnow() + timedelta(seconds=timeout),
        )
        source = pb.USAGE_ANSWER_SOURCE_PARTNER
        partner_error = ""
        try:
            reply = await self._relay.ask_usage(binding.partner_id, query, timeout)
        except LookupError:
            source = pb.USAGE_ANSWER_SOURCE_LAST_KNOWN_PARTNER_NOT_CONNECTED
        except TimeoutError:
            source = pb.USAGE_ANSWER_SOURCE_LAST_KNOWN_PARTNER_NO_ANSWER
        else:
            if reply.error:
                source = pb.USAGE_ANSWER_SOURCE_LAST_KNOWN_PARTNER_NO_ANSWER
                partner_error = reply.error
            else:
                async with self._db.transaction() as session:
                    await usage.save_answer(
                        session, binding_id, request.service_id, reply.figures, reply.period
                    )
                return pb.QueryDeviceUsageResponse(
                    source=source,
                    figures=[pb.UsageFigure(metric=k, quantity=q) for k, q in reply.figures],
                    period=reply.period,
                    as_of_time=timestamp(utcnow()),
                )
        async with self._db.sessions() as session:
            known = await usage.last_known(session, binding_id, request.service_id)
        return pb.QueryDeviceUsageResponse(
            source=source,
            figures=[pb.UsageFigure(metric=k, quantity=q) for k, q in known.figures],
            period=known.period,
            as_of_time=timestamp(known.as_of),
            partner_error=partner_error,
        )

    # --- internal services ---------------------------------------------

    async def QueryUsage(
        self, request: pb.QueryUsageRequest, context: Context
    ) -> pb.QueryUsageResponse:
        caller = require(CallerKind.INTERNAL, CallerKind.PARTNER)
        partner_id = caller.partner_scope(request.partner_id)
        violations = Violations()
        if not request.HasField("start_time"):
            violations.add("start_time", "required")
        if not request.HasField("end_time"):
            violations.add("end_time", "required")
        device = (
            bm.device(request.device, "device", violations) if request.HasField("device") else None
        )
        account = (
            bm.account(request.account, "account", violations)
            if request.HasField("account")
            else None
        )
        if account is not None and not partner_id:
            violations.add("partner_id", "required when filtering by account")
        binding_id = (
            bm.binding_id(request.binding_id, "binding_id", violations)
            if request.binding_id
            else None
        )
        violations.raise_if_any()
        tz = utcnow().tzinfo
        start = request.start_time.ToDatetime(tzinfo=tz)
        end = request.end_time.ToDatetime(tzinfo=tz)
        if not start < end <= start + usage.MAX_RANGE:
            raise errors.invalid("end_time", "after start_time, at most 366 days after it")
        size = paging.page_size(request.page_size)
        filters = usage.UsageFilter(
            start=start,
            end=end,
            partner_id=partner_id,
            service_id=request.service_id,
            device_digests=tuple(device.candidates(self._rt.digester)) if device else (),
            account_digests=tuple(account.candidates(self._rt.digester)) if account else (),
            binding_id=binding_id,
        )
        # The page token is tied to this exact filter.
        clean = pb.QueryUsageRequest()
        clean.CopyFrom(request)
        clean.ClearField("page_token")
        clean.ClearField("page_size")
        scope = f"usage:{clean.SerializeToString(deterministic=True).hex()}"
        after = paging.decode(scope, request.page_token)
        async with self._db.sessions() as session:
            rows = await usage.per_day(session, filters, after, size + 1)
            totals = await usage.totals(session, filters)
        token = paging.encode(scope, rows[size - 1].key()) if len(rows) > size else ""
        return pb.QueryUsageResponse(
            days=[
                pb.DailyUsage(
                    day=r.day.isoformat(),
                    partner_id=r.partner_id,
                    service_id=r.service_id,
                    metric=r.metric,
                    event_count=r.event_count,
                    quantity=r.quantity,
                )
                for r in rows[:size]
            ],
            totals=[
                pb.UsageTotal(metric=metric, event_count=count, quantity=quantity)
                for metric, count, quantity in totals
            ],
            next_page_token=token,
        )

    async def GetPipeline(
        self, request: pb.GetPipelineRequest, context: Context
    ) -> pb.GetPipelineResponse:
        caller = require(CallerKind.INTERNAL, CallerKind.PARTNER)
        partner_id = caller.partner_scope(request.partner_id)
        async with self._db.sessions() as session:
            stages = await pipeline.stages(session, partner_id)
        connected = self._hub.connected()
        if partner_id:
            connected = {partner_id: connected.get(partner_id, 0)}
        return pb.GetPipelineResponse(
            stages=[
                pb.PipelineStage(
                    partner_id=s.partner_id,
                    state=m.STATES_PB[s.state],
                    count=s.count,
                    oldest_age=m.duration(s.oldest_age),
                )
                for s in stages
            ],
            connected_streams=connected,
        )

    async def ListInstructions(
        self, request: pb.ListInstructionsRequest, context: Context
    ) -> pb.ListInstructionsResponse:
        caller = require(CallerKind.INTERNAL, CallerKind.PARTNER)
        partner_id = caller.partner_scope(request.partner_id)
        if not partner_id:
            raise errors.invalid("partner_id", "required")
        if request.state and request.state not in m.STATES:
            raise errors.invalid("state", "unknown instruction state")
        state = m.STATES.get(request.state, "")
        size = paging.page_size(request.page_size)
        scope = f"instructions:{partner_id}:{state}"
        after = paging.decode(scope, request.page_token)
        async with self._db.sessions() as session:
            rows = await pipeline.listing(session, partner_id, state, after, size + 1)
        token = paging.encode(scope, rows[size - 1].seq) if len(rows) > size else ""
        return pb.ListInstructionsResponse(
            instructions=[m.record_pb(r) for r in rows[:size]], next_page_token=token
        )

    async def ReplayInstruction(
        self, request: pb.ReplayInstructionRequest, context: Context
    ) -> pb.ReplayInstructionResponse:
        caller = require(CallerKind.INTERNAL)
        violations = Violations()
        idempotency.check_request_id(request.request_id, violations)
        instruction_id = confirmations.instruction_id_of(
            request.instruction_id, "instruction_id", violations
        )
        violations.raise_if_any()
        assert instruction_id is not None

        async def work(session: Any) -> pb.ReplayInstructionResponse:
            row = await pipeline.replay(session, self._notify, instruction_id)
            await session.flush()
            return pb.ReplayInstructionResponse(instruction=m.record_pb(row))

        once = idempotency.Once(
            self._db, caller, "ReplayInstruction", request, pb.ReplayInstructionResponse
        )
        return await once.run(work)


def register(server: grpc.aio.Server, runtime: Runtime) -> Component:
    settings = runtime.settings
    notify = wakeup.Wakeup(settings.effective_database_url)
    the_hub = hub.Hub(
        runtime.db, notify, leasing.Timing.of(settings), settings.provisioning_poll_seconds
    )
    the_relay = relay.UsageRelay(settings.effective_database_url, the_hub)
    runtime.binding_listeners.append(outbox.BindingOutbox(notify))
    service_pb2_grpc.add_ProvisioningServicer_to_server(
        ProvisioningServicer(runtime, notify, the_hub, the_relay), server
    )

    async def start() -> None:
        await notify.start()
        await the_relay.start()

    async def stop() -> None:
        notify.close_waiters()
        # First: this process's presence goes at once, so other processes
        # stop relaying usage queries to streams about to end.
        await the_relay.stop()
        await the_hub.shutdown()
        await notify.stop()

    return Component(
        services=["tether.provisioning.v1.Provisioning"],
        start=start,
        stop=stop,
        extra={"hub": the_hub, "wakeup": notify, "relay": the_relay},
    )

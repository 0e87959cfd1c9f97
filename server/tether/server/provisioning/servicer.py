"""gRPC face of tether.provisioning.v1.Provisioning: checks the caller,
translates messages (convert.py, shared/convert.py), calls the domain. The
partner stream's protocol is stream_protocol.py; a device's usage question
is usage_queries.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any

import grpc
from sqlalchemy.ext.asyncio import AsyncSession

from tether.provisioning.v1 import messages_pb2 as pb
from tether.provisioning.v1 import service_pb2, service_pb2_grpc
from tether.server import errors
from tether.server.errors import Violations
from tether.server.observability import propagation
from tether.server.provisioning import (
    confirmations,
    convert,
    entitlement_feed,
    entitlements,
    instructions,
    leasing,
    usage,
)
from tether.server.provisioning.stream_protocol import Ready, StreamProtocol, hello_missing
from tether.server.provisioning.streams import PartnerStreams
from tether.server.provisioning.usage_queries import UsageQueries
from tether.server.provisioning.wakeup import Wakeup
from tether.server.runtime import Runtime
from tether.server.shared import convert as shared_convert
from tether.server.shared.bindings import BindingReader
from tether.server.shared.subjects import Subject
from tether.server.storage.idempotency import Once
from tether.server.transport import paging, request_check
from tether.server.transport.principal import CallerKind, require
from tether.server.transport.request_check import checks_own_messages
from tether.server.transport.request_ids import check_request_id

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["Provisioning"].full_name

MAX_FETCH = 100
DEFAULT_FETCH = 10


class ProvisioningServicer(service_pb2_grpc.ProvisioningServicer):
    def __init__(
        self,
        runtime: Runtime,
        *,
        notify: Wakeup,
        streams: PartnerStreams,
        protocol: StreamProtocol,
        usage_queries: UsageQueries,
        bindings: BindingReader,
    ) -> None:
        self._db = runtime.db
        self._digester = runtime.digester
        self._settings = runtime.settings
        self._notify = notify
        self._streams = streams
        self._protocol = protocol
        self._usage_queries = usage_queries
        self._bindings = bindings
        self._timing = leasing.Timing.of(runtime.settings)
        # None unless tracing is on.
        self._delivery_spans = propagation.linked_spans("provisioning.deliver")

    def _device(self, message: Any, path: str = "device") -> Subject:
        violations = Violations()
        subject = shared_convert.device(message, path, violations)
        violations.raise_if_any()
        assert subject is not None
        return subject

    # --- partners: the stream ------------------------------------------

    @checks_own_messages
    async def Connect(
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: Context
    ) -> AsyncIterator[pb.ConnectResponse]:
        caller = require(CallerKind.PARTNER)
        first = await anext(aiter(request_iterator), None)
        # A bad hello ends the stream; later messages are answered one by one.
        request_check.check(first)
        hello = convert.hello(first) if first is not None else None
        if hello is None:
            raise hello_missing()
        async for out in self._protocol.run(caller, hello, convert.from_partner(request_iterator)):
            if isinstance(out, Ready):
                yield convert.ready_pb(out)
            else:
                for message in convert.to_partner(out):
                    yield message

    # --- partners: the unary path --------------------------------------

    async def FetchInstructions(
        self, request: pb.FetchInstructionsRequest, context: Context
    ) -> pb.FetchInstructionsResponse:
        caller = require(CallerKind.PARTNER)
        violations = Violations()
        check_request_id(request.request_id, violations)
        if not 0 <= request.max_count <= MAX_FETCH:
            violations.add("max_count", f"0-{MAX_FETCH}")
        violations.raise_if_any()
        partner_id = caller.partner_scope(request.partner_id)

        async def work(session: AsyncSession) -> pb.FetchInstructionsResponse:
            rows = await leasing.lease(
                session,
                partner_id,
                owner=f"fetch:{caller.credential_id}",
                limit=request.max_count or DEFAULT_FETCH,
                timing=self._timing,
            )
            if self._delivery_spans is not None:
                for row in rows:
                    # A mark in the fetch's span, linked to the call that wrote it.
                    self._delivery_spans.start(
                        [row.trace_parent],
                        {
                            "tether.instruction_id": str(row.instruction_id),
                            "tether.partner_id": partner_id,
                            "tether.service_id": row.service_id,
                            "tether.instruction_kind": row.kind,
                            "tether.attempt": row.attempts,
                        },
                    ).end()
            return pb.FetchInstructionsResponse(
                instructions=[convert.instruction_pb(r) for r in rows]
            )

        once = Once(self._db, caller, "FetchInstructions", request, pb.FetchInstructionsResponse)
        return await once.run(work)

    async def ConfirmInstruction(
        self, request: pb.ConfirmInstructionRequest, context: Context
    ) -> pb.ConfirmInstructionResponse:
        caller = require(CallerKind.PARTNER)
        assert caller.partner_id is not None
        violations = Violations()
        check_request_id(request.request_id, violations)
        instruction_id = confirmations.instruction_id_of(
            request.confirmation.instruction_id, "confirmation.instruction_id", violations
        )
        result = convert.result_of(request.confirmation)
        if result is None:
            violations.add("confirmation.result", "required: done or failed")
        violations.raise_if_any()
        assert instruction_id is not None and result is not None
        confirmations.check_result(result, "confirmation")
        # The confirmation itself is idempotent, so a retry needs no stored
        # answer: it is answered DUPLICATE.
        outcome, state = await self._streams.confirm(caller.partner_id, instruction_id, result)
        return pb.ConfirmInstructionResponse(
            outcome=convert.OUTCOMES_PB[outcome], state=convert.STATES_PB[state]
        )

    # --- devices -------------------------------------------------------

    async def WatchEntitlements(
        self, request: pb.WatchEntitlementsRequest, context: Context
    ) -> AsyncIterator[pb.WatchEntitlementsResponse]:
        require(CallerKind.DEVICE)
        device = self._device(request.device)
        if request.after_position < 0:
            raise errors.invalid("after_position", "0 or more")
        async for row in entitlement_feed.follow(
            self._db,
            self._notify,
            device.candidates(self._digester),
            request.after_position,
            self._settings.provisioning_poll_seconds,
        ):
            yield pb.WatchEntitlementsResponse(event=convert.event_pb(row))

    async def CheckEntitlement(
        self, request: pb.CheckEntitlementRequest, context: Context
    ) -> pb.CheckEntitlementResponse:
        caller = require(CallerKind.DEVICE, CallerKind.PARTNER, CallerKind.INTERNAL)
        violations = Violations()
        device = shared_convert.device(request.device, "device", violations)
        account = shared_convert.account(request.account, "account", violations)
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
                account.candidates(self._digester),
                device.candidates(self._digester),
            )
        if found is None:
            return pb.CheckEntitlementResponse(entitled=False)
        return pb.CheckEntitlementResponse(
            entitled=entitlements.is_usable(found),
            state=convert.ENTITLEMENTS_PB[found.state],
            binding_id=str(found.binding_id),
        )

    async def ReportUsage(
        self, request: pb.ReportUsageRequest, context: Context
    ) -> pb.ReportUsageResponse:
        caller = require(CallerKind.DEVICE, CallerKind.PARTNER)
        violations = Violations()
        check_request_id(request.request_id, violations)
        violations.raise_if_any()
        device = (
            self._device(request.device).candidates(self._digester)
            if caller.kind is CallerKind.DEVICE
            else []
        )

        async def work(session: AsyncSession) -> pb.ReportUsageResponse:
            report = convert.usage_report(request.report, "report")
            count = await usage.record_report(session, self._bindings, report, caller, device)
            return pb.ReportUsageResponse(recorded_count=count)

        once = Once(self._db, caller, "ReportUsage", request, pb.ReportUsageResponse)
        return await once.run(work)

    async def QueryDeviceUsage(
        self, request: pb.QueryDeviceUsageRequest, context: Context
    ) -> pb.QueryDeviceUsageResponse:
        caller = require(CallerKind.DEVICE, CallerKind.INTERNAL)
        violations = Violations()
        binding_id = shared_convert.binding_id(request.binding_id, "binding_id", violations)
        if not request.service_id:
            violations.add("service_id", "required")
        violations.raise_if_any()
        assert binding_id is not None
        device = (
            self._device(request.device).candidates(self._digester)
            if caller.kind is CallerKind.DEVICE
            else []
        )
        remaining = context.time_remaining()
        wait = self._settings.provisioning_usage_query_seconds
        if remaining is not None:
            # Leave a little of the caller's deadline to send the answer back.
            wait = max(remaining * 0.9 - 0.05, 0.0)
        answer = await self._usage_queries.ask(caller, device, binding_id, request.service_id, wait)
        return convert.device_usage_pb(answer)

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
            shared_convert.device(request.device, "device", violations)
            if request.HasField("device")
            else None
        )
        account = (
            shared_convert.account(request.account, "account", violations)
            if request.HasField("account")
            else None
        )
        if account is not None and not partner_id:
            violations.add("partner_id", "required when filtering by account")
        binding_id = (
            shared_convert.binding_id(request.binding_id, "binding_id", violations)
            if request.binding_id
            else None
        )
        violations.raise_if_any()
        # In range: request_check refused a Timestamp outside years 1-9999.
        start = request.start_time.ToDatetime(tzinfo=UTC)
        end = request.end_time.ToDatetime(tzinfo=UTC)
        # end - start, not start + the range: a start in the year 9999 has no room after it.
        if not (start < end and end - start <= usage.MAX_RANGE):
            raise errors.invalid("end_time", "after start_time, at most 366 days after it")
        size = paging.page_size(request.page_size)
        filters = usage.UsageFilter(
            start=start,
            end=end,
            partner_id=partner_id,
            service_id=request.service_id,
            device_digests=tuple(device.candidates(self._digester)) if device else (),
            account_digests=tuple(account.candidates(self._digester)) if account else (),
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
            stages = await instructions.stages(session, partner_id)
        connected = self._streams.connected()
        if partner_id:
            connected = {partner_id: connected.get(partner_id, 0)}
        return pb.GetPipelineResponse(
            stages=[
                pb.PipelineStage(
                    partner_id=s.partner_id,
                    state=convert.STATES_PB[s.state],
                    count=s.count,
                    oldest_age=convert.duration(s.oldest_age),
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
        if request.state and request.state not in convert.STATES:
            raise errors.invalid("state", "unknown instruction state")
        state = convert.STATES.get(request.state, "")
        size = paging.page_size(request.page_size)
        scope = f"instructions:{partner_id}:{state}"
        after = paging.decode(scope, request.page_token)
        async with self._db.sessions() as session:
            rows = await instructions.listing(session, partner_id, state, after, size + 1)
        token = paging.encode(scope, rows[size - 1].seq) if len(rows) > size else ""
        return pb.ListInstructionsResponse(
            instructions=[convert.record_pb(r) for r in rows[:size]], next_page_token=token
        )

    async def ReplayInstruction(
        self, request: pb.ReplayInstructionRequest, context: Context
    ) -> pb.ReplayInstructionResponse:
        caller = require(CallerKind.INTERNAL)
        violations = Violations()
        check_request_id(request.request_id, violations)
        instruction_id = confirmations.instruction_id_of(
            request.instruction_id, "instruction_id", violations
        )
        violations.raise_if_any()
        assert instruction_id is not None

        async def work(session: AsyncSession) -> pb.ReplayInstructionResponse:
            row = await instructions.replay(session, self._notify, instruction_id)
            await session.flush()
            return pb.ReplayInstructionResponse(instruction=convert.record_pb(row))

        once = Once(self._db, caller, "ReplayInstruction", request, pb.ReplayInstructionResponse)
        return await once.run(work)

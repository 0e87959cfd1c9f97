"""Translation between tether.provisioning.v1 messages and domain values.

Accounts, devices and binding ids are read as every area reads them
(tether.server.shared.convert).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import UTC, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from tether.common.v1.errors_pb2 import ErrorReason
from tether.provisioning.v1 import messages_pb2 as pb
from tether.server.errors import TetherError, Violations
from tether.server.provisioning import confirmations, tables, usage
from tether.server.provisioning.leasing import Delivery
from tether.server.provisioning.stream_protocol import (
    ConfirmationIn,
    FromPartner,
    Hello,
    HelloAgain,
    Ready,
    Refused,
    UsageAnswerIn,
    UsageReportIn,
)
from tether.server.provisioning.streams import ConfirmationReply, ToPartner, UsageReportRefused
from tether.server.provisioning.tables import EntitlementEvent, Instruction
from tether.server.provisioning.usage_queries import DeviceUsage, Source, UsageQueryOut, UsageReply
from tether.server.shared import convert as shared_convert
from tether.server.shared.convert import account_kind_pb
from tether.server.transport import request_check
from tether.server.transport.convert import timestamp

KINDS_PB = {tables.OPEN: pb.INSTRUCTION_KIND_OPEN, tables.CLOSE: pb.INSTRUCTION_KIND_CLOSE}
STATES_PB = {
    tables.PENDING: pb.INSTRUCTION_STATE_PENDING,
    tables.LEASED: pb.INSTRUCTION_STATE_LEASED,
    tables.CONFIRMED: pb.INSTRUCTION_STATE_CONFIRMED,
    tables.FAILED: pb.INSTRUCTION_STATE_FAILED,
    tables.DEAD: pb.INSTRUCTION_STATE_DEAD,
}
STATES = {v: k for k, v in STATES_PB.items()}
ENTITLEMENTS_PB = {
    tables.ACTIVATING: pb.ENTITLEMENT_STATE_ACTIVATING,
    tables.ACTIVE: pb.ENTITLEMENT_STATE_ACTIVE,
    tables.FAILED: pb.ENTITLEMENT_STATE_FAILED,
    tables.REVOKED: pb.ENTITLEMENT_STATE_REVOKED,
}
OUTCOMES_PB = {
    confirmations.Outcome.ACCEPTED: pb.CONFIRMATION_OUTCOME_ACCEPTED,
    confirmations.Outcome.DUPLICATE: pb.CONFIRMATION_OUTCOME_DUPLICATE,
    confirmations.Outcome.RETRY_SCHEDULED: pb.CONFIRMATION_OUTCOME_RETRY_SCHEDULED,
}


def duration(value: timedelta) -> Duration:
    result = Duration()
    result.FromTimedelta(value)
    return result


def result_of(message: pb.Confirmation) -> confirmations.Result | None:
    which = message.WhichOneof("result")
    if which == "done":
        return confirmations.Done(message.done.partner_service_reference)
    if which == "failed":
        return confirmations.Failed(message.failed.retryable, message.failed.reason)
    return None


def instruction_pb(row: Instruction | Delivery) -> pb.Instruction:
    return pb.Instruction(
        instruction_id=str(row.instruction_id),
        kind=KINDS_PB[row.kind],
        service_id=row.service_id,
        binding_id=str(row.binding_id),
        partner_reference=row.partner_reference,
        account_kind=account_kind_pb(row.account_kind),
        account_digest=row.account_digest.hex(),
        attempt=row.attempts,
        create_time=timestamp(row.create_time),
        lease_expire_time=timestamp(row.due_time) if row.state == tables.LEASED else None,
    )


def record_pb(row: Instruction) -> pb.InstructionRecord:
    return pb.InstructionRecord(
        instruction=instruction_pb(row),
        partner_id=row.partner_id,
        state=STATES_PB[row.state],
        attempts=row.attempts,
        last_error=row.last_error,
        partner_service_reference=row.partner_service_reference,
        update_time=timestamp(row.update_time),
    )


def event_pb(row: EntitlementEvent) -> pb.EntitlementEvent:
    return pb.EntitlementEvent(
        position=row.position,
        partner_id=row.partner_id,
        service_id=row.service_id,
        binding_id=str(row.binding_id),
        account_kind=account_kind_pb(row.account_kind),
        account_digest=row.account_digest.hex(),
        state=ENTITLEMENTS_PB[row.state],
        reason=row.reason,
        event_time=timestamp(row.event_time),
    )


SOURCES_PB = {
    Source.PARTNER: pb.USAGE_ANSWER_SOURCE_PARTNER,
    Source.NOT_CONNECTED: pb.USAGE_ANSWER_SOURCE_LAST_KNOWN_PARTNER_NOT_CONNECTED,
    Source.NO_ANSWER: pb.USAGE_ANSWER_SOURCE_LAST_KNOWN_PARTNER_NO_ANSWER,
}


def device_usage_pb(answer: DeviceUsage) -> pb.QueryDeviceUsageResponse:
    return pb.QueryDeviceUsageResponse(
        source=SOURCES_PB[answer.source],
        figures=[pb.UsageFigure(metric=k, quantity=q) for k, q in answer.figures],
        period=answer.period,
        as_of_time=timestamp(answer.as_of),
        partner_error=answer.partner_error,
    )


def usage_report(message: pb.UsageReport, path: str) -> usage.Report:
    """A usage report, checked; InvalidArgument with every bad field."""
    violations = Violations()
    binding_id = shared_convert.binding_id(message.binding_id, f"{path}.binding_id", violations)
    report = usage.Report(
        binding_id,
        message.service_id,
        [
            usage.Event(e.occur_time.ToDatetime(tzinfo=UTC), e.figure.metric, e.figure.quantity)
            for e in message.events
        ],
    )
    report.check(path, violations)
    violations.raise_if_any()
    return report


# --- the partner stream ------------------------------------------------------


def hello(message: pb.ConnectRequest) -> Hello | None:
    """The stream's first message as a Hello; None if it is not one."""
    if message.WhichOneof("message") != "hello":
        return None
    return Hello(message.hello.partner_id, message.hello.max_in_flight, message.hello.label)


def _malformed(message: Message, path: str) -> TetherError | None:
    """What request_check finds wrong with one message of the stream."""
    violations = Violations()
    request_check.inspect(message, path, violations)
    try:
        violations.raise_if_any()
    except TetherError as exc:
        return exc
    return None


def _confirmation_in(message: pb.Confirmation, path: str) -> ConfirmationIn | Refused:
    error = _malformed(message, path)
    if error is not None:
        return Refused(ConfirmationReply(_printable(message.instruction_id), error=error))
    return ConfirmationIn(message.instruction_id, result_of(message))


def _usage_report_in(message: pb.UsageReport) -> UsageReportIn | Refused:
    try:
        error = _malformed(message, "usage_report")
        if error is not None:
            raise error
        return UsageReportIn(usage_report(message, "usage_report"))
    except TetherError as exc:
        refused = UsageReportRefused(
            _printable(message.binding_id), _printable(message.service_id), exc
        )
        return Refused(refused)


def _printable(value: str) -> str:
    """An id echoed in an answer, without what made it unusable."""
    return value.replace("\x00", "")


async def from_partner(requests: AsyncIterator[pb.ConnectRequest]) -> AsyncIterator[FromPartner]:
    """What the partner sends after its hello, one item per confirmation.
    A malformed confirmation or usage report is refused on its own (an answer
    on the stream); the stream goes on."""
    async for request in requests:
        which = request.WhichOneof("message")
        if which == "confirmation":
            yield _confirmation_in(request.confirmation, "confirmation")
        elif which == "confirmations":
            for i, c in enumerate(request.confirmations.confirmations):
                yield _confirmation_in(c, f"confirmations.confirmations[{i}]")
        elif which == "usage_answer":
            a = request.usage_answer
            error = _malformed(a, "usage_answer")
            if error is not None:
                # The device is told the partner had no usable answer.
                reply = UsageReply([], "", f"malformed answer: {error.message}")
            else:
                reply = UsageReply([(f.metric, f.quantity) for f in a.figures], a.period, a.error)
            yield UsageAnswerIn(_printable(a.query_id), reply)
        elif which == "usage_report":
            yield _usage_report_in(request.usage_report)
        else:
            yield HelloAgain()
            return


def ready_pb(ready: Ready) -> pb.ConnectResponse:
    return pb.ConnectResponse(
        ready=pb.StreamReady(
            stream_id=ready.stream_id,
            max_in_flight=ready.max_in_flight,
            ack_deadline=duration(ready.ack_deadline),
        )
    )


def _result_pb(reply: ConfirmationReply) -> pb.ConfirmationResult:
    result = pb.ConfirmationResult(instruction_id=reply.instruction_id)
    if reply.outcome is not None:
        result.outcome = OUTCOMES_PB[reply.outcome]
    if reply.error is not None:
        result.error_reason = ErrorReason.Name(reply.error.reason)
        result.error_message = reply.error.message
    return result


def to_partner(items: Iterable[ToPartner]) -> list[pb.ConnectResponse]:
    """Stream messages for what is ready: instructions and results each in
    one message (a batch when there are several), usage queries one by one."""
    instructions: list[pb.Instruction] = []
    results: list[pb.ConfirmationResult] = []
    singles: list[pb.ConnectResponse] = []
    for item in items:
        if isinstance(item, ConfirmationReply):
            results.append(_result_pb(item))
        elif isinstance(item, UsageReportRefused):
            singles.append(
                pb.ConnectResponse(
                    usage_report_refused=pb.UsageReportRefused(
                        binding_id=item.binding_id,
                        service_id=item.service_id,
                        error_reason=ErrorReason.Name(item.error.reason),
                        error_message=item.error.message,
                    )
                )
            )
        elif isinstance(item, UsageQueryOut):
            singles.append(
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
        elif isinstance(item, Delivery):
            instructions.append(instruction_pb(item))
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
    return messages + singles

"""Translation between tether.provisioning.v1 messages and domain values.

Accounts and devices are read as the binding area reads them.
"""

from __future__ import annotations

from datetime import timedelta

from google.protobuf.duration_pb2 import Duration

from tether.common.v1 import types_pb2 as types
from tether.provisioning.v1 import messages_pb2 as pb
from tether.server.binding.convert import ACCOUNT_KINDS_PB
from tether.server.provisioning import confirmations, tables
from tether.server.provisioning.leasing import Delivery
from tether.server.provisioning.tables import EntitlementEvent, Instruction
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


def result_of(message: pb.Confirmation, path: str) -> confirmations.Result | None:
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
        account_kind=ACCOUNT_KINDS_PB.get(row.account_kind, types.ACCOUNT_KIND_UNSPECIFIED),
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
        account_kind=ACCOUNT_KINDS_PB.get(row.account_kind, types.ACCOUNT_KIND_UNSPECIFIED),
        account_digest=row.account_digest.hex(),
        state=ENTITLEMENTS_PB[row.state],
        reason=row.reason,
        event_time=timestamp(row.event_time),
    )

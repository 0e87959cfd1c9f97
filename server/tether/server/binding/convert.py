"""Translation between tether.binding.v1 messages and the domain's values."""

from __future__ import annotations

import uuid

from tether.binding.v1 import messages_pb2 as pb
from tether.common.v1 import types_pb2 as types
from tether.server.binding import subjects
from tether.server.binding.reports import Outcome, PartnerOutcome
from tether.server.shared.subjects import Subject
from tether.server.binding.tables import ACTIVE, Binding, EligibleAccount
from tether.server.errors import Violations
from tether.server.transport.convert import timestamp

ACCOUNT_KINDS: dict[types.AccountKind.ValueType, str] = {
    types.ACCOUNT_KIND_PHONE_NUMBER: "phone_number",
    types.ACCOUNT_KIND_MEMBER_ID: "member_id",
    types.ACCOUNT_KIND_EMAIL: "email",
    types.ACCOUNT_KIND_SOCIAL_ID: "social_id",
    types.ACCOUNT_KIND_LOGIN_ID: "login_id",
}
ACCOUNT_KINDS_PB = {v: k for k, v in ACCOUNT_KINDS.items()}
TERMINAL_ID_KINDS: dict[types.TerminalIdKind.ValueType, str] = {
    types.TERMINAL_ID_KIND_IMEI: "imei",
    types.TERMINAL_ID_KIND_MEID: "meid",
    types.TERMINAL_ID_KIND_SERIAL_NUMBER: "serial_number",
}
OUTCOMES = {
    Outcome.BOUND: pb.REPORT_OUTCOME_BOUND,
    Outcome.ALREADY_BOUND: pb.REPORT_OUTCOME_ALREADY_BOUND,
    Outcome.NOT_ELIGIBLE: pb.REPORT_OUTCOME_NOT_ELIGIBLE,
    Outcome.BOUND_TO_OTHER_DEVICE: pb.REPORT_OUTCOME_BOUND_TO_OTHER_DEVICE,
    Outcome.MOVED: pb.REPORT_OUTCOME_MOVED,
}


def account(message: types.Account, path: str, violations: Violations) -> Subject | None:
    kind = ACCOUNT_KINDS.get(message.kind, "")
    return subjects.account(kind, message.value, message.region_hint, path, violations)


def device(message: types.Device, path: str, violations: Violations) -> Subject | None:
    kind = TERMINAL_ID_KINDS.get(message.kind, "")
    return subjects.device(kind, message.terminal_id, path, violations)


def binding_id(value: str, path: str, violations: Violations) -> uuid.UUID | None:
    if not value:
        violations.add(path, "required")
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        violations.add(path, "not a binding id (a UUID)")
        return None


def binding_pb(row: Binding) -> pb.AccountBinding:
    return pb.AccountBinding(
        binding_id=str(row.binding_id),
        partner_id=row.partner_id,
        account_kind=ACCOUNT_KINDS_PB.get(row.account_kind, types.ACCOUNT_KIND_UNSPECIFIED),
        account_digest=row.account_digest.hex(),
        device_digest=row.device_digest.hex(),
        key_id=row.key_id,
        partner_reference=row.partner_reference,
        state=pb.BINDING_STATE_ACTIVE if row.state == ACTIVE else pb.BINDING_STATE_REVOKED,
        create_time=timestamp(row.create_time),
        revoke_time=timestamp(row.revoke_time),
    )


def outcome_pb(outcome: PartnerOutcome) -> pb.PartnerOutcome:
    return pb.PartnerOutcome(
        partner_id=outcome.partner_id,
        outcome=OUTCOMES[outcome.outcome],
        binding=binding_pb(outcome.binding) if outcome.binding is not None else None,
    )


def entry_pb(row: EligibleAccount) -> pb.EligibleAccount:
    return pb.EligibleAccount(
        entry_id=str(row.entry_id),
        account_kind=ACCOUNT_KINDS_PB.get(row.account_kind, types.ACCOUNT_KIND_UNSPECIFIED),
        account_digest=row.account_digest.hex(),
        partner_reference=row.partner_reference,
        create_time=timestamp(row.create_time),
    )

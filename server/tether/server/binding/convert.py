"""Translation between tether.binding.v1 messages and the domain's values.

Accounts, devices and binding ids are read as every area reads them
(tether.server.shared.convert).
"""

from __future__ import annotations

from collections.abc import Sequence

from tether.binding.v1 import messages_pb2 as pb
from tether.server.binding.importer import RawEntry
from tether.server.binding.reports import Outcome, PartnerOutcome
from tether.server.binding.tables import ACTIVE, Binding, EligibleAccount
from tether.server.shared.convert import ACCOUNT_KINDS, account_kind_pb
from tether.server.transport.convert import timestamp

OUTCOMES = {
    Outcome.BOUND: pb.REPORT_OUTCOME_BOUND,
    Outcome.ALREADY_BOUND: pb.REPORT_OUTCOME_ALREADY_BOUND,
    Outcome.NOT_ELIGIBLE: pb.REPORT_OUTCOME_NOT_ELIGIBLE,
    Outcome.BOUND_TO_OTHER_DEVICE: pb.REPORT_OUTCOME_BOUND_TO_OTHER_DEVICE,
    Outcome.MOVED: pb.REPORT_OUTCOME_MOVED,
}


def binding_pb(row: Binding) -> pb.AccountBinding:
    return pb.AccountBinding(
        binding_id=str(row.binding_id),
        partner_id=row.partner_id,
        account_kind=account_kind_pb(row.account_kind),
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


def report_response(outcomes: Sequence[PartnerOutcome]) -> pb.ReportAccountUseResponse:
    return pb.ReportAccountUseResponse(outcomes=[outcome_pb(o) for o in outcomes])


def entry_pb(row: EligibleAccount) -> pb.EligibleAccount:
    return pb.EligibleAccount(
        entry_id=str(row.entry_id),
        account_kind=account_kind_pb(row.account_kind),
        account_digest=row.account_digest.hex(),
        partner_reference=row.partner_reference,
        create_time=timestamp(row.create_time),
    )


def import_batch(items: Sequence[pb.EligibleAccountEntry]) -> list[RawEntry]:
    """The entries of one import batch as plain values (checked by the importer)."""
    kinds = ACCOUNT_KINDS
    return [
        (
            kinds.get(e.account.kind, ""),
            e.account.value,
            e.account.region_hint,
            e.partner_reference,
        )
        for e in items
    ]

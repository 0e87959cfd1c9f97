"""Translation between tether.admin.v1 messages and the domain's values."""

from __future__ import annotations

from tether.admin.v1 import messages_pb2 as pb
from tether.server.errors import Violations
from tether.server.shared.partners import Partner, PresetService
from tether.server.transport.convert import timestamp
from tether.server.transport.credentials import Credential
from tether.server.transport.principal import CallerKind

POLICIES_PB = {"refuse": pb.REBIND_POLICY_REFUSE, "move": pb.REBIND_POLICY_MOVE}
POLICIES = {
    pb.REBIND_POLICY_UNSPECIFIED: "refuse",
    pb.REBIND_POLICY_REFUSE: "refuse",
    pb.REBIND_POLICY_MOVE: "move",
}
KINDS = {
    pb.CREDENTIAL_KIND_DEVICE: CallerKind.DEVICE,
    pb.CREDENTIAL_KIND_PARTNER: CallerKind.PARTNER,
    pb.CREDENTIAL_KIND_INTERNAL: CallerKind.INTERNAL,
    pb.CREDENTIAL_KIND_ADMIN: CallerKind.ADMIN,
}
KINDS_PB = {v: k for k, v in KINDS.items()}


def partner_pb(row: Partner) -> pb.Partner:
    return pb.Partner(
        partner_id=row.partner_id,
        display_name=row.display_name,
        rebind_policy=POLICIES_PB[row.rebind_policy],
        create_time=timestamp(row.create_time),
    )


def service_pb(row: PresetService) -> pb.Service:
    return pb.Service(
        partner_id=row.partner_id,
        service_id=row.service_id,
        display_name=row.display_name,
        description=row.description,
        create_time=timestamp(row.create_time),
    )


def credential_pb(row: Credential) -> pb.Credential:
    return pb.Credential(
        credential_id=row.credential_id,
        kind=KINDS_PB[CallerKind(row.kind)],
        partner_id=row.partner_id or "",
        label=row.label,
        create_time=timestamp(row.create_time),
        revoke_time=timestamp(row.revoke_time),
        client_subject=row.client_subject or "",
    )


def policy(value: int, path: str) -> str:
    if value not in POLICIES:
        violations = Violations()
        violations.add(path, "unknown rebind policy")
        violations.raise_if_any()
    return POLICIES[value]  # type: ignore[index]

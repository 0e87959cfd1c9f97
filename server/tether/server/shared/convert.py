"""tether.common.v1 messages (Account, Device) to shared domain values.

Every area reads accounts and devices the same way; bad fields are
collected into a Violations, so a caller sees them all.
"""

from __future__ import annotations

import uuid

from tether.common.v1 import types_pb2 as types
from tether.server.errors import Violations
from tether.server.shared import subjects
from tether.server.shared.subjects import Subject

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


def account_kind_pb(kind: str) -> types.AccountKind.ValueType:
    return ACCOUNT_KINDS_PB.get(kind, types.ACCOUNT_KIND_UNSPECIFIED)


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

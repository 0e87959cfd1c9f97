"""Names of account and terminal id kinds, as the command-line tools spell them."""

from __future__ import annotations

from tether.common.v1 import types_pb2 as types

ACCOUNT_KINDS: dict[str, types.AccountKind.ValueType] = {
    "phone_number": types.ACCOUNT_KIND_PHONE_NUMBER,
    "member_id": types.ACCOUNT_KIND_MEMBER_ID,
    "email": types.ACCOUNT_KIND_EMAIL,
    "social_id": types.ACCOUNT_KIND_SOCIAL_ID,
    "login_id": types.ACCOUNT_KIND_LOGIN_ID,
}
ACCOUNT_KIND_NAMES = {v: k for k, v in ACCOUNT_KINDS.items()}
# The server names the account's region hint; the commands' flag is --region.
ACCOUNT_FLAGS = {"region_hint": "--region"}

TERMINAL_ID_KINDS: dict[str, types.TerminalIdKind.ValueType] = {
    "imei": types.TERMINAL_ID_KIND_IMEI,
    "meid": types.TERMINAL_ID_KIND_MEID,
    "serial_number": types.TERMINAL_ID_KIND_SERIAL_NUMBER,
}


def account(kind: str, value: str, region_hint: str = "") -> types.Account:
    """An Account; an unknown kind is sent as unspecified for the server to reject."""
    return types.Account(
        kind=ACCOUNT_KINDS.get(kind.strip().lower(), types.ACCOUNT_KIND_UNSPECIFIED),
        value=value,
        region_hint=region_hint,
    )


def device(kind: str, terminal_id: str) -> types.Device:
    return types.Device(kind=TERMINAL_ID_KINDS[kind], terminal_id=terminal_id)

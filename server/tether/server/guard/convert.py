"""Between tether.guard.v1 messages and the guard's domain values."""

from __future__ import annotations

import hashlib

from tether.common.v1 import types_pb2
from tether.guard.v1 import messages_pb2 as pb
from tether.server.errors import Violations
from tether.server.guard.identity import Components
from tether.server.guard.policies import ENFORCE, FAIL_CLOSED, FAIL_OPEN, SHADOW, Policy
from tether.server.guard.service import AccountRef, Action, Reason, Verdict
from tether.server.guard.tables import GuardLink
from tether.server.transport.convert import timestamp, timestamp_of_ms

_ACCOUNT_KINDS = {
    types_pb2.ACCOUNT_KIND_PHONE_NUMBER: "phone_number",
    types_pb2.ACCOUNT_KIND_MEMBER_ID: "member_id",
    types_pb2.ACCOUNT_KIND_EMAIL: "email",
    types_pb2.ACCOUNT_KIND_SOCIAL_ID: "social_id",
    types_pb2.ACCOUNT_KIND_LOGIN_ID: "login_id",
}
ACTIONS = {
    pb.ACTION_REGISTER: Action.REGISTER,
    pb.ACTION_LOGIN: Action.LOGIN,
    pb.ACTION_COLLABORATE: Action.COLLABORATE,
}
_ACTIONS_PB = {v.value: k for k, v in ACTIONS.items()}
_REASONS = {
    Reason.WITHIN_LIMIT: pb.VERDICT_REASON_WITHIN_LIMIT,
    Reason.ALREADY_COUNTED: pb.VERDICT_REASON_ALREADY_COUNTED,
    Reason.REGISTER_LIMIT: pb.VERDICT_REASON_REGISTER_LIMIT,
    Reason.LOGIN_LIMIT: pb.VERDICT_REASON_LOGIN_LIMIT,
    Reason.COLLABORATE_LIMIT: pb.VERDICT_REASON_COLLABORATE_LIMIT,
    Reason.ACCOUNT_ALLOW_LISTED: pb.VERDICT_REASON_ACCOUNT_ALLOW_LISTED,
    Reason.IDENTITY_ALLOW_LISTED: pb.VERDICT_REASON_IDENTITY_ALLOW_LISTED,
    Reason.COUNTERS_UNAVAILABLE: pb.VERDICT_REASON_COUNTERS_UNAVAILABLE,
}
_MODES = {pb.MODE_UNSPECIFIED: ENFORCE, pb.MODE_ENFORCE: ENFORCE, pb.MODE_SHADOW: SHADOW}
_MODES_PB = {ENFORCE: pb.MODE_ENFORCE, SHADOW: pb.MODE_SHADOW}
_FAILURES = {
    pb.REDIS_FAILURE_UNSPECIFIED: FAIL_OPEN,
    pb.REDIS_FAILURE_FAIL_OPEN: FAIL_OPEN,
    pb.REDIS_FAILURE_FAIL_CLOSED: FAIL_CLOSED,
}
_FAILURES_PB = {FAIL_OPEN: pb.REDIS_FAILURE_FAIL_OPEN, FAIL_CLOSED: pb.REDIS_FAILURE_FAIL_CLOSED}


def account(message: types_pb2.Account, present: bool) -> AccountRef | None:
    """None when absent; an unknown kind gives a kind the validator rejects."""
    if not present:
        return None
    kind = _ACCOUNT_KINDS.get(message.kind, f"unknown ({message.kind})")
    return AccountRef(kind, message.value, message.region_hint)


def components(message: pb.FingerprintComponents, present: bool) -> Components | None:
    if not present:
        return None
    return Components(
        browser_name=message.browser_name,
        browser_version=message.browser_version,
        os_name=message.os_name,
        os_version=message.os_version,
        screen_width=message.screen_width,
        screen_height=message.screen_height,
        pixel_ratio=message.pixel_ratio,
        color_depth=message.color_depth,
        fonts=list(message.fonts),
        plugins=list(message.plugins),
        languages=list(message.languages),
        timezone=message.timezone,
        platform=message.platform,
        extra=dict(message.extra),
    )


def components_key(message: pb.FingerprintComponents) -> bytes:
    """What IdentityCache keys on: a digest of the deterministic serialization."""
    serialized = message.SerializeToString(deterministic=True)
    return hashlib.blake2b(serialized, digest_size=16).digest() if serialized else b""


def verdict(value: Verdict) -> pb.EvaluateResponse:
    return pb.EvaluateResponse(
        verdict=pb.VERDICT_ALLOW if value.allowed else pb.VERDICT_DENY,
        reason=_REASONS[value.reason],
        identity=value.identity,
        count=value.counted,
        limit=value.limit,
        would_deny=value.would_deny,
        fail_open=value.fail_open,
        expire_time=timestamp_of_ms(value.expire_ms),
    )


def policy_pb(value: Policy) -> pb.Policy:
    return pb.Policy(
        service_id=value.service_id,
        mode=_MODES_PB[value.mode],
        register_limit=value.register_limit,
        register_window_seconds=value.register_window_seconds,
        login_limit=value.login_limit,
        login_session_seconds=value.login_session_seconds,
        collaborate_limit=value.collaborate_limit,
        room_membership_seconds=value.room_membership_seconds,
        redis_failure=_FAILURES_PB[value.redis_failure],
        allowed_account_digests=list(value.allowed_account_digests),
        allowed_identities=list(value.allowed_identities),
        update_time=timestamp(value.update_time),
    )


def policy_fields(message: pb.Policy, v: Violations) -> dict[str, object]:
    """The settable fields of a Policy message, as domain values."""
    if message.mode not in _MODES:
        v.add("policy.mode", "unknown mode")
    if message.redis_failure not in _FAILURES:
        v.add("policy.redis_failure", "unknown Redis failure behaviour")
    return {
        "service_id": message.service_id,
        "mode": _MODES.get(message.mode, ENFORCE),
        "register_limit": message.register_limit,
        "register_window_seconds": message.register_window_seconds,
        "login_limit": message.login_limit,
        "login_session_seconds": message.login_session_seconds,
        "collaborate_limit": message.collaborate_limit,
        "room_membership_seconds": message.room_membership_seconds,
        "redis_failure": _FAILURES.get(message.redis_failure, FAIL_OPEN),
        "allowed_identities": tuple(message.allowed_identities),
    }


def link_pb(row: GuardLink) -> pb.IdentityLink:
    return pb.IdentityLink(
        identity=row.identity,
        account_digest=row.account_digest.hex(),
        service_id=row.service_id,
        last_action=_ACTIONS_PB.get(row.last_action, pb.ACTION_UNSPECIFIED),
        first_seen_time=timestamp(row.first_seen_time),
        last_seen_time=timestamp(row.last_seen_time),
    )

"""Between tether.guard.v1 messages and the guard's domain values."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from tether.common.v1 import types_pb2
from tether.guard.v1 import messages_pb2 as pb
from tether.server.errors import Violations
from tether.server.guard.backtest import Counts, Summary
from tether.server.guard.backtest import Event as BacktestEvent
from tether.server.guard.corrections import IdentityView
from tether.server.guard.decide import EXPLANATIONS_KEPT, Explanation
from tether.server.guard.fingerprint import Components, remember
from tether.server.guard.identities import Link, LinkKind
from tether.server.guard.policies import ENFORCE, FAIL_CLOSED, FAIL_OPEN, SHADOW, Policy
from tether.server.guard.service import AccountRef, Action, EvaluateCall, Reason, Verdict
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
        fonts=tuple(message.fonts),
        plugins=tuple(message.plugins),
        languages=tuple(message.languages),
        timezone=message.timezone,
        platform=message.platform,
        extra=_dict(message.extra),
    )


def _dict(message_map: Mapping[str, str]) -> dict[str, str]:
    """A protobuf map as a dict: read key by key, in half the time of
    dict(map), which goes through the abstract Mapping's views."""
    return {key: message_map[key] for key in message_map}


def components_key(message: pb.FingerprintComponents) -> bytes:
    """What FingerprintCache keys on: a digest of the deterministic serialization."""
    serialized = message.SerializeToString(deterministic=True)
    return hashlib.blake2b(serialized, digest_size=16).digest() if serialized else b""


def verdict(value: Verdict) -> pb.EvaluateResponse:
    response = pb.EvaluateResponse(
        verdict=pb.VERDICT_ALLOW if value.allowed else pb.VERDICT_DENY,
        reason=_REASONS[value.reason],
        identity=value.identity,
        count=value.counted,
        limit=value.limit,
        would_deny=value.would_deny,
        fail_open=value.fail_open,
        expire_time=timestamp_of_ms(value.expire_ms),
    )
    if value.explanation is not None:
        response.explanation.CopyFrom(_explanation(value.explanation))
    return response


_LINK_KINDS = {
    LinkKind.DRIFT_SAME_NETWORK: pb.LINK_KIND_DRIFT_SAME_NETWORK,
    LinkKind.DRIFT_BURST: pb.LINK_KIND_DRIFT_BURST,
    LinkKind.PROFILE: pb.LINK_KIND_PROFILE,
    LinkKind.MERGE: pb.LINK_KIND_MERGE,
    LinkKind.OPERATOR_MERGE: pb.LINK_KIND_OPERATOR_MERGE,
    LinkKind.FARM_RETURN: pb.LINK_KIND_FARM_RETURN,
}
_SCOPES = {
    "browser": pb.SCOPE_BROWSER,
    "network": pb.SCOPE_NETWORK,
    "velocity": pb.SCOPE_VELOCITY,
}


def link(value: Link) -> pb.FingerprintLink:
    return pb.FingerprintLink(
        kind=_LINK_KINDS.get(value.kind, pb.LINK_KIND_UNSPECIFIED),
        to=value.target,
        confidence=value.confidence,
        changed=list(value.changed),
        create_time=timestamp_of_ms(int(value.time * 1000)),
        **{"from": value.source},
    )


# Explanations' messages, kept by value: a returning browser's calls repeat
# theirs, and copying a kept message costs a third of filling one in.
_EXPLANATIONS: dict[Explanation, pb.Explanation] = {}


def _explanation(value: Explanation) -> pb.Explanation:
    """The explanation's message (kept: not to be changed)."""
    message = _EXPLANATIONS.get(value)
    if message is not None:
        return message
    message = pb.Explanation(fingerprint=value.fingerprint)
    if value.links:
        message.links.extend([link(item) for item in value.links])
    message.scope = _SCOPES.get(value.scope, pb.SCOPE_UNSPECIFIED)
    message.scope_count = value.scope_count
    message.scope_threshold = value.scope_threshold
    add = message.signals.add
    for s in value.signals:
        add(name=s.name, value=s.value, threshold=s.threshold, fired=s.fired)
    message.risk = value.risk
    return remember(_EXPLANATIONS, value, message, EXPLANATIONS_KEPT)


def identity_view(value: IdentityView) -> pb.ExplainIdentityResponse:
    return pb.ExplainIdentityResponse(
        identity=value.identity,
        fingerprints=[
            pb.IdentityFingerprint(
                fingerprint=member.fingerprint,
                link=None if member.link is None else link(member.link),
                first_seen_time=timestamp_of_ms(int(member.first_seen * 1000)),
                last_seen_time=timestamp_of_ms(int(member.last_seen * 1000)),
            )
            for member in value.members
        ],
        merges=[link(item) for item in value.merges],
        popularity=value.popularity,
    )


_LABELS = {pb.LABEL_LEGITIMATE: "legitimate", pb.LABEL_ABUSIVE: "abusive"}


def evaluate_call(request: pb.EvaluateRequest) -> EvaluateCall:
    message = request.components
    present = request.HasField("components")
    return EvaluateCall(
        request.service_id,
        ACTIONS.get(request.action),
        account(request.account, request.HasField("account")),
        request.room_id,
        # Converted only when the fingerprint cache does not know them.
        lambda: components(message, present),
        request.client_ip,
        components_key(message),
    )


def backtest_event(message: pb.BacktestEvent) -> BacktestEvent:
    """A backtest event; its own checks (time, attributes) are the caller's."""
    time_seconds = message.event_time.seconds + message.event_time.nanos / 1e9
    return BacktestEvent(
        call=evaluate_call(message.request),
        time=time_seconds,
        label=_LABELS.get(message.label, ""),
        actor=message.actor,
        attributes=_dict(message.attributes),
    )


def backtest_counts(value: Counts) -> pb.BacktestCounts:
    return pb.BacktestCounts(
        events=value.events,
        allowed=value.allowed,
        refused=value.refused,
        legitimate=value.legitimate,
        false_refusals=value.false_refusals,
        abusive=value.abusive,
        excess=value.excess,
        caught=value.caught,
        false_refusals_within_limit=value.false_refusals_within_limit,
    )


def backtest_summary(value: Summary) -> pb.BacktestSummary:
    return pb.BacktestSummary(
        total=backtest_counts(value.total),
        groups=[
            pb.BacktestGroup(attribute=name, value=item, counts=backtest_counts(counts))
            for (name, item), counts in sorted(value.groups.items())
        ],
        rejected=value.rejected,
        seconds=value.seconds,
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

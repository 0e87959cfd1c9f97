"""A thin client of tether.guard.v1.FingerprintGuard for internal callers and
web front-ends' back-ends. Methods take plain values and return the
generated messages; errors surface as grpc.aio.AioRpcError (read them with
tether.clients.errors.details_of)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf import field_mask_pb2, json_format

from tether.clients.paging import every
from tether.common.v1 import types_pb2
from tether.guard.v1 import messages_pb2 as pb
from tether.guard.v1.service_pb2_grpc import FingerprintGuardStub

_V = TypeVar("_V")

# Backtest events sent per message.
BACKTEST_BATCH = 200

ACTIONS = {
    "register": pb.ACTION_REGISTER,
    "login": pb.ACTION_LOGIN,
    "collaborate": pb.ACTION_COLLABORATE,
}
ACCOUNT_KINDS = {
    "phone_number": types_pb2.ACCOUNT_KIND_PHONE_NUMBER,
    "member_id": types_pb2.ACCOUNT_KIND_MEMBER_ID,
    "email": types_pb2.ACCOUNT_KIND_EMAIL,
    "social_id": types_pb2.ACCOUNT_KIND_SOCIAL_ID,
    "login_id": types_pb2.ACCOUNT_KIND_LOGIN_ID,
}


def account(value: str, kind: str = "login_id", region_hint: str = "") -> types_pb2.Account:
    return types_pb2.Account(kind=ACCOUNT_KINDS[kind], value=value, region_hint=region_hint)


def components(fields: Mapping[str, Any]) -> pb.FingerprintComponents:
    """Components from a dict keyed by proto field names (what collector.js sends)."""
    return json_format.ParseDict(dict(fields), pb.FingerprintComponents())


class GuardClient:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = FingerprintGuardStub(channel)

    async def evaluate(
        self,
        service_id: str,
        action: str,
        account: types_pb2.Account,
        fingerprint: pb.FingerprintComponents,
        client_ip: str,
        *,
        room_id: str = "",
    ) -> pb.EvaluateResponse:
        return await self.stub.Evaluate(
            pb.EvaluateRequest(
                service_id=service_id,
                action=ACTIONS[action],
                account=account,
                components=fingerprint,
                client_ip=client_ip,
                room_id=room_id,
            )
        )

    async def cancel_registration(
        self, service_id: str, identity: str, account: types_pb2.Account
    ) -> bool:
        response = await self.stub.CancelRegistration(
            pb.CancelRegistrationRequest(service_id=service_id, identity=identity, account=account)
        )
        return response.cancelled

    async def end_login(self, service_id: str, identity: str, account: types_pb2.Account) -> bool:
        response = await self.stub.EndLogin(
            pb.EndLoginRequest(service_id=service_id, identity=identity, account=account)
        )
        return response.ended

    async def renew_login(
        self, service_id: str, identity: str, account: types_pb2.Account
    ) -> pb.RenewLoginResponse:
        return await self.stub.RenewLogin(
            pb.RenewLoginRequest(service_id=service_id, identity=identity, account=account)
        )

    async def leave_room(
        self, service_id: str, room_id: str, identity: str, account: types_pb2.Account
    ) -> bool:
        response = await self.stub.LeaveRoom(
            pb.LeaveRoomRequest(
                service_id=service_id, room_id=room_id, identity=identity, account=account
            )
        )
        return response.left

    async def get_policy(self, service_id: str) -> pb.Policy:
        return (await self.stub.GetPolicy(pb.GetPolicyRequest(service_id=service_id))).policy

    def list_policies(self) -> AsyncIterator[pb.Policy]:
        return every(
            lambda token: self.stub.ListPolicies(
                pb.ListPoliciesRequest(page_size=500, page_token=token)
            ),
            lambda page: page.policies,
        )

    async def set_policy(
        self,
        policy: pb.Policy,
        *,
        only: Iterable[str] = (),
        allowed_accounts: Iterable[types_pb2.Account] = (),
    ) -> pb.Policy:
        """Replaces the policy, or with `only` changes just the named fields."""
        response = await self.stub.SetPolicy(
            pb.SetPolicyRequest(
                policy=policy,
                allowed_accounts=list(allowed_accounts),
                update_mask=field_mask_pb2.FieldMask(paths=list(only)),
            )
        )
        return response.policy

    def identity_accounts(
        self, identity: str, service_id: str = ""
    ) -> AsyncIterator[pb.IdentityLink]:
        """Every link of an identity, newest first, page after page."""
        return every(
            lambda token: self.stub.ListIdentityAccounts(
                pb.ListIdentityAccountsRequest(
                    identity=identity, service_id=service_id, page_size=500, page_token=token
                )
            ),
            lambda page: page.links,
        )

    def account_identities(
        self, account: types_pb2.Account, service_id: str = ""
    ) -> AsyncIterator[pb.IdentityLink]:
        """Every link of an account, newest first, page after page."""
        return every(
            lambda token: self.stub.ListAccountIdentities(
                pb.ListAccountIdentitiesRequest(
                    account=account, service_id=service_id, page_size=500, page_token=token
                )
            ),
            lambda page: page.links,
        )

    async def rebuild(self, service_id: str = "") -> int:
        response = await self.stub.RebuildCounters(pb.RebuildCountersRequest(service_id=service_id))
        return response.entries_restored

    async def explain_identity(self, identity: str) -> pb.ExplainIdentityResponse:
        """An identity's fingerprints, how each was linked, and its merges."""
        return await self.stub.ExplainIdentity(pb.ExplainIdentityRequest(identity=identity))

    async def unlink(self, fingerprint: str, reason: str = "") -> pb.UnlinkFingerprintResponse:
        """Splits a fingerprint from the identity a link tied it to."""
        return await self.stub.UnlinkFingerprint(
            pb.UnlinkFingerprintRequest(fingerprint=fingerprint, reason=reason)
        )

    async def merge(self, identity: str, other: str, reason: str = "") -> str:
        """Joins `other` into `identity`; returns the identity both resolve to."""
        response = await self.stub.MergeIdentities(
            pb.MergeIdentitiesRequest(identity=identity, other=other, reason=reason)
        )
        return response.identity

    def backtest(
        self,
        start: pb.BacktestStart,
        events: AsyncIterable[pb.BacktestEvent] | Iterable[pb.BacktestEvent],
    ) -> AsyncIterator[pb.BacktestResponse]:
        """Replays events against start.policy: per-event verdicts when
        start.verdicts is set, then one summary."""

        async def requests() -> AsyncIterator[pb.BacktestRequest]:
            yield pb.BacktestRequest(start=start)
            # Many events per message: a message costs more than an event.
            batch: list[pb.BacktestEvent] = []
            async for event in _each(events):
                batch.append(event)
                if len(batch) >= BACKTEST_BATCH:
                    yield pb.BacktestRequest(events=pb.BacktestEvents(events=batch))
                    batch = []
            if batch:
                yield pb.BacktestRequest(events=pb.BacktestEvents(events=batch))

        async def responses() -> AsyncIterator[pb.BacktestResponse]:
            async for response in self.stub.Backtest(requests()):
                yield response

        return responses()


async def _each(
    events: AsyncIterable[pb.BacktestEvent] | Iterable[pb.BacktestEvent],
) -> AsyncIterator[pb.BacktestEvent]:
    if isinstance(events, AsyncIterable):
        async for event in events:
            yield event
    else:
        for event in events:
            yield event


_COMPONENT_FIELDS = frozenset(pb.FingerprintComponents.DESCRIPTOR.fields_by_name)
_EVENT_KEYS = frozenset(
    {"service_id", "action", "account", "components", "client_ip", "room_id", "event_time",
     "label", "actor"}
)  # fmt: skip
LABELS = {"legitimate": pb.LABEL_LEGITIMATE, "abusive": pb.LABEL_ABUSIVE, "": pb.LABEL_UNSPECIFIED}


class EventError(ValueError):
    """A record that is no backtest event; the message names the field."""


def backtest_event(record: Any) -> pb.BacktestEvent:
    """A backtest event from one JSON record: the EvaluateRequest's fields
    (components by proto field name, account as {"kind", "value"} or a
    login id), event_time (Unix seconds or RFC 3339), label ("legitimate"
    or "abusive") and actor; any other key becomes an attribute. A record
    that is none of this raises EventError, saying which field is wrong."""
    if not isinstance(record, Mapping):
        raise EventError(f"an event is a JSON object, not {_json_type(record)}")
    event = pb.BacktestEvent(
        request=pb.EvaluateRequest(
            service_id=str(record.get("service_id", "")),
            action=_one_of("action", record.get("action", "register"), ACTIONS),
            account=_event_account(record.get("account", "")),
            components=_event_components(record.get("components", {})),
            client_ip=str(record.get("client_ip", "")),
            room_id=str(record.get("room_id", "")),
        ),
        label=_one_of("label", record.get("label", ""), LABELS),
        actor=str(record.get("actor", "")),
        attributes={k: str(v) for k, v in record.items() if k not in _EVENT_KEYS},
    )
    _set_event_time(event, record.get("event_time"))
    return event


def _json_type(value: Any) -> str:
    """What a JSON value is, in JSON's words."""
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return "a number"
    return "null" if value is None else type(value).__name__


def _one_of(name: str, value: Any, choices: Mapping[str, _V]) -> _V:
    if isinstance(value, str) and value in choices:
        return choices[value]
    named = ", ".join(repr(choice) for choice in choices if choice)
    raise EventError(f"{name}: {value!r} is not one of {named}")


def _event_account(raw: Any) -> types_pb2.Account:
    if not isinstance(raw, Mapping):
        return account(str(raw))
    kind = raw.get("kind", "login_id")
    if not isinstance(kind, str) or kind not in ACCOUNT_KINDS:
        raise EventError(f"account.kind: {kind!r} is not one of {', '.join(ACCOUNT_KINDS)}")
    return account(str(raw.get("value", "")), kind, str(raw.get("region_hint", "")))


def _event_components(fields: Any) -> pb.FingerprintComponents:
    if fields is None:
        fields = {}  # null, as if absent: the server says they are required
    if not isinstance(fields, Mapping):
        raise EventError(
            f"components: a JSON object of proto field names, not {_json_type(fields)}"
        )
    unknown = set(fields) - _COMPONENT_FIELDS
    if unknown:
        raise EventError(f"unknown component fields: {', '.join(sorted(unknown))}")
    try:
        return pb.FingerprintComponents(**fields)
    except (TypeError, ValueError):
        pass
    # What the constructor refuses, the JSON mapping may take (1920.0 for
    # an integer, as guard evaluate --components does), or says why not.
    try:
        return components(fields)
    except json_format.ParseError as error:
        raise EventError(f"components: {error}") from None


def _set_event_time(event: pb.BacktestEvent, when: Any) -> None:
    if isinstance(when, str):
        try:
            event.event_time.FromJsonString(when)
        except ValueError as error:
            raise EventError(f"event_time: {error}") from None
        return
    if when is None:
        raise EventError("event_time is required: Unix seconds or an RFC 3339 time")
    if isinstance(when, bool) or not isinstance(when, int | float):
        raise EventError(f"event_time: Unix seconds or an RFC 3339 time, not {_json_type(when)}")
    if not math.isfinite(when):
        raise EventError(f"event_time: {when} is not a time")
    try:
        event.event_time.FromNanoseconds(int(when * 1e9))
    except (ValueError, OverflowError) as error:
        raise EventError(f"event_time: {error}") from None
